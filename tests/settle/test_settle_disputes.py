"""DisputeManager on the embedded EVM: equivocation slashing, disputes about one attested and
paid response with stake-weighted votes, and every balance that moves, down to the wei.

Every test runs against a real NodeRegistry and a real PaymentEscrow: requests are served
(the miner attests, the gateway signs a receipt) and paid (a voucher collected in the escrow),
so that a refund has a payment to be bounded by. The attacks of issue 8's audit each have a
test named after the attack; each failed on the contract before it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from eth_utils import keccak, to_checksum_address
from web3.types import TxReceipt

from infergrid.protocol.eip712 import SECP256K1_N, Domain, Signer
from infergrid.protocol.messages import Attestation, Receipt, Voucher, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.pricing import request_value
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractRevert, EmbeddedEVM, as_account
from infergrid.settle.disputes import (
    PPM,
    DisputeManager,
    DisputeRecord,
    VoteRecord,
    deploy_disputes,
    find_equivocation,
)
from infergrid.settle.escrow import PaymentEscrow, deploy_escrow
from infergrid.settle.registry import Registry, deploy_registry

ZERO_ADDRESS = to_checksum_address("0x" + "00" * 20)
# The miner's registered signer: a key apart from its owner key, as operators run it.
SIGNER_KEY = "0x" + "42" * 32
SIGNER = Signer(SIGNER_KEY).address
NEW_SIGNER_KEY = "0x" + "44" * 32
NEW_SIGNER = Signer(NEW_SIGNER_KEY).address
# Gateways sign receipts and vouchers and never send: keys outside the dev set. The payer
# authorized GATEWAY in the escrow; ROGUE_GATEWAY is a key the challenger holds.
GATEWAY = Signer("0x" + "21" * 32)
ROGUE_GATEWAY = Signer("0x" + "23" * 32)
POOL = Signer("0x" + "51" * 32).address  # the escrow's verifier pool; only receives

DEPOSIT = WEI_PER_BTT // 10
VOTING_PERIOD = 600  # the registry below unbonds in 3600 s
MAX_SLASH_PPM = 500_000
SHARE_PPM = 100_000
EQUIVOCATION_PPM = 250_000
QUORUM = 4 * WEI_PER_BTT
MIN_AGE = 100
WRONG_VOTE_PPM = 100_000
FORFEIT_PPM = 250_000
MAX_OPEN_MINER = 3
MAX_OPEN_CHALLENGER = 2

UNBONDING_DELAY = 3600
MIN_STAKES = {
    Role.MINER: 1 * WEI_PER_BTT,
    Role.VERIFIER: 2 * WEI_PER_BTT,
    Role.GATEWAY: WEI_PER_BTT // 2,
}
PROTOCOL_FEE_PPM = 20_000
POOL_FEE_PPM = 30_000
THAW = 300
PAYER_BALANCE = 10 * WEI_PER_BTT

MINER_STAKE = 4 * WEI_PER_BTT
VERIFIER_STAKES = (2 * WEI_PER_BTT, 3 * WEI_PER_BTT, 5 * WEI_PER_BTT)
# Indexes into the dev keys.
ADMIN, MINER, V1, V2, V3, CHALLENGER, PAYER, TREASURY, REPORTER, OTHER = range(10)

REQUEST = keccak(b"request-1")
EVIDENCE = keccak(b"audit evidence")
# Prices that make a request worth a visible fraction of a BTT.
OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "11" * 32, 10**15, 2 * 10**15)
TOKENS_IN, TOKENS_OUT = 100, 200
VALUE = request_value(TOKENS_IN, TOKENS_OUT, OFFER)  # 0.5 BTT


# --- helpers ------------------------------------------------------------------------------------


def attest(
    miner: str,
    response: bytes = b"\x02" * 32,
    request: bytes = REQUEST,
    tokens_out: int = TOKENS_OUT,
) -> Attestation:
    return Attestation(
        request_hash=request,
        response_hash=response,
        model_id=bytes.fromhex(OFFER.model_id[2:]),
        miner=miner,
        tokens_in=TOKENS_IN,
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


def request(n: int) -> bytes:
    return keccak(f"request-{n}".encode())


@dataclass(frozen=True)
class Served:
    """One request as the dispute manager sees it: the miner's signed attestation and the
    gateway's signed receipt for it."""

    attestation: Attestation
    attestation_signature: bytes
    receipt: Receipt
    receipt_signature: bytes


