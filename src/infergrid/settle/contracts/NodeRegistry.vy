# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid NodeRegistry
@notice Miners, verifiers and gateways register here with a stake. Gateways discover miners
        by paging through the node list; a slasher contract (the dispute manager) takes stake
        from nodes that cheated. Stake leaves only through a delayed unbonding so that it
        stays slashable for everything the node was paid for.
@dev Payments out are pull payments: withdraw() for a node's own unbonded stake, claim() for
     slashed stake credited to a recipient. The slasher may also freeze a node while a dispute
     about it is open: a frozen node cannot unbond, deregister, withdraw or change its details,
     so the stake the dispute may take cannot leave first. Freezing does not change `active`;
     gateways skip frozen nodes themselves (NodeView.frozen).

     What a node did stays answerable after it changes: a key it replaces stays `was_signer`
     for one unbonding delay (rotating keys escapes no slash); its role cannot change while
     the old role's funds unbond (a miner cannot become a gateway that disputes miss); its
     bonded stake is checkpointed (`stake_at`, `registered_at`: votes weigh stake from before
     a dispute). The admin (lib/two_step_admin.vy) names the slasher once and never again.

     Early miners: a miner whose current registration began within `early_period` seconds of
     the deployment (`genesis`) earns `early_multiplier_ppm` on its epoch rewards until the
     period ends, decaying linearly to 1x over the next `early_decay` seconds
     (`early_multiplier_at`). Fixed at deployment, readable by anyone. Registering again
     resets `registered_at`, so a node that leaves gives its multiplier up and no later
     registration can earn one: the bonus goes to stake that stayed from the start.
