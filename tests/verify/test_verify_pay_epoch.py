"""An epoch of verifier pay on real contracts (verify.pay_epoch on the embedded EVM, every
contract of settle.deploy with DEVNET_PARAMS; the deployer is treasury and verifier pool, as on
a devnet):

- a collected voucher credits the verifier pool, and the window's pool is exactly that
  collection's verifier fee;
- three verifiers: V1 opened an upheld dispute and audited 3 responses, V2 audited 1 and
  voted with the quorum, V3 audited 2 and voted against it: the dry run shows the shares and
  sends nothing; the run claims the escrow's fees, funds and proposes epoch 1; after the
  challenge window each verifier's claim pays it exactly its computed share (3/11, 6/11, 2/11
  of the pool, V3's wrong vote worth nothing);
- nothing is paid twice: the same window again is refused, the next run (from where the last
  ended) has nothing to pay, a second claim is reported as already claimed;
- a run interrupted after funding is completed by the next run without funding twice;
- the pool's key only, and no window past the chain's latest block.

The audit counts are what the gateway's GET /v1/verifiers would answer (its HTTP client,
fetch_verifier_audits, is tested against a real gateway in
tests/app/test_gateway_verifier_work.py); here they are given as the numbers they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from verify_helpers import ADDRS, KEYS, P

from infergrid.protocol.eip712 import Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import Attestation, Receipt, Voucher, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.chain import Chain, ChainError, EmbeddedEVM
from infergrid.settle.deploy import deploy_network
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.escrow import Collection, PaymentEscrow
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor
from infergrid.verify.pay import VerifierWork, verifier_shares
from infergrid.verify.pay_epoch import (
    PayContracts,
    PayState,
    claim_rewards,
    pay_epoch,
    pool_credited,
    resolved_votes,
)

POOL, GATEWAY, MINER, PAYER, V1, V2, V3, OTHER = range(8)
GATEWAY_SIGNER = Signer(KEYS[GATEWAY])
MINER_SIGNER = Signer("0x" + "42" * 32)
MODEL_ID = b"\x07" * 32
VALUE = 3 * WEI_PER_BTT  # one response's receipt value: fees are visible next to gas
AUDITS = {ADDRS[V1]: 3, ADDRS[V2]: 1, ADDRS[V3]: 2}


@dataclass
class World:
    chain: Chain
    net: PayContracts
    registry: Registry
    collection: Collection
    collected_at: int  # the collection's block timestamp
    dispute_id: int


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=10))


def _audits(counts: Mapping[str, int]) -> Callable[[int, int], Mapping[str, int]]:
    """The gateway's answer for any window: `counts`."""
    return lambda since, until: counts


def _served(chain: Chain, escrow: PaymentEscrow, n: int) -> tuple[Attestation, Receipt]:
    attestation = Attestation(
        request_hash=bytes([n]) * 32,
        response_hash=bytes([n + 1]) * 32,
        model_id=MODEL_ID,
        miner=ADDRS[MINER],
        tokens_in=10,
        tokens_out=20,
    )
    receipt = Receipt(
        request_hash=attestation.request_hash,
        payer=ADDRS[PAYER],
        miner=ADDRS[MINER],
        gateway=GATEWAY_SIGNER.address,
        model_id=MODEL_ID,
        tokens_in=10,
        tokens_out=20,
        value=VALUE,
        timestamp=chain.timestamp(),
        attestation_hash=attestation.struct_hash(),
    )
    return attestation, receipt


