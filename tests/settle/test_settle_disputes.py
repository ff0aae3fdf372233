"""DisputeManager on the embedded EVM: equivocation slashing, disputes with stake-weighted
votes, and every balance that moves, down to the wei."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from eth_utils import keccak, to_checksum_address
from web3.types import TxReceipt

from infergrid.protocol.eip712 import SECP256K1_N, Domain, Signer
from infergrid.protocol.messages import Attestation, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractRevert, as_account
from infergrid.settle.disputes import (
    PPM,
    DisputeManager,
    DisputeRecord,
    deploy_disputes,
    find_equivocation,
)
from infergrid.settle.registry import Registry, deploy_registry

ESCROW = to_checksum_address("0x" + "e5" * 20)
ZERO_ADDRESS = to_checksum_address("0x" + "00" * 20)
# The miner's registered signer: a key apart from its owner key, as operators run it.
SIGNER_KEY = "0x" + "42" * 32
SIGNER = Signer(SIGNER_KEY).address

DEPOSIT = WEI_PER_BTT // 10
VOTING_PERIOD = 600  # the conftest registry unbonds in 3600 s
MAX_SLASH_PPM = 500_000
SHARE_PPM = 100_000
EQUIVOCATION_PPM = 250_000
QUORUM = 4 * WEI_PER_BTT

MINER_STAKE = 4 * WEI_PER_BTT
VERIFIER_STAKES = (2 * WEI_PER_BTT, 3 * WEI_PER_BTT, 5 * WEI_PER_BTT)
# Indexes into the dev keys.
ADMIN, MINER, V1, V2, V3, CHALLENGER, PAYER, TREASURY, REPORTER, OTHER = range(10)

REQUEST = keccak(b"request-1")
EVIDENCE = keccak(b"audit evidence")
OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "11" * 32, 7, 14)


# --- helpers ------------------------------------------------------------------------------------


def attest(
    miner: str, response: bytes = b"\x02" * 32, request: bytes = REQUEST, tokens_out: int = 9
) -> Attestation:
    return Attestation(
        request_hash=request,
        response_hash=response,
        model_id=bytes.fromhex(OFFER.model_id[2:]),
        miner=miner,
        tokens_in=5,
        tokens_out=tokens_out,
    )


def sign(domain: Domain, attestation: Attestation, key: str = SIGNER_KEY) -> bytes:
    return sign_message(domain, attestation, Signer(key))


def high_s_twin(sig: bytes) -> bytes:
    """The other valid signature of the same digest: s -> n - s, with v flipped."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


def received(chain: Chain, address: str, send: Callable[[], TxReceipt]) -> int:
    """What `address` received from the transaction `send` makes, its own gas added back."""
    before = chain.balance(address)
    receipt = send()
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    return chain.balance(address) - before + fee


def deploy(
    chain: Chain, keys: list[str], addrs: list[str], registry: Registry, **overrides: int
) -> DisputeManager:
    params = {
        "dispute_deposit_wei": DEPOSIT,
        "voting_period_s": VOTING_PERIOD,
        "max_slash_ppm": MAX_SLASH_PPM,
        "challenger_share_ppm": SHARE_PPM,
        "equivocation_slash_ppm": EQUIVOCATION_PPM,
        "min_quorum_stake_wei": QUORUM,
    }
    params.update(overrides)
    address = deploy_disputes(
        chain,
        keys[ADMIN],
        registry=registry.address,
        escrow=ESCROW,
        treasury=addrs[TREASURY],
        **params,
    )
    # Deployment does not make it the slasher; the registry's admin does.
    registry.set_slasher(keys[ADMIN], address)
    return DisputeManager(chain, address)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def dm(chain: Chain, keys: list[str], addrs: list[str], registry: Registry) -> DisputeManager:
    return deploy(chain, keys, addrs, registry)


@pytest.fixture
def domain(chain: Chain) -> Domain:
    return Domain(chain.chain_id, ESCROW)


@pytest.fixture
def miner(registry: Registry, keys: list[str], addrs: list[str]) -> str:
    registry.register(keys[MINER], Role.MINER, "http://miner", SIGNER, [OFFER], MINER_STAKE)
    return addrs[MINER]


@pytest.fixture
def verifiers(registry: Registry, keys: list[str], addrs: list[str]) -> list[str]:
    for index, stake in zip((V1, V2, V3), VERIFIER_STAKES, strict=True):
        registry.register(keys[index], Role.VERIFIER, "http://v", addrs[index], [], stake)
    return [addrs[V1], addrs[V2], addrs[V3]]


# --- deployment and the signing domain ----------------------------------------------------------