"""

from lib import two_step_admin

initializes: two_step_admin

exports: (
    two_step_admin.admin,
    two_step_admin.pending_admin,
    two_step_admin.transfer_admin,
    two_step_admin.accept_admin,
)

MAX_MODELS: constant(uint256) = 16
MAX_PAGE: constant(uint256) = 32
# Enough for any real network; the list holds only nodes with funds in the contract.
MAX_NODES: constant(uint256) = 2**32

ROLE_MINER: constant(uint8) = 1
ROLE_VERIFIER: constant(uint8) = 2
ROLE_GATEWAY: constant(uint8) = 3

# A stake checkpoint is one word: block time in the top 64 bits, bonded stake in the low 192
# (native value held here; 2**192 wei is far beyond any token supply).
STAKE_BITS: constant(uint256) = 192
STAKE_MASK: constant(uint256) = 2**192 - 1
# node_meta: registration time in the top 128 bits, checkpoint count in the low 128.
COUNT_MASK: constant(uint256) = 2**128 - 1

PPM: constant(uint256) = 1_000_000
# Bounds on the early-miner schedule, against a typo that would hand out the emission.
MAX_EARLY_MULTIPLIER_PPM: constant(uint256) = 10 * PPM
MAX_EARLY_SPAN: constant(uint256) = 10 * 365 * 86400


struct ModelOffer:
    name: String[64]
    model_id: bytes32
    price_in: uint256  # wei per prompt token
    price_out: uint256  # wei per completion token


struct Node:
    role: uint8
    endpoint: String[256]
    signer: address
    models: DynArray[ModelOffer, MAX_MODELS]
    stake: uint256
    unbonding: uint256
    unbond_at: uint256
    active: bool


# What the views return: a node together with its owner, so one call gives a gateway all it
# needs about a page of nodes.
struct NodeView:
    owner: address
    role: uint8
    endpoint: String[256]
    signer: address
    models: DynArray[ModelOffer, MAX_MODELS]
    stake: uint256
    unbonding: uint256
    unbond_at: uint256
    active: bool
    frozen: bool  # at least one open dispute holds the node's funds in place


event NodeRegistered:
    owner: indexed(address)
    role: uint8
    endpoint: String[256]
    signer: address
    stake: uint256

event NodeUpdated:
    owner: indexed(address)
    endpoint: String[256]
    signer: address
    model_count: uint256

event Staked:
    owner: indexed(address)
    amount: uint256
    total: uint256

event UnbondingRequested:
    owner: indexed(address)
    amount: uint256
    unbonding: uint256
    unbond_at: uint256

event Withdrawn:
    owner: indexed(address)
    amount: uint256

event NodeDeregistered:
    owner: indexed(address)
    unbonding: uint256
    unbond_at: uint256

event NodeDeactivated:
    owner: indexed(address)

event NodeRemoved:
    owner: indexed(address)

event Slashed:
    owner: indexed(address)
    recipient: indexed(address)
    requested: uint256
    amount: uint256

event Claimed:
    recipient: indexed(address)
    amount: uint256

event NodeFrozen:
    owner: indexed(address)
    count: uint256  # open freezes on the node after this one

event NodeUnfrozen:
    owner: indexed(address)
    count: uint256  # freezes still open; the node is free again at zero

event SignerRetired:
    owner: indexed(address)
    signer: indexed(address)
    retired_at: uint256  # stays `was_signer` until retired_at + unbonding_delay

event SlasherSet:
    slasher: indexed(address)


slasher: public(address)
min_stake: public(HashMap[uint8, uint256])
unbonding_delay: public(uint256)

# The early-miner schedule (see the contract's notes), fixed at deployment.
genesis: public(immutable(uint256))
early_period: public(immutable(uint256))
early_multiplier_ppm: public(immutable(uint256))
early_decay: public(immutable(uint256))

nodes: HashMap[address, Node]
# Owners of every node that is active or still has stake or unbonding funds here; entries
# leave once a node is inactive and empty, so the list cannot grow without locking stake.
owners: DynArray[address, MAX_NODES]
# 1-based position in owners (0 = not listed), for O(1) removal.
owner_index: HashMap[address, uint256]
# Slashed stake waiting for its recipient to claim it.
credits: public(HashMap[address, uint256])
# Open freezes per node: a counter, not a flag, because several disputes about one node can
# be open at once and the node must stay frozen until the last is resolved. Kept apart from
# Node so that it survives the node being slashed empty and forgotten mid-dispute.
frozen: public(HashMap[address, uint256])
# Per owner: when each key it replaced stopped being its signer (0: current or never held).
signer_retired_at: public(HashMap[address, HashMap[address, uint256]])
# Per owner: checkpoint index -> (time << STAKE_BITS | stake). Apart from Node, like
# node_meta, so that both survive the node being forgotten.
stake_checkpoints: HashMap[address, HashMap[uint256, uint256]]
# Per owner: registered_at << 128 | checkpoint count, so register() writes both in one slot.
node_meta: HashMap[address, uint256]


@deploy
def __init__(
    min_stake_miner: uint256,
    min_stake_verifier: uint256,
    min_stake_gateway: uint256,
    unbonding_delay: uint256,
    early_period_s: uint256,
    early_multiplier: uint256,
    early_decay_s: uint256,
):
    # A zero minimum would let a node be active with zero stake, which nothing could slash.
    assert min_stake_miner > 0, "min stake must be positive"
    assert min_stake_verifier > 0, "min stake must be positive"
    assert min_stake_gateway > 0, "min stake must be positive"
    # Guards unbond_at = now + delay against overflow and absurd lock-ups.
    assert unbonding_delay <= 365 * 86400, "unbonding delay too long"
    assert early_multiplier >= PPM, "early multiplier below 1x"
    assert early_multiplier <= MAX_EARLY_MULTIPLIER_PPM, "early multiplier above 10x"
    assert early_period_s <= MAX_EARLY_SPAN, "early period too long"
    assert early_decay_s <= MAX_EARLY_SPAN, "early decay too long"
    genesis = block.timestamp
    early_period = early_period_s
    early_multiplier_ppm = early_multiplier
    early_decay = early_decay_s
    two_step_admin.__init__()
    self.min_stake[ROLE_MINER] = min_stake_miner
    self.min_stake[ROLE_VERIFIER] = min_stake_verifier
    self.min_stake[ROLE_GATEWAY] = min_stake_gateway
    self.unbonding_delay = unbonding_delay


# --- internal helpers -------------------------------------------------------------------


@internal
@pure
def _check_details(
    endpoint: String[256], signer: address, models: DynArray[ModelOffer, MAX_MODELS]
):
    assert len(endpoint) > 0, "empty endpoint"
    assert signer != empty(address), "zero signer"
    for i: uint256 in range(MAX_MODELS):
        if i >= len(models):
            break
        assert len(models[i].name) > 0, "empty model name"
        assert models[i].model_id != empty(bytes32), "zero model id"
        for j: uint256 in range(MAX_MODELS):
            if j >= i:
                break
            assert models[j].model_id != models[i].model_id, "duplicate model"


@internal
def _set_signer(owner: address, signer: address):
    # The key replaced is retired, not forgotten: attestations it signed stay slashable.
    old: address = self.nodes[owner].signer
    if old == signer:
        return
    if old != empty(address):
        self.signer_retired_at[owner][old] = block.timestamp
        log SignerRetired(owner=owner, signer=old, retired_at=block.timestamp)
    if self.signer_retired_at[owner][signer] != 0:
        self.signer_retired_at[owner][signer] = 0  # current again
    self.nodes[owner].signer = signer


@internal
def _checkpoint(owner: address, stake: uint256):
    # One word per block: a later change in the same block overwrites the block's checkpoint.
    assert stake <= STAKE_MASK, "stake too large"
    meta: uint256 = self.node_meta[owner]
    count: uint256 = meta & COUNT_MASK
    word: uint256 = (block.timestamp << STAKE_BITS) | stake
    if count != 0 and self.stake_checkpoints[owner][count - 1] >> STAKE_BITS == block.timestamp:
        self.stake_checkpoints[owner][count - 1] = word
        return
    self.stake_checkpoints[owner][count] = word
    self.node_meta[owner] = meta + 1


@internal
def _list(owner: address):
    if self.owner_index[owner] == 0:
        self.owners.append(owner)
        self.owner_index[owner] = len(self.owners)


@internal
def _remove_if_empty(owner: address):
    # A node that is inactive and holds nothing is forgotten, so the list stays short.
    if (
        self.nodes[owner].active
        or self.nodes[owner].stake != 0
        or self.nodes[owner].unbonding != 0
    ):
        return
    position: uint256 = self.owner_index[owner]
    if position == 0:
        return
    last: address = self.owners.pop()
    if last != owner:
        self.owners[position - 1] = last
        self.owner_index[last] = position
    self.owner_index[owner] = 0
    self.nodes[owner] = empty(Node)
    self.node_meta[owner] &= COUNT_MASK  # no registration any more; checkpoints stay
    log NodeRemoved(owner=owner)


@internal
@view
def _view(owner: address) -> NodeView:
    node: Node = self.nodes[owner]
    return NodeView(
        owner=owner,
        role=node.role,
        endpoint=node.endpoint,
        signer=node.signer,
        models=node.models,
        stake=node.stake,
        unbonding=node.unbonding,
        unbond_at=node.unbond_at,
        active=node.active,
        frozen=self.frozen[owner] != 0,
    )


# --- node operations --------------------------------------------------------------------


@external
@payable
def register(
    role: uint8,
    endpoint: String[256],
    signer: address,
    models: DynArray[ModelOffer, MAX_MODELS],
):
    """
    @notice Register msg.sender as a node, staking msg.value. A node that deregistered may
            register again while its old stake is still unbonding, in the same role only:
            those funds stay answerable as that role. Once withdrawn, any role. Sets
            registered_at; a different signer retires the old one (SignerRetired).
    """
    assert role >= ROLE_MINER and role <= ROLE_GATEWAY, "bad role"
    assert not self.nodes[msg.sender].active, "already registered"
    old_role: uint8 = self.nodes[msg.sender].role
    assert (
        old_role == 0 or old_role == role or self.nodes[msg.sender].unbonding == 0
    ), "role change while unbonding"
    self._check_details(endpoint, signer, models)
    assert msg.value >= self.min_stake[role], "stake below minimum"

    # Field by field: funds still unbonding from an earlier registration stay as they are.
    self.nodes[msg.sender].role = role
    self.nodes[msg.sender].endpoint = endpoint
    self._set_signer(msg.sender, signer)
    self.nodes[msg.sender].models = models
    self.nodes[msg.sender].stake = msg.value
    self.nodes[msg.sender].active = True
    self._list(msg.sender)
    self._checkpoint(msg.sender, msg.value)
    meta: uint256 = self.node_meta[msg.sender]  # warm: _checkpoint just wrote it
    self.node_meta[msg.sender] = (block.timestamp << 128) | (meta & COUNT_MASK)
    log NodeRegistered(
        owner=msg.sender, role=role, endpoint=endpoint, signer=signer, stake=msg.value
    )


@external
@payable
def stake():
    """@notice Add msg.value to the caller's stake."""
    assert self.nodes[msg.sender].active, "node not active"
    assert msg.value > 0, "zero amount"
    total: uint256 = self.nodes[msg.sender].stake + msg.value
    self.nodes[msg.sender].stake = total
    self._checkpoint(msg.sender, total)
    log Staked(owner=msg.sender, amount=msg.value, total=total)