@dataclass
class World:
    """A network: registry, escrow and dispute manager, a miner, three verifiers old enough
    to vote, and a payer with 10 BTT in the escrow that authorized GATEWAY."""

    chain: Chain
    keys: list[str]
    addrs: list[str]
    registry: Registry
    escrow: PaymentEscrow
    dm: DisputeManager
    # (payer, gateway, miner) -> the cumulative value the gateway billed, as its vouchers say.
    billed: dict[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def domain(self) -> Domain:
        return self.escrow.domain()

    @property
    def miner(self) -> str:
        return self.addrs[MINER]

    def serve(
        self,
        request_hash: bytes = REQUEST,
        *,
        payer: int = PAYER,
        gateway: Signer = GATEWAY,
        value: int = VALUE,
        collect: bool = True,
        response: bytes = b"\x02" * 32,
        signer_key: str = SIGNER_KEY,
    ) -> Served:
        """The miner serves a request for `payer` through `gateway`, which signs a receipt of
        `value`; with `collect`, a voucher covering it is collected in the escrow."""
        attestation = attest(self.miner, response, request_hash)
        receipt = Receipt(
            request_hash=request_hash,
            payer=self.addrs[payer],
            miner=self.miner,
            gateway=gateway.address,
            model_id=attestation.model_id,
            tokens_in=TOKENS_IN,
            tokens_out=TOKENS_OUT,
            value=value,
            timestamp=self.chain.timestamp(),
            attestation_hash=attestation.struct_hash(),
        )
        if collect:
            triple = (receipt.payer, gateway.address, self.miner)
            self.billed[triple] = self.billed.get(triple, 0) + value
            voucher = Voucher(
                payer=receipt.payer,
                miner=self.miner,
                gateway=gateway.address,
                value_aggregate=self.billed[triple],
                timestamp=receipt.timestamp,
                receipts_root=receipt.struct_hash(),
            )
            self.escrow.collect(
                self.keys[OTHER], voucher, sign_message(self.domain, voucher, gateway)
            )
        return Served(
            attestation,
            sign(self.domain, attestation, signer_key),
            receipt,
            sign_message(self.domain, receipt, gateway),
        )

    def open(
        self,
        served: Served,
        *,
        challenger: int = CHALLENGER,
        evidence: bytes = EVIDENCE,
        deposit: int | None = None,
    ) -> int:
        return self.dm.open_dispute(
            self.keys[challenger],
            served.attestation,
            served.attestation_signature,
            served.receipt,
            served.receipt_signature,
            evidence,
            deposit,
        )

    def open_and_vote(
        self, served: Served, votes: dict[int, bool], *, evidence: bytes = EVIDENCE
    ) -> int:
        dispute_id = self.open(served, evidence=evidence)
        for voter, uphold in votes.items():
            self.dm.vote(self.keys[voter], dispute_id, uphold)
        return dispute_id

    def settle_all(self, dispute_id: int, voters: list[int]) -> dict[int, int]:
        return {v: self.dm.settle_vote(self.keys[OTHER], dispute_id, self.addrs[v]) for v in voters}


def deploy_dm(
    chain: Chain, keys: list[str], addrs: list[str], registry: str, escrow: str, **overrides: int
) -> str:
    params = {
        "dispute_deposit_wei": DEPOSIT,
        "voting_period_s": VOTING_PERIOD,
        "max_slash_ppm": MAX_SLASH_PPM,
        "challenger_share_ppm": SHARE_PPM,
        "equivocation_slash_ppm": EQUIVOCATION_PPM,
        "min_quorum_stake_wei": QUORUM,
        "min_verifier_age_s": MIN_AGE,
        "wrong_vote_slash_ppm": WRONG_VOTE_PPM,
        "no_quorum_forfeit_ppm": FORFEIT_PPM,
        "max_open_per_miner": MAX_OPEN_MINER,
        "max_open_per_challenger": MAX_OPEN_CHALLENGER,
    }
    params.update(overrides)
    return deploy_disputes(
        chain,
        keys[ADMIN],
        registry=registry,
        escrow=escrow,
        treasury=addrs[TREASURY],
        **params,
    )


def build_world(
    chain: Chain, keys: list[str], addrs: list[str], *, verifiers: bool = True, **overrides: int
) -> World:
    registry = Registry(chain, deploy_registry(chain, keys[ADMIN], MIN_STAKES, UNBONDING_DELAY))
    escrow = PaymentEscrow(
        chain,
        deploy_escrow(
            chain,
            keys[ADMIN],
            treasury=addrs[TREASURY],
            verifier_pool=POOL,
            protocol_fee_ppm=PROTOCOL_FEE_PPM,
            verifier_pool_ppm=POOL_FEE_PPM,
            thaw_period_s=THAW,
            fee_delay_s=2 * THAW,
        ),
    )
    dm = DisputeManager(
        chain, deploy_dm(chain, keys, addrs, registry.address, escrow.address, **overrides)
    )
    # Deployment does not make it the slasher; the registry's admin does, once.
    registry.set_slasher(keys[ADMIN], dm.address)
    registry.register(keys[MINER], Role.MINER, "http://miner", SIGNER, [OFFER], MINER_STAKE)
    escrow.deposit(keys[PAYER], PAYER_BALANCE)
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    if verifiers:
        for index, stake in zip((V1, V2, V3), VERIFIER_STAKES, strict=True):
            registry.register(keys[index], Role.VERIFIER, "http://v", addrs[index], [], stake)
        chain.increase_time(MIN_AGE)  # old enough to vote on what opens from now on
    return World(chain, keys, addrs, registry, escrow, dm)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def make_world(chain: Chain, keys: list[str], addrs: list[str]) -> Callable[..., World]:
    def make(**overrides: int) -> World:
        return build_world(chain, keys, addrs, **overrides)

    return make


@pytest.fixture
def w(make_world: Callable[..., World]) -> World:
    return make_world()


# --- deployment and the signing domain ----------------------------------------------------------


def test_parameters_domain_and_digests_match_python(w: World) -> None:
    dm = w.dm
    assert dm.registry() == w.registry.address
    assert dm.escrow() == w.escrow.address
    assert dm.treasury() == w.addrs[TREASURY]
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
    assert (dm.min_verifier_age(), dm.wrong_vote_slash_ppm(), dm.no_quorum_forfeit_ppm()) == (
        MIN_AGE,
        WRONG_VOTE_PPM,
        FORFEIT_PPM,
    )
    assert (dm.max_open_per_miner(), dm.max_open_per_challenger()) == (
        MAX_OPEN_MINER,
        MAX_OPEN_CHALLENGER,
    )
    assert w.registry.slasher() == dm.address
    # The escrow's domain: one address configures all signing.
    assert dm.domain() == w.domain == Domain(w.chain.chain_id, w.escrow.address)
    assert dm.domain_separator() == w.domain.separator
    attestation = attest(w.miner, tokens_out=2**256 - 1)
    assert dm.attestation_digest(attestation) == w.domain.digest(attestation.struct_hash())
    receipt = w.serve(collect=False).receipt
    assert dm.receipt_digest(receipt) == w.domain.digest(receipt.struct_hash())
    extreme = Receipt(
        b"\xff" * 32, ZERO_ADDRESS, POOL, POOL, b"\x01" * 32, 0, 1, 2**256 - 1, 2**64, b"\x00" * 32
    )
    assert dm.receipt_digest(extreme) == w.domain.digest(extreme.struct_hash())
    assert dm.dispute_count() == 0
    with pytest.raises(ContractRevert, match="unknown dispute"):
        dm.dispute(1)


def test_dispute_manager_domain_follows_a_chain_id_change(
    keys: list[str], addrs: list[str]
) -> None:
    """Issue 8 (low): the DisputeManager's separator was fixed at deployment, so after a fork
    changed the chain id it still accepted attestations and receipts signed for the old
    chain. It now follows the chain id exactly as the escrow's does."""
    evm = EmbeddedEVM(accounts=10, chain_id=199)
    chain = Chain.embedded(evm)
    world = build_world(chain, keys, addrs, verifiers=False)
    attestation = attest(world.miner)
    receipt = world.serve(collect=False).receipt
    old = Domain(199, world.escrow.address)
    assert world.dm.domain_separator() == old.separator
    type(evm.tester.backend.chain).chain_id = 4242
    new = Domain(4242, world.escrow.address)
    assert world.dm.domain_separator() == new.separator
    assert world.dm.attestation_digest(attestation) == new.digest(attestation.struct_hash())
    assert world.dm.receipt_digest(receipt) == new.digest(receipt.struct_hash())
    # The escrow agrees, so one signature is valid for both contracts on either chain.
    assert chain.call(world.escrow.contract.functions.domain_separator()) == new.separator


@pytest.mark.parametrize(("voting_period", "ok"), [(3599, True), (3600, False), (3601, False)])
def test_unbonding_must_outlast_the_voting_period(w: World, voting_period: int, ok: bool) -> None:
    assert w.registry.unbonding_delay() == UNBONDING_DELAY

    def deploy() -> str:
        return deploy_dm(
            w.chain,
            w.keys,
            w.addrs,
            w.registry.address,
            w.escrow.address,
            voting_period_s=voting_period,
        )

    if ok:
        deploy()
        return
    with pytest.raises(ContractRevert) as exc:
        deploy()
    assert exc.value.reason == "unbonding must outlast disputes"


CONSTRUCTOR_DEFAULTS = (
    DEPOSIT,
    VOTING_PERIOD,
    MAX_SLASH_PPM,
    SHARE_PPM,
    EQUIVOCATION_PPM,
    QUORUM,
    MIN_AGE,
    WRONG_VOTE_PPM,
    FORFEIT_PPM,
    MAX_OPEN_MINER,
    MAX_OPEN_CHALLENGER,
)


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
        (9, 0, "zero verifier age"),
        (10, PPM + 1, "ppm above 1e6"),
        (11, PPM + 1, "ppm above 1e6"),
        (12, 0, "zero open disputes per miner"),
        (13, 0, "zero open disputes per challenger"),
    ],
)
def test_constructor_rejects_bad_parameters(
    w: World, position: int, value: object, reason: str
) -> None:
    args: list[object] = [
        w.registry.address,
        w.escrow.address,
        w.addrs[TREASURY],
        *CONSTRUCTOR_DEFAULTS,
    ]
    args[position] = value
    artifact = load_artifact("DisputeManager")
    with pytest.raises(ContractRevert) as exc:
        w.chain.deploy(w.keys[ADMIN], artifact.abi, artifact.bytecode, *args)
    assert exc.value.reason == reason


def test_constructor_accepts_the_limits(w: World) -> None:
    args = [w.registry.address, w.escrow.address, w.addrs[TREASURY], *CONSTRUCTOR_DEFAULTS]
    args[5:8] = [PPM, PPM, PPM]
    args[9:14] = [1, PPM, PPM, 1, 1]
    artifact = load_artifact("DisputeManager")
    address = w.chain.deploy(w.keys[ADMIN], artifact.abi, artifact.bytecode, *args)
    dm = DisputeManager(w.chain, address)
    assert (dm.wrong_vote_slash_ppm(), dm.no_quorum_forfeit_ppm(), dm.max_open_per_miner()) == (
        PPM,
        PPM,
        1,
    )


def test_deploy_disputes_validates_in_python(w: World) -> None:
    good = {
        "registry": w.registry.address,
        "escrow": w.escrow.address,
        "treasury": w.addrs[TREASURY],
        "dispute_deposit_wei": DEPOSIT,
        "voting_period_s": VOTING_PERIOD,
        "max_slash_ppm": MAX_SLASH_PPM,
        "challenger_share_ppm": SHARE_PPM,
        "equivocation_slash_ppm": EQUIVOCATION_PPM,
        "min_quorum_stake_wei": QUORUM,
        "min_verifier_age_s": MIN_AGE,
        "wrong_vote_slash_ppm": WRONG_VOTE_PPM,
        "no_quorum_forfeit_ppm": FORFEIT_PPM,
        "max_open_per_miner": MAX_OPEN_MINER,
        "max_open_per_challenger": MAX_OPEN_CHALLENGER,
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
        ("min_verifier_age_s", 0, "min verifier age"),
        ("wrong_vote_slash_ppm", PPM + 1, "wrong vote slash ppm"),
        ("no_quorum_forfeit_ppm", -1, "no quorum forfeit ppm"),
        ("max_open_per_miner", 0, "max open disputes per miner"),
        ("max_open_per_challenger", 1.5, "max open disputes per challenger"),
    ]
    for name, value, message in bad:
        kwargs: dict[str, object] = {**good, name: value}
        with pytest.raises(ValueError, match=message):
            deploy_disputes(w.chain, w.keys[ADMIN], **kwargs)  # type: ignore[arg-type]


# --- equivocation -------------------------------------------------------------------------------