def test_parameters_domain_and_digest_match_python(
    dm: DisputeManager, registry: Registry, addrs: list[str], domain: Domain, miner: str
) -> None:
    assert dm.registry() == registry.address
    assert dm.escrow() == ESCROW
    assert dm.treasury() == addrs[TREASURY]
    assert (dm.dispute_deposit(), dm.voting_period(), dm.min_quorum_stake()) == (
        DEPOSIT,
        VOTING_PERIOD,
        QUORUM,
    )
    assert (dm.max_slash_ppm(), dm.challenger_share_ppm(), dm.equivocation_slash_ppm()) == (
        MAX_SLASH_PPM,
        SHARE_PPM,
        EQUIVOCATION_PPM,
    )
    assert registry.slasher() == dm.address
    assert dm.domain() == domain
    assert dm.domain_separator() == domain.separator
    attestation = attest(miner, tokens_out=2**256 - 1)
    assert dm.attestation_digest(attestation) == domain.digest(attestation.struct_hash())
    assert dm.dispute_count() == 0
    with pytest.raises(ContractRevert, match="unknown dispute"):
        dm.dispute(1)


@pytest.mark.parametrize(("voting_period", "ok"), [(3599, True), (3600, False), (3601, False)])
def test_unbonding_must_outlast_the_voting_period(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    registry: Registry,
    voting_period: int,
    ok: bool,
) -> None:
    assert registry.unbonding_delay() == 3600
    if ok:
        deploy(chain, keys, addrs, registry, voting_period_s=voting_period)
        return
    with pytest.raises(ContractRevert) as exc:
        deploy(chain, keys, addrs, registry, voting_period_s=voting_period)
    assert exc.value.reason == "unbonding must outlast disputes"


CONSTRUCTOR_DEFAULTS = (DEPOSIT, VOTING_PERIOD, MAX_SLASH_PPM, SHARE_PPM, EQUIVOCATION_PPM, QUORUM)


@pytest.mark.parametrize(
    ("position", "value", "reason"),
    [
        (0, ZERO_ADDRESS, "zero registry"),
        (1, ZERO_ADDRESS, "zero escrow"),
        (2, ZERO_ADDRESS, "zero treasury"),
        (3, 0, "zero deposit"),
        (4, 0, "zero voting period"),
        (5, PPM + 1, "ppm above 1e6"),
        (6, PPM + 1, "ppm above 1e6"),
        (7, PPM + 1, "ppm above 1e6"),
        (8, 0, "zero quorum"),
    ],
)
def test_constructor_rejects_bad_parameters(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    registry: Registry,
    position: int,
    value: object,
    reason: str,
) -> None:
    args: list[object] = [registry.address, ESCROW, addrs[TREASURY], *CONSTRUCTOR_DEFAULTS]
    args[position] = value
    artifact = load_artifact("DisputeManager")
    with pytest.raises(ContractRevert) as exc:
        chain.deploy(keys[ADMIN], artifact.abi, artifact.bytecode, *args)
    assert exc.value.reason == reason


def test_deploy_disputes_validates_in_python(
    chain: Chain, keys: list[str], addrs: list[str], registry: Registry
) -> None:
    good = {
        "registry": registry.address,
        "escrow": ESCROW,
        "treasury": addrs[TREASURY],
        "dispute_deposit_wei": DEPOSIT,
        "voting_period_s": VOTING_PERIOD,
        "max_slash_ppm": MAX_SLASH_PPM,
        "challenger_share_ppm": SHARE_PPM,
        "equivocation_slash_ppm": EQUIVOCATION_PPM,
        "min_quorum_stake_wei": QUORUM,
    }
    bad: list[tuple[str, object, str]] = [
        ("registry", "0x12", "registry"),
        ("escrow", ZERO_ADDRESS, "escrow is the zero address"),
        ("treasury", ZERO_ADDRESS, "treasury is the zero address"),
        ("dispute_deposit_wei", 0, "dispute deposit"),
        ("voting_period_s", -1, "voting period"),
        ("max_slash_ppm", PPM + 1, "max slash ppm"),
        ("challenger_share_ppm", -1, "challenger share ppm"),
        ("equivocation_slash_ppm", True, "equivocation slash ppm"),
        ("min_quorum_stake_wei", 0, "min quorum stake"),
    ]
    for name, value, message in bad:
        with pytest.raises(ValueError, match=message):
            deploy_disputes(chain, keys[ADMIN], **{**good, name: value})  # type: ignore[arg-type]


# --- equivocation -------------------------------------------------------------------------------


