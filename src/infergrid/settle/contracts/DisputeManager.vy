# pragma version ~=0.4.3
# pragma evm-version london
"""
@title InferGrid DisputeManager
@notice The NodeRegistry's slasher. Two ways a miner loses stake:
        - equivocation: anyone shows two attestations for one request hash with different
          response hashes, each signed by a key the miner holds or held within the
          registry's unbonding delay (registry.was_signer); slashed at once, no vote;
        - a dispute about one attested, paid response: a challenger posts the miner's signed
          attestation, the gateway's signed receipt for it, evidence and a deposit; the miner
          is frozen in the registry, verifiers vote with the stake they had bonded before
          the dispute opened, then anyone resolves it and settles each vote.
@dev Slashed stake never passes through this contract: registry.slash() credits each
     recipient in the registry, which pays out with its own claim(). This contract holds only
     challengers' deposits, paid back (or to the treasury) through claim() here.
     After deployment the registry's admin must call registry.set_slasher(this); nothing here
     works before that.
     Why each rule (the audit of issue 8):
     - the refund goes to the payer a gateway-signed receipt names, bounded by the receipt's
       value and by what the escrow actually collected from that payer for that (gateway,
       miner) minus what earlier disputes refunded it: a challenger cannot name itself payer
       of an unbounded refund;
     - a vote weighs min(bonded stake min_verifier_age before the dispute opened, bonded
       stake now), from a verifier registered at least that long before it opened: stake
       brought in for the accusation weighs nothing;
     - a voter stays frozen until settle_vote; one on the losing side of a verdict loses
       wrong_vote_slash_ppm of its vote weight;
     - no quorum forfeits no_quorum_forfeit_ppm of the deposit, open disputes are capped per
       miner and per challenger, an evidence hash is disputed once and a (miner, request)
       once judged: freezing an honest miner is not free.
"""

from lib import eip712_domain
from lib import signatures

initializes: eip712_domain

PPM: constant(uint256) = 10**6
ROLE_MINER: constant(uint8) = 1
ROLE_VERIFIER: constant(uint8) = 2

# Dispute status; 0 is never stored, so it also means "no such dispute".
STATUS_OPEN: constant(uint8) = 1
STATUS_UPHELD: constant(uint8) = 2
STATUS_REJECTED: constant(uint8) = 3
STATUS_NO_QUORUM: constant(uint8) = 4

# EIP-712 type hashes, exactly protocol/messages.py's ATTESTATION_TYPE and RECEIPT_TYPE.
ATTESTATION_TYPEHASH: constant(bytes32) = keccak256(
    "Attestation(bytes32 requestHash,bytes32 responseHash,bytes32 modelId,address miner,"
    "uint256 tokensIn,uint256 tokensOut,bytes32 proofHash)"
)
RECEIPT_TYPEHASH: constant(bytes32) = keccak256(
    "Receipt(bytes32 requestHash,address payer,address miner,address gateway,bytes32 modelId,"
    "uint256 tokensIn,uint256 tokensOut,uint256 value,uint256 timestamp,bytes32 attestationHash)"
)


interface NodeRegistry:
    def signer_of(owner: address) -> address: view
    def was_signer(owner: address, signer: address) -> bool: view
    def role_of(owner: address) -> uint8: view
    def is_active(owner: address) -> bool: view
    def stake_of(owner: address) -> uint256: view
    def stake_at(owner: address, timestamp: uint256) -> uint256: view
    def registered_at(owner: address) -> uint256: view
    def total_stake_of(owner: address) -> uint256: view
    def min_stake(role: uint8) -> uint256: view
    def unbonding_delay() -> uint256: view
    def slash(owner: address, amount: uint256, recipient: address) -> uint256: nonpayable
    def freeze(owner: address): nonpayable
    def unfreeze(owner: address): nonpayable


interface PaymentEscrow:
    def collected(payer: address, gateway: address, miner: address) -> uint256: view


# Field order is messages.Attestation.as_tuple().
struct Attestation:
    request_hash: bytes32
    response_hash: bytes32
    model_id: bytes32
    miner: address
    tokens_in: uint256
    tokens_out: uint256
    proof_hash: bytes32


# Field order is messages.Receipt's, the order of RECEIPT_TYPE.
struct Receipt:
    request_hash: bytes32
    payer: address
    miner: address
    gateway: address  # the gateway's signer, as the escrow keys `collected`
    model_id: bytes32
    tokens_in: uint256
    tokens_out: uint256
    value: uint256
    timestamp: uint256
    attestation_hash: bytes32