def test_equivocation_slashes_exactly_and_only_once(w: World) -> None:
    miner, registry, chain = w.miner, w.registry, w.chain
    # Stake that is unbonding is slashable too: 3 BTT bonded + 1 BTT unbonding.
    registry.request_unbonding(w.keys[MINER], WEI_PER_BTT)
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    sig_a, sig_b = sign(w.domain, a), sign(w.domain, b)
    held = chain.balance(registry.address)

    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    to_reporter = amount * SHARE_PPM // PPM
    assert w.dm.slash_equivocation(w.keys[REPORTER], a, sig_a, b, sig_b) == amount
    assert registry.total_stake_of(miner) == MINER_STAKE - amount
    record = registry.node(miner)
    assert record is not None
    # Bonded stake goes first.
    assert (record.stake_wei, record.unbonding_wei) == (3 * WEI_PER_BTT - amount, WEI_PER_BTT)
    assert registry.credits(w.addrs[REPORTER]) == to_reporter
    assert registry.credits(w.addrs[TREASURY]) == amount - to_reporter
    assert w.dm.equivocation_slashed(miner, REQUEST)
    assert chain.balance(registry.address) == held  # credited, not paid yet
    assert chain.balance(w.dm.address) == 0  # slashed stake never passes through here

    # Once per (miner, request hash): the same pair, swapped, or a third response.
    c = attest(miner, b"\x04" * 32)
    for pair in ((a, sig_a, b, sig_b), (b, sig_b, a, sig_a), (a, sig_a, c, sign(w.domain, c))):
        with pytest.raises(ContractRevert) as exc:
            w.dm.slash_equivocation(w.keys[REPORTER], *pair)
        assert exc.value.reason == "already slashed"
    # Another request is another offence.
    d, e = attest(miner, b"\x05" * 32, request(2)), attest(miner, b"\x06" * 32, request(2))
    second = (MINER_STAKE - amount) * EQUIVOCATION_PPM // PPM
    got = w.dm.slash_equivocation(w.keys[OTHER], d, sign(w.domain, d), e, sign(w.domain, e))
    assert got == second

    # The credits are real money, paid by the registry to whoever they are owed.
    assert received(chain, w.addrs[REPORTER], lambda: registry.claim(w.keys[REPORTER])) == (
        to_reporter
    )
    assert chain.balance(registry.address) == held - to_reporter