def test_equivocation_slashes_exactly_and_only_once(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    domain: Domain,
    miner: str,
) -> None:
    # Stake that is unbonding is slashable too: 3 BTT bonded + 1 BTT unbonding.
    registry.request_unbonding(keys[MINER], WEI_PER_BTT)
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    sig_a, sig_b = sign(domain, a), sign(domain, b)
    held = chain.balance(registry.address)

    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    to_reporter = amount * SHARE_PPM // PPM
    assert dm.slash_equivocation(keys[REPORTER], a, sig_a, b, sig_b) == amount
    assert registry.total_stake_of(miner) == MINER_STAKE - amount
    record = registry.node(miner)
    assert record is not None
    # Bonded stake goes first.
    assert (record.stake_wei, record.unbonding_wei) == (3 * WEI_PER_BTT - amount, WEI_PER_BTT)
    assert registry.credits(addrs[REPORTER]) == to_reporter
    assert registry.credits(addrs[TREASURY]) == amount - to_reporter
    assert dm.equivocation_slashed(miner, REQUEST)
    assert chain.balance(registry.address) == held  # credited, not paid yet
    assert chain.balance(dm.address) == 0  # slashed stake never passes through here

    # Once per (miner, request hash): the same pair, swapped, or a third response.
    c = attest(miner, b"\x04" * 32)
    for pair in ((a, sig_a, b, sig_b), (b, sig_b, a, sig_a), (a, sig_a, c, sign(domain, c))):
        with pytest.raises(ContractRevert) as exc:
            dm.slash_equivocation(keys[REPORTER], *pair)
        assert exc.value.reason == "already slashed"
    # Another request is another offence.
    other = keccak(b"request-2")
    d, e = attest(miner, b"\x05" * 32, other), attest(miner, b"\x06" * 32, other)
    second = (MINER_STAKE - amount) * EQUIVOCATION_PPM // PPM
    got = dm.slash_equivocation(keys[OTHER], d, sign(domain, d), e, sign(domain, e))
    assert got == second

    # The credits are real money, paid by the registry to whoever they are owed.
    assert received(chain, addrs[REPORTER], lambda: registry.claim(keys[REPORTER])) == to_reporter
    assert chain.balance(registry.address) == held - to_reporter


def test_equivocation_events(
    dm: DisputeManager, chain: Chain, keys: list[str], addrs: list[str], domain: Domain, miner: str
) -> None:
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    receipt = chain.send(
        keys[REPORTER],
        dm.contract,
        "slash_equivocation",
        a.as_tuple(),
        sign(domain, a),
        b.as_tuple(),
        sign(domain, b),
    )
    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    (event,) = dm.events(receipt)
    assert (event.name, event.args) == (
        "EquivocationSlashed",
        {
            "miner": miner,
            "request_hash": REQUEST,
            "reporter": addrs[REPORTER],
            "response_hash_a": b"\x02" * 32,
            "response_hash_b": b"\x03" * 32,
            "amount": amount,
            "to_reporter": amount * SHARE_PPM // PPM,
        },
    )
    registry = Registry(chain, dm.registry())
    slashes = [e for e in registry.events(receipt) if e.name == "Slashed"]
    assert [(e.args["recipient"], e.args["amount"]) for e in slashes] == [
        (addrs[REPORTER], amount * SHARE_PPM // PPM),
        (addrs[TREASURY], amount - amount * SHARE_PPM // PPM),
    ]


def test_what_is_not_equivocation(
    dm: DisputeManager, keys: list[str], addrs: list[str], domain: Domain, miner: str
) -> None:
    a = attest(miner, b"\x02" * 32)
    cases = [
        # Same response: the miner said the same thing twice (other fields differ).
        (attest(miner, b"\x02" * 32, tokens_out=10), "same response"),
        # Different requests may well have different responses.
        (attest(miner, b"\x03" * 32, keccak(b"request-2")), "different requests"),
        (attest(addrs[OTHER], b"\x03" * 32), "different miners"),
    ]
    for b, reason in cases:
        with pytest.raises(ContractRevert) as exc:
            dm.slash_equivocation(keys[REPORTER], a, sign(domain, a), b, sign(domain, b))
        assert exc.value.reason == reason
    assert not dm.equivocation_slashed(miner, REQUEST)


def _bad_v(sig: bytes, v: int) -> bytes:
    return sig[:64] + bytes([v])


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        # The miner's owner key is not its registered signer.
        (lambda d, att: sign(d, att, "0x" + "43" * 32), "wrong signer"),
        (lambda d, att: sign(Domain(d.chain_id + 1, ESCROW), att), "wrong signer"),
        (lambda d, att: sign(Domain(d.chain_id, "0x" + "e6" * 20), att), "wrong signer"),
        (lambda d, att: high_s_twin(sign(d, att)), "malleable signature"),
        (lambda d, att: _bad_v(sign(d, att), 0), "bad signature v"),
        (lambda d, att: _bad_v(sign(d, att), 1), "bad signature v"),
        (lambda d, att: _bad_v(sign(d, att), 29), "bad signature v"),
        (lambda d, att: b"\x00" * 32 + sign(d, att)[32:], "invalid signature"),  # r = 0
    ],
    ids=[
        "other-key",
        "other-chain",
        "other-escrow",
        "high-s",
        "v0",
        "v1",
        "v29",
        "zero-r",
    ],
)
def test_bad_signatures_are_refused(
    dm: DisputeManager,
    keys: list[str],
    domain: Domain,
    miner: str,
    forge: Callable[[Domain, Attestation], bytes],
    reason: str,
) -> None:
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    good_a, good_b = sign(domain, a), sign(domain, b)
    # Either signature of the pair may be the bad one.
    for pair in ((a, forge(domain, a), b, good_b), (a, good_a, b, forge(domain, b))):
        with pytest.raises(ContractRevert) as exc:
            dm.slash_equivocation(keys[REPORTER], *pair)
        assert exc.value.reason == reason
    assert dm.slash_equivocation(keys[REPORTER], a, good_a, b, good_b) > 0


