"""An epoch of miner rewards on real contracts (verify.miner_pay on the embedded EVM, every
contract of settle.deploy with DEVNET_PARAMS, whose miners are all early: 2x): verifiers commit
and reveal their scores on the ScoreBoard, the treasury pays the epoch's emission by the
consensus share times the early multiplier, and each miner claims exactly its allocation.

- two honest verifiers (stake 20 and 30) score miners A and B 600,000 / 400,000; a third
  (stake 10) lifts B to 900,000: the median is the honest one;
- A registered early (2x), B after the early period (1x): A gets 2·600 / (2·600 + 400) = 3/4
  of the emission, B 1/4;
- nothing before the reveal window closes; an epoch nobody revealed for is passed over and
  recorded, and its emission is not spent; only the treasury pays; a dry run sends nothing;
  an interrupted run is completed without paying twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from verify_helpers import ADDRS, KEYS, P

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.settle.deploy import deploy_network
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor
from infergrid.settle.scores import ScoreBoard, new_salt
from infergrid.verify.miner_pay import next_scored_epoch, pay_miners
from infergrid.verify.pay_epoch import PayContracts, PayState, claim_rewards

TREASURY, MINER_A, MINER_B, V1, V2, V3, OTHER = range(7)
EMISSION = P.miner_emission_per_epoch_wei
HONEST = {ADDRS[MINER_A]: 600_000, ADDRS[MINER_B]: 400_000}
LIFTING_B = {ADDRS[MINER_A]: 100_000, ADDRS[MINER_B]: 900_000}


@dataclass
class World:
    chain: Chain
    net: PayContracts
    registry: Registry
    board: ScoreBoard


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=10))


def travel_to(chain: Chain, timestamp: int) -> None:
    now = chain.timestamp()
    if timestamp > now:
        chain.increase_time(timestamp - now)


@pytest.fixture
def world(chain: Chain) -> World:
    contracts = deploy_network(chain, KEYS[TREASURY], P)
    assert contracts.ScoreBoard is not None
    registry = Registry(chain, contracts.NodeRegistry)
    offer = ModelOffer("m", "0x" + "07" * 32, 1, 1)
    registry.register(
        KEYS[MINER_A], Role.MINER, "http://a", ADDRS[MINER_A], [offer], 100 * WEI_PER_BTT
    )
    for index, stake in ((V1, 20), (V2, 30), (V3, 10)):
        registry.register(
            KEYS[index], Role.VERIFIER, "http://v", ADDRS[index], [], stake * WEI_PER_BTT
        )
    # B joins after the early period: 1x.
    travel_to(chain, registry.early_schedule().period_end)
    registry.register(
        KEYS[MINER_B], Role.MINER, "http://b", ADDRS[MINER_B], [offer], 100 * WEI_PER_BTT
    )
    net = PayContracts.connect(
        chain,
        registry=contracts.NodeRegistry,
        escrow=contracts.PaymentEscrow,
        rewards=contracts.RewardDistributor,
    )
    return World(chain, net, registry, ScoreBoard(chain, contracts.ScoreBoard))


def score_epoch(world: World, epoch: int, reports: dict[int, dict[str, int]]) -> None:
    """Each verifier index in `reports` commits, then reveals, its scores of `epoch`; the
    chain is left after the reveal window."""
    schedule = world.board.schedule()
    salts = {index: new_salt() for index in reports}
    travel_to(world.chain, schedule.epoch_end(epoch))
    for index, scores in reports.items():
        world.board.commit(KEYS[index], epoch, scores, salts[index])
    travel_to(world.chain, schedule.reveal_opens(epoch))
    for index, scores in reports.items():
        world.board.reveal(KEYS[index], epoch, scores, salts[index])
    travel_to(world.chain, schedule.reveal_closes(epoch))


def current_scored(world: World) -> int:
    """The ScoreBoard epoch running now (the fixture travelled past the early period, so the
    first scored epoch comes hundreds of epochs after genesis)."""
    return world.board.current_epoch()


def test_an_epoch_pays_miners_by_consensus_share_times_early_multiplier(
    world: World, tmp_path: Path
) -> None:
    state_file = tmp_path / "miner-rewards.json"
    scored = current_scored(world)
    score_epoch(world, scored, {V1: HONEST, V2: HONEST, V3: LIFTING_B})
    dry = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION, dry_run=True,
    )  # fmt: skip
    assert dry.epoch is None and not state_file.exists()
    # Every epoch from 1 up to the scored one was passed over (nobody revealed).
    assert dry.skipped == (1, scored - 1) and scored > 100

    result = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION,
    )  # fmt: skip
    assert result.scored_epoch == scored and result.epoch == 1 and result.note == "proposed"
    assert result.shares == HONEST  # the median: V3's lift of B is outvoted
    # A is early, its 2x decaying since the period ended (the epoch ends just after); B is 1x.
    a_multiplier = world.registry.early_multiplier_at(ADDRS[MINER_A], result.until - 1)
    assert 1_990_000 < a_multiplier < 2_000_000
    assert result.multipliers == {ADDRS[MINER_A]: a_multiplier, ADDRS[MINER_B]: 1_000_000}
    a_weight, b_weight = 600_000 * a_multiplier, 400_000 * 1_000_000
    a_exact = Fraction(EMISSION * a_weight, a_weight + b_weight)
    assert abs(result.allocations[ADDRS[MINER_A]] - a_exact) < 1  # about 3/4
    assert sum(result.allocations.values()) == EMISSION
    assert world.net.rewards.epoch(1).total_wei == EMISSION

    state = PayState.load(state_file, world.net.deployment())
    assert [r.status for r in state.epochs] == ["skipped", "proposed"]
    assert next_scored_epoch(state, world.board) == scored + 1

    # After the challenge window each miner claims exactly its allocation.
    travel_to(world.chain, world.chain.timestamp() + world.net.rewards.challenge_window() + 1)
    for miner in (MINER_A, MINER_B):
        before = world.chain.balance(ADDRS[miner])
        (claim,) = claim_rewards(world.net, KEYS[miner], state_file)
        assert claim.status == "claimed" and claim.amount_wei == result.allocations[ADDRS[miner]]
        assert world.chain.balance(ADDRS[miner]) > before  # net of gas
        (again,) = claim_rewards(world.net, KEYS[miner], state_file)
        assert again.status == "already claimed"
    # A verifier (or anyone) not in the tree has nothing to claim.
    assert claim_rewards(world.net, KEYS[V1], state_file) == []


def test_nothing_is_paid_before_the_reveals_close_nor_twice(world: World, tmp_path: Path) -> None:
    state_file = tmp_path / "miner-rewards.json"
    scored = current_scored(world)
    schedule = world.board.schedule()
    nothing = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION,
    )  # fmt: skip
    assert nothing.epoch is None and "no verifier with stake revealed" in nothing.note
    salt = new_salt()
    travel_to(world.chain, schedule.epoch_end(scored))
    world.board.commit(KEYS[V1], scored, HONEST, salt)
    travel_to(world.chain, schedule.reveal_opens(scored))
    world.board.reveal(KEYS[V1], scored, HONEST, salt)
    with pytest.raises(ValueError, match=f"epoch {scored}'s reveals close"):
        pay_miners(
            world.net, world.board, world.registry, KEYS[TREASURY], state_file,
            emission_wei=EMISSION,
        )  # fmt: skip
    travel_to(world.chain, schedule.reveal_closes(scored))
    first = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION,
    )  # fmt: skip
    assert first.scored_epoch == scored and first.epoch == 1
    # The same epoch is never paid again: nothing later has reveals.
    again = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION,
    )  # fmt: skip
    assert again.epoch is None and again.scored_epoch == scored + 1
    assert world.net.rewards.next_epoch() == 2


def test_only_the_treasury_pays_and_the_emission_is_checked(world: World, tmp_path: Path) -> None:
    state_file = tmp_path / "miner-rewards.json"
    with pytest.raises(ValueError, match="not the reward distributor's treasury"):
        pay_miners(
            world.net, world.board, world.registry, KEYS[OTHER], state_file,
            emission_wei=EMISSION,
        )  # fmt: skip
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="emission"):
            pay_miners(
                world.net, world.board, world.registry, KEYS[TREASURY], state_file,
                emission_wei=bad,  # type: ignore[arg-type]
            )  # fmt: skip
    assert not state_file.exists()


def test_no_emission_means_nothing_to_pay(world: World, tmp_path: Path) -> None:
    state_file = tmp_path / "miner-rewards.json"
    score_epoch(world, current_scored(world), {V1: HONEST, V2: HONEST})
    result = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file, emission_wei=0
    )
    assert result.epoch is None and "nothing to pay" in result.note
    assert world.net.rewards.next_epoch() == 1


def test_an_interrupted_run_is_completed_without_paying_twice(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_file = tmp_path / "miner-rewards.json"
    score_epoch(world, current_scored(world), {V1: HONEST, V2: HONEST})

    def crash(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the chain went away after funding")

    monkeypatch.setattr(RewardDistributor, "propose", crash)
    with pytest.raises(ConnectionError):
        pay_miners(
            world.net, world.board, world.registry, KEYS[TREASURY], state_file,
            emission_wei=EMISSION,
        )  # fmt: skip
    funded = world.net.rewards.total_funded_wei()
    monkeypatch.undo()
    resumed = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION,
    )  # fmt: skip
    assert resumed.note == "completed the interrupted run" and resumed.epoch == 1
    assert world.net.rewards.total_funded_wei() == funded == EMISSION  # funded once
    assert world.net.rewards.epoch(1).status == "proposed"


def test_a_share_given_to_an_address_that_is_no_miner_is_not_paid(
    world: World, tmp_path: Path
) -> None:
    """The verifiers' consensus names a verifier's address: its share stays unspent, and the
    miners get exactly what they would have with it in the pool."""
    stranger = ADDRS[V3]  # registered, as a verifier
    scores = {ADDRS[MINER_B]: 500_000, stranger: 500_000}
    score_epoch(world, current_scored(world), {V1: scores, V2: scores})
    result = pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], tmp_path / "m.json",
        emission_wei=EMISSION,
    )  # fmt: skip
    assert result.shares == scores
    assert result.allocations == {ADDRS[MINER_B]: EMISSION // 2}
    assert world.net.rewards.epoch(1).total_wei == EMISSION // 2