def test_equivocation_events(w: World) -> None:
    a, b = attest(w.miner, b"\x02" * 32), attest(w.miner, b"\x03" * 32)
    receipt = w.chain.send(
        w.keys[REPORTER],
        w.dm.contract,
        "slash_equivocation",
        a.as_tuple(),
        sign(w.domain, a),
        b.as_tuple(),
        sign(w.domain, b),
    )
    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    (event,) = w.dm.events(receipt)
    assert (event.name, event.args) == (
        "EquivocationSlashed",
        {
            "miner": w.miner,
            "request_hash": REQUEST,
            "reporter": w.addrs[REPORTER],
            "response_hash_a": b"\x02" * 32,
            "response_hash_b": b"\x03" * 32,
            "amount": amount,
            "to_reporter": amount * SHARE_PPM // PPM,
        },
    )
    slashes = [e for e in w.registry.events(receipt) if e.name == "Slashed"]
    assert [(e.args["recipient"], e.args["amount"]) for e in slashes] == [
        (w.addrs[REPORTER], amount * SHARE_PPM // PPM),
        (w.addrs[TREASURY], amount - amount * SHARE_PPM // PPM),
    ]


def test_what_is_not_equivocation(w: World) -> None:
    a = attest(w.miner, b"\x02" * 32)
    cases = [
        # Same response: the miner said the same thing twice (other fields differ).
        (attest(w.miner, b"\x02" * 32, tokens_out=10), "same response"),
        # Different requests may well have different responses.
        (attest(w.miner, b"\x03" * 32, request(2)), "different requests"),
        (attest(w.addrs[OTHER], b"\x03" * 32), "different miners"),
    ]
    for b, reason in cases:
        with pytest.raises(ContractRevert) as exc:
            w.dm.slash_equivocation(w.keys[REPORTER], a, sign(w.domain, a), b, sign(w.domain, b))
        assert exc.value.reason == reason
    assert not w.dm.equivocation_slashed(w.miner, REQUEST)


def _bad_v(sig: bytes, v: int) -> bytes:
    return sig[:64] + bytes([v])


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        # The miner's owner key is not its registered signer.
        (lambda d, att: sign(d, att, "0x" + "43" * 32), "wrong signer"),
        (lambda d, att: sign(Domain(d.chain_id + 1, d.verifying_contract), att), "wrong signer"),
        (lambda d, att: sign(Domain(d.chain_id, "0x" + "e6" * 20), att), "wrong signer"),
        (lambda d, att: high_s_twin(sign(d, att)), "signatures: malleable"),
        (lambda d, att: _bad_v(sign(d, att), 0), "signatures: bad v"),
        (lambda d, att: _bad_v(sign(d, att), 1), "signatures: bad v"),
        (lambda d, att: _bad_v(sign(d, att), 29), "signatures: bad v"),
        (lambda d, att: b"\x00" * 32 + sign(d, att)[32:], "signatures: invalid"),  # r = 0
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
    w: World, forge: Callable[[Domain, Attestation], bytes], reason: str
) -> None:
    a, b = attest(w.miner, b"\x02" * 32), attest(w.miner, b"\x03" * 32)
    good_a, good_b = sign(w.domain, a), sign(w.domain, b)
    # Either signature of the pair may be the bad one.
    for pair in ((a, forge(w.domain, a), b, good_b), (a, good_a, b, forge(w.domain, b))):
        with pytest.raises(ContractRevert) as exc:
            w.dm.slash_equivocation(w.keys[REPORTER], *pair)
        assert exc.value.reason == reason
    assert w.dm.slash_equivocation(w.keys[REPORTER], a, good_a, b, good_b) > 0


def test_signature_length_and_unknown_miner(w: World) -> None:
    a, b = attest(w.miner, b"\x02" * 32), attest(w.miner, b"\x03" * 32)
    short = sign(w.domain, b)[:64]
    with pytest.raises(ValueError, match="65 bytes"):
        w.dm.slash_equivocation(w.keys[REPORTER], a, sign(w.domain, a), b, short)
    with pytest.raises(ContractRevert, match="signatures: bad length"):
        w.chain.send(
            w.keys[REPORTER],
            w.dm.contract,
            "slash_equivocation",
            a.as_tuple(),
            sign(w.domain, a),
            b.as_tuple(),
            short,
        )
    # No node behind the attestations' miner address.
    c, d = attest(w.addrs[OTHER], b"\x02" * 32), attest(w.addrs[OTHER], b"\x03" * 32)
    with pytest.raises(ContractRevert, match="unknown miner"):
        w.dm.slash_equivocation(w.keys[REPORTER], c, sign(w.domain, c), d, sign(w.domain, d))


def test_rotating_the_key_does_not_escape_an_equivocation_slash(w: World) -> None:
    """Issue 8, item 3: a miner that equivocated replaced its signing key and kept its stake,
    because only the current key counted. A key replaced less than one unbonding delay ago
    still counts (registry.was_signer), and so do two different keys of the miner."""
    miner = w.miner
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    sig_a, sig_b = sign(w.domain, a), sign(w.domain, b)
    w.registry.update(w.keys[MINER], "http://miner", NEW_SIGNER, [OFFER])
    assert w.registry.signer_of(miner) == NEW_SIGNER
    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    assert w.dm.slash_equivocation(w.keys[REPORTER], a, sig_a, b, sig_b) == amount

    # One attestation under the old key, one under the new: the same miner said both.
    c, d = attest(miner, b"\x04" * 32, request(2)), attest(miner, b"\x05" * 32, request(2))
    got = w.dm.slash_equivocation(
        w.keys[REPORTER], c, sign(w.domain, c), d, sign(w.domain, d, NEW_SIGNER_KEY)
    )
    assert got == (MINER_STAKE - amount) * EQUIVOCATION_PPM // PPM

    # Once the retired key's window has passed, it speaks for the miner no more.
    w.chain.increase_time(UNBONDING_DELAY)
    assert not w.registry.was_signer(miner, SIGNER)
    e, f = attest(miner, b"\x06" * 32, request(3)), attest(miner, b"\x07" * 32, request(3))
    with pytest.raises(ContractRevert, match="wrong signer"):
        w.dm.slash_equivocation(w.keys[REPORTER], e, sign(w.domain, e), f, sign(w.domain, f))
    assert not w.dm.equivocation_slashed(miner, request(3))


@pytest.mark.parametrize("reporter", ["owner", "signer key", "retired key"])
def test_a_miner_reporting_its_own_equivocation_gets_no_reporter_share(
    w: World, reporter: str
) -> None:
    """Issue 8 (low): a miner that reported its own equivocation got the reporter share of
    its own slash back. From the miner's owner address or any of its keys, the whole slash
    goes to the treasury."""
    miner = w.miner
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    sig_a, sig_b = sign(w.domain, a), sign(w.domain, b)
    key = w.keys[MINER]
    if reporter != "owner":
        key = SIGNER_KEY
        w.chain.transfer(w.keys[ADMIN], SIGNER, WEI_PER_BTT)  # gas money for the miner's key
    if reporter == "retired key":
        w.registry.update(w.keys[MINER], "http://miner", NEW_SIGNER, [OFFER])
    reporter_address = as_account(key).address
    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    receipt = w.chain.send(
        key, w.dm.contract, "slash_equivocation", a.as_tuple(), sig_a, b.as_tuple(), sig_b
    )
    (event,) = w.dm.events(receipt)
    assert (event.args["amount"], event.args["to_reporter"]) == (amount, 0)
    assert w.registry.credits(reporter_address) == 0
    assert w.registry.credits(w.addrs[TREASURY]) == amount
    assert w.registry.total_stake_of(miner) == MINER_STAKE - amount


def test_equivocation_slash_is_bounded_by_what_the_miner_holds(
    make_world: Callable[..., World],
) -> None:
    w = make_world(equivocation_slash_ppm=PPM)
    miner = w.miner
    w.registry.request_unbonding(w.keys[MINER], WEI_PER_BTT)
    held = w.chain.balance(w.registry.address)
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    assert w.dm.slash_equivocation(
        w.keys[REPORTER], a, sign(w.domain, a), b, sign(w.domain, b)
    ) == (MINER_STAKE)
    assert w.registry.node(miner) is None  # everything gone, unbonding included: forgotten
    to_reporter = MINER_STAKE * SHARE_PPM // PPM
    assert w.registry.credits(w.addrs[REPORTER]) == to_reporter
    assert w.registry.credits(w.addrs[TREASURY]) == MINER_STAKE - to_reporter
    assert w.chain.balance(w.registry.address) == held  # nothing created, nothing lost
    # Nothing is left to take, and the node is gone.
    c, d = attest(miner, b"\x05" * 32, request(2)), attest(miner, b"\x06" * 32, request(2))
    with pytest.raises(ContractRevert, match="unknown miner"):
        w.dm.slash_equivocation(w.keys[REPORTER], c, sign(w.domain, c), d, sign(w.domain, d))
    assert received(w.chain, w.addrs[TREASURY], lambda: w.registry.claim(w.keys[TREASURY])) == (
        MINER_STAKE - to_reporter
    )


def test_zero_equivocation_slash_is_refused(make_world: Callable[..., World]) -> None:
    w = make_world(equivocation_slash_ppm=0, verifiers=False)
    a, b = attest(w.miner, b"\x02" * 32), attest(w.miner, b"\x03" * 32)
    with pytest.raises(ContractRevert, match="nothing to slash"):
        w.dm.slash_equivocation(w.keys[REPORTER], a, sign(w.domain, a), b, sign(w.domain, b))
    assert not w.dm.equivocation_slashed(w.miner, REQUEST)  # a later deployment may still act


# --- find_equivocation (pure) -------------------------------------------------------------------


def test_find_equivocation(addrs: list[str]) -> None:
    domain = Domain(1337, POOL)
    miner = addrs[MINER]
    a, b = attest(miner, b"\x02" * 32), attest(miner, b"\x03" * 32)
    same_again = attest(miner, b"\x02" * 32, tokens_out=10)
    other_request = attest(miner, b"\x04" * 32, request(2))
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
    # Two forgeries by one other key conflict with each other, but not as the miner's.
    forged_a = (a, sign(domain, a, "0x" + "43" * 32))
    assert find_equivocation([forged_a, forged], domain=domain) == (*forged_a, *forged)

    # With was_signer: only the miner's keys count, and any two of them pair (a rotated key
    # and the new one), exactly as slash_equivocation accepts.
    keys_of = {miner: {SIGNER, NEW_SIGNER}}

    def was_signer(owner: str, key: str) -> bool:
        return key in keys_of.get(owner, set())

    assert find_equivocation([forged_a, forged], domain=domain, was_signer=was_signer) is None
    assert find_equivocation(
        [forged_a, (a, sig[a]), forged, (b, sig[b])], domain=domain, was_signer=was_signer
    ) == (a, sig[a], b, sig[b])
    b_new = (b, sign(domain, b, NEW_SIGNER_KEY))
    assert find_equivocation([(a, sig[a]), b_new], domain=domain, was_signer=was_signer) == (
        a,
        sig[a],
        *b_new,
    )
    # Without was_signer, two keys are two signers: no pair.
    assert find_equivocation([(a, sig[a]), b_new], domain=domain) is None


# --- opening disputes ---------------------------------------------------------------------------


def test_open_dispute_freezes_the_miner(w: World) -> None:
    miner, registry, chain = w.miner, w.registry, w.chain
    registry.request_unbonding(w.keys[MINER], WEI_PER_BTT)
    served = w.serve()
    receipt = chain.send(
        w.keys[CHALLENGER],
        w.dm.contract,
        "open_dispute",
        served.attestation.as_tuple(),
        served.attestation_signature,
        served.receipt.as_tuple(),
        served.receipt_signature,
        EVIDENCE,
        value=DEPOSIT + 1,  # more than the minimum is fine: all of it is the deposit
    )
    opened_at = chain.timestamp()
    deadline = opened_at + VOTING_PERIOD
    assert [(e.name, e.args) for e in w.dm.events(receipt)] == [
        (
            "DisputeOpened",
            {
                "dispute_id": 1,
                "miner": miner,
                "challenger": w.addrs[CHALLENGER],
                "payer": w.addrs[PAYER],
                "gateway": GATEWAY.address,
                "request_hash": REQUEST,
                "refund": VALUE,
                "evidence_hash": EVIDENCE,
                "deposit": DEPOSIT + 1,
                "opened_at": opened_at,
                "deadline": deadline,
            },
        )
    ]
    assert "NodeFrozen" in [e.name for e in registry.events(receipt)]
    assert w.dm.dispute(1) == DisputeRecord(
        id=1,
        challenger=w.addrs[CHALLENGER],
        miner=miner,
        payer=w.addrs[PAYER],
        gateway=GATEWAY.address,
        request_hash=REQUEST,
        refund_wei=VALUE,
        evidence_hash=EVIDENCE,
        deposit_wei=DEPOSIT + 1,
        opened_at=opened_at,
        deadline=deadline,
        votes_for_wei=0,
        votes_against_wei=0,
        status="open",
    )
    assert w.dm.dispute_count() == 1
    assert (w.dm.open_on_miner(miner), w.dm.open_by_challenger(w.addrs[CHALLENGER])) == (1, 1)
    assert w.dm.evidence_disputed(EVIDENCE) and w.dm.request_disputed(miner, REQUEST)
    assert chain.balance(w.dm.address) == DEPOSIT + 1

    # Frozen: the unbonding funds matured, and still cannot leave; no new unbonding, no new
    # signing key either.
    assert registry.is_frozen(miner)
    chain.increase_time(UNBONDING_DELAY)
    for action in (
        lambda: registry.withdraw(w.keys[MINER]),
        lambda: registry.request_unbonding(w.keys[MINER], WEI_PER_BTT),
        lambda: registry.deregister(w.keys[MINER]),
        lambda: registry.update(w.keys[MINER], "http://miner", NEW_SIGNER, [OFFER]),
    ):
        with pytest.raises(ContractRevert, match="node frozen"):
            action()
    # Still listed for gateways, marked frozen (they skip it themselves).
    assert [(n.owner, n.frozen) for n in registry.nodes(role=Role.MINER)] == [(miner, True)]

    # No votes at all: no quorum; part of the deposit is forfeit; the miner is free again.
    assert w.dm.resolve(w.keys[OTHER], 1).status == "no_quorum"
    assert not registry.is_frozen(miner)
    assert (w.dm.open_on_miner(miner), w.dm.open_by_challenger(w.addrs[CHALLENGER])) == (0, 0)
    registry.withdraw(w.keys[MINER])


def test_open_dispute_refusals(w: World) -> None:
    """Every reason a dispute is refused; none of them freezes the miner."""
    served = w.serve()
    a, sig_a = served.attestation, served.attestation_signature
    r, sig_r = served.receipt, served.receipt_signature

    def receipt_with(**change: object) -> tuple[Receipt, bytes]:
        """A receipt with fields changed, properly signed by the gateway."""
        other = Receipt(**{**r.__dict__, **change})  # type: ignore[arg-type]
        return other, sign_message(w.domain, other, GATEWAY)

    other_model = Attestation(**{**a.__dict__, "model_id": b"\x99" * 32})
    verifier_att = attest(w.addrs[V1])  # a registered node, but not a miner
    inflated = Receipt(**{**r.__dict__, "value": r.value + 1})  # the gateway's signature kept
    not_for_it = "receipt is not for this attestation"
    cases: list[tuple[tuple[object, ...], str]] = [
        ((verifier_att, sign(w.domain, verifier_att, w.keys[V1]), r, sig_r), "not a miner"),
        # Signed by a key that is not the miner's, or for another domain.
        ((a, sign(w.domain, a, "0x" + "43" * 32), r, sig_r), "not signed by the miner"),
        ((a, sign(Domain(w.domain.chain_id, POOL), a), r, sig_r), "not signed by the miner"),
        ((a, high_s_twin(sig_a), r, sig_r), "signatures: malleable"),
        ((a, sig_a, r, sig_r[:64] + b"\x00"), "signatures: bad v"),
        # The receipt must be signed by the gateway it names, and be about this attestation.
        (
            (a, sig_a, r, sign_message(w.domain, r, ROGUE_GATEWAY)),
            "receipt not signed by its gateway",
        ),
        ((a, sig_a, inflated, sig_r), "receipt not signed by its gateway"),
        ((a, sig_a, *receipt_with(request_hash=request(9))), not_for_it),
        ((a, sig_a, *receipt_with(miner=w.addrs[V1])), not_for_it),
        ((a, sig_a, *receipt_with(model_id=b"\x99" * 32)), not_for_it),
        ((a, sig_a, *receipt_with(attestation_hash=b"\x98" * 32)), not_for_it),
        ((other_model, sign(w.domain, other_model), r, sig_r), not_for_it),
        ((a, sig_a, *receipt_with(payer=ZERO_ADDRESS)), "zero payer"),
        ((a, sig_a, *receipt_with(payer=w.miner)), "miner cannot be the payer"),
    ]
    for args, reason in cases:
        with pytest.raises(ContractRevert) as exc:
            w.dm.open_dispute(w.keys[CHALLENGER], *args, EVIDENCE)  # type: ignore[arg-type]
        assert exc.value.reason == reason, reason
    for evidence, deposit, reason in (
        (EVIDENCE, DEPOSIT - 1, "deposit too small"),
        (b"\x00" * 32, DEPOSIT, "no evidence"),
    ):
        with pytest.raises(ContractRevert) as exc:
            w.open(served, evidence=evidence, deposit=deposit)
        assert exc.value.reason == reason
    assert w.dm.dispute_count() == 0 and not w.registry.is_frozen(w.miner)
    assert w.open(served) == 1


def test_one_evidence_and_one_request_are_disputed_once(w: World) -> None:
    """Issue 8, item 5: the same accusation could be opened again and again (one evidence
    hash, one request), each keeping the miner frozen for gas only. An evidence hash is
    disputed once, whatever the outcome; a request once it has been judged. A dispute that
    found no quorum leaves the request open, so an accomplice's junk dispute nobody judged
    cannot shield the miner from a real one."""
    first = w.serve(request(1))
    second = w.serve(request(2))
    dispute_id = w.open(first, evidence=keccak(b"e1"))
    with pytest.raises(ContractRevert, match="evidence already disputed"):
        w.open(second, evidence=keccak(b"e1"), challenger=OTHER)
    with pytest.raises(ContractRevert, match="request already disputed"):
        w.open(first, evidence=keccak(b"e2"), challenger=OTHER)
    # The same request in another response of the miner's (it re-signed the request) too.
    again = w.serve(request(1), response=b"\x07" * 32, collect=False)
    with pytest.raises(ContractRevert, match="request already disputed"):
        w.open(again, evidence=keccak(b"e3"), challenger=OTHER)
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], dispute_id).status == "no_quorum"
    # Nobody judged it: the request may be disputed again, never with the same evidence.
    with pytest.raises(ContractRevert, match="evidence already disputed"):
        w.open(first, evidence=keccak(b"e1"))
    judged = w.open_and_vote(first, {V3: False}, evidence=keccak(b"e4"))
    assert judged == dispute_id + 1
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], judged).status == "rejected"
    w.settle_all(judged, [V3])
    # Judged: closed for good.
    with pytest.raises(ContractRevert, match="request already disputed"):
        w.open(first, evidence=keccak(b"e5"))
    assert w.open(second, evidence=keccak(b"e2")) == judged + 1