def test_signature_length_and_unknown_miner(
    dm: DisputeManager, chain: Chain, keys: list[str], addrs: list[str], domain: Domain, miner: str
) -> None:
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    short = sign(domain, b)[:64]
    with pytest.raises(ValueError, match="65 bytes"):
        dm.slash_equivocation(keys[REPORTER], a, sign(domain, a), b, short)
    with pytest.raises(ContractRevert, match="bad signature length"):
        chain.send(
            keys[REPORTER],
            dm.contract,
            "slash_equivocation",
            a.as_tuple(),
            sign(domain, a),
            b.as_tuple(),
            short,
        )
    # No node behind the attestations' miner address.
    c, d = attest(addrs[OTHER], b"\x02" * 32), attest(addrs[OTHER], b"\x03" * 32)
    with pytest.raises(ContractRevert, match="unknown miner"):
        dm.slash_equivocation(keys[REPORTER], c, sign(domain, c), d, sign(domain, d))


def test_signatures_are_checked_against_the_current_signer(
    dm: DisputeManager, registry: Registry, keys: list[str], domain: Domain, miner: str
) -> None:
    # Documents a limit: after a signer rotation, attestations by the old key no longer
    # count on-chain. Reporters must report before the miner rotates.
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    sig_a, sig_b = sign(domain, a), sign(domain, b)
    registry.update(keys[MINER], "http://miner", Signer("0x" + "44" * 32).address, [OFFER])
    with pytest.raises(ContractRevert, match="wrong signer"):
        dm.slash_equivocation(keys[REPORTER], a, sig_a, b, sig_b)


def test_equivocation_slash_is_bounded_by_what_the_miner_holds(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    registry: Registry,
    domain: Domain,
    miner: str,
) -> None:
    dm = deploy(chain, keys, addrs, registry, equivocation_slash_ppm=PPM)
    registry.request_unbonding(keys[MINER], WEI_PER_BTT)
    held = chain.balance(registry.address)
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    assert dm.slash_equivocation(keys[REPORTER], a, sign(domain, a), b, sign(domain, b)) == (
        MINER_STAKE
    )
    assert registry.node(miner) is None  # everything gone, unbonding included: forgotten
    to_reporter = MINER_STAKE * SHARE_PPM // PPM
    assert registry.credits(addrs[REPORTER]) == to_reporter
    assert registry.credits(addrs[TREASURY]) == MINER_STAKE - to_reporter
    assert chain.balance(registry.address) == held  # nothing created, nothing lost
    # Nothing is left to take, and the node is gone.
    c, d = attest(miner, b"\x05" * 32, keccak(b"r2")), attest(miner, b"\x06" * 32, keccak(b"r2"))
    with pytest.raises(ContractRevert, match="unknown miner"):
        dm.slash_equivocation(keys[REPORTER], c, sign(domain, c), d, sign(domain, d))
    assert received(chain, addrs[TREASURY], lambda: registry.claim(keys[TREASURY])) == (
        MINER_STAKE - to_reporter
    )


def test_zero_equivocation_slash_is_refused(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    registry: Registry,
    domain: Domain,
    miner: str,
) -> None:
    dm = deploy(chain, keys, addrs, registry, equivocation_slash_ppm=0)
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    with pytest.raises(ContractRevert, match="nothing to slash"):
        dm.slash_equivocation(keys[REPORTER], a, sign(domain, a), b, sign(domain, b))
    assert not dm.equivocation_slashed(miner, REQUEST)  # a later deployment may still act


# --- find_equivocation (pure) -------------------------------------------------------------------


def test_find_equivocation(domain: Domain, addrs: list[str]) -> None:
    miner = addrs[MINER]
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    same_again = attest(miner, b"\x02" * 32, tokens_out=10)
    other_request = attest(miner, b"\x04" * 32, keccak(b"request-2"))
    other_miner = attest(addrs[OTHER], b"\x05" * 32)
    sig = {att: sign(domain, att) for att in (a, b, same_again, other_request, other_miner)}

    def signed(*atts: Attestation) -> list[tuple[Attestation, bytes]]:
        return [(att, sig[att]) for att in atts]

    assert find_equivocation([]) is None
    assert find_equivocation(signed(a, same_again, other_request, other_miner)) is None
    found = find_equivocation(signed(other_request, a, same_again, other_miner, b))
    assert found == (a, sig[a], b, sig[b])

    # With the domain: a forged attestation (another key) pairs with nothing, and bad
    # signatures are skipped.
    forged = (b, sign(domain, b, "0x" + "43" * 32))
    broken = (b, b"\x00" * 65)
    assert find_equivocation([(a, sig[a]), forged, broken], domain=domain) is None
    # Without it, the caller vouches for the signatures.
    assert find_equivocation([(a, sig[a]), forged]) == (a, sig[a], *forged)
    # Two forgeries by one other key conflict with each other, but not under the registered
    # signer.
    forged_a = (a, sign(domain, a, "0x" + "43" * 32))
    assert find_equivocation([forged_a, forged], domain=domain) == (*forged_a, *forged)

    def registered(owner: str) -> str | None:
        return SIGNER if owner == miner else None

    assert find_equivocation([forged_a, forged], domain=domain, signer_of=registered) is None
    assert find_equivocation(
        [forged_a, (a, sig[a]), forged, (b, sig[b])], domain=domain, signer_of=registered
    ) == (a, sig[a], b, sig[b])


