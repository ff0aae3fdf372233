"""Where the gateway sends a request: the scheduling policy as pure logic.

No I/O, no asyncio, no wall clock: every call that depends on time takes `now` (seconds, any
monotonic origin: a simulation's clock or `time.monotonic()`), and randomness comes from the
`random.Random` the caller passes in, so a seeded run is reproducible.

Live state per miner (`MinerStats`): EWMAs of time to first token (TTFT) and of time per
output token (TPOT), requests in flight against the capacity the miner declared, an error-rate
EWMA and a consecutive-failure count, a circuit breaker, the audit record and probation flag,
prices per routed model name, and stake.

The policy, for one request (`Scheduler.pick`):

1. **Filter.** A miner is *eligible* for a model when it serves it, its last health check
   passed, it is not on probation, and its breaker is not open. It is *ready* when, moreover,
   it has a free slot (in flight < capacity) and is not a half-open miner whose probe is
   running. Per request, the miners already tried (`exclude`) and those above the developer's
   maximum price are filtered too.
2. **Affinity.** A request carrying a prompt-prefix key goes to the miner that last served that
   prefix successfully (its KV cache may still hold it) while that miner is ready, loaded
   below `affinity_max_load` of its capacity and not slow (step 3: a cached prefix saves part
   of a first token, a slow miner costs the whole answer); otherwise the policy goes on, and
   whichever miner serves the prefix next becomes its home. The map is an LRU bounded by
   `affinity_entries`, entries expire after `affinity_ttl_s`.
3. **Score, power of two choices.** Two (`choices`) distinct ready candidates are drawn at
   random and the one with the lower `score` wins (lower is better): the expected service time
   ``ttft + tpot × (tokens − 1)`` (EWMAs, or the model's averages for a miner not measured yet),
   multiplied by ``1 + load_weight × inflight / capacity``, ``1 + error_weight × error rate``,
   ``1 + audit_weight × audit failure rate`` and ``1 − stake_weight × stake / (stake +
   stake_ref_wei)``. A measured miner whose unloaded service time is more than `slow_factor`
   times the model's typical one (the EWMAs over all its miners), plus `slow_margin_s` (a few
   milliseconds of a fast model's service are noise), is *slow*: a candidate only
   when the draws find fewer than two others, so the tail of slow miners, which the better of
   two random ones would still pick when drawn together, serves only what the rest cannot.
   Sampling keeps a pick O(1) in the number of miners; when random draws do not find two
   candidates (few ready miners, or a tight price filter) the ready set is scanned.
   With ``sort="price"`` the cheapest ready miners (by the request's estimated cost) are taken
   first and the better of two among them wins: an O(n) scan the developer asked for.
4. **Shed.** No ready candidate, but eligible ones exist (all at capacity): `Shed` (for a new
   request; one failing over goes over capacity to the eligible miner with the most room), whose
   `retry_after_s` is the time the model's eligible miners need to drain the recently shed
   backlog, ``shed backlog / Σ capacity_i / service_i``, clamped to [`retry_after_min_s`,
   `retry_after_max_s`]; the gateway answers 429 with ``retry-after``. The backlog counts this
   request and decays with time constant max(`shed_tau_s`, the last retry-after): the clients
   shed within one retry interval are those still waiting to come back.
   Nothing eligible at all: `NoMiner` (503; or 404 for a model nobody serves, or 400-style
   "none within the price" when only the developer's price filter leaves nobody).

A pick reserves a slot: every `Picked` must be handed back once through `release` with its
outcome (`Served`, `Failed`, `Cancelled`).

**Circuit breaker**, per miner::

    CLOSED --(breaker_failures failures in a row)--> OPEN(until now + cooldown)
    OPEN --(cooldown elapsed, seen at the next pick)--> HALF_OPEN (ready for one probe)
    HALF_OPEN --(probe picked)--> HALF_OPEN, probe in flight (not ready)
    probe Served --> CLOSED, cooldown back to breaker_cooldown_s
    probe Failed --> OPEN, cooldown doubled (at most breaker_cooldown_max_s)
    probe Cancelled --> HALF_OPEN, ready for another probe

A passing health check does not close a breaker: a miner that answers /health but fails
requests is what the breaker is for.

**Failover** before the first token: the caller picks again with the miners already tried in
`exclude`. **Hedging**: `hedge_due_at(picked)` is when a first token becomes late,
``max(hedge_min_s, hedge_factor × the miner's TTFT EWMA)`` after the start; at that time
`should_hedge` says whether to start a second attempt elsewhere (a pick excluding the first),
within a budget of `hedge_budget` hedges per pick (plus `hedge_burst`), so hedging cannot
double the load of a network that is slow everywhere.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from infergrid.compute.routing import (
    BreakerState,
    Cancelled,
    Decision,
    Failed,
    NoMiner,
    Outcome,
    Picked,
    Price,
    RoutePreferences,
    RouteRequest,
    SchedulerConfig,
    Served,
    Shed,
    Sort,
    prefix_key,
)

__all__ = [
    "BreakerState",
    "Cancelled",
    "Failed",
    "MinerStats",
    "NoMiner",
    "Picked",
    "Price",
    "RoutePreferences",
    "RouteRequest",
    "Scheduler",
    "SchedulerConfig",
    "Served",
    "Shed",
    "Sort",
    "prefix_key",
]

T = TypeVar("T")


# -- state -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Ewma:
    value: float | None = None

    def observe(self, sample: float, alpha: float) -> None:
        self.value = sample if self.value is None else self.value + alpha * (sample - self.value)


@dataclass(eq=False, slots=True)
class MinerStats:
    """Everything the policy knows of one miner; read it, change it through `Scheduler`."""

    miner_id: str
    prices: dict[str, Price]  # by routed model name (a name or a protocol model id)
    capacity: int
    stake_wei: int = 0
    healthy: bool = True
    probation: bool = False
    audits_passed: int = 0
    audits_failed: int = 0
    inflight: int = 0
    ttft: _Ewma = field(default_factory=_Ewma)
    tpot: _Ewma = field(default_factory=_Ewma)
    error_rate: float = 0.0
    consecutive_failures: int = 0
    served: int = 0
    failed: int = 0
    breaker: BreakerState = BreakerState.CLOSED
    open_until: float = 0.0
    cooldown_s: float = 0.0
    probe_in_flight: bool = False
    # Membership as last recorded in the per-model sets (see Scheduler._refresh).
    _eligible: bool = False
    _ready: bool = False

    @property
    def eligible(self) -> bool:
        return self.healthy and not self.probation and self.breaker is not BreakerState.OPEN

    @property
    def ready(self) -> bool:
        return self.eligible and not self.probe_in_flight and self.inflight < self.capacity

    @property
    def audit_failure_rate(self) -> float:
        total = self.audits_passed + self.audits_failed
        return self.audits_failed / total if total else 0.0


class _IndexedSet(Generic[T]):
    """A set with O(1) add, remove and uniform random sampling."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._pos: dict[T, int] = {}

    def add(self, item: T) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        i = self._pos.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._pos[last] = i

    def sample(self, rng: random.Random) -> T:
        return self._items[rng.randrange(len(self._items))]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._pos


