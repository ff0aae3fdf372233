"""The standby tier: per model, how many of its miners take traffic, following the load.

A network with more capacity than its load spreads requests thinly over every miner: each
runs nearly idle batches (a GPU's throughput grows with its batch), and every miner's
latency and reward are noisy. So the scheduler keeps, per model, an *active* tier just large
enough for the load, and *parks* the rest on standby: a parked miner gets no traffic from the
policy, only health checks and the verifiers' canaries (which go through their own route), so
its record stays fresh and it earns what those pay, not a share of the workload.

Per model, at each `update` (the gateway calls it every health round) with the model's
in-service miners, best first, and the slots it has in flight:

- the load is an EWMA (`alpha`) of the in-flight count over the active tier's slots;
- the active tier never has fewer than `min_active` miners (failover and hedging need a second
  one), or all of them when there are fewer;
- above `activate_above`, the best parked miner is activated (one per update: the load is
  measured again before the next);
- below `park_below` for `park_after_s` without a break, the worst active miner is parked (one
  per update, and the clock starts again), so a short lull parks nothing;
- a miner that left service leaves the tier; a new one starts parked unless the tier needs it.

`activate(model)`: a request found every active miner full. The best parked miner becomes
active at once, so the request is served instead of shed while capacity stands by.

Pure logic: time comes in as `now`, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["StandbyConfig", "StandbyTier"]


@dataclass(frozen=True, slots=True)
class StandbyConfig:
    """The tier's parameters (module docstring)."""

    min_active: int = 2
    activate_above: float = 0.7
    park_below: float = 0.3
    park_after_s: float = 60.0
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.min_active < 1:
            raise ValueError(f"min_active must be at least 1, not {self.min_active}")
        if not 0 <= self.park_below < self.activate_above <= 1:
            raise ValueError(
                "need 0 <= park_below < activate_above <= 1, not"
                f" {self.park_below} and {self.activate_above}"
            )
        if self.park_after_s < 0:
            raise ValueError(f"park_after_s must not be negative, not {self.park_after_s}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {self.alpha}")


@dataclass(slots=True)
class _ModelTier:
    active: list[str] = field(default_factory=list)  # in the order they were activated
    load: float | None = None  # EWMA of in-flight slots
    quiet_since: float | None = None  # since when the load has been below park_below


class StandbyTier:
    """Which miners of each model are parked (module docstring)."""

    def __init__(self, config: StandbyConfig | None = None) -> None:
        self.config = config or StandbyConfig()
        self._models: dict[str, _ModelTier] = {}
        self._ranked: dict[str, list[str]] = {}  # the last update's miners, best first
        self._capacity: dict[str, dict[str, int]] = {}

    def update(
        self, model: str, miners: Sequence[tuple[str, int]], inflight: int, now: float
    ) -> None:
        """The model's in-service miners as (id, slots), best first, and its slots in use."""
        cfg = self.config
        tier = self._models.setdefault(model, _ModelTier())
        ranked = [miner for miner, _ in miners]
        self._ranked[model] = ranked
        self._capacity[model] = dict(miners)
        present = set(ranked)
        tier.active = [m for m in tier.active if m in present]
        tier.load = (
            inflight if tier.load is None else tier.load + cfg.alpha * (inflight - tier.load)
        )
        while len(tier.active) < min(cfg.min_active, len(ranked)):
            self._activate_best(model, tier)
        slots = sum(self._capacity[model][m] for m in tier.active)
        utilization = tier.load / slots if slots else 1.0
        if utilization > cfg.activate_above:
            tier.quiet_since = None
            self._activate_best(model, tier)
        elif utilization < cfg.park_below and len(tier.active) > cfg.min_active:
            if tier.quiet_since is None:
                tier.quiet_since = now
            elif now - tier.quiet_since >= cfg.park_after_s:
                worst = max(tier.active, key=ranked.index)
                tier.active.remove(worst)
                tier.quiet_since = now
        else:
            tier.quiet_since = None

    def _activate_best(self, model: str, tier: _ModelTier) -> bool:
        for miner in self._ranked.get(model, ()):
            if miner not in tier.active:
                tier.active.append(miner)
                return True
        return False

    def activate(self, model: str) -> bool:
        """Every active miner of `model` is full: activate the best parked one now. False if
        none is parked."""
        tier = self._models.get(model)
        if tier is None:
            return False
        tier.quiet_since = None
        return self._activate_best(model, tier)

    def parked(self, model: str) -> set[str]:
        """The model's miners on standby (known at the last update, not active)."""
        tier = self._models.get(model)
        active = set(tier.active) if tier is not None else set()
        return {m for m in self._ranked.get(model, ()) if m not in active}

    def active(self, model: str) -> list[str]:
        tier = self._models.get(model)
        return list(tier.active) if tier is not None else []