# --- disputes -----------------------------------------------------------------------------------


def test_open_dispute_freezes_the_miner(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
) -> None:
    registry.request_unbonding(keys[MINER], WEI_PER_BTT)
    receipt = chain.send(
        keys[CHALLENGER],
        dm.contract,
        "open_dispute",
        miner,
        EVIDENCE,
        addrs[PAYER],
        WEI_PER_BTT // 2,
        value=DEPOSIT + 1,  # more than the minimum is fine: all of it is the deposit
    )
    deadline = chain.timestamp() + VOTING_PERIOD
    events = dm.events(receipt)
    assert [(e.name, e.args) for e in events] == [
        (
            "DisputeOpened",
            {
                "dispute_id": 1,
                "miner": miner,
                "challenger": addrs[CHALLENGER],
                "payer": addrs[PAYER],
                "refund": WEI_PER_BTT // 2,
                "evidence_hash": EVIDENCE,
                "deposit": DEPOSIT + 1,
                "deadline": deadline,
            },
        )
    ]
    assert "NodeFrozen" in [e.name for e in registry.events(receipt)]
    assert dm.dispute(1) == DisputeRecord(
        id=1,
        challenger=addrs[CHALLENGER],
        miner=miner,
        payer=addrs[PAYER],
        refund_wei=WEI_PER_BTT // 2,
        evidence_hash=EVIDENCE,
        deposit_wei=DEPOSIT + 1,
        deadline=deadline,
        votes_for_wei=0,
        votes_against_wei=0,
        status="open",
    )
    assert dm.dispute_count() == 1
    assert chain.balance(dm.address) == DEPOSIT + 1

    # Frozen: the unbonding funds matured, and still cannot leave; no new unbonding either.
    assert registry.is_frozen(miner)
    chain.increase_time(3600)
    for action in (
        lambda: registry.withdraw(keys[MINER]),
        lambda: registry.request_unbonding(keys[MINER], WEI_PER_BTT),
        lambda: registry.deregister(keys[MINER]),
    ):
        with pytest.raises(ContractRevert, match="node frozen"):
            action()
    # Still listed for gateways, marked frozen (they skip it themselves).
    assert [(n.owner, n.frozen) for n in registry.nodes(role=Role.MINER)] == [(miner, True)]

    # No votes at all: no quorum, the deposit goes back, the miner is free again.
    assert dm.resolve(keys[OTHER], 1).status == "no_quorum"
    assert not registry.is_frozen(miner)
    assert dm.credits(addrs[CHALLENGER]) == DEPOSIT + 1
    assert received(chain, addrs[CHALLENGER], lambda: dm.claim(keys[CHALLENGER])) == DEPOSIT + 1
    assert chain.balance(dm.address) == 0
    registry.withdraw(keys[MINER])


def test_open_dispute_refusals(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
) -> None:
    payer = addrs[PAYER]
    cases: list[tuple[dict[str, object], str]] = [
        ({"deposit_wei": DEPOSIT - 1}, "deposit too small"),
        ({"evidence_hash": b"\x00" * 32}, "no evidence"),
        ({"miner": verifiers[0]}, "not a miner"),
        ({"miner": addrs[OTHER]}, "not a miner"),
        ({"payer": ZERO_ADDRESS}, "zero payer"),
        ({"payer": miner}, "miner cannot be the payer"),
    ]
    base: dict[str, object] = {
        "miner": miner,
        "evidence_hash": EVIDENCE,
        "payer": payer,
        "refund_wei": 1,
        "deposit_wei": DEPOSIT,
    }
    for change, reason in cases:
        with pytest.raises(ContractRevert) as exc:
            dm.open_dispute(keys[CHALLENGER], **{**base, **change})  # type: ignore[arg-type]
        assert exc.value.reason == reason
    assert dm.dispute_count() == 0 and not registry.is_frozen(miner)
    # No refund, no payer needed.
    assert dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, ZERO_ADDRESS, 0) == 1