def test_open_disputes_are_capped_per_miner_and_per_challenger(w: World) -> None:
    """Issue 8, item 5: overlapping disputes kept a miner frozen indefinitely, one challenger
    opening the next before the last was resolved. At most max_open_per_miner disputes are
    open on a miner and max_open_per_challenger by a challenger; resolving frees a place."""
    served = [w.serve(request(n)) for n in range(5)]

    def open_(n: int, challenger: int) -> int:
        return w.open(served[n], challenger=challenger, evidence=keccak(bytes([n])))

    first = open_(0, CHALLENGER)
    open_(1, CHALLENGER)
    with pytest.raises(ContractRevert) as exc:
        open_(2, CHALLENGER)
    assert exc.value.reason == "too many open disputes by challenger"
    open_(2, OTHER)
    assert w.dm.open_on_miner(w.miner) == MAX_OPEN_MINER
    with pytest.raises(ContractRevert) as exc:
        open_(3, REPORTER)
    assert exc.value.reason == "too many open disputes on miner"
    assert w.dm.open_by_challenger(w.addrs[CHALLENGER]) == MAX_OPEN_CHALLENGER

    w.chain.increase_time(VOTING_PERIOD)
    w.dm.resolve(w.keys[OTHER], first)
    assert w.dm.open_on_miner(w.miner) == MAX_OPEN_MINER - 1
    assert w.dm.open_by_challenger(w.addrs[CHALLENGER]) == MAX_OPEN_CHALLENGER - 1
    open_(3, CHALLENGER)
    assert w.registry.is_frozen(w.miner)


# --- voting -------------------------------------------------------------------------------------


def test_votes_are_weighted_by_stake_and_checked(w: World) -> None:
    registry, dm = w.registry, w.dm
    # A gateway, and a verifier that deregistered (inactive, still unbonding).
    registry.register(w.keys[OTHER], Role.GATEWAY, "http://gw", w.addrs[OTHER], [], WEI_PER_BTT)
    registry.deregister(w.keys[V3])
    dispute_id = w.open(w.serve())

    receipt = dm.vote(w.keys[V1], dispute_id, True)
    assert [(e.name, e.args) for e in dm.events(receipt)] == [
        (
            "Voted",
            {
                "dispute_id": dispute_id,
                "voter": w.addrs[V1],
                "uphold": True,
                "weight": VERIFIER_STAKES[0],
            },
        )
    ]
    # The voter is frozen: the stake it voted with stays until its vote is settled.
    assert [e.name for e in registry.events(receipt)] == ["NodeFrozen"]
    assert registry.is_frozen(w.addrs[V1])
    dm.vote(w.keys[V2], dispute_id, False)
    record = dm.dispute(dispute_id)
    assert (record.votes_for_wei, record.votes_against_wei) == VERIFIER_STAKES[:2]
    assert dm.has_voted(dispute_id, w.addrs[V1]) and not dm.has_voted(dispute_id, w.addrs[V3])
    assert dm.vote_of(dispute_id, w.addrs[V2]) == VoteRecord(VERIFIER_STAKES[1], False, False)
    assert dm.vote_of(dispute_id, w.addrs[V3]) is None

    refusals = [
        (V1, dispute_id, "already voted"),
        (MINER, dispute_id, "miner cannot vote"),
        (CHALLENGER, dispute_id, "challenger cannot vote"),
        (PAYER, dispute_id, "payer cannot vote"),
        (OTHER, dispute_id, "not a verifier"),  # a gateway
        (REPORTER, dispute_id, "not a verifier"),  # not registered at all
        (V3, dispute_id, "verifier not active"),
        (V1, dispute_id + 1, "unknown dispute"),
    ]
    for who, target, reason in refusals:
        with pytest.raises(ContractRevert) as exc:
            dm.vote(w.keys[who], target, True)
        assert exc.value.reason == reason

    # Registering again starts the verifier's age afresh.
    registry.register(w.keys[V3], Role.VERIFIER, "http://v", w.addrs[V3], [], 5 * WEI_PER_BTT)
    with pytest.raises(ContractRevert, match="verifier too new"):
        dm.vote(w.keys[V3], dispute_id, True)

    w.chain.increase_time(VOTING_PERIOD)
    with pytest.raises(ContractRevert, match="voting closed"):
        dm.vote(w.keys[V3], dispute_id, True)


