"""What a gateway observed of each miner over a window: the gateway's half of the verifiers'
epoch scores (protocol.scoring.MinerObservation), served as `GET /v1/miners/epoch`.

Per miner, over the requests the gateway received in [since, until) (its traces) and its
health checks in that window:

- `requests`: requests a miner answered or failed (traces naming it); `errors`: those that
  ended in a 5xx (the miner failed, timed out or broke its stream; a request the gateway then
  served elsewhere before the first token counts on the miner that finally served it only);
- `verified_tokens`: completion tokens of its 200 answers, less those of requests a verifier's
  verdict failed;
- `ttft_ratio`, `tpot_ratio`: the median over its requests of the request's time to first
  token (a stream's first content chunk; a whole answer otherwise) and time per output token
  after it, each divided by the median of that model's requests over every miner: 1.0 is the
  model's typical speed, 2.0 twice as slow. So a miner serving several models is judged
  against each model's own pace, and protocol.scoring takes the ratio with a model median of 1;
- `health_checks`, `health_ok`: the gateway's health checks of it in the window (`HealthLog`,
  one-minute buckets kept two days, in memory: a restarted gateway counts from its restart);
- `audits_passed`, `audits_failed`: verdicts recorded for its requests (re-audits included);
- `models`: per model served, the miner's raw medians in seconds and the model's.

The counting is pure (`observe`); the stores are read by the caller, in a worker thread.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HealthLog", "MinerEpoch", "TraceRow", "VerdictRow", "observe", "verdict_rows"]

HEALTH_BUCKET_S = 60
HEALTH_RETENTION_S = 2 * 86_400


class HealthLog:
    """Health-check results per miner in `bucket_s` buckets, the last `retention_s` seconds.

    A window counts the buckets that start inside it, so its edges are exact to one bucket.
    Thread-compatible (one writer, the gateway's loop; readers take a snapshot)."""

    def __init__(
        self, *, bucket_s: int = HEALTH_BUCKET_S, retention_s: int = HEALTH_RETENTION_S
    ) -> None:
        if bucket_s <= 0 or retention_s < bucket_s:
            raise ValueError("health log: bucket_s must be positive and retention_s >= bucket_s")
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self._buckets: dict[str, OrderedDict[int, list[int]]] = {}

    def record(self, miner: str, ok: bool, now: float) -> None:
        start = int(now // self.bucket_s) * self.bucket_s
        buckets = self._buckets.setdefault(miner, OrderedDict())
        counts = buckets.get(start)
        if counts is None:
            counts = buckets[start] = [0, 0]
            oldest = start - self.retention_s
            while buckets and next(iter(buckets)) < oldest:
                buckets.popitem(last=False)
        counts[0] += 1
        counts[1] += int(ok)

    def counts(self, miner: str, since: float, until: float) -> tuple[int, int]:
        """(checks sent, checks answered healthy) for `miner` in [since, until)."""
        sent = ok = 0
        for start, (checks, healthy) in list(self._buckets.get(miner, {}).items()):
            if since <= start < until:
                sent += checks
                ok += healthy
        return sent, ok

    def miners(self) -> list[str]:
        return list(self._buckets)


@dataclass(frozen=True)
class TraceRow:
    """The columns of a trace that the counts read."""

    request_id: str
    miner: str
    model: str
    status: int
    stream: bool
    completion_tokens: int | None
    ttft_ms: float | None
    total_ms: float | None


@dataclass(frozen=True)
class VerdictRow:
    """A metered request's verdicts: which miner served it, and each verdict's outcome."""

    request_id: str
    miner: str
    passed: tuple[bool, ...]


@dataclass
class MinerEpoch:
    """One miner's counts over a window (module docstring)."""

    miner: str
    requests: int = 0
    errors: int = 0
    verified_tokens: int = 0
    ttft_ratio: float | None = None
    tpot_ratio: float | None = None
    health_checks: int = 0
    health_ok: int = 0
    audits_passed: int = 0
    audits_failed: int = 0
    models: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "miner": self.miner,
            "requests": self.requests,
            "errors": self.errors,
            "verified_tokens": self.verified_tokens,
            "ttft_ratio": self.ttft_ratio,
            "tpot_ratio": self.tpot_ratio,
            "health_checks": self.health_checks,
            "health_ok": self.health_ok,
            "audits": {"passed": self.audits_passed, "failed": self.audits_failed},
            "models": self.models,
        }


def _ttft_s(row: TraceRow) -> float | None:
    if row.stream and row.ttft_ms is not None:
        return row.ttft_ms / 1000
    return None if row.total_ms is None else row.total_ms / 1000


def _tpot_s(row: TraceRow) -> float | None:
    tokens = row.completion_tokens or 0
    if row.total_ms is None or tokens < 1:
        return None
    if row.stream and row.ttft_ms is not None:
        return (row.total_ms - row.ttft_ms) / 1000 / (tokens - 1) if tokens >= 2 else None
    return row.total_ms / 1000 / tokens


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def observe(
    traces: Sequence[TraceRow],
    verdicts: Sequence[VerdictRow],
    health: HealthLog,
    since: float,
    until: float,
    *,
    miners: Iterable[str] = (),
) -> list[MinerEpoch]:
    """Every miner's counts over [since, until) (module docstring): those the traces, the
    verdicts or the health log name, and `miners` (listed with zeros if nothing names them),
    ordered by address. `traces` and `verdicts` are the window's, as the caller selected."""
    failed = {v.request_id for v in verdicts if not all(v.passed)}
    by_miner: dict[str, MinerEpoch] = {}

    def entry(miner: str) -> MinerEpoch:
        found = by_miner.get(miner)
        if found is None:
            found = by_miner[miner] = MinerEpoch(miner)
        return found

    answered = [t for t in traces if t.status == 200]
    model_ttft = {
        model: _median(_ttft_s(t) for t in answered if t.model == model)
        for model in {t.model for t in answered}
    }
    model_tpot = {
        model: _median(_tpot_s(t) for t in answered if t.model == model)
        for model in {t.model for t in answered}
    }
    ttft_ratios: dict[str, list[float]] = {}
    tpot_ratios: dict[str, list[float]] = {}
    for trace in traces:
        miner = entry(trace.miner)
        miner.requests += 1
        if trace.status >= 500:
            miner.errors += 1
        if trace.status != 200:
            continue
        if trace.request_id not in failed:
            miner.verified_tokens += trace.completion_tokens or 0
        ttft, tpot = _ttft_s(trace), _tpot_s(trace)
        typical_ttft, typical_tpot = model_ttft.get(trace.model), model_tpot.get(trace.model)
        if ttft is not None and typical_ttft:
            ttft_ratios.setdefault(trace.miner, []).append(ttft / typical_ttft)
        if tpot is not None and typical_tpot:
            tpot_ratios.setdefault(trace.miner, []).append(tpot / typical_tpot)
    for verdict in verdicts:
        miner = entry(verdict.miner)
        miner.audits_passed += sum(verdict.passed)
        miner.audits_failed += len(verdict.passed) - sum(verdict.passed)
    for name in (*health.miners(), *miners):
        entry(name)
    for address, miner in by_miner.items():
        miner.health_checks, miner.health_ok = health.counts(address, since, until)
        miner.ttft_ratio = _median(ttft_ratios.get(address, []))
        miner.tpot_ratio = _median(tpot_ratios.get(address, []))
        mine = [t for t in answered if t.miner == address]
        for model in sorted({t.model for t in mine}):
            served = [t for t in mine if t.model == model]
            miner.models[model] = {
                "ttft_s": _median(_ttft_s(t) for t in served),
                "tpot_s": _median(_tpot_s(t) for t in served),
                "model_ttft_s": model_ttft.get(model),
                "model_tpot_s": model_tpot.get(model),
            }
    return [by_miner[m] for m in sorted(by_miner, key=lambda a: a.lower())]


def verdict_rows(
    records: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]],
) -> list[VerdictRow]:
    """VerdictRows from request id -> (miner, verdicts as SignedVerdict JSON)."""
    return [
        VerdictRow(rid, miner, tuple(bool(v.get("passed")) for v in found))
        for rid, (miner, found) in records.items()
        if found
    ]