def test_votes_are_weighted_by_stake_and_checked(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
) -> None:
    # A gateway, and a verifier that deregistered (inactive, still unbonding).
    registry.register(keys[OTHER], Role.GATEWAY, "http://gw", addrs[OTHER], [], WEI_PER_BTT)
    registry.deregister(keys[V3])
    dispute_id = dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, addrs[PAYER], 0)

    receipt = dm.vote(keys[V1], dispute_id, True)
    assert [(e.name, e.args) for e in dm.events(receipt)] == [
        (
            "Voted",
            {
                "dispute_id": dispute_id,
                "voter": addrs[V1],
                "uphold": True,
                "weight": VERIFIER_STAKES[0],
            },
        )
    ]
    dm.vote(keys[V2], dispute_id, False)
    record = dm.dispute(dispute_id)
    assert (record.votes_for_wei, record.votes_against_wei) == VERIFIER_STAKES[:2]
    assert dm.has_voted(dispute_id, addrs[V1]) and not dm.has_voted(dispute_id, addrs[V3])

    refusals = [
        (V1, dispute_id, "already voted"),
        (MINER, dispute_id, "miner cannot vote"),
        (OTHER, dispute_id, "not a verifier"),  # a gateway
        (CHALLENGER, dispute_id, "not a verifier"),  # not registered at all
        (V3, dispute_id, "verifier not active"),
        (V1, dispute_id + 1, "unknown dispute"),
    ]
    for who, target, reason in refusals:
        with pytest.raises(ContractRevert) as exc:
            dm.vote(keys[who], target, True)
        assert exc.value.reason == reason

    # Stake counts as it is when the vote is cast.
    registry.register(keys[V3], Role.VERIFIER, "http://v", addrs[V3], [], 2 * WEI_PER_BTT)
    registry.stake(keys[V3], WEI_PER_BTT)
    dm.vote(keys[V3], dispute_id, True)
    assert dm.dispute(dispute_id).votes_for_wei == 2 * WEI_PER_BTT + 3 * WEI_PER_BTT

    chain.increase_time(VOTING_PERIOD)
    with pytest.raises(ContractRevert, match="voting closed"):
        dm.vote(keys[V1], dispute_id, True)


def test_a_verifier_slashed_below_the_minimum_cannot_vote(
    dm: DisputeManager,
    registry: Registry,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
) -> None:
    dispute_id = dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, addrs[PAYER], 0)
    # The admin lends the slasher role to a key for a moment to cut V1 below its minimum.
    registry.set_slasher(keys[ADMIN], addrs[OTHER])
    registry.slash(keys[OTHER], addrs[V1], 1, addrs[TREASURY])
    registry.set_slasher(keys[ADMIN], dm.address)
    with pytest.raises(ContractRevert, match="verifier stake below minimum"):
        dm.vote(keys[V1], dispute_id, True)


def _open_and_vote(
    dm: DisputeManager,
    keys: list[str],
    miner: str,
    payer: str,
    refund: int,
    votes: dict[int, bool],
) -> int:
    dispute_id = dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, payer, refund)
    for voter, uphold in votes.items():
        dm.vote(keys[voter], dispute_id, uphold)
    return dispute_id


def test_upheld_dispute_slashes_refunds_and_rewards(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
) -> None:
    refund = WEI_PER_BTT // 2
    # 5 BTT for against 3 BTT: upheld, quorum 8 >= 4.
    dispute_id = _open_and_vote(
        dm, keys, miner, addrs[PAYER], refund, {V1: True, V2: False, V3: True}
    )
    registry_held = chain.balance(registry.address)
    with pytest.raises(ContractRevert, match="voting not over"):
        dm.resolve(keys[OTHER], dispute_id)
    chain.increase_time(VOTING_PERIOD)

    receipt = chain.send(keys[OTHER], dm.contract, "resolve", dispute_id)
    target = MINER_STAKE * MAX_SLASH_PPM // PPM  # 2 BTT
    to_challenger = (target - refund) * SHARE_PPM // PPM
    to_treasury = target - refund - to_challenger
    resolved = [e for e in dm.events(receipt) if e.name == "DisputeResolved"]
    assert resolved[0].args == {
        "dispute_id": dispute_id,
        "miner": miner,
        "status": 2,
        "votes_for": 7 * WEI_PER_BTT,
        "votes_against": 3 * WEI_PER_BTT,
        "slashed": target,
        "to_payer": refund,
        "to_challenger": to_challenger,
        "to_treasury": to_treasury,
    }
    assert [e.name for e in registry.events(receipt)] == [
        "Slashed",
        "Slashed",
        "Slashed",
        "NodeUnfrozen",
    ]
    record = dm.dispute(dispute_id)
    assert record.status == "upheld"
    assert registry.total_stake_of(miner) == MINER_STAKE - target
    assert not registry.is_frozen(miner)
    assert chain.balance(registry.address) == registry_held

    # Every wei, claimed: the payer's refund and the challenger's share from the registry,
    # the deposit from the dispute manager.
    assert received(chain, addrs[PAYER], lambda: registry.claim(keys[PAYER])) == refund
    assert received(chain, addrs[CHALLENGER], lambda: registry.claim(keys[CHALLENGER])) == (
        to_challenger
    )
    assert received(chain, addrs[TREASURY], lambda: registry.claim(keys[TREASURY])) == to_treasury
    assert received(chain, addrs[CHALLENGER], lambda: dm.claim(keys[CHALLENGER])) == DEPOSIT
    assert chain.balance(registry.address) == registry_held - target
    assert chain.balance(dm.address) == 0
    with pytest.raises(ContractRevert, match="nothing to claim"):
        dm.claim(keys[CHALLENGER])

    with pytest.raises(ContractRevert, match="already resolved"):
        dm.resolve(keys[OTHER], dispute_id)
    with pytest.raises(ContractRevert, match="dispute not open"):
        dm.vote(keys[V1], dispute_id, True)
    with pytest.raises(ContractRevert, match="unknown dispute"):
        dm.resolve(keys[OTHER], dispute_id + 1)
    # Free again: the miner can leave.
    registry.deregister(keys[MINER])