def test_a_just_in_time_verifier_weighs_nothing(w: World) -> None:
    """Issue 8, item 2: a challenger registered a verifier right before voting (a vote
    weighed the stake at the moment of the vote), voted alone and decided the dispute. Now a
    verifier must be registered min_verifier_age before the dispute opened, and its vote
    weighs min(stake just before the opening, stake now): stake added after the accusation
    counts for nothing."""
    registry = w.registry
    # Registered, but not long enough before the dispute opens.
    registry.register(
        w.keys[REPORTER], Role.VERIFIER, "http://v", w.addrs[REPORTER], [], 50 * WEI_PER_BTT
    )
    w.chain.increase_time(MIN_AGE // 2)
    dispute_id = w.open(w.serve())
    opened_at = w.dm.dispute(dispute_id).opened_at
    assert registry.registered_at(w.addrs[REPORTER]) + MIN_AGE > opened_at
    # And registered after it opened: the audit's attacker.
    registry.register(
        w.keys[OTHER], Role.VERIFIER, "http://v", w.addrs[OTHER], [], 50 * WEI_PER_BTT
    )
    for late in (REPORTER, OTHER):
        with pytest.raises(ContractRevert) as exc:
            w.dm.vote(w.keys[late], dispute_id, True)
        assert exc.value.reason == "verifier too new"

    # An old verifier topping up after the opening votes with what it had before.
    registry.stake(w.keys[V1], 48 * WEI_PER_BTT)
    w.dm.vote(w.keys[V1], dispute_id, True)
    # One unbonding since votes with what is left: the vote must stay slashable.
    registry.request_unbonding(w.keys[V2], WEI_PER_BTT)
    w.dm.vote(w.keys[V2], dispute_id, True)
    weights = [w.dm.vote_of(dispute_id, w.addrs[v]) for v in (V1, V2)]
    assert [vote.weight_wei if vote else None for vote in weights] == [
        VERIFIER_STAKES[0],
        VERIFIER_STAKES[1] - WEI_PER_BTT,
    ]
    # 2 + 2 BTT reach the quorum of 4; the 48 BTT topped up would have made it 50 alone.
    assert w.dm.dispute(dispute_id).votes_for_wei == QUORUM


def test_a_verifier_slashed_below_the_minimum_cannot_vote(w: World) -> None:
    # V1 (exactly the minimum) votes against a dispute that is upheld, and loses part of it.
    first = w.open_and_vote(w.serve(request(1)), {V1: False, V3: True})
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], first).status == "upheld"
    assert w.dm.settle_vote(w.keys[OTHER], first, w.addrs[V1]) > 0
    second = w.open(w.serve(request(2)), evidence=keccak(b"second"))
    with pytest.raises(ContractRevert, match="verifier stake below minimum"):
        w.dm.vote(w.keys[V1], second, True)


