# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid RewardDistributor
@notice Epoch rewards as Merkle roots, proposed optimistically: anyone may propose an epoch's
        root with a bond; anyone else may challenge it with an equal bond inside the
        challenge window; the arbiter settles challenges. An unchallenged root is finalized
        after the window, and then each account claims its leaf once. Gateways also anchor
        the Merkle roots of their receipts here, so any receipt can be proven to anyone.
@dev Leaves are keccak256(keccak256(abi_encode(account, amount))) and pairs are hashed
     sorted, exactly as infergrid.protocol.merkle builds them. Rewards are paid to the
     account on claim; bonds are pull payments (withdraw_credit).
     Accounting: self.balance == bonds_held + (allocated - total_claimed) + unallocated(),
     where allocated is the sum of the totals of every epoch still proposed, challenged or
     finalized. propose() reserves its total out of unallocated(), which never goes below
     zero, so the roots can never promise more than the contract holds.
"""

# Proofs for trees of up to 2**32 leaves (protocol/merkle.MAX_PROOF_LENGTH).
MAX_PROOF_LENGTH: constant(uint256) = 32
# Long enough for any real dispute process; bounds proposed_at + window against overflow.
MAX_CHALLENGE_WINDOW: constant(uint256) = 30 * 86400
# Anchors pack count, timestamp and block number into one storage word, 64 bits each: two
# words per anchor instead of four, which is most of an anchor's gas. No gateway signs 2**64
# receipts, and block times and numbers stay below 2**64 for billions of years.
MASK64: constant(uint256) = 2**64 - 1
MAX_ANCHOR_COUNT: constant(uint256) = MASK64

STATUS_NONE: constant(uint8) = 0
STATUS_PROPOSED: constant(uint8) = 1
STATUS_CHALLENGED: constant(uint8) = 2
STATUS_FINALIZED: constant(uint8) = 3


struct EpochInfo:
    status: uint8
    root: bytes32
    total: uint256  # wei reserved for this epoch's claims
    claimed: uint256  # wei paid out so far
    proposer: address
    challenger: address
    proposed_at: uint256  # block timestamp of the proposal


struct Anchor:
    root: bytes32  # Merkle root of the receipts' EIP-712 struct hashes
    count: uint256  # how many receipts the tree holds
    timestamp: uint256
    block_number: uint256


# How an Anchor is stored: packed = count << 128 | timestamp << 64 | block_number.
struct StoredAnchor:
    root: bytes32
    packed: uint256


event Funded:
    funder: indexed(address)
    amount: uint256

event RootProposed:
    epoch: indexed(uint256)
    proposer: indexed(address)
    root: bytes32
    total: uint256

event RootChallenged:
    epoch: indexed(uint256)
    challenger: indexed(address)

event ChallengeResolved:
    epoch: indexed(uint256)
    winner: indexed(address)
    root_valid: bool

event RootFinalized:
    epoch: indexed(uint256)
    root: bytes32
    total: uint256

event Credited:
    recipient: indexed(address)
    epoch: indexed(uint256)
    amount: uint256

event CreditWithdrawn:
    recipient: indexed(address)
    amount: uint256

event RewardClaimed:
    epoch: indexed(uint256)
    account: indexed(address)
    amount: uint256

event ReceiptsAnchored:
    gateway: indexed(address)
    index: uint256
    root: bytes32
    count: uint256

event ArbiterSet:
    arbiter: indexed(address)

event AdminTransferred:
    admin: indexed(address)


admin: public(address)
arbiter: public(address)
proposer_bond: public(uint256)
challenge_window: public(uint256)

# Every wei ever received through fund().
total_funded: public(uint256)
# Sum of the totals of every epoch that is proposed, challenged or finalized.
allocated: public(uint256)
# Sum of every reward paid by claim().
total_claimed: public(uint256)
# Bonds posted and not yet withdrawn: those of open proposals and challenges plus credits.
bonds_held: public(uint256)
# Bonds owed, pulled with withdraw_credit().
credits: public(HashMap[address, uint256])

epochs: HashMap[uint256, EpochInfo]
claimed: HashMap[uint256, HashMap[address, bool]]

anchors: HashMap[address, HashMap[uint256, StoredAnchor]]
anchor_counts: HashMap[address, uint256]


@deploy
def __init__(arbiter: address, proposer_bond: uint256, challenge_window: uint256):
    assert arbiter != empty(address), "zero arbiter"
    # A free proposal could be spammed at no cost, and a challenge would risk nothing.
    assert proposer_bond > 0, "bond must be positive"
    assert challenge_window <= MAX_CHALLENGE_WINDOW, "challenge window too long"
    self.admin = msg.sender
    self.arbiter = arbiter
    self.proposer_bond = proposer_bond
    self.challenge_window = challenge_window
    log AdminTransferred(admin=msg.sender)
    log ArbiterSet(arbiter=arbiter)


# --- internal helpers -------------------------------------------------------------------


@internal
@view
def _unallocated() -> uint256:
    # Ether forced in without fund() (selfdestruct, coinbase) counts as reward funds too.
    return self.balance - self.bonds_held - (self.allocated - self.total_claimed)


@internal
@pure
def _leaf(account: address, amount: uint256) -> bytes32:
    # Hashed twice so that no leaf is the 64-byte preimage of an inner node.
    return keccak256(keccak256(abi_encode(account, amount)))


@internal
@pure
def _verify(leaf: bytes32, proof: DynArray[bytes32, MAX_PROOF_LENGTH], root: bytes32) -> bool:
    node: bytes32 = leaf
    for sibling: bytes32 in proof:
        # Sorted pairs: proofs carry no left/right bits.
        if convert(node, uint256) <= convert(sibling, uint256):
            node = keccak256(concat(node, sibling))
        else:
            node = keccak256(concat(sibling, node))
    return node == root


@internal
def _credit(recipient: address, epoch: uint256, amount: uint256):
    # The bonds are already counted in bonds_held; crediting only names their owner.
    self.credits[recipient] += amount
    log Credited(recipient=recipient, epoch=epoch, amount=amount)


# --- funding and epoch roots ------------------------------------------------------------


@external
@payable
def fund():
    """@notice Add msg.value to the rewards pool (the treasury does; anyone may)."""
    assert msg.value > 0, "zero amount"
    self.total_funded += msg.value
    log Funded(funder=msg.sender, amount=msg.value)


@external
@payable
def propose(epoch: uint256, root: bytes32, total: uint256):
    """
    @notice Propose the reward root of `epoch`, paying out `total` wei in all, with a bond of
            exactly proposer_bond. `total` is reserved from the unallocated funds at once.
    """
    assert msg.value == self.proposer_bond, "wrong bond"
    assert self.epochs[epoch].status == STATUS_NONE, "epoch already proposed"
    assert root != empty(bytes32), "zero root"
    assert total > 0, "zero total"
    # The bond is in self.balance already: count it as held before measuring what is free.
    self.bonds_held += msg.value
    assert total <= self._unallocated(), "insufficient funds"
    self.allocated += total
    # Field by field: claimed and challenger are zero already (a rejected proposal is erased
    # whole), and writing zeros would still cost gas.
    self.epochs[epoch].status = STATUS_PROPOSED
    self.epochs[epoch].root = root
    self.epochs[epoch].total = total
    self.epochs[epoch].proposer = msg.sender
    self.epochs[epoch].proposed_at = block.timestamp
    log RootProposed(epoch=epoch, proposer=msg.sender, root=root, total=total)


@external
@payable
def challenge(epoch: uint256):
    """
    @notice Dispute the proposed root of `epoch` with a bond equal to the proposer's, before
            proposed_at + challenge_window. The arbiter then decides who gets both bonds.
    """
    assert msg.value == self.proposer_bond, "wrong bond"
    assert self.epochs[epoch].status == STATUS_PROPOSED, "not challengeable"
    assert (
        block.timestamp < self.epochs[epoch].proposed_at + self.challenge_window
    ), "challenge window closed"
    assert msg.sender != self.epochs[epoch].proposer, "proposer cannot challenge"
    self.bonds_held += msg.value
    self.epochs[epoch].status = STATUS_CHALLENGED
    self.epochs[epoch].challenger = msg.sender
    log RootChallenged(epoch=epoch, challenger=msg.sender)


@external
def resolve_challenge(epoch: uint256, root_valid: bool):
    """
    @notice The arbiter's verdict on a challenged root. Valid: the root is final and the
            proposer gets both bonds. Invalid: the challenger gets both bonds, the proposal
            is erased, its reservation released, and the epoch may be proposed again.
    """
    assert msg.sender == self.arbiter, "only arbiter"
    info: EpochInfo = self.epochs[epoch]
    assert info.status == STATUS_CHALLENGED, "not challenged"
    both: uint256 = 2 * self.proposer_bond
    if root_valid:
        self.epochs[epoch].status = STATUS_FINALIZED
        log ChallengeResolved(epoch=epoch, winner=info.proposer, root_valid=True)
        self._credit(info.proposer, epoch, both)
        log RootFinalized(epoch=epoch, root=info.root, total=info.total)
    else:
        self.allocated -= info.total
        self.epochs[epoch] = empty(EpochInfo)
        log ChallengeResolved(epoch=epoch, winner=info.challenger, root_valid=False)
        self._credit(info.challenger, epoch, both)


@external
def finalize(epoch: uint256):
    """@notice Finalize an unchallenged root once its window has passed; anyone may."""
    status: uint8 = self.epochs[epoch].status
    assert status != STATUS_NONE, "not proposed"
    assert status != STATUS_FINALIZED, "already finalized"
    assert status != STATUS_CHALLENGED, "challenged"
    assert (
        block.timestamp >= self.epochs[epoch].proposed_at + self.challenge_window
    ), "challenge window open"
    self.epochs[epoch].status = STATUS_FINALIZED
    log RootFinalized(epoch=epoch, root=self.epochs[epoch].root, total=self.epochs[epoch].total)
    self._credit(self.epochs[epoch].proposer, epoch, self.proposer_bond)


# --- payouts ----------------------------------------------------------------------------


@external
@nonreentrant
def claim(
    epoch: uint256, account: address, amount: uint256, proof: DynArray[bytes32, MAX_PROOF_LENGTH]
):
    """
    @notice Pay `account` its reward `amount` for a finalized `epoch`, proven by `proof`.
            Anyone may submit it (a relayer, a batcher): the reward always goes to `account`.
    """
    assert self.epochs[epoch].status == STATUS_FINALIZED, "epoch not finalized"
    assert account != empty(address), "zero account"
    assert amount > 0, "zero amount"
    assert not self.claimed[epoch][account], "already claimed"
    assert self._verify(self._leaf(account, amount), proof, self.epochs[epoch].root), "bad proof"
    claimed: uint256 = self.epochs[epoch].claimed + amount
    # A bad root could promise more than its total; the surplus is never paid.
    assert claimed <= self.epochs[epoch].total, "exceeds epoch total"
    # Effects before the transfer.
    self.claimed[epoch][account] = True
    self.epochs[epoch].claimed = claimed
    self.total_claimed += amount
    log RewardClaimed(epoch=epoch, account=account, amount=amount)
    ok: bool = raw_call(account, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


@external
@nonreentrant
def withdraw_credit():
    """@notice Pay the caller the bonds credited to it."""
    amount: uint256 = self.credits[msg.sender]
    assert amount > 0, "nothing to withdraw"
    self.credits[msg.sender] = 0
    self.bonds_held -= amount
    log CreditWithdrawn(recipient=msg.sender, amount=amount)
    ok: bool = raw_call(msg.sender, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


# --- receipt anchors --------------------------------------------------------------------


@external
def anchor(root: bytes32, count: uint256) -> uint256:
    """
    @notice Commit the Merkle root of `count` receipts the caller (a gateway) signed since its
            last anchor. Anchors are kept per gateway in order.
    @return The anchor's index in the caller's list.
    """
    assert root != empty(bytes32), "zero root"
    assert count > 0, "zero count"
    assert count <= MAX_ANCHOR_COUNT, "count too large"
    index: uint256 = self.anchor_counts[msg.sender]
    self.anchors[msg.sender][index] = StoredAnchor(
        root=root,
        packed=(count << 128) | ((block.timestamp & MASK64) << 64) | (block.number & MASK64),
    )
    self.anchor_counts[msg.sender] = index + 1
    log ReceiptsAnchored(gateway=msg.sender, index=index, root=root, count=count)
    return index


# --- administration ---------------------------------------------------------------------


@external
def set_arbiter(arbiter: address):
    assert msg.sender == self.admin, "only admin"
    assert arbiter != empty(address), "zero arbiter"
    self.arbiter = arbiter
    log ArbiterSet(arbiter=arbiter)


@external
def transfer_admin(new_admin: address):
    assert msg.sender == self.admin, "only admin"
    assert new_admin != empty(address), "zero admin"
    self.admin = new_admin
    log AdminTransferred(admin=new_admin)


# --- views ------------------------------------------------------------------------------


@external
@view
def unallocated() -> uint256:
    """@notice Funds free to back a new proposal."""
    return self._unallocated()


@external
@view
def epoch_info(epoch: uint256) -> EpochInfo:
    """@notice The proposal for `epoch`; status 0 means there is none."""
    return self.epochs[epoch]


@external
@view
def is_claimed(epoch: uint256, account: address) -> bool:
    return self.claimed[epoch][account]


@external
@pure
def verify(
    root: bytes32, account: address, amount: uint256, proof: DynArray[bytes32, MAX_PROOF_LENGTH]
) -> bool:
    """@notice Whether `proof` shows the leaf of (`account`, `amount`) under `root`."""
    return self._verify(self._leaf(account, amount), proof, root)


@external
@view
def anchor_count(gateway: address) -> uint256:
    return self.anchor_counts[gateway]


@external
@view
def get_anchor(gateway: address, index: uint256) -> Anchor:
    assert index < self.anchor_counts[gateway], "index out of range"
    stored: StoredAnchor = self.anchors[gateway][index]
    return Anchor(
        root=stored.root,
        count=stored.packed >> 128,
        timestamp=(stored.packed >> 64) & MASK64,
        block_number=stored.packed & MASK64,
    )