def test_refund_is_capped_by_the_slash(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
) -> None:
    dispute_id = _open_and_vote(dm, keys, miner, addrs[PAYER], 100 * WEI_PER_BTT, {V3: True})
    chain.increase_time(VOTING_PERIOD)
    assert dm.resolve(keys[OTHER], dispute_id).status == "upheld"
    target = MINER_STAKE * MAX_SLASH_PPM // PPM
    assert registry.credits(addrs[PAYER]) == target
    assert registry.credits(addrs[CHALLENGER]) == 0
    assert registry.credits(addrs[TREASURY]) == 0
    assert registry.total_stake_of(miner) == MINER_STAKE - target
    assert dm.credits(addrs[CHALLENGER]) == DEPOSIT


@pytest.mark.parametrize(
    ("votes", "status"),
    [
        ({V1: True, V2: False}, "rejected"),  # 2 for 3 against, quorum 5
        ({V1: False, V3: True, V2: False}, "rejected"),  # 5 for 5 against: a tie is no verdict
        ({V3: False}, "rejected"),  # one verifier with 5 >= 4 against
        ({V2: True}, "no_quorum"),  # 3 < 4, however one-sided
        ({}, "no_quorum"),
    ],
)
def test_rejected_and_no_quorum_disputes_slash_nothing(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
    votes: dict[int, bool],
    status: str,
) -> None:
    dispute_id = _open_and_vote(dm, keys, miner, addrs[PAYER], WEI_PER_BTT, votes)
    chain.increase_time(VOTING_PERIOD)
    record = dm.resolve(keys[MINER], dispute_id)  # the miner itself may close it
    assert record.status == status
    assert registry.total_stake_of(miner) == MINER_STAKE
    assert not registry.is_frozen(miner)
    for who in (PAYER, CHALLENGER, TREASURY):
        assert registry.credits(addrs[who]) == 0
    loser = TREASURY if status == "rejected" else CHALLENGER
    winner = CHALLENGER if status == "rejected" else TREASURY
    assert dm.credits(addrs[loser]) == DEPOSIT and dm.credits(addrs[winner]) == 0
    assert received(chain, addrs[loser], lambda: dm.claim(keys[loser])) == DEPOSIT
    assert chain.balance(dm.address) == 0


def test_quorum_is_inclusive(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    registry: Registry,
    miner: str,
    verifiers: list[str],
) -> None:
    dm = deploy(chain, keys, addrs, registry, min_quorum_stake_wei=5 * WEI_PER_BTT)
    dispute_id = _open_and_vote(dm, keys, miner, addrs[PAYER], 0, {V1: True, V2: True})
    chain.increase_time(VOTING_PERIOD)
    assert dm.resolve(keys[OTHER], dispute_id).status == "upheld"


