# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid RewardDistributor
@notice Epoch rewards as Merkle roots, proposed optimistically: anyone may propose the root
        of the next epoch (epochs are numbered from 1, in order) with a bond; anyone else may
        challenge it with an equal bond inside the challenge window; the arbiter rules on
        challenges. The loser of a ruling forfeits its bond: half to the treasury, half to the
        winner, so that challenging one's own root from a second address costs half a bond.
        A root is finalized only once its window has passed, whether or not it was challenged
        and upheld, and then each account claims its leaf once. The arbiter is replaced only
        through a timelock longer than the challenge window; the admin is handed over in two
        steps. Gateways also anchor the Merkle roots of their receipts here, so any receipt
        can be proven to anyone.
@dev Leaves are keccak256(keccak256(abi_encode(account, amount))) and pairs are hashed
     sorted, exactly as infergrid.protocol.merkle builds them. Rewards are paid to the
     account on claim; bonds are pull payments (withdraw_credit), the treasury's shares of
     forfeited bonds too.
     Accounting: self.balance == bonds_held + (allocated - total_claimed) + unallocated(),
     where bonds_held counts every bond posted and not yet withdrawn (those of open proposals
     and challenges, and the credits they were turned into, the treasury's included) and
     allocated is the sum of the totals of every epoch still proposed, challenged or
     finalized. propose() reserves its total out of unallocated(), which never goes below
     zero, so the roots can never promise more than the contract holds.
"""

from lib import timelock
from lib import two_step_admin

initializes: two_step_admin
initializes: timelock

exports: (
    two_step_admin.transfer_admin,
    two_step_admin.accept_admin,
    two_step_admin.admin,
    two_step_admin.pending_admin,
    timelock.delay,
    timelock.pending,
)

# Proofs for trees of up to 2**32 leaves (protocol/merkle.MAX_PROOF_LENGTH).
MAX_PROOF_LENGTH: constant(uint256) = 32
# Long enough for any real dispute process; bounds proposed_at + window against overflow.
MAX_CHALLENGE_WINDOW: constant(uint256) = 30 * 86400
# Anchors pack count, timestamp and block number into one storage word, 64 bits each: two
# words per anchor instead of four, which is most of an anchor's gas. No gateway signs 2**64
# receipts, and block times and numbers stay below 2**64 for billions of years.
MASK64: constant(uint256) = 2**64 - 1
MAX_ANCHOR_COUNT: constant(uint256) = MASK64

# Share of a losing bond that goes to the treasury; the winner gets the rest. Paying part of it
# to a third party is what makes a self-challenge (one party on both sides) cost something.
PPM: constant(uint256) = 1_000_000
BOND_TO_TREASURY_PPM: constant(uint256) = 500_000
# The timelock's key for arbiter changes.
ARBITER_CHANGE: constant(bytes32) = keccak256("arbiter")

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

event ArbiterScheduled:
    arbiter: indexed(address)
    ready_at: uint256

event ArbiterCancelled:
    arbiter: indexed(address)

event ArbiterSet:
    arbiter: indexed(address)


# Receives half of every losing bond (pulled with withdraw_credit, like any credit).
treasury: public(immutable(address))
arbiter: public(address)
# The arbiter announced by schedule_arbiter(), applicable from the ready_at of
# timelock.pending[ARBITER_CHANGE]; empty when none is pending.
pending_arbiter: public(address)
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
# The lowest epoch never proposed. Proposals come in order, so no epoch is skipped and none is
# proposed far ahead, where no one watches for a root to challenge.
next_epoch: public(uint256)

epochs: HashMap[uint256, EpochInfo]
claimed: HashMap[uint256, HashMap[address, bool]]

anchors: HashMap[address, HashMap[uint256, StoredAnchor]]
anchor_counts: HashMap[address, uint256]


@deploy
def __init__(
    arbiter: address,
    _treasury: address,
    proposer_bond: uint256,
    challenge_window: uint256,
    _arbiter_delay: uint256,
):
    """
    @notice The deployer becomes admin. `_arbiter_delay` is how long a new arbiter waits after
            its announcement; it must outlast the challenge window, so that every root
            proposed before an announcement has its whole window under the arbiter its
            proposer and challengers knew.
    """
    assert arbiter != empty(address), "zero arbiter"
    assert _treasury != empty(address), "zero treasury"
    # A free proposal could be spammed at no cost, and a challenge would risk nothing.
    assert proposer_bond > 0, "bond must be positive"
    # Without a window no one can challenge: every root would be final at once.
    assert challenge_window > 0, "zero challenge window"
    assert challenge_window <= MAX_CHALLENGE_WINDOW, "challenge window too long"
    assert _arbiter_delay > challenge_window, "arbiter delay must outlast the challenge window"
    two_step_admin.__init__()
    timelock.__init__(_arbiter_delay)
    treasury = _treasury
    self.arbiter = arbiter
    self.proposer_bond = proposer_bond
    self.challenge_window = challenge_window
    self.next_epoch = 1
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


@internal
def _forfeit(winner: address, epoch: uint256, own_bond: uint256):
    """
    @notice Split the loser's bond: BOND_TO_TREASURY_PPM of it to the treasury, the rest to
            `winner`, who is also credited `own_bond` (its own bond back, or 0 where that
            stays held).
    """
    bond: uint256 = self.proposer_bond
    # No overflow: msg.value == bond was paid, so bond is far below 2**256 / PPM.
    to_treasury: uint256 = bond * BOND_TO_TREASURY_PPM // PPM
    self._credit(winner, epoch, own_bond + bond - to_treasury)
    self._credit(treasury, epoch, to_treasury)


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
            `epoch` is next_epoch, or an earlier epoch whose proposal was ruled invalid and
            erased.
    """
    assert msg.value == self.proposer_bond, "wrong bond"
    next_epoch: uint256 = self.next_epoch
    assert epoch >= 1 and epoch <= next_epoch, "epoch out of order"
    assert self.epochs[epoch].status == STATUS_NONE, "epoch already proposed"
    assert root != empty(bytes32), "zero root"
    assert total > 0, "zero total"
    # The bond is in self.balance already: count it as held before measuring what is free.
    self.bonds_held += msg.value
    assert total <= self._unallocated(), "insufficient funds"
    self.allocated += total
    if epoch == next_epoch:
        self.next_epoch = next_epoch + 1
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
            proposed_at + challenge_window. The arbiter then rules; the loser forfeits its
            bond. A root upheld before its window closes may be challenged again.
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
    @notice The arbiter's verdict on a challenged root; the loser's bond is split, half to the
            treasury and half to the winner.
            Valid: the proposer is credited half the challenger's bond; its own bond stays
            held until finalize(), as for an unchallenged root. The root is proposed again,
            with no challenger, and its window runs on: it is finalized only after
            proposed_at + challenge_window, and may be challenged again until then.
            Invalid: the challenger is credited its bond and half the proposer's; the
            proposal is erased, its reservation released, and the epoch may be proposed again.
    """
    assert msg.sender == self.arbiter, "only arbiter"
    info: EpochInfo = self.epochs[epoch]
    assert info.status == STATUS_CHALLENGED, "not challenged"
    if root_valid:
        # A ruling never shortens the window: an arbiter colluding with the proposer cannot
        # make a root final before others had the whole window to dispute it.
        self.epochs[epoch].status = STATUS_PROPOSED
        self.epochs[epoch].challenger = empty(address)
        log ChallengeResolved(epoch=epoch, winner=info.proposer, root_valid=True)
        self._forfeit(info.proposer, epoch, 0)
    else:
        self.allocated -= info.total
        self.epochs[epoch] = empty(EpochInfo)
        log ChallengeResolved(epoch=epoch, winner=info.challenger, root_valid=False)
        self._forfeit(info.challenger, epoch, self.proposer_bond)


@external
def finalize(epoch: uint256):
    """
    @notice Finalize a proposed root once its window has passed; anyone may. The proposer's
            bond is credited back. A root under challenge waits for the arbiter's ruling.
    """
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


@internal
@pure
def _arbiter_change(arbiter: address) -> bytes32:
    return keccak256(abi_encode(arbiter))


@external
def schedule_arbiter(arbiter: address) -> uint256:
    """
    @notice Announce `arbiter` as the next arbiter (admin only); anyone may apply it once
            timelock.delay has passed. Replaces an announcement still pending.
    @return The timestamp from which apply_arbiter() succeeds.
    """
    two_step_admin._check_admin()
    assert arbiter != empty(address), "zero arbiter"
    ready_at: uint256 = timelock._schedule(ARBITER_CHANGE, self._arbiter_change(arbiter))
    self.pending_arbiter = arbiter
    log ArbiterScheduled(arbiter=arbiter, ready_at=ready_at)
    return ready_at


@external
def apply_arbiter():
    """@notice Make the announced arbiter the arbiter once its delay has passed; anyone may."""
    arbiter: address = self.pending_arbiter
    timelock._consume(ARBITER_CHANGE, self._arbiter_change(arbiter))
    self.arbiter = arbiter
    self.pending_arbiter = empty(address)
    log ArbiterSet(arbiter=arbiter)


@external
def cancel_arbiter():
    """@notice Withdraw the pending arbiter announcement (admin only)."""
    two_step_admin._check_admin()
    arbiter: address = self.pending_arbiter
    timelock._cancel(ARBITER_CHANGE)
    self.pending_arbiter = empty(address)
    log ArbiterCancelled(arbiter=arbiter)


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
