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
   epoch stays what the treasury set;
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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infergrid.protocol.consensus import miner_rewards
from infergrid.protocol.nodes import Role
from infergrid.protocol.pricing import PPM
from infergrid.settle.chain import PrivateKey, as_account
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import reward_tree
from infergrid.settle.scores import ScoreBoard, epoch_consensus
from infergrid.verify.pay_epoch import PayContracts, propose_record
from infergrid.verify.pay_state import EpochRecord, PayState

__all__ = ["MinerPayResult", "next_scored_epoch", "pay_miners"]

SKIPPED = "skipped"
# The treasury's record of miner pay, by default in the state directory.
PAY_STATE_FILE = "miner-rewards.json"


@dataclass(frozen=True)
class MinerPayResult:
    """What one `pay_miners` run did. `epoch` is the RewardDistributor's epoch proposed (None
    when nothing was: a dry run, or nothing to pay); `scored_epoch` the ScoreBoard's epoch
    it pays for; `shares` the consensus share (ppm) and `multipliers` the early multiplier
    (ppm) of each miner; `note` says what happened in one line."""

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
        }


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
) -> MinerPayResult:
    """Pay the miners for the next scored epoch whose reveal window has closed (module
    docstring), passing over (and recording) epochs nobody revealed for. `key` must be the
    RewardDistributor's treasury. A dry run reads and computes, and changes nothing. ValueError
    for another key, a negative emission, or when the next epoch's reveals are not over yet."""
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
    miners = {m for m in result.miner_shares if _is_miner(registry, m)}
    multipliers = {
        m: registry.early_multiplier_at(m, until - 1) if m in miners else PPM
        for m in result.miner_shares
    }
    # A share the verifiers gave an address that is no miner is left unpaid (at 1x), not
    # handed to the others: what a miner gets does not depend on what is said about others.
    allocations = {
        miner: amount
        for miner, amount in miner_rewards(result, emission_wei, multipliers).items()
        if amount > 0 and miner in miners
    }
    work = [
        {"miner": m, "share_ppm": s, "multiplier_ppm": multipliers[m]}
        for m, s in result.miner_shares.items()
    ]

    def outcome(epoch: int | None, note: str, tx: str | None = None) -> MinerPayResult:
        return MinerPayResult(
            scored, since, until, emission_wei, dict(result.miner_shares), multipliers,
            allocations, epoch, note, skipped, tx,
        )  # fmt: skip

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
        audits_since=since,
        audits_until=until,
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
    shares = {w["miner"]: int(w["share_ppm"]) for w in record.work}
    multipliers = {w["miner"]: int(w["multiplier_ppm"]) for w in record.work}
    return MinerPayResult(
        scored, record.since, record.until, record.pool_wei, shares, multipliers,
        dict(record.allocations), epoch, note, None, tx,
    )  # fmt: skip


def _is_miner(registry: Registry, address: str) -> bool:
    record = registry.node(address)
    return record is not None and record.role == Role.MINER
