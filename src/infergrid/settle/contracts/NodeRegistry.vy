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
     about it is open: a frozen node cannot unbond, deregister or withdraw, so the stake the
     dispute may take cannot leave first. Freezing does not change `active`; gateways skip
     frozen nodes themselves (NodeView.frozen).
"""

MAX_MODELS: constant(uint256) = 16
MAX_PAGE: constant(uint256) = 32
# Enough for any real network; the list holds only nodes with funds in the contract.
MAX_NODES: constant(uint256) = 2**32

ROLE_MINER: constant(uint8) = 1
ROLE_VERIFIER: constant(uint8) = 2
ROLE_GATEWAY: constant(uint8) = 3


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

event SlasherSet:
    slasher: indexed(address)

event AdminTransferred:
    admin: indexed(address)


admin: public(address)
slasher: public(address)
min_stake: public(HashMap[uint8, uint256])
unbonding_delay: public(uint256)

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


@deploy
def __init__(
    min_stake_miner: uint256,
    min_stake_verifier: uint256,
    min_stake_gateway: uint256,
    unbonding_delay: uint256,
):
    # A zero minimum would let a node be active with zero stake, which nothing could slash.
    assert min_stake_miner > 0, "min stake must be positive"
    assert min_stake_verifier > 0, "min stake must be positive"
    assert min_stake_gateway > 0, "min stake must be positive"
    # Guards unbond_at = now + delay against overflow and absurd lock-ups.
    assert unbonding_delay <= 365 * 86400, "unbonding delay too long"
    self.admin = msg.sender
    self.min_stake[ROLE_MINER] = min_stake_miner
    self.min_stake[ROLE_VERIFIER] = min_stake_verifier
    self.min_stake[ROLE_GATEWAY] = min_stake_gateway
    self.unbonding_delay = unbonding_delay
    log AdminTransferred(admin=msg.sender)


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
            register again while its old stake is still unbonding.
    """
    assert role >= ROLE_MINER and role <= ROLE_GATEWAY, "bad role"
    assert not self.nodes[msg.sender].active, "already registered"
    self._check_details(endpoint, signer, models)
    assert msg.value >= self.min_stake[role], "stake below minimum"

    # Field by field: funds still unbonding from an earlier registration stay as they are.
    self.nodes[msg.sender].role = role
    self.nodes[msg.sender].endpoint = endpoint
    self.nodes[msg.sender].signer = signer
    self.nodes[msg.sender].models = models
    self.nodes[msg.sender].stake = msg.value
    self.nodes[msg.sender].active = True
    self._list(msg.sender)
    log NodeRegistered(
        owner=msg.sender, role=role, endpoint=endpoint, signer=signer, stake=msg.value
    )


@external
@payable
def stake():
    """@notice Add msg.value to the caller's stake."""
    assert self.nodes[msg.sender].active, "node not active"
    assert msg.value > 0, "zero amount"
    self.nodes[msg.sender].stake += msg.value
    log Staked(owner=msg.sender, amount=msg.value, total=self.nodes[msg.sender].stake)


@external
def update(endpoint: String[256], signer: address, models: DynArray[ModelOffer, MAX_MODELS]):
    """@notice Replace the caller's endpoint, signing key and model offers."""
    assert self.nodes[msg.sender].active, "node not active"
    self._check_details(endpoint, signer, models)
    self.nodes[msg.sender].endpoint = endpoint
    self.nodes[msg.sender].signer = signer
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
    self.nodes[owner].stake = stake - from_stake
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
    assert msg.sender == self.admin, "only admin"
    self.slasher = slasher
    log SlasherSet(slasher=slasher)


@external
def transfer_admin(new_admin: address):
    assert msg.sender == self.admin, "only admin"
    assert new_admin != empty(address), "zero admin"
    self.admin = new_admin
    log AdminTransferred(admin=new_admin)


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