@pytest.fixture
def world(chain: Chain) -> World:
    """Fresh contracts; one response served, receipted, paid by a voucher, disputed by V1
    and upheld with V2 (20 BTT) for and V3 (10 BTT) against."""
    contracts = deploy_network(chain, KEYS[POOL], P)
    registry = Registry(chain, contracts.NodeRegistry)
    escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
    disputes = DisputeManager(chain, contracts.DisputeManager)
    domain = escrow.domain()
    offer = ModelOffer("m", "0x" + MODEL_ID.hex(), 1, 1)
    registry.register(
        KEYS[GATEWAY], Role.GATEWAY, "http://g", GATEWAY_SIGNER.address, [],
        P.min_stake_gateway_wei,
    )  # fmt: skip
    registry.register(
        KEYS[MINER], Role.MINER, "http://m", MINER_SIGNER.address, [offer], 100 * WEI_PER_BTT
    )
    for index, stake in ((V1, 10), (V2, 20), (V3, 10)):
        registry.register(
            KEYS[index], Role.VERIFIER, "http://v", ADDRS[index], [], stake * WEI_PER_BTT
        )
    escrow.deposit(KEYS[PAYER], 10 * WEI_PER_BTT)
    escrow.authorize_signer(KEYS[PAYER], GATEWAY_SIGNER.address)
    attestation, receipt = _served(chain, escrow, 1)
    voucher = Voucher(
        ADDRS[PAYER], ADDRS[MINER], GATEWAY_SIGNER.address, VALUE, receipt.timestamp,
        merkle_root([receipt.struct_hash()]),
    )  # fmt: skip
    owed_before = escrow.fees_owed(ADDRS[POOL])
    collection = escrow.collect(KEYS[MINER], voucher, sign_message(domain, voucher, GATEWAY_SIGNER))
    collected_at = chain.timestamp()  # the latest block is the collection's
    # The collection credits the verifier pool (here also the treasury) its fees.
    assert collection.verifier_fee_wei == VALUE * P.verifier_pool_ppm // 1_000_000
    assert escrow.fees_owed(ADDRS[POOL]) - owed_before == (
        collection.verifier_fee_wei + collection.protocol_fee_wei
    )
    chain.increase_time(P.min_verifier_age_s + 1)  # the verifiers are old enough to vote
    dispute_id = disputes.open_dispute(
        KEYS[V1],
        attestation,
        sign_message(domain, attestation, MINER_SIGNER),
        receipt,
        sign_message(domain, receipt, GATEWAY_SIGNER),
        b"\x99" * 32,
    )
    disputes.vote(KEYS[V2], dispute_id, True)
    disputes.vote(KEYS[V3], dispute_id, False)
    chain.increase_time(P.voting_period_s)
    assert disputes.resolve(KEYS[OTHER], dispute_id).status == "upheld"
    for voter in (V2, V3):
        disputes.settle_vote(KEYS[OTHER], dispute_id, ADDRS[voter])
    net = PayContracts.connect(
        chain,
        registry=contracts.NodeRegistry,
        escrow=contracts.PaymentEscrow,
        rewards=contracts.RewardDistributor,
    )
    return World(chain, net, registry, collection, collected_at, dispute_id)


def _received(chain: Chain, address: str, before: int) -> int:
    return chain.balance(address) - before


def test_the_window_reads_the_pool_and_the_votes(world: World) -> None:
    until = world.chain.timestamp() + 1
    assert pool_credited(world.net.escrow, 0, until) == world.collection.verifier_fee_wei
    votes = resolved_votes(world.net.disputes, 0, until)
    assert set(votes) == {ADDRS[V2], ADDRS[V3]}
    assert (votes[ADDRS[V2]].agreeing, votes[ADDRS[V2]].against_upheld) == (1, 0)
    assert (votes[ADDRS[V3]].agreeing, votes[ADDRS[V3]].against_upheld) == (0, 1)
    # A window that ends before the collection and the resolution holds neither.
    assert pool_credited(world.net.escrow, 0, world.collected_at) == 0
    assert resolved_votes(world.net.disputes, 0, world.collected_at) == {}
    # One that starts after the collection holds the resolution but not the fee.
    after = world.collected_at + 1
    assert pool_credited(world.net.escrow, after, until) == 0
    assert set(resolved_votes(world.net.disputes, after, until)) == {ADDRS[V2], ADDRS[V3]}


