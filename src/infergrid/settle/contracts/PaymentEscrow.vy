# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid PaymentEscrow
@notice Payers deposit here and authorize gateway signers. A gateway signs cumulative
        vouchers (EIP-712) for what a payer owes a miner; anyone may submit a voucher, and
        the miner is paid the part not paid before, minus the protocol and verifier-pool
        fees, which are credited for their recipients to claim.
@dev Withdrawals and signer revocations wait `thaw_period`, so that a payer cannot pull its
     funds or its authorization from under receipts a gateway has already signed. Fees are
     pull payments; only the miner's share is pushed, last, in the transaction that earns it.
     Fees together never exceed MAX_FEE_PPM, and a change waits `delay` (the fee timelock),
     which outlasts the thaw period: a miner can collect every voucher it holds at the old
     fees, and a payer can thaw and withdraw, before new fees apply. The admin is handed over
     in two steps (lib/two_step_admin.vy).
"""

from lib import eip712_domain
from lib import signatures
from lib import timelock
from lib import two_step_admin

initializes: eip712_domain
initializes: timelock
initializes: two_step_admin

# `delay` is the fee delay; `pending(FEES_CHANGE)` is the scheduled fee change (Vyper cannot
# rename an export).
exports: (
    two_step_admin.admin,
    two_step_admin.pending_admin,
    two_step_admin.transfer_admin,
    two_step_admin.accept_admin,
    timelock.delay,
    timelock.pending,
)

PPM: constant(uint256) = 1_000_000
# Protocol fee + verifier pool share, at most 10 % of every payment.
MAX_FEE_PPM: constant(uint256) = 100_000
MAX_THAW_PERIOD: constant(uint256) = 365 * 86400
# The timelock's kind for fee changes; its change is keccak256(abi_encode(protocol, pool)).
FEES_CHANGE: constant(bytes32) = keccak256("fees")

# Must match protocol/messages.py byte for byte.
VOUCHER_TYPEHASH: constant(bytes32) = keccak256(
    "Voucher(address payer,address miner,address gateway,uint256 valueAggregate,"
    "uint256 timestamp,bytes32 receiptsRoot)"
)


struct Account:
    balance: uint256
    thawing: uint256  # part of balance on its way out; still collectable until withdrawn
    thaw_end: uint256


struct SignerState:
    authorized: bool
    revoke_at: uint256  # 0 while no revocation is pending


# Field order is the ABI tuple order of protocol.messages.Voucher.as_tuple().
struct Voucher:
    payer: address
    miner: address
    gateway: address
    value_aggregate: uint256
    timestamp: uint256
    receipts_root: bytes32


event Deposited:
    payer: indexed(address)
    sender: indexed(address)
    amount: uint256
    balance: uint256

event ThawStarted:
    payer: indexed(address)
    amount: uint256
    thaw_end: uint256

event ThawCancelled:
    payer: indexed(address)
    amount: uint256

event Withdrawn:
    payer: indexed(address)
    amount: uint256

event SignerAuthorized:
    payer: indexed(address)
    signer: indexed(address)

event SignerRevocationStarted:
    payer: indexed(address)
    signer: indexed(address)
    revoke_at: uint256

event Collected:
    payer: indexed(address)
    miner: indexed(address)
    gateway: indexed(address)
    value_aggregate: uint256
    paid: uint256
    miner_amount: uint256
    protocol_fee: uint256
    verifier_fee: uint256
    receipts_root: bytes32

event FeesClaimed:
    recipient: indexed(address)
    amount: uint256

event FeesScheduled:
    protocol_fee_ppm: uint256
    verifier_pool_ppm: uint256
    ready_at: uint256

event FeesSet:
    protocol_fee_ppm: uint256
    verifier_pool_ppm: uint256


treasury: public(immutable(address))
verifier_pool: public(immutable(address))
thaw_period: public(immutable(uint256))
protocol_fee_ppm: public(uint256)
verifier_pool_ppm: public(uint256)
# The fees schedule_fees() announced, in force from timelock.pending(FEES_CHANGE).ready_at on
# once someone calls apply_fees(); meaningful only while that change is pending.
pending_protocol_fee_ppm: public(uint256)
pending_verifier_pool_ppm: public(uint256)

accounts: public(HashMap[address, Account])
# payer => signer => state
signers: public(HashMap[address, HashMap[address, SignerState]])
# payer => gateway => miner => paid so far; vouchers are cumulative, so each pays the rest.
collected: public(HashMap[address, HashMap[address, HashMap[address, uint256]]])
# payer => gateway => paid so far to all miners, for the gateway's headroom accounting.
gateway_collected: public(HashMap[address, HashMap[address, uint256]])
fees_owed: public(HashMap[address, uint256])


@deploy
def __init__(
    _treasury: address,
    _verifier_pool: address,
    protocol_fee_ppm: uint256,
    verifier_pool_ppm: uint256,
    _thaw_period: uint256,
    _fee_delay: uint256,
):
    """
    @param _fee_delay Seconds a fee change waits between schedule_fees() and apply_fees();
           must exceed _thaw_period (and be at most the timelock's MAX_DELAY, 365 days).
    """
    assert _treasury != empty(address), "zero treasury"
    assert _verifier_pool != empty(address), "zero verifier pool"
    self._check_fees(protocol_fee_ppm, verifier_pool_ppm)
    # Guards now + thaw_period against overflow and absurd lock-ups.
    assert _thaw_period <= MAX_THAW_PERIOD, "thaw period too long"
    # A payer who sees a fee change coming must be able to thaw and withdraw before it applies.
    assert _fee_delay > _thaw_period, "fee delay must outlast the thaw period"
    two_step_admin.__init__()
    timelock.__init__(_fee_delay)
    eip712_domain.__init__(self)
    treasury = _treasury
    verifier_pool = _verifier_pool
    thaw_period = _thaw_period
    self.protocol_fee_ppm = protocol_fee_ppm
    self.verifier_pool_ppm = verifier_pool_ppm
    log FeesSet(protocol_fee_ppm=protocol_fee_ppm, verifier_pool_ppm=verifier_pool_ppm)


# --- EIP-712 ----------------------------------------------------------------------------


@internal
@view
def _voucher_digest(voucher: Voucher) -> bytes32:
    struct_hash: bytes32 = keccak256(
        abi_encode(
            VOUCHER_TYPEHASH,
            voucher.payer,
            voucher.miner,
            voucher.gateway,
            voucher.value_aggregate,
            voucher.timestamp,
            voucher.receipts_root,
        )
    )
    return eip712_domain._digest(struct_hash)


@internal
@view
def _is_authorized(payer: address, signer: address) -> bool:
    state: SignerState = self.signers[payer][signer]
    return state.authorized and (state.revoke_at == 0 or block.timestamp < state.revoke_at)


# --- deposits and withdrawals -----------------------------------------------------------


@internal
def _deposit(payer: address, amount: uint256):
    assert payer != empty(address), "zero payer"
    assert amount > 0, "zero deposit"
    balance: uint256 = self.accounts[payer].balance + amount
    self.accounts[payer].balance = balance
    log Deposited(payer=payer, sender=msg.sender, amount=amount, balance=balance)


@external
@payable
def deposit():
    """@notice Credit msg.value to the caller's balance."""
    self._deposit(msg.sender, msg.value)


@external
@payable
def deposit_for(payer: address):
    """@notice Credit msg.value to `payer`'s balance."""
    self._deposit(payer, msg.value)


@external
def thaw(amount: uint256):
    """
    @notice Start withdrawing `amount`, replacing any earlier thaw; it matures after
            thaw_period. Thawing funds stay collectable until withdrawn.
    """
    assert amount > 0, "zero amount"
    assert amount <= self.accounts[msg.sender].balance, "amount exceeds balance"
    thaw_end: uint256 = block.timestamp + thaw_period
    self.accounts[msg.sender].thawing = amount
    self.accounts[msg.sender].thaw_end = thaw_end
    log ThawStarted(payer=msg.sender, amount=amount, thaw_end=thaw_end)


@external
def cancel_thaw():
    amount: uint256 = self.accounts[msg.sender].thawing
    assert amount > 0, "nothing thawing"
    self.accounts[msg.sender].thawing = 0
    self.accounts[msg.sender].thaw_end = 0
    log ThawCancelled(payer=msg.sender, amount=amount)


@external
@nonreentrant
def withdraw():
    """@notice Pay the caller its matured thawing funds."""
    thawing: uint256 = self.accounts[msg.sender].thawing
    assert thawing > 0, "nothing thawing"
    assert block.timestamp >= self.accounts[msg.sender].thaw_end, "thaw not matured"
    balance: uint256 = self.accounts[msg.sender].balance
    # collect() already shrinks a thaw to the balance it leaves; min() keeps this function
    # safe on its own.
    amount: uint256 = min(thawing, balance)
    # Effects before the transfer: the funds are gone before any code of the payee runs.
    self.accounts[msg.sender].balance = balance - amount
    self.accounts[msg.sender].thawing = 0
    self.accounts[msg.sender].thaw_end = 0
    log Withdrawn(payer=msg.sender, amount=amount)
    ok: bool = raw_call(msg.sender, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


# --- gateway signers --------------------------------------------------------------------


@external
def authorize_signer(signer: address):
    """@notice Let `signer` sign vouchers against the caller's balance; cancels a pending
            revocation of it."""
    assert signer != empty(address), "zero signer"
    state: SignerState = self.signers[msg.sender][signer]
    assert not state.authorized or state.revoke_at != 0, "already authorized"
    self.signers[msg.sender][signer] = SignerState(authorized=True, revoke_at=0)
    log SignerAuthorized(payer=msg.sender, signer=signer)


@external
def revoke_signer(signer: address):
    """
    @notice Revoke `signer` after thaw_period; until then its vouchers stay collectable, so
            receipts it signed while authorized can still be paid.
    """
    assert self._is_authorized(msg.sender, signer), "signer not authorized"
    assert self.signers[msg.sender][signer].revoke_at == 0, "revocation pending"
    revoke_at: uint256 = block.timestamp + thaw_period
    self.signers[msg.sender][signer].revoke_at = revoke_at
    log SignerRevocationStarted(payer=msg.sender, signer=signer, revoke_at=revoke_at)


# --- collection -------------------------------------------------------------------------


@external
@nonreentrant
def collect(voucher: Voucher, signature: Bytes[65]) -> uint256:
    """
    @notice Pay voucher.miner what the voucher's cumulative value adds to what this
            (payer, gateway, miner) was paid before, at most the payer's balance. Anyone may
            submit; the money always goes to voucher.miner.
    @return The amount taken from the payer, fees included.
    """
    assert voucher.payer != empty(address), "zero payer"
    assert voucher.miner != empty(address), "zero miner"
    signer: address = signatures._recover(self._voucher_digest(voucher), signature)
    assert signer == voucher.gateway, "signer is not the gateway"
    assert self._is_authorized(voucher.payer, signer), "gateway not authorized"

    already: uint256 = self.collected[voucher.payer][signer][voucher.miner]
    assert voucher.value_aggregate > already, "nothing to collect"
    balance: uint256 = self.accounts[voucher.payer].balance
    paid: uint256 = min(voucher.value_aggregate - already, balance)
    assert paid > 0, "payer balance empty"

    # Only what is paid counts as collected: the rest of the voucher stays collectable
    # after a top-up.
    balance -= paid
    self.accounts[voucher.payer].balance = balance
    if self.accounts[voucher.payer].thawing > balance:
        self.accounts[voucher.payer].thawing = balance
    self.collected[voucher.payer][signer][voucher.miner] = already + paid
    self.gateway_collected[voucher.payer][signer] += paid

    # The same rounding as protocol/pricing.split_payment: fees round down, the miner gets
    # the rest, so the three parts add up to `paid` exactly.
    protocol_fee: uint256 = paid * self.protocol_fee_ppm // PPM
    verifier_fee: uint256 = paid * self.verifier_pool_ppm // PPM
    miner_amount: uint256 = paid - protocol_fee - verifier_fee
    self.fees_owed[treasury] += protocol_fee
    self.fees_owed[verifier_pool] += verifier_fee
    log Collected(
        payer=voucher.payer,
        miner=voucher.miner,
        gateway=signer,
        value_aggregate=voucher.value_aggregate,
        paid=paid,
        miner_amount=miner_amount,
        protocol_fee=protocol_fee,
        verifier_fee=verifier_fee,
        receipts_root=voucher.receipts_root,
    )
    if miner_amount > 0:
        ok: bool = raw_call(voucher.miner, b"", value=miner_amount, revert_on_failure=False)
        assert ok, "transfer failed"
    return paid


@external
@nonreentrant
def claim_fees():
    """@notice Pay the caller the fees credited to it (treasury, verifier pool)."""
    amount: uint256 = self.fees_owed[msg.sender]
    assert amount > 0, "nothing to claim"
    self.fees_owed[msg.sender] = 0
    log FeesClaimed(recipient=msg.sender, amount=amount)
    ok: bool = raw_call(msg.sender, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


# --- administration ---------------------------------------------------------------------


@internal
@pure
def _check_fees(protocol_fee_ppm: uint256, verifier_pool_ppm: uint256):
    # Compared by subtraction, not sum: a sum of absurd inputs would overflow and revert
    # without a reason.
    assert protocol_fee_ppm <= MAX_FEE_PPM, "fees exceed 10%"
    assert verifier_pool_ppm <= MAX_FEE_PPM - protocol_fee_ppm, "fees exceed 10%"


@internal
@pure
def _fees_change(protocol_fee_ppm: uint256, verifier_pool_ppm: uint256) -> bytes32:
    return keccak256(abi_encode(protocol_fee_ppm, verifier_pool_ppm))


@external
def schedule_fees(protocol_fee_ppm: uint256, verifier_pool_ppm: uint256):
    """
    @notice Announce new fees (admin only), at most MAX_FEE_PPM together; anyone may apply
            them once the fee delay has passed. Replaces a pending change and restarts its
            clock. Collections until then pay the fees in force now.
    """
    two_step_admin._check_admin()
    self._check_fees(protocol_fee_ppm, verifier_pool_ppm)
    ready_at: uint256 = timelock._schedule(
        FEES_CHANGE, self._fees_change(protocol_fee_ppm, verifier_pool_ppm)
    )
    self.pending_protocol_fee_ppm = protocol_fee_ppm
    self.pending_verifier_pool_ppm = verifier_pool_ppm
    log FeesScheduled(
        protocol_fee_ppm=protocol_fee_ppm, verifier_pool_ppm=verifier_pool_ppm, ready_at=ready_at
    )


@external
def apply_fees():
    """@notice Put the scheduled fees in force; anyone may, once the fee delay has passed."""
    protocol_fee_ppm: uint256 = self.pending_protocol_fee_ppm
    verifier_pool_ppm: uint256 = self.pending_verifier_pool_ppm
    timelock._consume(FEES_CHANGE, self._fees_change(protocol_fee_ppm, verifier_pool_ppm))
    self.protocol_fee_ppm = protocol_fee_ppm
    self.verifier_pool_ppm = verifier_pool_ppm
    self.pending_protocol_fee_ppm = 0
    self.pending_verifier_pool_ppm = 0
    log FeesSet(protocol_fee_ppm=protocol_fee_ppm, verifier_pool_ppm=verifier_pool_ppm)


@external
def cancel_fees():
    """@notice Withdraw the scheduled fee change (admin only); the fees in force stay."""
    two_step_admin._check_admin()
    timelock._cancel(FEES_CHANGE)
    self.pending_protocol_fee_ppm = 0
    self.pending_verifier_pool_ppm = 0


# --- views ------------------------------------------------------------------------------


@external
@view
def is_authorized(payer: address, signer: address) -> bool:
    """@notice Whether `signer`'s vouchers for `payer` are collectable now."""
    return self._is_authorized(payer, signer)


@external
@pure
def max_fee_ppm() -> uint256:
    """@notice The most protocol fee + verifier pool share can ever be, in ppm."""
    return MAX_FEE_PPM


@external
@view
def domain_separator() -> bytes32:
    return eip712_domain._separator()


@external
@view
def voucher_digest(voucher: Voucher) -> bytes32:
    """@notice The EIP-712 digest a gateway signs for `voucher`."""
    return self._voucher_digest(voucher)
