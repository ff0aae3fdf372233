"""A verifier's epoch scores: observe the miners, score them, commit, then reveal (issue 11).

`ScoreDuty.tick()` runs on the verifier node's duty loop:

1. **Commit.** Once a ScoreBoard epoch has ended and while its commit window is open, a
   verifier that has not committed for it asks its gateway what it observed of each miner
   since this verifier's last scored window (`GET /v1/miners/epoch`, app.miner_epochs, on the
   gateway's clock: the chain's may run ahead of it on a devnet), turns each registered miner's
   counts into a protocol.scoring.MinerObservation (its stake: `stake_at` the epoch's end),
   scores them (`score`), reports the shares (`score_shares_ppm`: ppm, rounded down), draws a
   salt, saves all of it to its state file and only then commits. Latency comes as ratios to
   each model's typical pace, so the observation's model medians are 1. A network with more
   miners than a reveal holds (settle.scores.MAX_SCORED) is reported by its highest scores.
   An epoch in which nobody earned a positive score is not committed (nothing to report).
2. **Reveal.** For every committed epoch whose reveal window is open and that is not yet
   revealed, it reveals the saved shares and salt.

The state file (one per verifier address) keeps, per epoch, the gateway window it scored, the
shares and the salt: a verifier restarted between its commit and its reveal still reveals, and
the next window starts where the last one ended. It names the ScoreBoard (address and genesis)
it is about: a file of another board (a devnet restarted on a fresh chain reuses addresses) is
set aside, not trusted, or the verifier would skip epochs it never committed on this one.

A failure (gateway down, chain refusing) is logged once per epoch and step and tried again on
the next tick.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address

from infergrid.gateway_client import get_gateway_json
from infergrid.protocol.nodes import Role
from infergrid.protocol.scoring import MinerObservation, score, score_shares_ppm
from infergrid.settle.chain import PrivateKey, as_account
from infergrid.settle.registry import Registry
from infergrid.settle.scores import MAX_SCORED, ScoreBoard, new_salt

__all__ = ["ScoreDuty", "fetch_miner_epoch", "observations", "score_state_path"]

STATE_VERSION = 2
# One state file per verifier address, in its state directory.
STATE_FILE = "verifier-scores-{}.json"


def score_state_path(state_dir: Path, verifier: str) -> Path:
    return state_dir / STATE_FILE.format(to_checksum_address(verifier))


def fetch_miner_epoch(
    gateway_url: str, api_key: str, since: float, until: float, *, timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """The gateway's `GET /v1/miners/epoch` rows for [since, until). RuntimeError with the
    gateway's message; ConnectionError when unreachable."""
    base_url = gateway_url.rstrip("/").removesuffix("/v1") + "/v1"
    query = {"since": repr(float(since)), "until": repr(float(until))}
    body = get_gateway_json(base_url, "/miners/epoch", api_key, query=query, timeout_s=timeout_s)
    try:
        return list(body["data"])
    except (KeyError, TypeError) as exc:
        raise RuntimeError(f"the gateway's /v1/miners/epoch answer is malformed: {exc}") from None