@pytest.mark.parametrize(
    ("votes", "status", "slashed"),
    [
        # Upheld: who voted against loses wrong_vote_slash_ppm of its vote weight.
        ({V1: True, V2: False, V3: True}, "upheld", {V1: 0, V2: 3 * WEI_PER_BTT // 10, V3: 0}),
        # Rejected: who voted for loses it.
        ({V1: True, V3: False}, "rejected", {V1: 2 * WEI_PER_BTT // 10, V3: 0}),
        # No quorum: no verdict, nobody loses anything.
        ({V1: True}, "no_quorum", {V1: 0}),
    ],
)
def test_a_verifier_voting_against_the_verdict_is_slashed_when_its_vote_settles(
    w: World, votes: dict[int, bool], status: str, slashed: dict[int, int]
) -> None:
    """Issue 8, item 2: a vote cost nothing whichever way it went, so a verifier lost
    nothing by voting to slash an honest miner. Now each voter stays frozen until its vote
    is settled, and one on the losing side of a verdict loses wrong_vote_slash_ppm of its
    vote weight to the treasury."""
    dispute_id = w.open_and_vote(w.serve(), votes)
    with pytest.raises(ContractRevert, match="dispute not resolved"):
        w.dm.settle_vote(w.keys[OTHER], dispute_id, w.addrs[V1])
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], dispute_id).status == status
    treasury_before = w.registry.credits(w.addrs[TREASURY])
    for voter in votes:
        # Still frozen after the verdict: nothing leaves before the vote is answered for.
        assert w.registry.is_frozen(w.addrs[voter])
        with pytest.raises(ContractRevert, match="node frozen"):
            w.registry.request_unbonding(w.keys[voter], 1)
        receipt = w.chain.send(
            w.keys[OTHER], w.dm.contract, "settle_vote", dispute_id, w.addrs[voter]
        )
        events = [(e.name, e.args) for e in w.dm.events(receipt)]
        assert events == [
            (
                "VoteSettled",
                {"dispute_id": dispute_id, "voter": w.addrs[voter], "slashed": slashed[voter]},
            )
        ]
        assert not w.registry.is_frozen(w.addrs[voter])
        stake = VERIFIER_STAKES[voter - V1]
        assert w.registry.total_stake_of(w.addrs[voter]) == stake - slashed[voter]
        assert w.dm.vote_of(dispute_id, w.addrs[voter]).settled  # type: ignore[union-attr]
        with pytest.raises(ContractRevert, match="vote already settled"):
            w.dm.settle_vote(w.keys[OTHER], dispute_id, w.addrs[voter])
    assert w.registry.credits(w.addrs[TREASURY]) - treasury_before == sum(slashed.values())
    # A settled voter may leave.
    w.registry.deregister(w.keys[V1])
    with pytest.raises(ContractRevert, match="no such vote"):
        w.dm.settle_vote(w.keys[OTHER], dispute_id, w.addrs[REPORTER])
    with pytest.raises(ContractRevert, match="unknown dispute"):
        w.dm.settle_vote(w.keys[OTHER], dispute_id + 1, w.addrs[V1])


def test_settling_the_vote_of_an_emptied_verifier_still_unfreezes_it(
    make_world: Callable[..., World],
) -> None:
    # A wrong vote costs all its weight here; V2 lost two disputes with its whole stake.
    w = make_world(wrong_vote_slash_ppm=PPM)
    first = w.open_and_vote(w.serve(request(1)), {V2: False, V3: True}, evidence=keccak(b"1"))
    second = w.open_and_vote(w.serve(request(2)), {V2: False, V3: True}, evidence=keccak(b"2"))
    w.chain.increase_time(VOTING_PERIOD)
    for dispute_id in (first, second):
        assert w.dm.resolve(w.keys[OTHER], dispute_id).status == "upheld"
    assert w.dm.settle_vote(w.keys[OTHER], first, w.addrs[V2]) == VERIFIER_STAKES[1]
    assert w.registry.node(w.addrs[V2]) is None  # slashed empty: forgotten
    assert w.registry.is_frozen(w.addrs[V2])
    # Nothing left to take: the settlement takes nothing and still releases the freeze.
    assert w.dm.settle_vote(w.keys[OTHER], second, w.addrs[V2]) == 0
    assert not w.registry.is_frozen(w.addrs[V2])


# --- resolving: refunds, shares, deposits -------------------------------------------------------


def test_an_honest_dispute_end_to_end(w: World) -> None:
    """A miner served a bad response: the payer paid for it through the escrow, a challenger
    disputes it with the receipt, a real quorum upholds it. The payer gets back what it paid
    for that response, the challenger exactly its share and its deposit, the verifier on the
    wrong side loses its part, the treasury the rest: every wei claimed."""
    chain, registry, dm = w.chain, w.registry, w.dm
    w.serve(request(0))  # an earlier, undisputed request: paid too
    bad = w.serve(REQUEST)
    paid = 2 * VALUE
    assert w.escrow.collected(w.addrs[PAYER], GATEWAY.address, w.miner) == paid
    registry_held = chain.balance(registry.address)

    # 7 BTT for against 3 BTT: upheld, quorum 10 >= 4.
    dispute_id = w.open_and_vote(bad, {V1: True, V2: False, V3: True})
    with pytest.raises(ContractRevert, match="voting not over"):
        dm.resolve(w.keys[OTHER], dispute_id)
    chain.increase_time(VOTING_PERIOD)

    receipt = chain.send(w.keys[OTHER], dm.contract, "resolve", dispute_id)
    target = MINER_STAKE * MAX_SLASH_PPM // PPM  # 2 BTT
    refund = VALUE  # the receipt's value: within what was paid and within the target
    to_challenger = (target - refund) * SHARE_PPM // PPM
    to_treasury = target - refund - to_challenger
    resolved = [e for e in dm.events(receipt) if e.name == "DisputeResolved"]
    assert resolved[0].args == {
        "dispute_id": dispute_id,
        "miner": w.miner,
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
    assert dm.dispute(dispute_id).status == "upheld"
    assert dm.refunded(w.addrs[PAYER], GATEWAY.address, w.miner) == refund
    assert registry.total_stake_of(w.miner) == MINER_STAKE - target
    assert not registry.is_frozen(w.miner)
    assert (dm.open_on_miner(w.miner), dm.open_by_challenger(w.addrs[CHALLENGER])) == (0, 0)
    wrong_vote = VERIFIER_STAKES[1] * WRONG_VOTE_PPM // PPM
    assert w.settle_all(dispute_id, [V1, V2, V3]) == {V1: 0, V2: wrong_vote, V3: 0}
    assert chain.balance(registry.address) == registry_held

    # Every wei, claimed: the refund and the shares from the registry, the deposit from the
    # dispute manager.
    def claim(who: int, contract: Registry | DisputeManager) -> int:
        return received(chain, w.addrs[who], lambda: contract.claim(w.keys[who]))

    assert claim(PAYER, registry) == refund
    assert claim(CHALLENGER, registry) == to_challenger
    assert claim(TREASURY, registry) == to_treasury + wrong_vote
    assert claim(CHALLENGER, dm) == DEPOSIT
    assert chain.balance(registry.address) == registry_held - target - wrong_vote
    assert chain.balance(dm.address) == 0
    with pytest.raises(ContractRevert, match="nothing to claim"):
        dm.claim(w.keys[CHALLENGER])
    assert registry.total_stake_of(w.addrs[V2]) == VERIFIER_STAKES[1] - wrong_vote

    with pytest.raises(ContractRevert, match="already resolved"):
        dm.resolve(w.keys[OTHER], dispute_id)
    with pytest.raises(ContractRevert, match="dispute not open"):
        dm.vote(w.keys[V1], dispute_id, True)
    with pytest.raises(ContractRevert, match="unknown dispute"):
        dm.resolve(w.keys[OTHER], dispute_id + 1)
    # Free again: the miner can leave.
    registry.deregister(w.keys[MINER])


@pytest.mark.parametrize("paid", [0, VALUE // 5], ids=["never-paid", "paid-a-fifth"])
def test_a_self_refund_is_bounded_by_what_the_payer_paid(w: World, paid: int) -> None:
    """Issue 8, item 2: a challenger opened a dispute naming itself as the refunded payer
    with an unbounded refund, and kept the whole slash. The payer now comes from a receipt
    its gateway signed, and the refund is bounded by what the escrow collected from that
    payer for that gateway and miner: a receipt for 100 BTT signed by the challenger's own
    gateway key gets back what the challenger really paid (nothing, or a fifth of a
    request), and the challenger's share is exactly what the parameters say."""
    if paid:
        # The challenger pays a little through its own gateway key, to have a real payment.
        w.escrow.deposit(w.keys[CHALLENGER], WEI_PER_BTT)
        w.escrow.authorize_signer(w.keys[CHALLENGER], ROGUE_GATEWAY.address)
        w.serve(request(0), payer=CHALLENGER, gateway=ROGUE_GATEWAY, value=paid)
    forged = w.serve(
        REQUEST, payer=CHALLENGER, gateway=ROGUE_GATEWAY, value=100 * WEI_PER_BTT, collect=False
    )
    dispute_id = w.open_and_vote(forged, {V1: True, V2: True, V3: True})
    assert w.dm.dispute(dispute_id).refund_wei == 100 * WEI_PER_BTT  # what it claims
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], dispute_id).status == "upheld"

    target = MINER_STAKE * MAX_SLASH_PPM // PPM
    to_challenger = (target - paid) * SHARE_PPM // PPM
    # Refund and share both credit the challenger: together no more than it paid plus its
    # share (the old code credited it the whole 2 BTT target).
    assert w.registry.credits(w.addrs[CHALLENGER]) == paid + to_challenger
    assert w.registry.credits(w.addrs[TREASURY]) == target - paid - to_challenger
    assert w.dm.refunded(w.addrs[CHALLENGER], ROGUE_GATEWAY.address, w.miner) == paid


def test_refunds_for_one_payer_never_exceed_what_it_paid(w: World) -> None:
    """Receipts prove what a payer owed, only the escrow what it paid: two upheld disputes
    about one (payer, gateway, miner) refund together at most what the escrow collected for
    it, however much the receipts say."""
    w.serve(request(0))  # paid
    first = w.serve(request(1))  # paid: 1 BTT collected in all
    unpaid = w.serve(request(2), value=4 * VALUE, collect=False)  # 2 BTT owed, never paid
    paid = 2 * VALUE
    one = w.open_and_vote(first, {V3: True}, evidence=keccak(b"one"))
    two = w.open_and_vote(unpaid, {V3: True}, evidence=keccak(b"two"))
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], one).status == "upheld"
    assert w.registry.credits(w.addrs[PAYER]) == VALUE
    assert w.dm.resolve(w.keys[OTHER], two).status == "upheld"
    # The second gets the rest of what was paid, not its receipt's 2 BTT.
    assert w.registry.credits(w.addrs[PAYER]) == paid
    assert w.dm.refunded(w.addrs[PAYER], GATEWAY.address, w.miner) == paid
    second_target = (MINER_STAKE - MINER_STAKE * MAX_SLASH_PPM // PPM) * MAX_SLASH_PPM // PPM
    assert w.registry.total_stake_of(w.miner) == MINER_STAKE // 2 - second_target


def test_refund_is_capped_by_the_slash(w: World) -> None:
    # The payer paid 3 BTT for one request; the target is 2 BTT.
    big = w.serve(value=6 * VALUE)
    dispute_id = w.open_and_vote(big, {V3: True})
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], dispute_id).status == "upheld"
    target = MINER_STAKE * MAX_SLASH_PPM // PPM
    assert w.registry.credits(w.addrs[PAYER]) == target
    assert w.registry.credits(w.addrs[CHALLENGER]) == 0
    assert w.registry.credits(w.addrs[TREASURY]) == 0
    assert w.registry.total_stake_of(w.miner) == MINER_STAKE - target
    assert w.dm.credits(w.addrs[CHALLENGER]) == DEPOSIT


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
def test_rejected_and_no_quorum_disputes_slash_the_miner_nothing(
    w: World, votes: dict[int, bool], status: str
) -> None:
    dispute_id = w.open_and_vote(w.serve(), votes)
    w.chain.increase_time(VOTING_PERIOD)
    record = w.dm.resolve(w.keys[MINER], dispute_id)  # the miner itself may close it
    assert record.status == status
    assert w.registry.total_stake_of(w.miner) == MINER_STAKE
    assert not w.registry.is_frozen(w.miner)
    for who in (PAYER, CHALLENGER, TREASURY):
        assert w.registry.credits(w.addrs[who]) == 0
    forfeit = DEPOSIT if status == "rejected" else DEPOSIT * FORFEIT_PPM // PPM
    assert w.dm.credits(w.addrs[TREASURY]) == forfeit
    assert w.dm.credits(w.addrs[CHALLENGER]) == DEPOSIT - forfeit
    assert received(w.chain, w.addrs[TREASURY], lambda: w.dm.claim(w.keys[TREASURY])) == forfeit
    if forfeit < DEPOSIT:
        w.dm.claim(w.keys[CHALLENGER])
    assert w.chain.balance(w.dm.address) == 0


def test_a_dispute_without_quorum_forfeits_part_of_the_deposit(w: World) -> None:
    """Issue 8, item 5: a dispute nobody voted on returned the whole deposit, so freezing an
    honest miner for a voting period cost only gas. No quorum now forfeits
    no_quorum_forfeit_ppm of the deposit to the treasury."""
    deposit = DEPOSIT + 3
    dispute_id = w.open(w.serve(), deposit=deposit)
    w.chain.increase_time(VOTING_PERIOD)
    receipt = w.chain.send(w.keys[OTHER], w.dm.contract, "resolve", dispute_id)
    forfeit = deposit * FORFEIT_PPM // PPM
    credited = [
        (e.args["recipient"], e.args["amount"])
        for e in w.dm.events(receipt)
        if e.name == "Credited"
    ]
    assert credited == [(w.addrs[TREASURY], forfeit), (w.addrs[CHALLENGER], deposit - forfeit)]
    assert received(w.chain, w.addrs[CHALLENGER], lambda: w.dm.claim(w.keys[CHALLENGER])) == (
        deposit - forfeit
    )
    assert received(w.chain, w.addrs[TREASURY], lambda: w.dm.claim(w.keys[TREASURY])) == forfeit
    assert w.chain.balance(w.dm.address) == 0


