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
"""

PPM: constant(uint256) = 1_000_000
MAX_THAW_PERIOD: constant(uint256) = 365 * 86400
# The half order of secp256k1: a signature with a larger s is the malleable twin of another.
# (0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0; a 32-byte hex literal
# would be a bytes32 in Vyper.)
SECP256K1_HALF_N: constant(uint256) = (
    57896044618658097711785492504343953926418782139537452191302581570759080747168
)

# Must match protocol/eip712.py and protocol/messages.py byte for byte.
DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("InferGrid")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")
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

event FeesSet:
    protocol_fee_ppm: uint256
    verifier_pool_ppm: uint256

event AdminTransferred:
    admin: indexed(address)


admin: public(address)
treasury: public(immutable(address))
verifier_pool: public(immutable(address))
thaw_period: public(immutable(uint256))
protocol_fee_ppm: public(uint256)
verifier_pool_ppm: public(uint256)

accounts: public(HashMap[address, Account])
# payer => signer => state
signers: public(HashMap[address, HashMap[address, SignerState]])
# payer => gateway => miner => paid so far; vouchers are cumulative, so each pays the rest.
collected: public(HashMap[address, HashMap[address, HashMap[address, uint256]]])
# payer => gateway => paid so far to all miners, for the gateway's headroom accounting.
gateway_collected: public(HashMap[address, HashMap[address, uint256]])
fees_owed: public(HashMap[address, uint256])

# The separator is cached for the deployment chain and recomputed after a fork changes the
# chain id, so a voucher signed for one chain is never valid on the other.
CACHED_CHAIN_ID: immutable(uint256)
CACHED_SEPARATOR: immutable(bytes32)


@deploy
def __init__(
    _treasury: address,
    _verifier_pool: address,
    protocol_fee_ppm: uint256,
    verifier_pool_ppm: uint256,
    _thaw_period: uint256,
):
    assert _treasury != empty(address), "zero treasury"
    assert _verifier_pool != empty(address), "zero verifier pool"
    assert protocol_fee_ppm + verifier_pool_ppm <= PPM, "fees exceed 100%"
    # Guards now + thaw_period against overflow and absurd lock-ups.
    assert _thaw_period <= MAX_THAW_PERIOD, "thaw period too long"
    self.admin = msg.sender
    treasury = _treasury
    verifier_pool = _verifier_pool
    thaw_period = _thaw_period
    self.protocol_fee_ppm = protocol_fee_ppm
    self.verifier_pool_ppm = verifier_pool_ppm
    CACHED_CHAIN_ID = chain.id
    CACHED_SEPARATOR = self._compute_separator()
    log AdminTransferred(admin=msg.sender)
    log FeesSet(protocol_fee_ppm=protocol_fee_ppm, verifier_pool_ppm=verifier_pool_ppm)


# --- EIP-712 ----------------------------------------------------------------------------


@internal
@view
def _compute_separator() -> bytes32:
    return keccak256(
        abi_encode(DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, self)
    )


@internal
@view
def _separator() -> bytes32:
    if chain.id == CACHED_CHAIN_ID:
        return CACHED_SEPARATOR
    return self._compute_separator()


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
    return keccak256(concat(b"\x19\x01", self._separator(), struct_hash))


@internal
@pure
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    assert len(signature) == 65, "invalid signature length"
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "invalid signature v"
    assert s <= SECP256K1_HALF_N, "malleable signature"
    assert r != 0 and s != 0, "invalid signature"
    signer: address = ecrecover(digest, v, r, s)
    # The precompile returns nothing (the zero address) for r or s off the curve order.
    assert signer != empty(address), "invalid signature"
    return signer


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
    signer: address = self._recover(self._voucher_digest(voucher), signature)
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


@external
def set_fees(protocol_fee_ppm: uint256, verifier_pool_ppm: uint256):
    assert msg.sender == self.admin, "only admin"
    assert protocol_fee_ppm + verifier_pool_ppm <= PPM, "fees exceed 100%"
    self.protocol_fee_ppm = protocol_fee_ppm
    self.verifier_pool_ppm = verifier_pool_ppm
    log FeesSet(protocol_fee_ppm=protocol_fee_ppm, verifier_pool_ppm=verifier_pool_ppm)


@external
def transfer_admin(new_admin: address):
    assert msg.sender == self.admin, "only admin"
    assert new_admin != empty(address), "zero admin"
    self.admin = new_admin
    log AdminTransferred(admin=new_admin)


# --- views ------------------------------------------------------------------------------


@external
@view
def is_authorized(payer: address, signer: address) -> bool:
    """@notice Whether `signer`'s vouchers for `payer` are collectable now."""
    return self._is_authorized(payer, signer)


@external
@view
def domain_separator() -> bytes32:
    return self._separator()


@external
@view
def voucher_digest(voucher: Voucher) -> bytes32:
    """@notice The EIP-712 digest a gateway signs for `voucher`."""
    return self._voucher_digest(voucher)