def observations(
    rows: list[dict[str, Any]], stake_of: Callable[[str], int]
) -> list[MinerObservation]:
    """MinerObservations from the gateway's rows, for the miners `stake_of` gives a positive
    stake (the others are not miners of this network, or hold nothing to back a score)."""
    found: list[MinerObservation] = []
    for row in rows:
        try:
            miner = to_checksum_address(row["miner"])
            stake = stake_of(miner)
            if stake <= 0:
                continue
            audits = row.get("audits") or {}
            found.append(
                MinerObservation(
                    miner=miner,
                    verified_tokens=int(row["verified_tokens"]),
                    ttft_s=float(row["ttft_ratio"] if row.get("ttft_ratio") is not None else 1),
                    tpot_s=float(row["tpot_ratio"] if row.get("tpot_ratio") is not None else 1),
                    model_ttft_s=1.0,
                    model_tpot_s=1.0,
                    health_checks=int(row["health_checks"]),
                    health_ok=int(row["health_ok"]),
                    requests=int(row["requests"]),
                    errors=int(row["errors"]),
                    audits_passed=int(audits.get("passed", 0)),
                    audits_failed=int(audits.get("failed", 0)),
                    stake_wei=stake,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RuntimeError(f"the gateway's row for a miner is malformed: {exc}") from None
    return found


@dataclass
class _Scored:
    epoch: int
    since: float
    until: float
    shares: dict[str, int]
    salt: str  # hex
    committed: bool = False
    revealed: bool = False


class ScoreDuty:
    """Commits and reveals one verifier's scores every epoch (module docstring).
    `miner_epoch(since, until)` gives the gateway's rows for a window of its clock
    (`fetch_miner_epoch` bound to a gateway and an API key)."""

    def __init__(
        self,
        *,
        board: ScoreBoard,
        registry: Registry,
        private_key: PrivateKey,
        miner_epoch: Callable[[float, float], list[dict[str, Any]]],
        state_path: Path,
        log: Callable[[str], None] = print,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.board = board
        self.registry = registry
        self.key = private_key
        self.verifier = as_account(private_key).address
        self.miner_epoch = miner_epoch
        self.state_path = state_path
        self.log = log
        self.wall_clock = wall_clock
        self._said: set[str] = set()
        self.epochs: dict[int, _Scored] = self._load()

    # -- the state file ----------------------------------------------------------------------

    def _board_identity(self) -> dict[str, Any]:
        return {"board": self.board.address, "genesis": self.board.schedule().genesis}

    def _load(self) -> dict[int, _Scored]:
        if not self.state_path.exists():
            return {}
        try:
            data = json.loads(self.state_path.read_text())
            identity = {key: data.get(key) for key in ("board", "genesis")}
            if identity != self._board_identity():
                aside = self.state_path.with_name(self.state_path.name + ".other-board")
                os.replace(self.state_path, aside)
                self.log(
                    f"scores: {self.state_path} is about another ScoreBoard ({identity});"
                    f" starting afresh (set aside as {aside.name})"
                )
                return {}
            return {int(e["epoch"]): _Scored(**e) for e in data["epochs"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"the score state file {self.state_path} is unreadable: {exc}"
            ) from None

    def _save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "verifier": self.verifier,
            **self._board_identity(),
            "epochs": [vars(e) for e in sorted(self.epochs.values(), key=lambda e: e.epoch)],
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.state_path)

    # -- the duty ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Commit for the epoch that just ended, reveal what is due; never raises for a
        failure of the gateway or the chain (logged, tried again next tick)."""
        try:
            self._commit_due()
        except Exception as exc:
            self._say_once("commit", f"scores: cannot commit yet: {type(exc).__name__}: {exc}")
        try:
            self._reveal_due()
        except Exception as exc:
            self._say_once("reveal", f"scores: cannot reveal yet: {type(exc).__name__}: {exc}")

    def _say_once(self, step: str, line: str) -> None:
        key = f"{step}:{line}"
        if key not in self._said:
            self._said.add(key)
            self.log(line)

    def _commit_due(self) -> None:
        schedule = self.board.schedule()
        now = self.board.chain.timestamp()
        epoch = schedule.epoch_at(now) - 1
        if epoch < 1 or now >= schedule.reveal_opens(epoch):
            return  # no epoch over yet, or its commit window has closed
        scored = self.epochs.get(epoch)
        if scored is None:
            scored = self._score(epoch)
            if scored is None:
                return
        if not scored.committed:
            self.board.commit(self.key, epoch, scored.shares, bytes.fromhex(scored.salt))
            scored.committed = True
            self._save()
            self.log(f"scores: committed epoch {epoch} ({len(scored.shares)} miners)")

    def _score(self, epoch: int) -> _Scored | None:
        since = max((e.until for e in self.epochs.values()), default=0.0)
        until = self.wall_clock()
        end = self.board.schedule().epoch_end(epoch)
        rows = self.miner_epoch(since, until)
        found = observations(rows, lambda miner: self._stake(miner, end))
        scores = {obs.miner: score(obs) for obs in found}
        scores = dict(sorted(scores.items(), key=lambda item: -item[1])[:MAX_SCORED])
        shares = {m: s for m, s in score_shares_ppm(scores).items() if s > 0}
        if not shares:
            self._say_once("empty", f"scores: nothing to report for epoch {epoch} (no score > 0)")
            return None
        scored = _Scored(epoch, since, until, shares, new_salt().hex())
        self.epochs[epoch] = scored
        self._save()  # the salt is on disk before the commitment is on the chain
        return scored

    def _stake(self, miner: str, timestamp: int) -> int:
        record = self.registry.node(miner)
        if record is None or record.role != Role.MINER:
            return 0
        return self.registry.stake_at(miner, timestamp)

    def _reveal_due(self) -> None:
        schedule = self.board.schedule()
        now = self.board.chain.timestamp()
        for scored in sorted(self.epochs.values(), key=lambda e: e.epoch):
            if not scored.committed or scored.revealed:
                continue
            if now < schedule.reveal_opens(scored.epoch):
                continue
            if now >= schedule.reveal_closes(scored.epoch):
                scored.revealed = True  # missed: nothing can be done for it any more
                self._save()
                self.log(f"scores: missed the reveal window of epoch {scored.epoch}")
                continue
            self.board.reveal(self.key, scored.epoch, scored.shares, bytes.fromhex(scored.salt))
            scored.revealed = True
            self._save()
            self.log(f"scores: revealed epoch {scored.epoch}")

    def shares(self, epoch: int) -> Mapping[str, int] | None:
        """What this verifier reported for `epoch` (None: nothing)."""
        found = self.epochs.get(epoch)
        return None if found is None else dict(found.shares)