@dataclass(slots=True)
class _ModelState:
    miners: set[str] = field(default_factory=set)
    eligible: _IndexedSet[str] = field(default_factory=_IndexedSet)
    ready: _IndexedSet[str] = field(default_factory=_IndexedSet)
    ttft: _Ewma = field(default_factory=_Ewma)  # over all its miners: the prior of new ones
    tpot: _Ewma = field(default_factory=_Ewma)
    output_tokens: _Ewma = field(default_factory=_Ewma)
    shed_backlog: float = 0.0
    shed_at: float = 0.0
    retry_after_s: float = 0.0  # the last one handed out
    drain: tuple[float, float] | None = None  # (computed at, requests per second)


class Scheduler:
    """The policy of the module docstring over a set of miners; synchronous, no I/O."""

    def __init__(self, config: SchedulerConfig | None = None, *, rng: random.Random) -> None:
        self.config = config or SchedulerConfig()
        self.rng = rng
        self._miners: dict[str, MinerStats] = {}
        self._models: dict[str, _ModelState] = {}
        self._affinity: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._timers: list[tuple[float, int, str]] = []  # (open_until, seq, miner): breakers
        self._seq = 0
        self.picks = 0
        self.hedges = 0

    # -- membership and inputs ---------------------------------------------------------------

    def add_miner(
        self,
        miner_id: str,
        prices: Mapping[str, Price],
        *,
        capacity: int,
        stake_wei: int = 0,
        healthy: bool = True,
    ) -> MinerStats:
        """Add a miner, or update the offer of one already known (its live state stays).

        `prices` maps every name the miner may be routed by to its price."""
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, not {capacity}")
        if stake_wei < 0:
            raise ValueError(f"stake_wei must not be negative, not {stake_wei}")
        if not prices:
            raise ValueError(f"miner {miner_id} serves no model")
        stats = self._miners.get(miner_id)
        if stats is None:
            stats = MinerStats(miner_id, dict(prices), capacity, stake_wei, healthy)
            self._miners[miner_id] = stats
        else:
            self._leave_models(stats, set(stats.prices) - set(prices))
            stats.prices, stats.capacity, stats.stake_wei = dict(prices), capacity, stake_wei
            stats.healthy = healthy
        for model in stats.prices:
            self._models.setdefault(model, _ModelState()).miners.add(miner_id)
        self._refresh(stats, force=True)
        return stats

    def remove_miner(self, miner_id: str) -> None:
        """Forget a miner (deregistered). Picks still out for it may be released harmlessly."""
        stats = self._miners.pop(miner_id, None)
        if stats is not None:
            self._leave_models(stats, set(stats.prices))

    def _leave_models(self, stats: MinerStats, models: Iterable[str]) -> None:
        for model in models:
            state = self._models.get(model)
            if state is None:
                continue
            state.miners.discard(stats.miner_id)
            state.eligible.discard(stats.miner_id)
            state.ready.discard(stats.miner_id)
            if not state.miners:
                del self._models[model]

    def get(self, miner_id: str) -> MinerStats | None:
        return self._miners.get(miner_id)

    def set_health(self, miner_id: str, ok: bool) -> None:
        """A health check's result; an unhealthy miner is filtered out until one passes."""
        stats = self._miners[miner_id]
        stats.healthy = ok
        self._refresh(stats)

    def set_audit_record(self, miner_id: str, *, passed: int, failed: int, probation: bool) -> None:
        """The verifiers' record of the miner: audits passed and failed, and whether it is on
        probation (then it gets no traffic from this policy)."""
        if passed < 0 or failed < 0:
            raise ValueError("audit counts must not be negative")
        stats = self._miners[miner_id]
        stats.audits_passed, stats.audits_failed, stats.probation = passed, failed, probation
        self._refresh(stats)

    # -- the policy --------------------------------------------------------------------------

    def pick(
        self,
        request: RouteRequest,
        now: float,
        exclude: Iterable[str] = (),
        *,
        admitted: bool = False,
    ) -> Decision:
        """Decide where `request` goes (module docstring, steps 1–4), excluding `exclude`
        (the miners already tried: failover). A `Picked` holds a slot until `release`.

        An `admitted` request (one failing over: the network already took it) is never shed
        while an eligible miner is only busy: it goes over capacity to the one with the most
        room, reason "overflow". Shedding is for new requests, at the door."""
        self._advance(now)
        state = self._models.get(request.model)
        if state is None:
            return NoMiner(request.model, "model_not_served")
        excluded = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        prefs = request.prefs
        priced = prefs.max_prompt_wei is not None or prefs.max_completion_wei is not None
        model = request.model

        def usable(miner_id: str) -> bool:
            if miner_id in excluded:
                return False
            return not priced or prefs.admits(self._miners[miner_id].prices[model])

        if request.prefix is not None:
            home = self._affinity_home(request.prefix, now)
            if home is not None and home in state.ready and usable(home):
                stats = self._miners[home]
                typical = self._typical_service_s(state, request)
                if stats.inflight < self.config.affinity_max_load * stats.capacity and not (
                    self._is_slow(stats, request, typical)
                ):
                    return self._reserve(stats, request, now, "affinity")

        if prefs.sort is Sort.PRICE:
            candidates = [m for m in state.ready if usable(m)]
            if candidates:
                cost = {m: self._cost(self._miners[m], request) for m in candidates}
                cheapest = min(cost.values())
                candidates = [m for m in candidates if cost[m] == cheapest]
                return self._p2c(candidates, request, now, "price")
        else:
            found: list[str] = []
            slow: list[str] = []
            ready = state.ready
            choices = self.config.choices
            if len(ready):
                typical = self._typical_service_s(state, request)
                for _ in range(self.config.sample_tries):
                    miner_id = ready.sample(self.rng)
                    if miner_id in found or miner_id in slow or not usable(miner_id):
                        continue
                    if self._is_slow(self._miners[miner_id], request, typical):
                        slow.append(miner_id)
                        continue
                    found.append(miner_id)
                    if len(found) == choices:
                        break
                if len(found) + len(slow) < 2:
                    # Few usable miners: the draws may have missed them; look at all.
                    everyone = [m for m in ready if usable(m)]
                    found = [
                        m for m in everyone if not self._is_slow(self._miners[m], request, typical)
                    ]
                    slow = [m for m in everyone if m not in found]
                if len(found) < 2:
                    found += slow[: 2 - len(found)]
            if found:
                return self._p2c(found, request, now, "p2c")

        # Nothing ready and usable: shed if something eligible and usable is only busy.
        if any(usable(m) for m in state.eligible):
            if admitted:
                busy = [
                    self._miners[m]
                    for m in state.eligible
                    if usable(m) and not self._miners[m].probe_in_flight
                ]
                if busy:
                    roomiest = min(busy, key=lambda stats: stats.inflight / stats.capacity)
                    return self._reserve(roomiest, request, now, "overflow")
            return Shed(model, self._retry_after(state, request, now))
        if priced and any(m not in excluded for m in state.eligible):
            return NoMiner(model, "none_within_price")
        return NoMiner(model, "none_eligible")

    def _p2c(self, candidates: list[str], request: RouteRequest, now: float, how: str) -> Picked:
        if len(candidates) == 1:
            return self._reserve(self._miners[candidates[0]], request, now, "only")
        if len(candidates) > self.config.choices:
            candidates = self.rng.sample(candidates, self.config.choices)
        best = min((self._miners[m] for m in candidates), key=lambda s: self.score(s, request))
        return self._reserve(best, request, now, how)

    def score(self, stats: MinerStats, request: RouteRequest) -> float:
        """The miner's cost for the request (lower is better), as the module docstring says."""
        cfg = self.config
        state = self._models[request.model]
        ttft = stats.ttft.value
        if ttft is None:
            ttft = state.ttft.value if state.ttft.value is not None else cfg.default_ttft_s
        tpot = stats.tpot.value
        if tpot is None:
            tpot = state.tpot.value if state.tpot.value is not None else cfg.default_tpot_s
        service = ttft + tpot * self._tokens(state, request)
        return (
            service
            * (1 + cfg.load_weight * stats.inflight / stats.capacity)
            * (1 + cfg.error_weight * stats.error_rate)
            * (1 + cfg.audit_weight * stats.audit_failure_rate)
            * (1 - cfg.stake_weight * stats.stake_wei / (stats.stake_wei + cfg.stake_ref_wei))
        )

    def _typical_service_s(self, state: _ModelState, request: RouteRequest) -> float | None:
        """The model's service time over all its miners (None until measured)."""
        if state.ttft.value is None or state.tpot.value is None:
            return None
        return state.ttft.value + state.tpot.value * self._tokens(state, request)

    def _is_slow(self, stats: MinerStats, request: RouteRequest, typical: float | None) -> bool:
        """Whether a measured miner's unloaded service time exceeds `slow_factor` times the
        model's typical one: such a miner is a candidate only when too few others are."""
        if typical is None or stats.ttft.value is None or stats.tpot.value is None:
            return False
        state = self._models[request.model]
        own = stats.ttft.value + stats.tpot.value * self._tokens(state, request)
        return own > self.config.slow_factor * typical + self.config.slow_margin_s

    def _tokens(self, state: _ModelState, request: RouteRequest) -> float:
        """Output tokens after the first that the request is expected to produce."""
        typical = state.output_tokens.value
        if typical is None:
            typical = float(self.config.default_output_tokens)
        tokens = typical if request.max_tokens is None else min(typical, request.max_tokens)
        return max(0.0, tokens - 1)

    def _cost(self, stats: MinerStats, request: RouteRequest) -> int:
        price = stats.prices[request.model]
        tokens = request.max_tokens or self.config.default_output_tokens
        return price.prompt_wei * request.prompt_tokens + price.completion_wei * tokens

    def _reserve(self, stats: MinerStats, request: RouteRequest, now: float, how: str) -> Picked:
        stats.inflight += 1
        probe = stats.breaker is BreakerState.HALF_OPEN
        if probe:
            stats.probe_in_flight = True
        self._refresh(stats)
        self.picks += 1
        return Picked(stats.miner_id, request, now, how, probe=probe)

    # -- outcomes ----------------------------------------------------------------------------

    def release(self, picked: Picked, now: float, outcome: Outcome) -> None:
        """The attempt `picked` ended with `outcome`: frees its slot and learns from it.

        Raises ValueError if the pick was already released."""
        if picked.released:
            raise ValueError(f"the pick of {picked.miner_id} was already released")
        picked.released = True
        stats = self._miners.get(picked.miner_id)
        if stats is None:
            return  # removed meanwhile
        cfg = self.config
        stats.inflight -= 1
        if picked.probe:
            stats.probe_in_flight = False
        if isinstance(outcome, Served):
            state = self._models.get(picked.request.model)
            stats.served += 1
            stats.consecutive_failures = 0
            stats.error_rate += cfg.error_alpha * (0.0 - stats.error_rate)
            stats.ttft.observe(outcome.ttft_s, cfg.ewma_alpha)
            if state is not None:
                state.ttft.observe(outcome.ttft_s, cfg.model_alpha)
            if outcome.output_tokens > 1:
                tpot = outcome.decode_s / (outcome.output_tokens - 1)
                stats.tpot.observe(tpot, cfg.ewma_alpha)
                if state is not None:
                    state.tpot.observe(tpot, cfg.model_alpha)
            if state is not None and outcome.output_tokens > 0:
                state.output_tokens.observe(outcome.output_tokens, cfg.model_alpha)
            if stats.breaker is BreakerState.HALF_OPEN and picked.probe:
                stats.breaker = BreakerState.CLOSED
                stats.cooldown_s = 0.0
            if picked.request.prefix is not None:
                self._affinity_set(picked.request.prefix, stats.miner_id, now)
        elif isinstance(outcome, Failed):
            stats.failed += 1
            stats.consecutive_failures += 1
            stats.error_rate += cfg.error_alpha * (1.0 - stats.error_rate)
            if stats.breaker is BreakerState.HALF_OPEN and picked.probe:
                self._open(stats, now, min(stats.cooldown_s * 2, cfg.breaker_cooldown_max_s))
            elif (
                stats.breaker is BreakerState.CLOSED
                and stats.consecutive_failures >= cfg.breaker_failures
            ):
                self._open(stats, now, cfg.breaker_cooldown_s)
        self._refresh(stats)

    def _open(self, stats: MinerStats, now: float, cooldown_s: float) -> None:
        stats.breaker = BreakerState.OPEN
        stats.cooldown_s = cooldown_s
        stats.open_until = now + cooldown_s
        self._seq += 1
        heapq.heappush(self._timers, (stats.open_until, self._seq, stats.miner_id))

    def _advance(self, now: float) -> None:
        """Open breakers whose cooldown has elapsed become half-open."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, _, miner_id = heapq.heappop(timers)
            stats = self._miners.get(miner_id)
            if stats is not None and stats.breaker is BreakerState.OPEN and stats.open_until == due:
                stats.breaker = BreakerState.HALF_OPEN
                self._refresh(stats)

    def breaker_state(self, miner_id: str, now: float) -> BreakerState:
        """The miner's breaker as of `now` (an elapsed cooldown shows as half-open)."""
        self._advance(now)
        return self._miners[miner_id].breaker

    def _refresh(self, stats: MinerStats, *, force: bool = False) -> None:
        """Bring the per-model eligible and ready sets in line with the miner's state."""
        eligible, ready = stats.eligible, stats.ready
        if not force and eligible == stats._eligible and ready == stats._ready:
            return
        stats._eligible, stats._ready = eligible, ready
        for model in stats.prices:
            state = self._models[model]
            if eligible:
                state.eligible.add(stats.miner_id)
            else:
                state.eligible.discard(stats.miner_id)
            if ready:
                state.ready.add(stats.miner_id)
            else:
                state.ready.discard(stats.miner_id)

    # -- affinity ----------------------------------------------------------------------------

    def _affinity_home(self, prefix: int, now: float) -> str | None:
        entry = self._affinity.get(prefix)
        if entry is None:
            return None
        miner_id, at = entry
        if now - at > self.config.affinity_ttl_s:
            del self._affinity[prefix]
            return None
        return miner_id

    def _affinity_set(self, prefix: int, miner_id: str, now: float) -> None:
        self._affinity[prefix] = (miner_id, now)
        self._affinity.move_to_end(prefix)
        while len(self._affinity) > self.config.affinity_entries:
            self._affinity.popitem(last=False)

    def affinity_home(self, prefix: int, now: float) -> str | None:
        """The miner that last served `prefix` successfully, if the entry is still live."""
        return self._affinity_home(prefix, now)

    # -- hedging -----------------------------------------------------------------------------

    def hedge_due_at(self, picked: Picked) -> float | None:
        """When the attempt's first token becomes late: ``started_at + max(hedge_min_s,
        hedge_factor × TTFT EWMA)`` of its miner (the model's average for an unmeasured
        miner); None when nothing has been measured for the model yet."""
        stats = self._miners.get(picked.miner_id)
        ttft = stats.ttft.value if stats is not None else None
        if ttft is None:
            state = self._models.get(picked.request.model)
            ttft = state.ttft.value if state is not None else None
        if ttft is None:
            return None
        return picked.started_at + max(self.config.hedge_min_s, self.config.hedge_factor * ttft)

    def should_hedge(self, picked: Picked, now: float, *, first_token_seen: bool) -> bool:
        """Whether to start a second attempt for `picked` now: its first token is late and
        the hedge budget allows. A True answer spends budget: pick the hedge at once."""
        if first_token_seen or picked.released:
            return False
        due = self.hedge_due_at(picked)
        if due is None or now < due:
            return False
        if self.hedges >= self.config.hedge_budget * self.picks + self.config.hedge_burst:
            return False
        self.hedges += 1
        return True

    # -- shedding ----------------------------------------------------------------------------

    def _retry_after(self, state: _ModelState, request: RouteRequest, now: float) -> float:
        cfg = self.config
        # The clients shed within the last retry interval are the ones still waiting to come
        # back: the backlog forgets at the pace of the retry-after it hands out.
        tau = max(cfg.shed_tau_s, state.retry_after_s)
        state.shed_backlog = state.shed_backlog * math.exp(-(now - state.shed_at) / tau)
        state.shed_at = now
        state.shed_backlog += 1
        drain = state.drain
        if drain is None or now - drain[0] > cfg.shed_drain_cache_s:
            rate = 0.0
            for miner_id in state.eligible:
                stats = self._miners[miner_id]
                rate += stats.capacity / self._service_s(stats, state, request)
            state.drain = drain = (now, rate)
        seconds = state.shed_backlog / drain[1] if drain[1] > 0 else cfg.retry_after_max_s
        state.retry_after_s = min(max(seconds, cfg.retry_after_min_s), cfg.retry_after_max_s)
        return state.retry_after_s

    def _service_s(self, stats: MinerStats, state: _ModelState, request: RouteRequest) -> float:
        cfg = self.config
        ttft = stats.ttft.value or state.ttft.value or cfg.default_ttft_s
        tpot = stats.tpot.value or state.tpot.value or cfg.default_tpot_s
        return ttft + tpot * self._tokens(state, request)