def test_overlapping_disputes_keep_the_miner_frozen_until_the_last(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miner: str,
    verifiers: list[str],
) -> None:
    first = dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, addrs[PAYER], 0)
    chain.increase_time(VOTING_PERIOD // 2)
    second = dm.open_dispute(keys[OTHER], miner, keccak(b"more"), addrs[PAYER], 0)
    assert second == first + 1
    chain.increase_time(VOTING_PERIOD // 2)
    dm.resolve(keys[OTHER], first)
    assert registry.is_frozen(miner)
    with pytest.raises(ContractRevert, match="voting not over"):
        dm.resolve(keys[OTHER], second)
    with pytest.raises(ContractRevert, match="node frozen"):
        registry.deregister(keys[MINER])
    chain.increase_time(VOTING_PERIOD // 2)
    dm.resolve(keys[OTHER], second)
    assert not registry.is_frozen(miner)


def test_upheld_dispute_on_an_emptied_miner_still_resolves(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    registry: Registry,
    domain: Domain,
    miner: str,
    verifiers: list[str],
) -> None:
    # The miner is slashed empty for equivocation while its dispute is open: the dispute
    # still closes (nothing left to slash), unfreezes, and returns the deposit.
    dm = deploy(chain, keys, addrs, registry, equivocation_slash_ppm=PPM)
    dispute_id = _open_and_vote(dm, keys, miner, addrs[PAYER], WEI_PER_BTT, {V3: True})
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    dm.slash_equivocation(keys[REPORTER], a, sign(domain, a), b, sign(domain, b))
    assert registry.node(miner) is None and registry.is_frozen(miner)
    chain.increase_time(VOTING_PERIOD)
    assert dm.resolve(keys[OTHER], dispute_id).status == "upheld"
    assert registry.credits(addrs[PAYER]) == 0
    assert dm.credits(addrs[CHALLENGER]) == DEPOSIT
    assert not registry.is_frozen(miner)


def test_gas(
    dm: DisputeManager,
    registry: Registry,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    domain: Domain,
    miner: str,
    verifiers: list[str],
) -> None:
    """Gas of each operation, printed with -s; bounds catch an accidental blow-up."""
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    fn = dm.contract
    used = {
        "slash_equivocation": chain.send(
            keys[REPORTER],
            fn,
            "slash_equivocation",
            a.as_tuple(),
            sign(domain, a),
            b.as_tuple(),
            sign(domain, b),
        )["gasUsed"],
        "open_dispute": chain.send(
            keys[CHALLENGER],
            fn,
            "open_dispute",
            miner,
            EVIDENCE,
            addrs[PAYER],
            WEI_PER_BTT,
            value=DEPOSIT,
        )["gasUsed"],
        "vote": chain.send(keys[V1], fn, "vote", 1, True)["gasUsed"],
    }
    dm.vote(keys[V2], 1, True)  # 5 BTT for: upheld, with a refund, a share and a remainder
    no_quorum = dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, addrs[PAYER], 0)
    chain.increase_time(VOTING_PERIOD)
    used["resolve_upheld"] = chain.send(keys[OTHER], fn, "resolve", 1)["gasUsed"]
    used["resolve_no_quorum"] = chain.send(keys[OTHER], fn, "resolve", no_quorum)["gasUsed"]
    assert [dm.dispute(i).status for i in (1, no_quorum)] == ["upheld", "no_quorum"]
    print({name: int(gas) for name, gas in used.items()})
    # Mostly fresh storage slots at 22k each: the two credits and the once-only flag for
    # an equivocation; the ten unpacked slots of a Dispute plus the freeze counter for a
    # dispute.
    assert used["slash_equivocation"] < 180_000
    assert used["open_dispute"] < 300_000
    assert used["vote"] < 110_000
    assert used["resolve_upheld"] < 200_000
    assert used["resolve_no_quorum"] < 100_000


def test_client_validates_before_sending(dm: DisputeManager, keys: list[str]) -> None:
    with pytest.raises(ValueError, match="miner"):
        dm.open_dispute(keys[CHALLENGER], "0x12", EVIDENCE, ZERO_ADDRESS, 0)
    with pytest.raises(ValueError, match="evidence"):
        dm.open_dispute(keys[CHALLENGER], as_account(keys[MINER]).address, b"x", ZERO_ADDRESS, 0)
    with pytest.raises(ValueError, match="refund"):
        dm.open_dispute(keys[CHALLENGER], as_account(keys[MINER]).address, EVIDENCE, ESCROW, -1)
    with pytest.raises(ValueError, match="dispute id"):
        dm.dispute(0)  # ids start at 1
    with pytest.raises(ValueError, match="dispute id"):
        dm.vote(keys[V1], True, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dispute manager address"):
        DisputeManager(dm.chain, "0x12")


# --- on anvil with BTTC's rules -----------------------------------------------------------------


@pytest.mark.anvil
def test_equivocation_and_a_dispute_on_anvil(anvil_url: str) -> None:
    from infergrid.settle.chain import dev_private_keys

    chain = Chain.connect(anvil_url)
    keys = dev_private_keys(10)
    addrs = [as_account(k).address for k in keys]
    registry = Registry(
        chain,
        deploy_registry(
            chain,
            keys[ADMIN],
            {Role.MINER: WEI_PER_BTT, Role.VERIFIER: 2 * WEI_PER_BTT, Role.GATEWAY: WEI_PER_BTT},
            3600,
        ),
    )
    dm = deploy(chain, keys, addrs, registry)
    domain = Domain(chain.chain_id, ESCROW)
    assert domain.chain_id == 199 and dm.domain_separator() == domain.separator
    registry.register(keys[MINER], Role.MINER, "http://m", SIGNER, [OFFER], MINER_STAKE)
    registry.register(keys[V3], Role.VERIFIER, "http://v", addrs[V3], [], 5 * WEI_PER_BTT)
    miner = addrs[MINER]

    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    with pytest.raises(ContractRevert, match="malleable signature"):
        dm.slash_equivocation(keys[REPORTER], a, high_s_twin(sign(domain, a)), b, sign(domain, b))
    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    assert dm.slash_equivocation(keys[REPORTER], a, sign(domain, a), b, sign(domain, b)) == amount

    dispute_id = dm.open_dispute(keys[CHALLENGER], miner, EVIDENCE, addrs[PAYER], WEI_PER_BTT)
    dm.vote(keys[V3], dispute_id, True)
    chain.increase_time(VOTING_PERIOD)
    assert dm.resolve(keys[OTHER], dispute_id).status == "upheld"
    assert registry.credits(addrs[PAYER]) == WEI_PER_BTT
    assert not registry.is_frozen(miner)