@external
def update(endpoint: String[256], signer: address, models: DynArray[ModelOffer, MAX_MODELS]):
    """
    @notice Replace the caller's endpoint, signing key and model offers. A new signing key
            retires the old one (SignerRetired), which stays `was_signer` for one unbonding
            delay. Refused while frozen: a node under dispute keeps the key it is judged by.
    """
    assert self.nodes[msg.sender].active, "node not active"
    assert self.frozen[msg.sender] == 0, "node frozen"
    self._check_details(endpoint, signer, models)
    self.nodes[msg.sender].endpoint = endpoint
    self._set_signer(msg.sender, signer)
    self.nodes[msg.sender].models = models
    log NodeUpdated(owner=msg.sender, endpoint=endpoint, signer=signer, model_count=len(models))


@external
def request_unbonding(amount: uint256):
    """
    @notice Move `amount` of stake into unbonding. All unbonding funds share one maturity
            time, which restarts at every request: they stay slashable for a full delay.
    """
    # Storage fields one by one, not the whole struct: copying 16 model offers costs gas.
    role: uint8 = self.nodes[msg.sender].role
    assert role != 0, "not registered"
    assert self.frozen[msg.sender] == 0, "node frozen"
    assert amount > 0, "zero amount"
    stake: uint256 = self.nodes[msg.sender].stake
    assert amount <= stake, "amount exceeds stake"
    remaining: uint256 = stake - amount
    assert remaining == 0 or remaining >= self.min_stake[role], "remaining stake below minimum"
    unbonding: uint256 = self.nodes[msg.sender].unbonding + amount
    unbond_at: uint256 = block.timestamp + self.unbonding_delay
    self.nodes[msg.sender].stake = remaining
    self._checkpoint(msg.sender, remaining)
    self.nodes[msg.sender].unbonding = unbonding
    self.nodes[msg.sender].unbond_at = unbond_at
    deactivated: bool = self.nodes[msg.sender].active and remaining == 0
    if deactivated:
        self.nodes[msg.sender].active = False
    log UnbondingRequested(
        owner=msg.sender, amount=amount, unbonding=unbonding, unbond_at=unbond_at
    )
    if deactivated:
        log NodeDeactivated(owner=msg.sender)


