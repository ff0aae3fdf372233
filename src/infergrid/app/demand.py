"""Demand against supply, per model, as this gateway sees it: the input of demand-driven
emission (protocol.supply) and what operators read to choose what to serve (`GET /v1/network`).

Per model (its offer name; a request pinning the protocol model id counts under the name), in
`bucket_s` buckets kept `retention_s` seconds, in memory (a restarted gateway counts from its
restart, as the HealthLog does):

- `requests`: every completion request for it that reached routing; `shed`: of those, the ones
  refused with 429 `network_saturated` (every miner at capacity: demand nobody could serve);
- `tokens_requested`: prompt estimate + completion limit of every request, shed ones included;
- `tokens_served`: prompt + completion tokens of the answered ones;
- `busy_slot_s`: the time miner slots were held by its attempts (pick to release);
- `capacity_slot_s`: the integral over time of the slots its in-service miners offer (sampled
  at each health round: `capacity()`), so `busy_slot_s / capacity_slot_s` is its utilization.

Pure bookkeeping; the gateway's loop is the one writer, readers take a snapshot.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

from infergrid.protocol.supply import utilization

__all__ = ["DemandLog", "ModelCounts"]

DEMAND_BUCKET_S = 60
DEMAND_RETENTION_S = 2 * 86_400
# A capacity sample older than this says nothing of the time since (a gateway that was
# suspended, or a model nobody served for a while): the gap is not counted as capacity.
MAX_CAPACITY_GAP_S = 60.0


@dataclass
class ModelCounts:
    """One model's counts over a bucket or a window (module docstring)."""

    requests: int = 0
    shed: int = 0
    tokens_requested: int = 0
    tokens_served: int = 0
    busy_slot_s: float = 0.0
    capacity_slot_s: float = 0.0

    @property
    def utilization(self) -> float:
        return utilization(self.busy_slot_s, self.capacity_slot_s)

    def add(self, other: ModelCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        body["busy_slot_s"] = round(self.busy_slot_s, 3)
        body["capacity_slot_s"] = round(self.capacity_slot_s, 3)
        body["utilization"] = round(self.utilization, 6)
        return body


class DemandLog:
    """Per-model counts in time buckets (module docstring)."""

    def __init__(
        self, *, bucket_s: int = DEMAND_BUCKET_S, retention_s: int = DEMAND_RETENTION_S
    ) -> None:
        if bucket_s <= 0 or retention_s < bucket_s:
            raise ValueError("demand log: bucket_s must be positive and retention_s >= bucket_s")
        self.bucket_s = bucket_s
        self.retention_s = retention_s
        self._buckets: dict[str, OrderedDict[int, ModelCounts]] = {}
        self._capacity: dict[str, tuple[float, int]] = {}  # model -> (sampled at, slots)

    def _bucket(self, model: str, now: float) -> ModelCounts:
        start = int(now // self.bucket_s) * self.bucket_s
        buckets = self._buckets.setdefault(model, OrderedDict())
        counts = buckets.get(start)
        if counts is None:
            counts = buckets[start] = ModelCounts()
            oldest = start - self.retention_s
            while buckets and next(iter(buckets)) < oldest:
                buckets.popitem(last=False)
        return counts

    def requested(self, model: str, tokens: int, now: float) -> None:
        counts = self._bucket(model, now)
        counts.requests += 1
        counts.tokens_requested += max(0, tokens)

    def shed(self, model: str, now: float) -> None:
        self._bucket(model, now).shed += 1

    def served(self, model: str, tokens: int, now: float) -> None:
        self._bucket(model, now).tokens_served += max(0, tokens)

    def busy(self, model: str, seconds: float, now: float) -> None:
        self._bucket(model, now).busy_slot_s += max(0.0, seconds)

    def capacity(self, model: str, slots: int, now: float) -> None:
        """The model's in-service slots as of `now`: the slots sampled last held until now."""
        last = self._capacity.get(model)
        if last is not None:
            at, held = last
            gap = now - at
            if 0 < gap <= MAX_CAPACITY_GAP_S and held > 0:
                self._bucket(model, now).capacity_slot_s += held * gap
        self._capacity[model] = (now, max(0, slots))

    def window(self, model: str, since: float, until: float) -> ModelCounts:
        """The model's counts over the buckets that start in [since, until)."""
        total = ModelCounts()
        for start, counts in list(self._buckets.get(model, {}).items()):
            if since <= start < until:
                total.add(counts)
        return total

    def models(self) -> list[str]:
        return sorted(self._buckets)
