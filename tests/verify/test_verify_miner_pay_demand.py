"""Miner pay by demand on real contracts (verify.miner_pay with `demand`, the embedded EVM, every
contract of settle.deploy with DEVNET_PARAMS): the emission is split between the models by
protocol.supply's rule, then each model's pool between the registered miners offering it.

- miner A offers model "busy" only, miner B offers "busy" and "idle"; both registered in the
  early period (2x, the same multiplier for both);
- two verifiers report A 500,000 and B 500,000;
- the gateway saw the same tokens served for both models, "busy" at the target utilization
  (pressure 1: boost 2.5) and "idle" at none (boost 1): "busy" gets 2.5 / 3.5 of the emission;
- "busy"'s pool goes 2 : 1 to A and B (B counts half its share there), "idle"'s all to B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from verify_helpers import ADDRS, KEYS, P

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.supply import ModelDemand, allocate_by_model, emission_weights_ppm
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.settle.deploy import deploy_network
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor
from infergrid.settle.scores import ScoreBoard, new_salt
from infergrid.verify.miner_pay import MinerPayResult, last_demand_until, pay_miners
from infergrid.verify.pay_epoch import PayContracts, PayState

TREASURY, MINER_A, MINER_B, V1, V2 = range(5)
EMISSION = P.miner_emission_per_epoch_wei
SHARES = {ADDRS[MINER_A]: 500_000, ADDRS[MINER_B]: 500_000}
DEMAND = {
    "busy": ModelDemand("busy", 100, 0, 9000, 5000, 50.0, 100.0),
    "idle": ModelDemand("idle", 100, 0, 9000, 5000, 0.0, 100.0),
}
WINDOW = (1_764_650_000.0, 1_764_650_300.0)


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


def offer(name: str) -> ModelOffer:
    return ModelOffer(name, "0x" + ("07" if name == "busy" else "08") * 32, 1, 1)


@pytest.fixture
def world(chain: Chain) -> World:
    contracts = deploy_network(chain, KEYS[TREASURY], P)
    assert contracts.ScoreBoard is not None
    registry = Registry(chain, contracts.NodeRegistry)
    stake = 100 * WEI_PER_BTT
    registry.register(KEYS[MINER_A], Role.MINER, "http://a", ADDRS[MINER_A], [offer("busy")], stake)
    registry.register(
        KEYS[MINER_B], Role.MINER, "http://b", ADDRS[MINER_B], [offer("busy"), offer("idle")],
        stake,
    )  # fmt: skip
    for index in (V1, V2):
        registry.register(KEYS[index], Role.VERIFIER, "http://v", ADDRS[index], [], stake)
    net = PayContracts.connect(
        chain,
        registry=contracts.NodeRegistry,
        escrow=contracts.PaymentEscrow,
        rewards=contracts.RewardDistributor,
    )
    board = ScoreBoard(chain, contracts.ScoreBoard)
    # Both verifiers commit and reveal SHARES for the epoch running now.
    epoch = board.current_epoch()
    schedule = board.schedule()
    salts = {index: new_salt() for index in (V1, V2)}
    travel_to(chain, schedule.epoch_end(epoch))
    for index in (V1, V2):
        board.commit(KEYS[index], epoch, SHARES, salts[index])
    travel_to(chain, schedule.reveal_opens(epoch))
    for index in (V1, V2):
        board.reveal(KEYS[index], epoch, SHARES, salts[index])
    travel_to(chain, schedule.reveal_closes(epoch))
    return World(chain, net, registry, board)


def pay(world: World, state_file: Path, **kwargs: Any) -> MinerPayResult:
    return pay_miners(
        world.net, world.board, world.registry, KEYS[TREASURY], state_file,
        emission_wei=EMISSION, **kwargs,
    )  # fmt: skip


def test_the_emission_follows_demand_to_the_miners_of_each_model(
    world: World, tmp_path: Path
) -> None:
    state_file = tmp_path / "miner-rewards.json"
    result = pay(world, state_file, demand=DEMAND, demand_window=WINDOW)
    assert result.note == "proposed"
    weights = emission_weights_ppm(DEMAND.values())
    assert weights == {"busy": 714_286, "idle": 285_714}  # 2.5 : 1
    assert result.model_weights == weights
    assert result.model_utilization == {"busy": 0.5, "idle": 0.0}
    # The registry's offers decide who shares which pool: the same as allocate_by_model.
    multipliers = result.multipliers
    expected = allocate_by_model(
        EMISSION, SHARES, {ADDRS[MINER_A]: ["busy"], ADDRS[MINER_B]: ["busy", "idle"]}, weights,
        multipliers,
    )  # fmt: skip
    assert result.allocations == expected.allocations
    a, b = (result.allocations[ADDRS[m]] for m in (MINER_A, MINER_B))
    assert a + b == EMISSION and b > a  # B has all of "idle" and a third of "busy"
    assert world.net.rewards.epoch(1).total_wei == EMISSION

    state = PayState.load(state_file, world.net.deployment())
    (record,) = [r for r in state.epochs if r.status == "proposed"]
    models = {w["model"]: w for w in record.work if "model" in w}
    assert {m: w["weight_ppm"] for m, w in models.items()} == weights
    assert last_demand_until(state) == int(WINDOW[1])


def test_a_model_no_paid_miner_offers_leaves_its_pool_unpaid(world: World, tmp_path: Path) -> None:
    demand = {**DEMAND, "orphan": ModelDemand("orphan", 10, 0, 900, 5000, 0.0, 100.0)}
    result = pay(world, tmp_path / "m.json", demand=demand)
    weights = emission_weights_ppm(demand.values())
    orphan_pool = EMISSION * weights["orphan"] // 1_000_000
    assert result.unpaid_wei == orphan_pool
    assert world.net.rewards.epoch(1).total_wei == EMISSION - orphan_pool


def test_explicit_miner_models_override_the_registry(world: World, tmp_path: Path) -> None:
    result = pay(
        world, tmp_path / "m.json", dry_run=True, demand=DEMAND,
        miner_models={ADDRS[MINER_A]: ["busy"], ADDRS[MINER_B]: ["idle"]},
    )  # fmt: skip
    weights = emission_weights_ppm(DEMAND.values())
    assert result.allocations == {
        ADDRS[MINER_A]: EMISSION * weights["busy"] // 1_000_000,
        ADDRS[MINER_B]: EMISSION * weights["idle"] // 1_000_000,
    }


def test_demand_with_nothing_served_pays_nothing_and_records_nothing(
    world: World, tmp_path: Path
) -> None:
    state_file = tmp_path / "m.json"
    quiet = {"busy": ModelDemand("busy", capacity_slot_s=100.0)}
    result = pay(world, state_file, demand=quiet)
    assert result.epoch is None and "no tokens served" in result.note
    state = PayState.load(state_file, world.net.deployment())
    # Only epochs passed over (nobody revealed) are on record: the scored one is still to pay.
    assert all(r.status == "skipped" for r in state.epochs)
    assert pay(world, state_file, demand=DEMAND).note == "proposed"


def test_an_interrupted_run_by_demand_pays_what_was_recorded(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_file = tmp_path / "m.json"

    def crash(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the chain went away after funding")

    monkeypatch.setattr(RewardDistributor, "propose", crash)
    with pytest.raises(ConnectionError):
        pay(world, state_file, demand=DEMAND)
    first = PayState.load(state_file, world.net.deployment()).epochs[-1].allocations
    monkeypatch.undo()
    # Demand read again later is different; the interrupted epoch is paid as recorded.
    other = {"idle": ModelDemand("idle", 100, 50, 9000, 9000, 99.0, 100.0)}
    resumed = pay(world, state_file, demand=other)
    assert resumed.note == "completed the interrupted run"
    assert resumed.allocations == first
    assert resumed.model_weights == emission_weights_ppm(DEMAND.values())
    assert world.net.rewards.total_funded_wei() == EMISSION