@external
def deregister():
    """@notice Stop serving: all stake moves into unbonding and the node goes inactive."""
    assert self.nodes[msg.sender].active, "node not active"
    # A node under dispute keeps its stake bonded: unbonding started now would let the delay
    # run down while the node is being judged, and leave right after the verdict.
    assert self.frozen[msg.sender] == 0, "node frozen"
    unbonding: uint256 = self.nodes[msg.sender].unbonding + self.nodes[msg.sender].stake
    unbond_at: uint256 = block.timestamp + self.unbonding_delay
    self.nodes[msg.sender].unbonding = unbonding
    self.nodes[msg.sender].stake = 0
    self._checkpoint(msg.sender, 0)
    self.nodes[msg.sender].unbond_at = unbond_at
    self.nodes[msg.sender].active = False
    log NodeDeregistered(owner=msg.sender, unbonding=unbonding, unbond_at=unbond_at)


@external
@nonreentrant
def withdraw():
    """@notice Pay the caller its unbonded stake once the unbonding delay has passed."""
    amount: uint256 = self.nodes[msg.sender].unbonding
    assert amount > 0, "nothing to withdraw"
    # Matured unbonding funds are still slashable until they leave: a dispute opened in time
    # keeps them here until it is resolved.
    assert self.frozen[msg.sender] == 0, "node frozen"
    assert block.timestamp >= self.nodes[msg.sender].unbond_at, "unbonding not matured"
    # Effects before the transfer: the balance is gone before any code of the payee runs.
    self.nodes[msg.sender].unbonding = 0
    self.nodes[msg.sender].unbond_at = 0
    log Withdrawn(owner=msg.sender, amount=amount)
    self._remove_if_empty(msg.sender)
    ok: bool = raw_call(msg.sender, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


# --- slashing ---------------------------------------------------------------------------


@external
def slash(owner: address, amount: uint256, recipient: address) -> uint256:
    """
    @notice Take up to `amount` from a node, first from its stake, then from its unbonding
            funds, and credit it to `recipient`, who claims it with claim().
    @return The amount actually taken; never more than the node holds.
    """
    assert msg.sender == self.slasher, "only slasher"
    assert recipient != empty(address), "zero recipient"
    assert amount > 0, "zero amount"
    assert self.nodes[owner].role != 0, "unknown node"
    stake: uint256 = self.nodes[owner].stake
    unbonding: uint256 = self.nodes[owner].unbonding
    from_stake: uint256 = min(amount, stake)
    from_unbonding: uint256 = min(amount - from_stake, unbonding)
    taken: uint256 = from_stake + from_unbonding
    assert taken > 0, "nothing to slash"
    if from_stake != 0:
        self.nodes[owner].stake = stake - from_stake
        self._checkpoint(owner, stake - from_stake)
    self.nodes[owner].unbonding = unbonding - from_unbonding
    deactivated: bool = self.nodes[owner].active and stake == from_stake
    if deactivated:
        self.nodes[owner].active = False
    self.credits[recipient] += taken
    log Slashed(owner=owner, recipient=recipient, requested=amount, amount=taken)
    if deactivated:
        log NodeDeactivated(owner=owner)
    self._remove_if_empty(owner)
    return taken


@external
def freeze(owner: address):
    """
    @notice Hold a node's funds in place while a dispute about it is open (slasher only).
            Freezes nest: each freeze needs its own unfreeze.
    """
    assert msg.sender == self.slasher, "only slasher"
    assert self.nodes[owner].role != 0, "unknown node"
    count: uint256 = self.frozen[owner] + 1
    self.frozen[owner] = count
    log NodeFrozen(owner=owner, count=count)


@external
def unfreeze(owner: address):
    """
    @notice Release one freeze (slasher only). No registration check: the dispute may have
            slashed the node empty, which removes it, and must still be able to finish.
    """
    assert msg.sender == self.slasher, "only slasher"
    count: uint256 = self.frozen[owner]
    assert count != 0, "node not frozen"
    self.frozen[owner] = count - 1
    log NodeUnfrozen(owner=owner, count=count - 1)


@external
@nonreentrant
def claim():
    """@notice Pay the caller the slashed stake credited to it."""
    amount: uint256 = self.credits[msg.sender]
    assert amount > 0, "nothing to claim"
    self.credits[msg.sender] = 0
    log Claimed(recipient=msg.sender, amount=amount)
    ok: bool = raw_call(msg.sender, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


# --- administration ---------------------------------------------------------------------


@external
def set_slasher(slasher: address):
    """
    @notice Name the slasher (the dispute manager), once, for the registry's whole life (admin
            only): no admin can later make itself the slasher and take the stake.
    """
    two_step_admin._check_admin()
    assert slasher != empty(address), "zero slasher"
    assert self.slasher == empty(address), "slasher already set"
    self.slasher = slasher
    log SlasherSet(slasher=slasher)


# --- views ------------------------------------------------------------------------------


@external
@view
def node_count() -> uint256:
    return len(self.owners)


@external
@view
def node_owner(index: uint256) -> address:
    assert index < len(self.owners), "index out of range"
    return self.owners[index]


# Single-slot reads for other contracts (the dispute manager): get_node copies all 16 model
# offers out of storage, which costs far more gas than these checks need.


@external
@view
def signer_of(owner: address) -> address:
    """@notice The key that signs for `owner`'s node; empty if none is registered."""
    return self.nodes[owner].signer


@external
@view
def was_signer(owner: address, signer: address) -> bool:
    """
    @notice Whether `signer` signs for `owner`: its current key, or one it replaced (update()
            or register() with another key) less than `unbonding_delay` seconds ago, while
            stake bonded under it can still be here. False for zero and keys never held.
    """
    if signer == empty(address):
        return False
    if signer == self.nodes[owner].signer:
        return True
    retired_at: uint256 = self.signer_retired_at[owner][signer]
    return retired_at != 0 and block.timestamp < retired_at + self.unbonding_delay


@external
@view
def registered_at(owner: address) -> uint256:
    """
    @notice Block time of `owner`'s current registration (every register() sets it), kept
            until the node is forgotten; 0 if none.
    """
    return self.node_meta[owner] >> 128


@external
@view
def early_multiplier_at(owner: address, timestamp: uint256) -> uint256:
    """
    @notice The reward multiplier (ppm, 1_000_000 = 1x) of `owner` at `timestamp`: for a node
            whose current registration began before genesis + early_period, the full
            early_multiplier_ppm until then, falling linearly (rounded up) to 1x over the next
            early_decay seconds; 1x for everyone else, and for nobody registered.
    """
    registered: uint256 = self.node_meta[owner] >> 128
    period_end: uint256 = genesis + early_period
    if registered == 0 or registered >= period_end or early_multiplier_ppm == PPM:
        return PPM
    if timestamp < period_end:
        return early_multiplier_ppm
    elapsed: uint256 = timestamp - period_end
    if elapsed >= early_decay:
        return PPM
    return early_multiplier_ppm - (early_multiplier_ppm - PPM) * elapsed // early_decay


@external
@view
def stake_at(owner: address, timestamp: uint256) -> uint256:
    """
    @notice `owner`'s bonded stake as of the last checkpoint with time <= `timestamp` (so
            changes in a block at exactly that time count); 0 before the first. Outlives the
            node being forgotten. stake_of() is the current stake.
    """
    count: uint256 = self.node_meta[owner] & COUNT_MASK
    if count == 0:
        return 0
    last: uint256 = self.stake_checkpoints[owner][count - 1]
    if last >> STAKE_BITS <= timestamp:
        return last & STAKE_MASK
    # Binary search for the first checkpoint after `timestamp`; the last one is. Times only
    # grow, one checkpoint per block at most, so 64 halvings cover any count.
    low: uint256 = 0
    high: uint256 = count - 1
    for _: uint256 in range(64):
        if low >= high:
            break
        mid: uint256 = (low + high) // 2
        if self.stake_checkpoints[owner][mid] >> STAKE_BITS > timestamp:
            high = mid
        else:
            low = mid + 1
    if low == 0:
        return 0
    return self.stake_checkpoints[owner][low - 1] & STAKE_MASK


@external
@view
def stake_checkpoint_count(owner: address) -> uint256:
    """@notice How many stake checkpoints `owner` has (at most one per block)."""
    return self.node_meta[owner] & COUNT_MASK


@external
@view
def stake_checkpoint(owner: address, index: uint256) -> (uint256, uint256):
    """@notice Checkpoint `index` of `owner`: (block time, bonded stake from then on)."""
    assert index < self.node_meta[owner] & COUNT_MASK, "index out of range"
    word: uint256 = self.stake_checkpoints[owner][index]
    return word >> STAKE_BITS, word & STAKE_MASK


@external
@view
def role_of(owner: address) -> uint8:
    return self.nodes[owner].role


@external
@view
def is_active(owner: address) -> bool:
    return self.nodes[owner].active


@external
@view
def stake_of(owner: address) -> uint256:
    """@notice Bonded stake only: what a verifier's vote weighs."""
    return self.nodes[owner].stake


@external
@view
def total_stake_of(owner: address) -> uint256:
    """@notice Everything slash() can still take: bonded stake plus unbonding funds."""
    return self.nodes[owner].stake + self.nodes[owner].unbonding


@external
@view
def get_node(owner: address) -> NodeView:
    """@notice The node of `owner`; role 0 means none is registered."""
    return self._view(owner)


@external
@view
def get_nodes(start: uint256, count: uint256) -> DynArray[NodeView, MAX_PAGE]:
    """
    @notice Up to `count` nodes (at most MAX_PAGE) from position `start` of the node list;
            fewer at the end of the list, none past it.
    """
    result: DynArray[NodeView, MAX_PAGE] = []
    total: uint256 = len(self.owners)
    if start >= total:
        return result
    for i: uint256 in range(MAX_PAGE):
        if i >= count or start + i >= total:
            break
        result.append(self._view(self.owners[start + i]))
    return result


@external
@view
def max_page() -> uint256:
    return MAX_PAGE