struct Dispute:
    challenger: address
    miner: address
    payer: address  # the receipt's payer: refunded first from an upheld slash
    gateway: address  # the receipt's gateway signer
    request_hash: bytes32
    refund: uint256  # the receipt's value: the most the payer is refunded
    evidence_hash: bytes32  # commits to the audit evidence kept off-chain
    deposit: uint256
    opened_at: uint256  # stake is weighed as it was min_verifier_age before this moment
    deadline: uint256  # opened_at + voting_period; votes strictly before, resolve at or after
    votes_for: uint256  # verifier stake voting to uphold
    votes_against: uint256
    status: uint8


struct Vote:
    weight: uint256  # 0: no vote (a vote always weighs at least the verifier minimum)
    uphold: bool
    settled: bool  # the voter was unfrozen (and slashed if it lost)


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
    gateway: address
    request_hash: bytes32
    refund: uint256
    evidence_hash: bytes32
    deposit: uint256
    opened_at: uint256
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

event VoteSettled:
    dispute_id: indexed(uint256)
    voter: indexed(address)
    slashed: uint256  # from the voter to the treasury; 0 unless it voted against the verdict

event Credited:
    recipient: indexed(address)
    dispute_id: indexed(uint256)
    amount: uint256  # a deposit or part of one, returned or forfeited, claimable here

event Claimed:
    recipient: indexed(address)
    amount: uint256


registry: public(immutable(address))
escrow: public(immutable(address))  # the EIP-712 verifyingContract, and what payers paid
treasury: public(immutable(address))
dispute_deposit: public(immutable(uint256))
voting_period: public(immutable(uint256))
max_slash_ppm: public(immutable(uint256))
challenger_share_ppm: public(immutable(uint256))
equivocation_slash_ppm: public(immutable(uint256))
min_quorum_stake: public(immutable(uint256))
min_verifier_age: public(immutable(uint256))
wrong_vote_slash_ppm: public(immutable(uint256))
no_quorum_forfeit_ppm: public(immutable(uint256))
max_open_per_miner: public(immutable(uint256))
max_open_per_challenger: public(immutable(uint256))

disputes: HashMap[uint256, Dispute]
dispute_count: public(uint256)  # ids run 1..dispute_count
votes: public(HashMap[uint256, HashMap[address, Vote]])
# Open disputes about each miner and by each challenger, bounded by the max_open_* caps.
open_on_miner: public(HashMap[address, uint256])
open_by_challenger: public(HashMap[address, uint256])
# Each evidence hash is disputed once, whatever the outcome; each (miner, request hash) once
# it has been judged (upheld or rejected): a dispute nobody judged does not close the request,
# so an accomplice's junk dispute cannot shield the miner from a real one.
evidence_disputed: public(HashMap[bytes32, bool])
request_disputed: public(HashMap[address, HashMap[bytes32, bool]])
# payer => gateway => miner => refunded so far by upheld disputes; with the escrow's
# `collected` for the same triple it bounds every later refund.
refunded: public(HashMap[address, HashMap[address, HashMap[address, uint256]]])
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
    _min_verifier_age: uint256,
    _wrong_vote_slash_ppm: uint256,
    _no_quorum_forfeit_ppm: uint256,
    _max_open_per_miner: uint256,
    _max_open_per_challenger: uint256,
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
    # A verifier registered in the block a dispute opens would vote on it.
    assert _min_verifier_age > 0, "zero verifier age"
    assert _wrong_vote_slash_ppm <= PPM, "ppm above 1e6"
    assert _no_quorum_forfeit_ppm <= PPM, "ppm above 1e6"
    # A zero cap would refuse every dispute.
    assert _max_open_per_miner > 0, "zero open disputes per miner"
    assert _max_open_per_challenger > 0, "zero open disputes per challenger"
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
    min_verifier_age = _min_verifier_age
    wrong_vote_slash_ppm = _wrong_vote_slash_ppm
    no_quorum_forfeit_ppm = _no_quorum_forfeit_ppm
    max_open_per_miner = _max_open_per_miner
    max_open_per_challenger = _max_open_per_challenger
    # The escrow's domain: one address configures all signing, and the separator follows a
    # chain-id change exactly as the escrow's does.
    eip712_domain.__init__(_escrow)


# --- signed messages --------------------------------------------------------------------


