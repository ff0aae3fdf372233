"""Paying miners, one ScoreBoard epoch at a time: the treasury's side of epoch rewards.

Run by the treasury of the RewardDistributor (on a devnet the deployer) after an epoch's
reveal window has closed:

1. the vectors the verifiers revealed for the epoch (settle.scores.ScoreBoard), each weighed
   by the stake the contract logged with it, make the epoch's consensus: per miner the
   stake-weighted median share (protocol.consensus.consensus);
2. each miner's early multiplier at the end of the epoch (NodeRegistry.early_multiplier_at,
   protocol.scoring.EarlyMinerSchedule's rule);
3. the epoch's emission (`emission_wei`, SettlementParams.miner_emission_per_epoch_wei by
   default) is split by consensus share × multiplier (protocol.consensus.miner_rewards:
   integer wei summing exactly to the emission). The multiplier weighs a miner's claim within
   the epoch, so an early miner's bonus comes out of the others' shares and the emission per
   epoch stays what the treasury set. **With demand** (the gateway's `GET /v1/network`
   rows, one protocol.supply.ModelDemand per model) the emission is first split between the
   models (protocol.supply.emission_weights_ppm: towards the models short of capacity), then
   each model's pool between the registered miners offering it (their registry offers) by
   share × multiplier, a miner offering k models counting 1/k in each
   (protocol.supply.allocate_by_model); a model none of whose miners has a share leaves its
   pool unpaid. Without demand the emission is one pool, as in step 3;
4. the treasury funds the distributor with the emission and proposes the root with the
   proposer bond (as verifier pay does, verify.pay_epoch); after the challenge window anyone
   finalizes and each miner claims its amount with its proof (`claim_rewards`, `infergrid
   miner claim`).

The epochs paid are kept in a state file of verify.pay_state's format (its own file,
STATE_DIR/miner-rewards.json by default): each record's window is the scored epoch's on the
chain's clock, its `work` the consensus share and multiplier of every miner. Epochs for
which no verifier with stake revealed are passed over: one "skipped" record covers them, their
emission is not spent, and the run pays the next epoch that has reveals. Only addresses the
registry knows as miners are paid: a share the consensus gave any other address is not paid
out (the others' shares are not raised by it either: see `pay_miners`). A record is written as
"pending" before any money moves, so an interrupted run is completed by the next one rather
than paid twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infergrid.gateway_client import get_gateway_json
from infergrid.protocol.addresses import checked_address
from infergrid.protocol.consensus import miner_rewards
from infergrid.protocol.nodes import NodeRecord, Role
from infergrid.protocol.pricing import PPM
from infergrid.protocol.supply import (
    DEFAULT_SUPPLY,
    ModelDemand,
    SupplyParams,
    allocate_by_model,
    demand_from_network,
    emission_weights_ppm,
)
from infergrid.settle.chain import PrivateKey, as_account
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import reward_tree
from infergrid.settle.scores import ScoreBoard, epoch_consensus
from infergrid.verify.pay_epoch import PayContracts, propose_record
from infergrid.verify.pay_state import EpochRecord, PayState

__all__ = [
    "MinerPayResult",
    "fetch_network_demand",
    "last_demand_until",
    "next_scored_epoch",
    "pay_miners",
]

SKIPPED = "skipped"
# The treasury's record of miner pay, by default in the state directory.
PAY_STATE_FILE = "miner-rewards.json"


@dataclass(frozen=True)
class MinerPayResult:
    """What one `pay_miners` run did. `epoch` is the RewardDistributor's epoch proposed (None
    when nothing was: a dry run, or nothing to pay); `scored_epoch` the ScoreBoard's epoch
    it pays for; `shares` the consensus share (ppm) and `multipliers` the early multiplier
    (ppm) of each miner; `note` says what happened in one line. Paid by demand,
    `model_weights` holds each model's share of the emission (ppm) and `model_utilization`
    the utilization it was computed from; both are empty for a single pool."""

    scored_epoch: int
    since: int
    until: int
    emission_wei: int
    shares: dict[str, int]
    multipliers: dict[str, int]
    allocations: dict[str, int]
    epoch: int | None
    note: str
    skipped: tuple[int, int] | None = None  # (first, last) epochs passed over: no reveal
    tx: str | None = None
    model_weights: dict[str, int] = field(default_factory=dict)
    model_utilization: dict[str, float] = field(default_factory=dict)

    @property
    def unpaid_wei(self) -> int:
        """The part of the emission paid to nobody (the treasury keeps it): shares of
        addresses that are no miner, pools of models whose miners had no share."""
        return self.emission_wei - sum(self.allocations.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "scored_epoch": self.scored_epoch,
            "since": self.since,
            "until": self.until,
            "emission_wei": str(self.emission_wei),
            "shares_ppm": self.shares,
            "multipliers_ppm": self.multipliers,
            "allocations": {a: str(w) for a, w in self.allocations.items()},
            "epoch": self.epoch,
            "note": self.note,
            "skipped": list(self.skipped) if self.skipped else None,
            "tx": self.tx,
            "model_weights_ppm": self.model_weights,
            "model_utilization": self.model_utilization,
            "unpaid_wei": str(self.unpaid_wei),
        }


def fetch_network_demand(
    gateway_url: str, api_key: str, since: float, until: float, *, timeout_s: float = 10.0
) -> dict[str, ModelDemand]:
    """Each model's demand as the gateway's `GET /v1/network` publishes it for [since, until)
    (its clock). ConnectionError when it cannot be reached; RuntimeError with the gateway's
    message, or naming what is malformed in its answer."""
    base_url = gateway_url.rstrip("/").removesuffix("/v1") + "/v1"
    query = {"since": repr(float(since)), "until": repr(float(until))}
    body = get_gateway_json(base_url, "/network", api_key, query=query, timeout_s=timeout_s)
    try:
        return demand_from_network(body)
    except ValueError as exc:
        raise RuntimeError(f"{exc} (from {base_url}/network)") from None


def next_scored_epoch(state: PayState, board: ScoreBoard) -> int:
    """The ScoreBoard epoch after the last one the state file paid or skipped (1 at first)."""
    schedule = board.schedule()
    ends = [e.until for e in state.epochs]
    return schedule.epoch_at(max(ends)) if ends else 1


def pay_miners(
    net: PayContracts,
    board: ScoreBoard,
    registry: Registry,
    key: PrivateKey,
    state_path: Path,
    *,
    emission_wei: int,
    dry_run: bool = False,
    demand: Mapping[str, ModelDemand] | None = None,
    miner_models: Mapping[str, Sequence[str]] | None = None,
    supply: SupplyParams = DEFAULT_SUPPLY,
    demand_window: tuple[float, float] | None = None,
) -> MinerPayResult:
    """Pay the miners for the next scored epoch whose reveal window has closed (module
    docstring), passing over (and recording) epochs nobody revealed for. `key` must be the
    RewardDistributor's treasury. A dry run reads and computes, and changes nothing. ValueError
    for another key, a negative emission, or when the next epoch's reveals are not over yet.

    `demand` (model name → ModelDemand, e.g. from the gateway's /v1/network; each row names
    its model, the keys are not read) splits the emission by model with `supply`'s rule; None
    keeps the single pool. `miner_models` (miner → offer names) defaults to the registry's
    offers. `demand_window` (the gateway's clock) is recorded with the epoch, so that the next
    run can ask for demand from where it ended (`last_demand_until`). With demand but no
    tokens served in it nothing is paid and nothing recorded: a later run pays the epoch. The
    weights are kept in the state file with the epoch: a run completing an interrupted one
    pays what was recorded, not a new split."""
    if isinstance(emission_wei, bool) or not isinstance(emission_wei, int) or emission_wei < 0:
        raise ValueError(f"the emission must be a non-negative int of wei, not {emission_wei!r}")
    holder = as_account(key).address
    treasury = net.rewards.treasury()
    if holder != treasury:
        raise ValueError(
            f"{holder} is not the reward distributor's treasury ({treasury}): only it pays miners"
        )
    state = PayState.load(state_path, net.deployment())
    pending = [e for e in state.epochs if e.status == "pending"]
    schedule = board.schedule()
    if pending and not dry_run:
        record = pending[-1]
        tx, _ = propose_record(net, key, state, record, resumed=True, claim_fees=False)
        scored = schedule.epoch_at(record.since)
        return _result(record, scored, record.epoch, "completed the interrupted run", tx)
    first = next_scored_epoch(state, board)
    now = net.chain.timestamp()
    result = None
    ended = schedule.epoch_at(now) - 1  # the epochs that have ended; later ones have no reveal
    for scored in (e for e in range(first, ended + 1) if board.reveal_count(e) > 0):
        closes = schedule.reveal_closes(scored)
        if now < closes:
            raise ValueError(
                f"epoch {scored}'s reveals close at block time {closes} ({closes - now} s from"
                " now): nothing to pay before then"
            )
        try:
            result = epoch_consensus(board, scored)
            break
        except ValueError:  # only verifiers without stake revealed: nobody to weigh
            continue
    if result is None:
        return MinerPayResult(
            first, schedule.epoch_end(first) - schedule.epoch_length_s, schedule.epoch_end(first),
            emission_wei, {}, {}, {}, None,
            f"nothing to pay: no verifier with stake revealed scores for epoch {first} or later",
        )  # fmt: skip
    until = schedule.epoch_end(scored)
    since = until - schedule.epoch_length_s
    skipped = (first, scored - 1) if scored > first else None
    if skipped and not dry_run:
        # One record for the epochs passed over: their emission is not spent.
        start = schedule.epoch_end(first) - schedule.epoch_length_s
        state.epochs.append(EpochRecord(0, start, since, 0, {}, [], start, since, status=SKIPPED))
        state.save()
    records = {m: registry.node(m) for m in result.miner_shares}
    miners = {m for m, record in records.items() if _is_miner(record)}
    multipliers = {
        m: registry.early_multiplier_at(m, until - 1) if m in miners else PPM
        for m in result.miner_shares
    }
    # A share the verifiers gave an address that is no miner is left unpaid (at 1x), not
    # handed to the others: what a miner gets does not depend on what is said about others.
    weights: dict[str, int] = {}
    utilization: dict[str, float] = {}
    models_of: dict[str, list[str]] = {}
    model_work: list[dict[str, Any]] = []
    if demand is None:
        allocations = {
            miner: amount
            for miner, amount in miner_rewards(result, emission_wei, multipliers).items()
            if amount > 0 and miner in miners
        }
    else:
        weights = emission_weights_ppm(demand.values(), supply)
        utilization = {d.model: d.utilization for d in demand.values()}
        if miner_models is None:
            models_of = {m: _offers(records[m]) for m in miners}
        else:
            given = {checked_address(m, "miner"): list(v) for m, v in miner_models.items()}
            models_of = {m: given[m] for m in miners if m in given}
        split = allocate_by_model(
            emission_wei,
            {m: s for m, s in result.miner_shares.items() if m in miners},
            models_of,
            weights,
            {m: x for m, x in multipliers.items() if m in miners},
        )
        allocations = {m: a for m, a in split.allocations.items() if a > 0}
        model_work = [
            {
                "model": name,
                "weight_ppm": weights[name],
                "utilization": utilization[name],
                "pool_wei": str(split.pools.get(name, 0)),
                "unpaid_wei": str(split.unpaid.get(name, 0)),
            }
            for name in sorted(weights)
        ]
    work: list[dict[str, Any]] = [
        {"miner": m, "share_ppm": s, "multiplier_ppm": multipliers[m]}
        | ({"models": models_of.get(m, [])} if demand is not None else {})
        for m, s in result.miner_shares.items()
    ]
    work += model_work

    def outcome(epoch: int | None, note: str, tx: str | None = None) -> MinerPayResult:
        return MinerPayResult(
            scored, since, until, emission_wei, dict(result.miner_shares), multipliers,
            allocations, epoch, note, skipped, tx, dict(weights), dict(utilization),
        )  # fmt: skip

    if demand is not None and not any(weights.values()):
        return outcome(None, "nothing to pay: the gateway saw no tokens served in its window")
    if not allocations:
        return outcome(None, "nothing to pay: every consensus share is 0, or no emission")
    if dry_run:
        return outcome(None, "dry run: nothing sent")
    tree = reward_tree(allocations)
    record = EpochRecord(
        epoch=net.rewards.next_epoch(),
        since=since,
        until=until,
        pool_wei=emission_wei,
        allocations=dict(tree.allocations),
        work=work,
        # The gateway window the demand was read for (its clock), else the chain's window.
        audits_since=int(demand_window[0]) if demand_window else since,
        audits_until=int(demand_window[1]) if demand_window else until,
        root="0x" + tree.root.hex(),
        block=net.chain.block_number(),
    )
    state.epochs.append(record)
    state.save()  # pending: a crash from here on is completed by the next run
    tx, _ = propose_record(net, key, state, record, resumed=False, claim_fees=False)
    return outcome(record.epoch, "proposed", tx)


def _result(
    record: EpochRecord, scored: int, epoch: int | None, note: str, tx: str | None
) -> MinerPayResult:
    miner_rows = [w for w in record.work if "miner" in w]
    model_rows = [w for w in record.work if "model" in w]
    shares = {w["miner"]: int(w["share_ppm"]) for w in miner_rows}
    multipliers = {w["miner"]: int(w["multiplier_ppm"]) for w in miner_rows}
    weights = {w["model"]: int(w["weight_ppm"]) for w in model_rows}
    utilization = {w["model"]: float(w["utilization"]) for w in model_rows}
    return MinerPayResult(
        scored, record.since, record.until, record.pool_wei, shares, multipliers,
        dict(record.allocations), epoch, note, None, tx, weights, utilization,
    )  # fmt: skip


def last_demand_until(state: PayState) -> int:
    """Where the demand windows of the epochs paid by demand end, on the gateway's clock (0
    when none was): the next run's window starts there."""
    return max((e.audits_until for e in state.epochs if _by_demand(e)), default=0)


def _by_demand(record: EpochRecord) -> bool:
    return any("model" in w for w in record.work)


def _offers(record: NodeRecord | None) -> list[str]:
    return [offer.name for offer in record.models] if record is not None else []


def _is_miner(record: NodeRecord | None) -> bool:
    return record is not None and record.role == Role.MINER
