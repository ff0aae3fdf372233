# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid DisputeManager
@notice The NodeRegistry's slasher. Two ways a miner loses stake:
        - equivocation: anyone shows two attestations the miner's registered signer made for
          one request hash with different response hashes; slashed at once, no vote;
        - a dispute (a failed audit): a challenger posts evidence and a deposit, the miner is
          frozen in the registry, active verifiers vote with their stake until the voting
          period ends, then anyone resolves it.
@dev Slashed stake never passes through this contract: registry.slash() credits each
     recipient in the registry, which pays out with its own claim(). This contract holds only
     challengers' deposits, paid back (or to the treasury) through claim() here.
     After deployment the registry's admin must call registry.set_slasher(this); nothing here
     works before that.
"""

PPM: constant(uint256) = 10**6
ROLE_MINER: constant(uint8) = 1
ROLE_VERIFIER: constant(uint8) = 2

# Dispute status; 0 is never stored, so it also means "no such dispute".
STATUS_OPEN: constant(uint8) = 1
STATUS_UPHELD: constant(uint8) = 2
STATUS_REJECTED: constant(uint8) = 3
STATUS_NO_QUORUM: constant(uint8) = 4

# EIP-712, exactly as protocol/eip712.py and protocol/messages.py compute it.
DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("InferGrid")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")
ATTESTATION_TYPEHASH: constant(bytes32) = keccak256(
    "Attestation(bytes32 requestHash,bytes32 responseHash,bytes32 modelId,address miner,"
    "uint256 tokensIn,uint256 tokensOut,bytes32 proofHash)"
)
# Signatures with s above half the secp256k1 order are the malleable twin of another.
# (0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0; a 64-digit hex literal
# would be a bytes32 in Vyper.)
SECP256K1_HALF_N: constant(uint256) = (
    57896044618658097711785492504343953926418782139537452191302581570759080747168
)


interface NodeRegistry:
    def signer_of(owner: address) -> address: view
    def role_of(owner: address) -> uint8: view
    def is_active(owner: address) -> bool: view
    def stake_of(owner: address) -> uint256: view
    def total_stake_of(owner: address) -> uint256: view
    def min_stake(role: uint8) -> uint256: view
    def unbonding_delay() -> uint256: view
    def slash(owner: address, amount: uint256, recipient: address) -> uint256: nonpayable
    def freeze(owner: address): nonpayable
    def unfreeze(owner: address): nonpayable


# Field order is messages.Attestation.as_tuple().
struct Attestation:
    request_hash: bytes32
    response_hash: bytes32
    model_id: bytes32
    miner: address
    tokens_in: uint256
    tokens_out: uint256
    proof_hash: bytes32


struct Dispute:
    challenger: address
    miner: address
    payer: address  # refunded first from an upheld slash; empty when there is no refund
    refund: uint256  # what the payer is owed at most
    evidence_hash: bytes32  # commits to the audit evidence kept off-chain
    deposit: uint256
    deadline: uint256  # votes strictly before, resolve at or after
    votes_for: uint256  # verifier stake voting to uphold
    votes_against: uint256
    status: uint8


event EquivocationSlashed:
    miner: indexed(address)
    request_hash: indexed(bytes32)
    reporter: indexed(address)
    response_hash_a: bytes32
    response_hash_b: bytes32
    amount: uint256  # taken in total
    to_reporter: uint256  # of which credited to the reporter; the rest went to the treasury

event DisputeOpened:
    dispute_id: indexed(uint256)
    miner: indexed(address)
    challenger: indexed(address)
    payer: address
    refund: uint256
    evidence_hash: bytes32
    deposit: uint256
    deadline: uint256

event Voted:
    dispute_id: indexed(uint256)
    voter: indexed(address)
    uphold: bool
    weight: uint256

event DisputeResolved:
    dispute_id: indexed(uint256)
    miner: indexed(address)
    status: uint8
    votes_for: uint256
    votes_against: uint256
    slashed: uint256  # to_payer + to_challenger + to_treasury, credited in the registry
    to_payer: uint256
    to_challenger: uint256
    to_treasury: uint256

event Credited:
    recipient: indexed(address)
    dispute_id: indexed(uint256)
    amount: uint256  # a deposit, returned or forfeited, claimable here

event Claimed:
    recipient: indexed(address)
    amount: uint256


registry: public(immutable(address))
escrow: public(immutable(address))  # only the EIP-712 verifyingContract
treasury: public(immutable(address))
dispute_deposit: public(immutable(uint256))
voting_period: public(immutable(uint256))
max_slash_ppm: public(immutable(uint256))
challenger_share_ppm: public(immutable(uint256))
equivocation_slash_ppm: public(immutable(uint256))
min_quorum_stake: public(immutable(uint256))
DOMAIN_SEPARATOR: immutable(bytes32)

disputes: HashMap[uint256, Dispute]
dispute_count: public(uint256)  # ids run 1..dispute_count
has_voted: public(HashMap[uint256, HashMap[address, bool]])
# (miner, request hash) pairs already slashed for equivocation: one conflict, one slash, however
# many more conflicting attestations the miner signed for that request.
equivocation_slashed: public(HashMap[address, HashMap[bytes32, bool]])
# Deposits owed, paid by claim().
credits: public(HashMap[address, uint256])


@deploy
def __init__(
    _registry: address,
    _escrow: address,
    _treasury: address,
    _dispute_deposit: uint256,
    _voting_period: uint256,
    _max_slash_ppm: uint256,
    _challenger_share_ppm: uint256,
    _equivocation_slash_ppm: uint256,
    _min_quorum_stake: uint256,
):
    assert _registry != empty(address), "zero registry"
    assert _escrow != empty(address), "zero escrow"
    assert _treasury != empty(address), "zero treasury"
    # A free dispute would let anyone freeze any miner at will.
    assert _dispute_deposit > 0, "zero deposit"
    assert _voting_period > 0, "zero voting period"
    # Without a quorum a single verifier with any stake could slash alone.
    assert _min_quorum_stake > 0, "zero quorum"
    assert _max_slash_ppm <= PPM, "ppm above 1e6"
    assert _challenger_share_ppm <= PPM, "ppm above 1e6"
    assert _equivocation_slash_ppm <= PPM, "ppm above 1e6"
    # A miner that starts unbonding when a dispute opens must still hold its stake when the
    # vote ends (the freeze covers the rest, but only once the dispute exists).
    delay: uint256 = staticcall NodeRegistry(_registry).unbonding_delay()
    assert delay > _voting_period, "unbonding must outlast disputes"
    registry = _registry
    escrow = _escrow
    treasury = _treasury
    dispute_deposit = _dispute_deposit
    voting_period = _voting_period
    max_slash_ppm = _max_slash_ppm
    challenger_share_ppm = _challenger_share_ppm
    equivocation_slash_ppm = _equivocation_slash_ppm
    min_quorum_stake = _min_quorum_stake
    DOMAIN_SEPARATOR = keccak256(
        abi_encode(DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, _escrow)
    )


# --- signatures -------------------------------------------------------------------------


@internal
@view
def _digest(a: Attestation) -> bytes32:
    struct_hash: bytes32 = keccak256(
        abi_encode(
            ATTESTATION_TYPEHASH,
            a.request_hash,
            a.response_hash,
            a.model_id,
            a.miner,
            a.tokens_in,
            a.tokens_out,
            a.proof_hash,
        )
    )
    return keccak256(concat(b"\x19\x01", DOMAIN_SEPARATOR, struct_hash))


@internal
@pure
def _recover(digest: bytes32, sig: Bytes[65]) -> address:
    # The same rules as eip712.recover: 65 bytes r ‖ s ‖ v, v in {27, 28}, low s, and a
    # signature that recovers at all (ecrecover gives the zero address otherwise).
    assert len(sig) == 65, "bad signature length"
    r: uint256 = convert(extract32(sig, 0), uint256)
    s: uint256 = convert(extract32(sig, 32), uint256)
    v: uint256 = convert(slice(sig, 64, 1), uint256)
    assert v == 27 or v == 28, "bad signature v"
    assert s != 0 and s <= SECP256K1_HALF_N, "malleable signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "invalid signature"
    return signer


# --- equivocation -----------------------------------------------------------------------


@external
@nonreentrant
def slash_equivocation(
    a: Attestation, sig_a: Bytes[65], b: Attestation, sig_b: Bytes[65]
) -> uint256:
    """
    @notice Slash a miner that signed two different responses to one request. The caller
            gets challenger_share_ppm of the slash, the treasury the rest, both as credits
            in the registry.
    @return The amount taken from the miner.
    """
    assert a.miner == b.miner, "different miners"
    assert a.request_hash == b.request_hash, "different requests"
    assert a.response_hash != b.response_hash, "same response"
    miner: address = a.miner
    assert not self.equivocation_slashed[miner][a.request_hash], "already slashed"
    signer: address = staticcall NodeRegistry(registry).signer_of(miner)
    assert signer != empty(address), "unknown miner"
    assert self._recover(self._digest(a), sig_a) == signer, "wrong signer"
    assert self._recover(self._digest(b), sig_b) == signer, "wrong signer"

    amount: uint256 = (
        staticcall NodeRegistry(registry).total_stake_of(miner) * equivocation_slash_ppm // PPM
    )
    assert amount > 0, "nothing to slash"
    self.equivocation_slashed[miner][a.request_hash] = True

    # Both parts come out of `amount`, which is at most what the miner holds, so each slash
    # takes all it asks for; the treasury's part is computed from what the first returned.
    reporter_part: uint256 = amount * challenger_share_ppm // PPM
    to_reporter: uint256 = 0
    if reporter_part > 0:
        to_reporter = extcall NodeRegistry(registry).slash(miner, reporter_part, msg.sender)
    to_treasury: uint256 = 0
    if amount > to_reporter:
        to_treasury = extcall NodeRegistry(registry).slash(miner, amount - to_reporter, treasury)
    taken: uint256 = to_reporter + to_treasury
    log EquivocationSlashed(
        miner=miner,
        request_hash=a.request_hash,
        reporter=msg.sender,
        response_hash_a=a.response_hash,
        response_hash_b=b.response_hash,
        amount=taken,
        to_reporter=to_reporter,
    )
    return taken


# --- disputes ---------------------------------------------------------------------------


@external
@payable
def open_dispute(
    miner: address, evidence_hash: bytes32, payer: address, refund: uint256
) -> uint256:
    """
    @notice Accuse `miner` (typically of a failed audit), depositing msg.value. The miner is
            frozen in the registry until the dispute is resolved.
    @param payer Who is refunded first if the dispute is upheld; may be empty if refund is 0.
    @param refund The most the payer is refunded from the slash.
    @return The dispute id (the first is 1).
    """
    assert msg.value >= dispute_deposit, "deposit too small"
    assert evidence_hash != empty(bytes32), "no evidence"
    assert staticcall NodeRegistry(registry).role_of(miner) == ROLE_MINER, "not a miner"
    assert refund == 0 or payer != empty(address), "zero payer"
    # Slashed stake credited back to the miner would shrink its punishment.
    assert payer != miner, "miner cannot be the payer"

    dispute_id: uint256 = self.dispute_count + 1
    self.dispute_count = dispute_id
    deadline: uint256 = block.timestamp + voting_period
    self.disputes[dispute_id] = Dispute(
        challenger=msg.sender,
        miner=miner,
        payer=payer,
        refund=refund,
        evidence_hash=evidence_hash,
        deposit=msg.value,
        deadline=deadline,
        votes_for=0,
        votes_against=0,
        status=STATUS_OPEN,
    )
    extcall NodeRegistry(registry).freeze(miner)
    log DisputeOpened(
        dispute_id=dispute_id,
        miner=miner,
        challenger=msg.sender,
        payer=payer,
        refund=refund,
        evidence_hash=evidence_hash,
        deposit=msg.value,
        deadline=deadline,
    )
    return dispute_id


@external
def vote(dispute_id: uint256, uphold: bool):
    """
    @notice Vote on an open dispute as an active verifier; the vote weighs the verifier's
            bonded stake at this moment. One vote per verifier per dispute, final.
    """
    status: uint8 = self.disputes[dispute_id].status
    assert status != 0, "unknown dispute"
    assert status == STATUS_OPEN, "dispute not open"
    assert block.timestamp < self.disputes[dispute_id].deadline, "voting closed"
    assert msg.sender != self.disputes[dispute_id].miner, "miner cannot vote"
    assert not self.has_voted[dispute_id][msg.sender], "already voted"
    assert staticcall NodeRegistry(registry).role_of(msg.sender) == ROLE_VERIFIER, (
        "not a verifier"
    )
    assert staticcall NodeRegistry(registry).is_active(msg.sender), "verifier not active"
    # Bonded stake only: unbonding funds are on their way out. A verifier slashed below the
    # minimum is not offered work by the network, and does not vote either.
    weight: uint256 = staticcall NodeRegistry(registry).stake_of(msg.sender)
    assert weight >= staticcall NodeRegistry(registry).min_stake(ROLE_VERIFIER), (
        "verifier stake below minimum"
    )

    self.has_voted[dispute_id][msg.sender] = True
    if uphold:
        self.disputes[dispute_id].votes_for += weight
    else:
        self.disputes[dispute_id].votes_against += weight
    log Voted(dispute_id=dispute_id, voter=msg.sender, uphold=uphold, weight=weight)


@internal
def _credit(recipient: address, dispute_id: uint256, amount: uint256):
    self.credits[recipient] += amount
    log Credited(recipient=recipient, dispute_id=dispute_id, amount=amount)


@external
@nonreentrant
def resolve(dispute_id: uint256) -> uint8:
    """
    @notice Close a dispute once its voting period is over (anyone may). Upheld (more stake
            for than against, and at least min_quorum_stake voted): up to max_slash_ppm of
            the miner's stake is slashed, the payer refunded first, the challenger given
            challenger_share_ppm of the rest, the treasury the remainder, and the deposit
            returned. Rejected (quorum, not upheld): the deposit goes to the treasury. No
            quorum: the deposit goes back. The miner is unfrozen in every case.
    @return The new status.
    """
    d: Dispute = self.disputes[dispute_id]
    assert d.status != 0, "unknown dispute"
    assert d.status == STATUS_OPEN, "already resolved"
    assert block.timestamp >= d.deadline, "voting not over"

    status: uint8 = STATUS_NO_QUORUM
    if d.votes_for + d.votes_against >= min_quorum_stake:
        status = STATUS_REJECTED
        if d.votes_for > d.votes_against:
            status = STATUS_UPHELD
    # Effects first: the status is final before any call leaves this contract.
    self.disputes[dispute_id].status = status

    to_payer: uint256 = 0
    to_challenger: uint256 = 0
    to_treasury: uint256 = 0
    if status == STATUS_UPHELD:
        # `target` is at most what the miner holds, so every slash below takes all it asks
        # for; each later part is still computed from what the earlier ones returned, so
        # nothing is credited that the miner did not lose. The miner may hold nothing by
        # now (slashed empty for equivocation meanwhile): then nothing is slashed.
        target: uint256 = (
            staticcall NodeRegistry(registry).total_stake_of(d.miner) * max_slash_ppm // PPM
        )
        refund_part: uint256 = min(d.refund, target)
        if refund_part > 0:
            to_payer = extcall NodeRegistry(registry).slash(d.miner, refund_part, d.payer)
        rest: uint256 = target - to_payer
        challenger_part: uint256 = rest * challenger_share_ppm // PPM
        if challenger_part > 0:
            to_challenger = extcall NodeRegistry(registry).slash(
                d.miner, challenger_part, d.challenger
            )
        if rest > to_challenger:
            to_treasury = extcall NodeRegistry(registry).slash(
                d.miner, rest - to_challenger, treasury
            )
        self._credit(d.challenger, dispute_id, d.deposit)
    elif status == STATUS_REJECTED:
        self._credit(treasury, dispute_id, d.deposit)
    else:
        self._credit(d.challenger, dispute_id, d.deposit)

    extcall NodeRegistry(registry).unfreeze(d.miner)
    log DisputeResolved(
        dispute_id=dispute_id,
        miner=d.miner,
        status=status,
        votes_for=d.votes_for,
        votes_against=d.votes_against,
        slashed=to_payer + to_challenger + to_treasury,
        to_payer=to_payer,
        to_challenger=to_challenger,
        to_treasury=to_treasury,
    )
    return status


@external
@nonreentrant
def claim():
    """@notice Pay the caller the deposits credited to it."""
    amount: uint256 = self.credits[msg.sender]
    assert amount > 0, "nothing to claim"
    self.credits[msg.sender] = 0
    log Claimed(recipient=msg.sender, amount=amount)
    ok: bool = raw_call(msg.sender, b"", value=amount, revert_on_failure=False)
    assert ok, "transfer failed"


# --- views ------------------------------------------------------------------------------


@external
@view
def dispute(dispute_id: uint256) -> Dispute:
    d: Dispute = self.disputes[dispute_id]
    assert d.status != 0, "unknown dispute"
    return d


@external
@view
def domain_separator() -> bytes32:
    return DOMAIN_SEPARATOR


@external
@view
def attestation_digest(a: Attestation) -> bytes32:
    """@notice The EIP-712 digest a miner signs for `a` in this deployment's domain."""
    return self._digest(a)