@internal
@pure
def _attestation_hash(a: Attestation) -> bytes32:
    return keccak256(
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


@internal
@pure
def _receipt_hash(r: Receipt) -> bytes32:
    return keccak256(
        abi_encode(
            RECEIPT_TYPEHASH,
            r.request_hash,
            r.payer,
            r.miner,
            r.gateway,
            r.model_id,
            r.tokens_in,
            r.tokens_out,
            r.value,
            r.timestamp,
            r.attestation_hash,
        )
    )


@internal
@view
def _signed_by_miner(miner: address, a: Attestation, signature: Bytes[65]) -> bool:
    """@notice Whether `signature` over `a` is by a key the registry says `miner` holds or
            held within the unbonding delay."""
    signer: address = signatures._recover(
        eip712_domain._digest(self._attestation_hash(a)), signature
    )
    return staticcall NodeRegistry(registry).was_signer(miner, signer)


# --- equivocation -----------------------------------------------------------------------


@external
@nonreentrant
def slash_equivocation(
    a: Attestation, sig_a: Bytes[65], b: Attestation, sig_b: Bytes[65]
) -> uint256:
    """
    @notice Slash a miner that signed two different responses to one request: each
            signature must be by a key of the miner (registry.was_signer: its current key or
            one it replaced less than the unbonding delay ago; the two may differ), so
            rotating the key does not escape. equivocation_slash_ppm of the miner's total
            stake is taken; the caller gets challenger_share_ppm of it and the treasury the
            rest, both as credits in the registry. A miner reporting itself (from its owner
            address or one of its keys) gets no share: all goes to the treasury.
    @return The amount taken from the miner.
    """
    assert a.miner == b.miner, "different miners"
    assert a.request_hash == b.request_hash, "different requests"
    assert a.response_hash != b.response_hash, "same response"
    miner: address = a.miner
    assert not self.equivocation_slashed[miner][a.request_hash], "already slashed"
    assert staticcall NodeRegistry(registry).signer_of(miner) != empty(address), "unknown miner"
    assert self._signed_by_miner(miner, a, sig_a), "wrong signer"
    assert self._signed_by_miner(miner, b, sig_b), "wrong signer"

    amount: uint256 = (
        staticcall NodeRegistry(registry).total_stake_of(miner) * equivocation_slash_ppm // PPM
    )
    assert amount > 0, "nothing to slash"
    self.equivocation_slashed[miner][a.request_hash] = True

    # A reporter share paid to the miner itself would shrink its own punishment.
    reporter_part: uint256 = 0
    if msg.sender != miner and not staticcall NodeRegistry(registry).was_signer(
        miner, msg.sender
    ):
        reporter_part = amount * challenger_share_ppm // PPM
    # Both parts come out of `amount`, which is at most what the miner holds, so each slash
    # takes all it asks for; the treasury's part is computed from what the first returned.
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
    attestation: Attestation,
    attestation_signature: Bytes[65],
    receipt: Receipt,
    receipt_signature: Bytes[65],
    evidence_hash: bytes32,
) -> uint256:
    """
    @notice Accuse the miner of one attested response (typically a failed audit),
            depositing msg.value. The attestation must be signed by a key of the miner
            (registry.was_signer), the receipt by its gateway, and the receipt must be the one
            for that attestation (same miner, request, model, and attestation struct hash).
            The receipt's payer is refunded first if the dispute is upheld, at most the
            receipt's value and what the escrow collected from it. The miner is frozen in the
            registry until the dispute is resolved.
    @return The dispute id (the first is 1).
    """
    assert msg.value >= dispute_deposit, "deposit too small"
    assert evidence_hash != empty(bytes32), "no evidence"
    assert not self.evidence_disputed[evidence_hash], "evidence already disputed"
    miner: address = attestation.miner
    assert staticcall NodeRegistry(registry).role_of(miner) == ROLE_MINER, "not a miner"
    assert not self.request_disputed[miner][attestation.request_hash], (
        "request already disputed"
    )
    assert self._signed_by_miner(miner, attestation, attestation_signature), (
        "not signed by the miner"
    )
    receipt_signer: address = signatures._recover(
        eip712_domain._digest(self._receipt_hash(receipt)), receipt_signature
    )
    assert receipt_signer == receipt.gateway, "receipt not signed by its gateway"
    assert (
        receipt.miner == miner
        and receipt.request_hash == attestation.request_hash
        and receipt.model_id == attestation.model_id
        and receipt.attestation_hash == self._attestation_hash(attestation)
    ), "receipt is not for this attestation"
    assert receipt.payer != empty(address), "zero payer"
    # Slashed stake credited back to the miner would shrink its punishment.
    assert receipt.payer != miner, "miner cannot be the payer"
    assert self.open_on_miner[miner] < max_open_per_miner, "too many open disputes on miner"
    assert self.open_by_challenger[msg.sender] < max_open_per_challenger, (
        "too many open disputes by challenger"
    )

    dispute_id: uint256 = self.dispute_count + 1
    self.dispute_count = dispute_id
    self.evidence_disputed[evidence_hash] = True
    self.request_disputed[miner][attestation.request_hash] = True
    self.open_on_miner[miner] += 1
    self.open_by_challenger[msg.sender] += 1
    deadline: uint256 = block.timestamp + voting_period
    self.disputes[dispute_id] = Dispute(
        challenger=msg.sender,
        miner=miner,
        payer=receipt.payer,
        gateway=receipt.gateway,
        request_hash=attestation.request_hash,
        refund=receipt.value,
        evidence_hash=evidence_hash,
        deposit=msg.value,
        opened_at=block.timestamp,
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
        payer=receipt.payer,
        gateway=receipt.gateway,
        request_hash=attestation.request_hash,
        refund=receipt.value,
        evidence_hash=evidence_hash,
        deposit=msg.value,
        opened_at=block.timestamp,
        deadline=deadline,
    )
    return dispute_id