def test_quorum_is_inclusive(make_world: Callable[..., World]) -> None:
    w = make_world(min_quorum_stake_wei=5 * WEI_PER_BTT)
    dispute_id = w.open_and_vote(w.serve(), {V1: True, V2: True})
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], dispute_id).status == "upheld"


def test_overlapping_disputes_keep_the_miner_frozen_until_the_last(w: World) -> None:
    first = w.open(w.serve(request(1)), evidence=keccak(b"1"))
    w.chain.increase_time(VOTING_PERIOD // 2)
    second = w.open(w.serve(request(2)), challenger=OTHER, evidence=keccak(b"2"))
    assert second == first + 1
    w.chain.increase_time(VOTING_PERIOD // 2)
    w.dm.resolve(w.keys[OTHER], first)
    assert w.registry.is_frozen(w.miner)
    with pytest.raises(ContractRevert, match="voting not over"):
        w.dm.resolve(w.keys[OTHER], second)
    with pytest.raises(ContractRevert, match="node frozen"):
        w.registry.deregister(w.keys[MINER])
    w.chain.increase_time(VOTING_PERIOD // 2)
    w.dm.resolve(w.keys[OTHER], second)
    assert not w.registry.is_frozen(w.miner)


def test_upheld_dispute_on_an_emptied_miner_still_resolves(
    make_world: Callable[..., World],
) -> None:
    # The miner is slashed empty for equivocation while its dispute is open: the dispute
    # still closes (nothing left to slash), unfreezes, and returns the deposit.
    w = make_world(equivocation_slash_ppm=PPM)
    dispute_id = w.open_and_vote(w.serve(), {V3: True})
    a, b = attest(w.miner, b"\x02" * 32, request(7)), attest(w.miner, b"\x03" * 32, request(7))
    w.dm.slash_equivocation(w.keys[REPORTER], a, sign(w.domain, a), b, sign(w.domain, b))
    assert w.registry.node(w.miner) is None and w.registry.is_frozen(w.miner)
    w.chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(w.keys[OTHER], dispute_id).status == "upheld"
    assert w.registry.credits(w.addrs[PAYER]) == 0
    assert w.dm.credits(w.addrs[CHALLENGER]) == DEPOSIT
    assert not w.registry.is_frozen(w.miner)
    assert w.dm.settle_vote(w.keys[OTHER], dispute_id, w.addrs[V3]) == 0


def test_gas(w: World) -> None:
    """Gas of each operation, printed with -s; bounds catch an accidental blow-up."""
    chain, fn = w.chain, w.dm.contract
    a, b = attest(w.miner, b"\x02" * 32, request(9)), attest(w.miner, b"\x03" * 32, request(9))
    served = w.serve()
    used = {
        "slash_equivocation": chain.send(
            w.keys[REPORTER],
            fn,
            "slash_equivocation",
            a.as_tuple(),
            sign(w.domain, a),
            b.as_tuple(),
            sign(w.domain, b),
        )["gasUsed"],
        "open_dispute": chain.send(
            w.keys[CHALLENGER],
            fn,
            "open_dispute",
            served.attestation.as_tuple(),
            served.attestation_signature,
            served.receipt.as_tuple(),
            served.receipt_signature,
            EVIDENCE,
            value=DEPOSIT,
        )["gasUsed"],
        "vote": chain.send(w.keys[V1], fn, "vote", 1, True)["gasUsed"],
    }
    w.dm.vote(w.keys[V2], 1, False)
    w.dm.vote(w.keys[V3], 1, True)  # 7 BTT for: upheld, with a refund, a share and a remainder
    no_quorum = w.open(w.serve(request(2)), evidence=keccak(b"nq"))
    chain.increase_time(VOTING_PERIOD)
    used["resolve_upheld"] = chain.send(w.keys[OTHER], fn, "resolve", 1)["gasUsed"]
    used["resolve_no_quorum"] = chain.send(w.keys[OTHER], fn, "resolve", no_quorum)["gasUsed"]
    used["settle_vote_slashed"] = chain.send(w.keys[OTHER], fn, "settle_vote", 1, w.addrs[V2])[
        "gasUsed"
    ]
    used["settle_vote"] = chain.send(w.keys[OTHER], fn, "settle_vote", 1, w.addrs[V1])["gasUsed"]
    assert [w.dm.dispute(i).status for i in (1, no_quorum)] == ["upheld", "no_quorum"]
    print({name: int(gas) for name, gas in used.items()})
    # Mostly fresh storage slots at 22k each: the two credits and the once-only flag for an
    # equivocation (and three was_signer reads); for a dispute the thirteen unpacked slots of
    # a Dispute, two once-only flags, two open counters and the freeze counter; for a vote
    # its record and the voter's freeze; for an upheld resolve the refunded total.
    assert used["slash_equivocation"] < 210_000
    assert used["open_dispute"] < 480_000
    assert used["vote"] < 170_000
    assert used["resolve_upheld"] < 260_000
    assert used["resolve_no_quorum"] < 120_000
    assert used["settle_vote_slashed"] < 130_000
    assert used["settle_vote"] < 80_000


def test_client_validates_before_sending(w: World) -> None:
    dm, key = w.dm, w.keys[CHALLENGER]
    served = w.serve(collect=False)
    a, sig_a = served.attestation, served.attestation_signature
    r, sig_r = served.receipt, served.receipt_signature
    with pytest.raises(ValueError, match="attestation must be"):
        dm.open_dispute(key, r, sig_a, r, sig_r, EVIDENCE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="receipt must be"):
        dm.open_dispute(key, a, sig_a, a, sig_r, EVIDENCE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attestation signature must be 65 bytes"):
        dm.open_dispute(key, a, sig_a[:64], r, sig_r, EVIDENCE)
    with pytest.raises(ValueError, match="receipt signature must be 65 bytes"):
        dm.open_dispute(key, a, sig_a, r, sig_r + b"\x00", EVIDENCE)
    with pytest.raises(ValueError, match="evidence"):
        dm.open_dispute(key, a, sig_a, r, sig_r, b"x")
    with pytest.raises(ValueError, match="deposit"):
        dm.open_dispute(key, a, sig_a, r, sig_r, EVIDENCE, deposit_wei=-1)
    with pytest.raises(ValueError, match="dispute id"):
        dm.dispute(0)  # ids start at 1
    with pytest.raises(ValueError, match="dispute id"):
        dm.vote(w.keys[V1], True, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="voter"):
        dm.settle_vote(key, 1, "0x12")
    with pytest.raises(ValueError, match="voter"):
        dm.vote_of(1, "0x12")
    with pytest.raises(ValueError, match="gateway"):
        dm.refunded(w.addrs[PAYER], "0x12", w.miner)
    with pytest.raises(ValueError, match="dispute manager address"):
        DisputeManager(dm.chain, "0x12")


# --- on anvil with BTTC's rules -----------------------------------------------------------------


@pytest.mark.anvil
def test_equivocation_and_a_dispute_on_anvil(anvil_url: str) -> None:
    from infergrid.settle.chain import dev_private_keys

    chain = Chain.connect(anvil_url)
    keys = dev_private_keys(10)
    addrs = [as_account(k).address for k in keys]
    w = build_world(chain, keys, addrs)
    assert w.domain.chain_id == 199 and w.dm.domain_separator() == w.domain.separator

    a, b = attest(w.miner, b"\x02" * 32, request(9)), attest(w.miner, b"\x03" * 32, request(9))
    with pytest.raises(ContractRevert, match="signatures: malleable"):
        w.dm.slash_equivocation(
            keys[REPORTER], a, high_s_twin(sign(w.domain, a)), b, sign(w.domain, b)
        )
    amount = MINER_STAKE * EQUIVOCATION_PPM // PPM
    assert (
        w.dm.slash_equivocation(keys[REPORTER], a, sign(w.domain, a), b, sign(w.domain, b))
        == amount
    )

    dispute_id = w.open_and_vote(w.serve(), {V3: True})
    chain.increase_time(VOTING_PERIOD)
    assert w.dm.resolve(keys[OTHER], dispute_id).status == "upheld"
    assert w.registry.credits(addrs[PAYER]) == VALUE
    assert not w.registry.is_frozen(w.miner)
    assert w.dm.settle_vote(keys[OTHER], dispute_id, addrs[V3]) == 0