def test_an_epoch_pays_each_verifier_exactly_its_share_once(world: World, tmp_path: Path) -> None:
    chain, net = world.chain, world.net
    state = tmp_path / "verifier-pay.json"
    pool = world.collection.verifier_fee_wei
    # Scores: V1 3 audits = 3; V2 1 audit + 5 for its agreeing vote = 6; V3 2 audits = 2.
    expected = {
        ADDRS[V1]: pool * 3 // 11,
        ADDRS[V3]: pool * 2 // 11,
    }
    expected[ADDRS[V2]] = pool - expected[ADDRS[V1]] - expected[ADDRS[V3]]
    assert expected == verifier_shares(
        [
            VerifierWork(ADDRS[V1], audits=3),
            VerifierWork(ADDRS[V2], audits=1, votes_agreeing=1),
            VerifierWork(ADDRS[V3], audits=2, votes_against_upheld=1),
        ],
        pool,
    )

    # By default the chain window ends a second past the latest block, however far the
    # chain's clock ran ahead of the wall clock (voting periods), and the gateway's at now.
    dry = pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), dry_run=True, now=1_000)
    assert dry.epoch is None and dry.shares == expected and dry.pool_wei == pool
    assert (dry.since, dry.until) == (0, chain.timestamp() + 1)
    assert (dry.audits_since, dry.audits_until, dry.note) == (0, 1_000, "dry run: nothing sent")
    assert not state.exists() and net.rewards.next_epoch() == 1
    work = {w.verifier: w for w in dry.work}
    assert work[ADDRS[V3]].votes_against_upheld == 1 and work[ADDRS[V3]].votes_agreeing == 0

    owed = net.escrow.fees_owed(ADDRS[POOL])
    # An explicit --until ends both windows; it must be past on both clocks.
    until = now = chain.timestamp() + 1
    result = pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), until=until, now=now)
    assert result.epoch == 1 and result.shares == expected
    assert (result.since, result.until, result.audits_until) == (0, until, until)
    assert result.claimed_fees_wei == owed and net.escrow.fees_owed(ADDRS[POOL]) == 0
    epoch = net.rewards.epoch(1)
    assert epoch.status == "proposed" and epoch.total_wei == pool
    (record,) = PayState.load(state, net.deployment()).epochs
    assert (record.since, record.until, record.status) == (0, until, "proposed")
    assert (record.audits_since, record.audits_until) == (0, until)
    assert record.allocations == expected

    # In the challenge window nothing can be claimed yet.
    early = claim_rewards(net, KEYS[OTHER], state, ADDRS[V1])
    assert [(c.epoch, c.status) for c in early] == [(1, "not final yet")]
    assert early[0].final_at == epoch.proposed_at + net.rewards.challenge_window()
    chain.increase_time(net.rewards.challenge_window())
    for verifier in (V1, V2, V3):
        before = chain.balance(ADDRS[verifier])
        # Another key sends the claim, so the verifier's balance moves by the reward alone.
        (claim,) = claim_rewards(net, KEYS[OTHER], state, ADDRS[verifier])
        assert claim.status == "claimed" and claim.amount_wei == expected[ADDRS[verifier]]
        assert _received(chain, ADDRS[verifier], before) == expected[ADDRS[verifier]]
    assert net.rewards.epoch(1).status == "finalized"
    assert net.rewards.total_claimed_wei() == pool

    # Nothing twice: the same window is refused, the next run starts where this one ended
    # and has nothing to pay, and a second claim is only reported.
    with pytest.raises(ValueError) as exc:
        pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), since=0, now=now)
    assert str(exc.value) == f"--since 0 would pay again: epoch 1 already paid up to {until}"
    again = pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), now=chain.timestamp() + 1)
    assert (again.since, again.audits_since) == (until, until)
    assert again.epoch is None and again.pool_wei == 0
    assert (
        again.note
        == "nothing to pay: no fee was credited to the verifier pool; the window stays open"
    )
    assert net.rewards.next_epoch() == 2
    (second,) = claim_rewards(net, KEYS[V2], state)  # the verifier's own key, its own share
    assert (second.epoch, second.status) == (1, "already claimed")


def test_an_interrupted_run_is_completed_without_funding_twice(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, state = world.net, tmp_path / "verifier-pay.json"
    funded = net.rewards.total_funded_wei()

    def broken(*args: object, **kwargs: object) -> None:
        raise ChainError("the chain went away (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(RewardDistributor, "propose_tree", broken)
        with pytest.raises(ChainError, match="injected"):
            pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), now=world.chain.timestamp() + 1)
    (record,) = PayState.load(state, net.deployment()).epochs
    assert record.status == "pending"
    assert net.rewards.total_funded_wei() - funded == world.collection.verifier_fee_wei
    done = pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), now=world.chain.timestamp() + 1)
    assert done.epoch == 1 and done.note == "completed the interrupted run for this window"
    assert net.rewards.epoch(1).status == "proposed"
    assert net.rewards.total_funded_wei() - funded == world.collection.verifier_fee_wei


def test_only_the_pool_pays_and_only_for_time_the_chain_has_seen(
    world: World, tmp_path: Path
) -> None:
    net, state = world.net, tmp_path / "verifier-pay.json"
    with pytest.raises(ValueError) as exc:
        pay_epoch(net, KEYS[V1], state, _audits(AUDITS))
    assert str(exc.value) == (
        f"{ADDRS[V1]} is not the escrow's verifier pool ({ADDRS[POOL]}): only its holder pays"
    )
    latest = world.chain.timestamp()
    with pytest.raises(ValueError) as exc:
        pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), until=latest + 2, now=latest + 9)
    assert str(exc.value) == (
        f"--until {latest + 2} is after the chain's latest block ({latest}): events could"
        " still land before it"
    )
    with pytest.raises(ValueError) as exc:
        pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), until=latest, now=latest - 1)
    assert str(exc.value) == (
        f"--until {latest} is in the future: the gateway could still record audits"
    )
    with pytest.raises(ValueError) as exc:
        pay_epoch(net, KEYS[POOL], state, _audits(AUDITS), since=50, until=50)
    assert str(exc.value) == "empty window: --until 50 is not after --since 50"
    # Nobody audited and nobody voted in this window: nothing is paid, the window stays open.
    early = pay_epoch(net, KEYS[POOL], state, _audits({}), until=1)
    assert early.epoch is None and early.note.startswith("nothing to pay")
    assert not state.exists()