@external
def vote(dispute_id: uint256, uphold: bool):
    """
    @notice Vote on an open dispute as an active verifier registered at least
            min_verifier_age before the dispute opened. The vote weighs
            min(bonded stake min_verifier_age before the dispute opened, bonded stake now),
            which must reach the verifier minimum. One vote per verifier per dispute, final; neither the
            miner, the challenger nor the payer votes. The voter is frozen in the registry
            until settle_vote, so the stake it voted with answers for the vote.
    """
    # Field by field, not the whole struct: a vote needs six of its thirteen slots.
    status: uint8 = self.disputes[dispute_id].status
    assert status != 0, "unknown dispute"
    assert status == STATUS_OPEN, "dispute not open"
    assert block.timestamp < self.disputes[dispute_id].deadline, "voting closed"
    assert msg.sender != self.disputes[dispute_id].miner, "miner cannot vote"
    assert msg.sender != self.disputes[dispute_id].challenger, "challenger cannot vote"
    assert msg.sender != self.disputes[dispute_id].payer, "payer cannot vote"
    opened_at: uint256 = self.disputes[dispute_id].opened_at
    assert self.votes[dispute_id][msg.sender].weight == 0, "already voted"
    assert staticcall NodeRegistry(registry).role_of(msg.sender) == ROLE_VERIFIER, (
        "not a verifier"
    )
    assert staticcall NodeRegistry(registry).is_active(msg.sender), "verifier not active"
    registered_at: uint256 = staticcall NodeRegistry(registry).registered_at(msg.sender)
    assert registered_at + min_verifier_age <= opened_at, "verifier too new"
    # Bonded stake only (unbonding funds are on their way out), as old as the verifier must
    # be: the challenger picks when a dispute opens, so stake added just before it (by the
    # challenger's own verifier) must not count. And no more than is still here to answer
    # for the vote. registered_at + min_verifier_age <= opened_at, so this cannot underflow.
    weight: uint256 = min(
        staticcall NodeRegistry(registry).stake_at(msg.sender, opened_at - min_verifier_age),
        staticcall NodeRegistry(registry).stake_of(msg.sender),
    )
    # A verifier slashed below the minimum is not offered work, and does not vote either.
    assert weight >= staticcall NodeRegistry(registry).min_stake(ROLE_VERIFIER), (
        "verifier stake below minimum"
    )

    self.votes[dispute_id][msg.sender] = Vote(weight=weight, uphold=uphold, settled=False)
    if uphold:
        self.disputes[dispute_id].votes_for += weight
    else:
        self.disputes[dispute_id].votes_against += weight
    extcall NodeRegistry(registry).freeze(msg.sender)
    log Voted(dispute_id=dispute_id, voter=msg.sender, uphold=uphold, weight=weight)


@internal
def _credit(recipient: address, dispute_id: uint256, amount: uint256):
    if amount == 0:
        return
    self.credits[recipient] += amount
    log Credited(recipient=recipient, dispute_id=dispute_id, amount=amount)


@external
@nonreentrant
def resolve(dispute_id: uint256) -> uint8:
    """
    @notice Close a dispute once its voting period is over (anyone may).
            Upheld (more stake for than against, and at least min_quorum_stake voted): a
            target of max_slash_ppm of the miner's total stake is slashed; the payer is
            refunded first, min(the receipt's value, what the escrow collected for (payer,
            gateway, miner) minus what disputes refunded it before, the target); the
            challenger gets challenger_share_ppm of the rest and the treasury the remainder;
            the deposit is returned.
            Rejected (quorum, not upheld): the deposit goes to the treasury.
            No quorum: no_quorum_forfeit_ppm of the deposit goes to the treasury, the rest
            back to the challenger.
            The miner is unfrozen in every case; the voters stay frozen until settle_vote.
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
    self.open_on_miner[d.miner] -= 1
    self.open_by_challenger[d.challenger] -= 1

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
        # The payer gets back at most what it paid this miner through this gateway and was
        # not refunded yet: a receipt alone proves a debt, only the escrow proves payment.
        paid: uint256 = staticcall PaymentEscrow(escrow).collected(d.payer, d.gateway, d.miner)
        already: uint256 = self.refunded[d.payer][d.gateway][d.miner]
        owed: uint256 = 0
        if paid > already:
            owed = paid - already
        refund_part: uint256 = min(min(d.refund, owed), target)
        if refund_part > 0:
            to_payer = extcall NodeRegistry(registry).slash(d.miner, refund_part, d.payer)
            self.refunded[d.payer][d.gateway][d.miner] = already + to_payer
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
        # Freezing a miner with a dispute nobody judges costs part of the deposit, and leaves
        # the request open to a dispute that is judged.
        self.request_disputed[d.miner][d.request_hash] = False
        forfeit: uint256 = d.deposit * no_quorum_forfeit_ppm // PPM
        self._credit(treasury, dispute_id, forfeit)
        self._credit(d.challenger, dispute_id, d.deposit - forfeit)

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
def settle_vote(dispute_id: uint256, voter: address) -> uint256:
    """
    @notice Settle one vote of a resolved dispute (anyone may): the voter is unfrozen, and
            if it voted against the verdict (against an upheld dispute, or for a rejected
            one) wrong_vote_slash_ppm of its vote weight, at most what it still holds, is
            slashed to the treasury. A no-quorum dispute has no verdict: nothing is slashed.
            Once per vote.
    @return The amount slashed from the voter.
    """
    status: uint8 = self.disputes[dispute_id].status
    assert status != 0, "unknown dispute"
    assert status != STATUS_OPEN, "dispute not resolved"
    v: Vote = self.votes[dispute_id][voter]
    assert v.weight != 0, "no such vote"
    assert not v.settled, "vote already settled"
    self.votes[dispute_id][voter].settled = True

    wrong: bool = (status == STATUS_UPHELD and not v.uphold) or (
        status == STATUS_REJECTED and v.uphold
    )
    slashed: uint256 = 0
    if wrong:
        # The voter may have lost stake since (another dispute's settlement, or an
        # equivocation slash): take what is left, and skip a slash of nothing, which the
        # registry refuses and which would keep the voter frozen for ever.
        amount: uint256 = min(
            v.weight * wrong_vote_slash_ppm // PPM,
            staticcall NodeRegistry(registry).total_stake_of(voter),
        )
        if amount > 0:
            slashed = extcall NodeRegistry(registry).slash(voter, amount, treasury)
    extcall NodeRegistry(registry).unfreeze(voter)
    log VoteSettled(dispute_id=dispute_id, voter=voter, slashed=slashed)
    return slashed


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
def has_voted(dispute_id: uint256, voter: address) -> bool:
    return self.votes[dispute_id][voter].weight != 0


@external
@view
def domain_separator() -> bytes32:
    """@notice The separator of the escrow's domain on the current chain id."""
    return eip712_domain._separator()


@external
@view
def attestation_digest(a: Attestation) -> bytes32:
    """@notice The EIP-712 digest a miner signs for `a` in this deployment's domain."""
    return eip712_domain._digest(self._attestation_hash(a))


@external
@view
def receipt_digest(r: Receipt) -> bytes32:
    """@notice The EIP-712 digest a gateway signs for `r` in this deployment's domain."""
    return eip712_domain._digest(self._receipt_hash(r))
