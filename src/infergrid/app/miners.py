"""Which miners exist, which are healthy, and which one gets the next request.

`MinerPool` is pure bookkeeping that tests drive directly: the registry's records go in through
`update()`, health results (with the concurrency each miner declares) through `set_health()`,
the verifiers' audit record through `set_audit_record()`, and `pick()` chooses. The choice is
compute.scheduler's policy (filter, prefix affinity, score with power of two choices, circuit
breakers, load shedding): the pool feeds it every miner's prices, stake, capacity, health and
audit record, and a pick holds one of the miner's slots (a `Slot`) until `release()` reports
how the attempt went (`Served`, `Failed`, `Cancelled`).

A miner's capacity is `QUEUE_FACTOR` × the `max_concurrency` its /health declares (what it
runs at once; as many again wait in its queue), `DEFAULT_MAX_CONCURRENCY` for a miner that
declares none. When every miner that may serve a model is at capacity, `pick` raises
`NetworkSaturated` with the scheduler's retry-after: the gateway answers 429.

Per model, a standby tier (compute.standby) keeps only as many miners active as the load
needs (two at least); the rest are parked, excluded from picks, until the load rises or a
request finds every active miner full (then one is activated at once rather than shedding).
Parked miners still get health checks and canaries. The tier moves each health round.

Canary requests (a verifier's key) keep their own rule: `route_filter` sends them to miners
on probation first, least loaded; they hold no scheduler slot.

`PoolMaintainer` is the I/O shell: it calls the discovery function in a thread every few
seconds and health-checks every endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from infergrid.app.deadlines import ModelLatency
from infergrid.app.demand import DemandLog
from infergrid.app.miner_epochs import HealthLog
from infergrid.compute.routing import (
    BreakerState,
    Cancelled,
    Failed,
    NoMiner,
    Outcome,
    Picked,
    Price,
    RouteRequest,
    Served,
    Shed,
)
from infergrid.compute.scheduler import Scheduler, SchedulerConfig
from infergrid.compute.standby import StandbyConfig, StandbyTier
from infergrid.protocol.nodes import NodeRecord, Role

log = logging.getLogger(__name__)

# A miner's slots at this gateway: what it declares it runs at once, and as many again queued
# behind them (each waits for at most one answer's time).
QUEUE_FACTOR = 2
DEFAULT_MAX_CONCURRENCY = 16  # for a miner whose /health declares none
MAX_DECLARED_CONCURRENCY = 4096  # more is a miner's bug or a lie, not a capacity


class ModelNotServed(LookupError):
    """No registered, active miner serves the model (the client's problem: 404)."""


class NoHealthyMiner(LookupError):
    """Miners serve the model but none can take a request now (our problem: 503)."""


class NoMinerWithinPrice(LookupError):
    """Only the developer's maximum price (infergrid.route.max_price) leaves no miner (400)."""


class NetworkSaturated(LookupError):
    """Every miner that may serve the model is at capacity: 429, retry after `retry_after`
    (the header's whole seconds)."""

    def __init__(self, model: str, retry_after: str) -> None:
        super().__init__(model)
        self.model = model
        self.retry_after = retry_after


@dataclass(eq=False)
class MinerState:
    record: NodeRecord
    base_url: str
    # None until the first health check answers: an unchecked miner gets no traffic.
    healthy: bool | None = None
    inflight: int = 0  # this gateway's attempts on it, canaries included
    max_concurrency: int | None = None  # as its /health declares
    health_rtt_ms: float | None = None
    last_error: str | None = None
    served: int = 0
    failed: int = 0
    # Called whenever the pool takes the miner out of service, so that requests still waiting
    # for its first token can move to another miner instead of waiting for a frozen one.
    down_watchers: set[Callable[[], None]] = field(default_factory=set, repr=False)

    @property
    def owner(self) -> str:
        return self.record.owner

    @property
    def endpoint(self) -> str:
        return self.record.endpoint

    @property
    def capacity(self) -> int:
        """Its slots at this gateway (module docstring)."""
        return QUEUE_FACTOR * (self.max_concurrency or DEFAULT_MAX_CONCURRENCY)


@dataclass(eq=False, slots=True)
class Slot:
    """One attempt's place on a miner, from `MinerPool.pick` until `MinerPool.release`."""

    miner: MinerState
    ticket: Picked | None  # the scheduler's reservation; None for a canary request
    model: str  # the offer name it serves (app.demand counts its slot time there)
    picked_at: float  # the pool's clock
    released: bool = False


def declared_concurrency(payload: object) -> int | None:
    """The `max_concurrency` a /health payload declares, when it is a sane positive integer."""
    value = payload.get("max_concurrency") if isinstance(payload, dict) else None
    sane = isinstance(value, int) and not isinstance(value, bool)
    return value if sane and 1 <= value <= MAX_DECLARED_CONCURRENCY else None


def _prices(record: NodeRecord) -> dict[str, Price]:
    """The miner's price under every name a request may route to it by."""
    prices: dict[str, Price] = {}
    for offer in record.models:
        price = Price(offer.price_in_wei, offer.price_out_wei)
        prices[offer.name] = price
        if offer.model_id:
            prices.setdefault(offer.model_id, price)
    return prices


@dataclass
class MinerPool:
    """Routing state for one gateway; every method is synchronous and does no I/O."""

    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    standby_config: StandbyConfig = field(default_factory=StandbyConfig)
    _miners: dict[str, MinerState] = field(default_factory=dict)  # by owner address
    _by_model: dict[str, list[MinerState]] = field(default_factory=dict)
    _first_seen: dict[str, int] = field(default_factory=dict)  # model -> unix time
    _names: list[str] = field(default_factory=list)
    _latency: dict[str, ModelLatency] = field(default_factory=dict)  # by the model as routed
    # Which of a model's miners a request may go to, given whether it is a canary request
    # (app.audits.AuditService.route: qualification); None: all of them.
    route_filter: Callable[[list[MinerState], bool], list[MinerState]] | None = None
    # Every health check's result, for the verifiers' epoch counts (app.miner_epochs).
    health_log: HealthLog = field(default_factory=HealthLog)
    # The verifiers' record of each miner, (passed, failed), kept for miners not yet known.
    _audits: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Per model: demand against the slots offered (app.demand; GET /v1/network).
    demand: DemandLog = field(default_factory=DemandLog)
    _offer_names: dict[str, str] = field(default_factory=dict)  # name or model id -> name

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.scheduler_config, rng=self.rng)
        self.standby = StandbyTier(self.standby_config)

    # -- registry ----------------------------------------------------------------------------

    def update(self, records: Iterable[NodeRecord]) -> list[MinerState]:
        """Replace the miner set with the registry's; returns miners that need a health check.

        A miner already known keeps its health and load unless its endpoint moved.
        """
        fresh: dict[str, MinerState] = {}
        to_check: list[MinerState] = []
        for record in records:
            if record.role != Role.MINER or not record.active or not record.models:
                continue
            if record.frozen:
                continue  # under an open dispute: may be acquitted, but gets no traffic now
            if not record.endpoint:
                continue
            old = self._miners.get(record.owner)
            if old is not None and old.endpoint == record.endpoint:
                old.record = record
                fresh[record.owner] = old
            else:
                # Requests still running on a moved miner release the old state, which is
                # dropped here; the new one starts empty and unchecked.
                state = MinerState(record=record, base_url=record.endpoint.rstrip("/"))
                fresh[record.owner] = state
                to_check.append(state)
        for gone in self._miners.keys() - fresh.keys():
            self.scheduler.remove_miner(gone)  # its slots still out are released harmlessly
        self._miners = fresh
        for state in fresh.values():
            self._schedule(state)
        # A client may name a model or pin its exact weights by protocol id; both route.
        by_model: dict[str, list[MinerState]] = {}
        names: set[str] = set()
        offer_names: dict[str, str] = {}
        for state in fresh.values():
            for offer in state.record.models:
                names.add(offer.name)
                offer_names[offer.name] = offer.name
                by_model.setdefault(offer.name, []).append(state)
                if offer.model_id and offer.model_id != offer.name:
                    by_model.setdefault(offer.model_id, []).append(state)
                    offer_names.setdefault(offer.model_id, offer.name)
        self._offer_names = offer_names
        now = int(time.time())
        for name in names:
            self._first_seen.setdefault(name, now)
        self._by_model = by_model
        self._names = sorted(names)
        return to_check

    def _schedule(self, state: MinerState) -> None:
        """Tell the scheduler the miner's offer, stake, capacity, health and audit record."""
        owner = state.owner
        self.scheduler.add_miner(
            owner,
            _prices(state.record),
            capacity=state.capacity,
            stake_wei=max(0, state.record.stake_wei),
            healthy=state.healthy is True,
        )
        passed, failed = self._audits.get(owner, (0, 0))
        self.scheduler.set_audit_record(owner, passed=passed, failed=failed, probation=False)

    def miners(self) -> list[MinerState]:
        return list(self._miners.values())

    def get(self, owner: str) -> MinerState | None:
        return self._miners.get(owner)

    def models(self) -> list[tuple[str, int]]:
        """(model name, first seen) for every model some registered active miner serves."""
        return [(name, self._first_seen[name]) for name in self._names]

    def serves(self, model: str) -> bool:
        return model in self._by_model

    def offer_name(self, model: str) -> str:
        """The offer name a request's model routes to (a pinned model id -> its name)."""
        return self._offer_names.get(model, model)

    def serving(self, model: str) -> list[MinerState]:
        """The registered active miners offering `model` (a name or a model id)."""
        return list(self._by_model.get(model, ()))

    def sample_capacity(self) -> None:
        """Every health round: tell the demand log each model's in-service slots, and move
        its standby tier with its load (miners ranked by the scheduler's score, best first)."""
        wall, now = time.time(), self.clock()
        for name in self._names:
            in_service = [s for s in self._by_model.get(name, ()) if self.in_service(s)]
            self.demand.capacity(name, sum(s.capacity for s in in_service), wall)
            probe = RouteRequest(name)
            ranked = sorted(in_service, key=lambda state: self._score(state, probe))
            inflight = sum(s.inflight for s in in_service)
            self.standby.update(name, [(s.owner, s.capacity) for s in ranked], inflight, now)

    def _score(self, state: MinerState, request: RouteRequest) -> float:
        stats = self.scheduler.get(state.owner)
        return float("inf") if stats is None else self.scheduler.score(stats, request)

    # -- health ------------------------------------------------------------------------------

    def set_health(
        self,
        state: MinerState,
        ok: bool,
        *,
        rtt_ms: float | None = None,
        error: str | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        """A health check's result and, when it passed, the concurrency the miner declared."""
        state.healthy = ok
        self.health_log.record(state.owner, ok, time.time())
        known = self._miners.get(state.owner) is state
        if ok:
            state.health_rtt_ms = rtt_ms
            if max_concurrency is not None and max_concurrency != state.max_concurrency:
                state.max_concurrency = max_concurrency
                if known:
                    self._schedule(state)  # the new capacity
        else:
            state.last_error = error
            _taken_out(state)
        if known:
            self.scheduler.set_health(state.owner, ok)

    def mark_unreachable(self, state: MinerState, error: str) -> None:
        """A connection to the miner failed: no more traffic until a health check passes."""
        state.healthy = False
        state.last_error = error
        if self._miners.get(state.owner) is state:
            self.scheduler.set_health(state.owner, False)
        _taken_out(state)

    def set_audit_record(self, owner: str, *, passed: int, failed: int) -> None:
        """The verifiers' verdicts on the miner's audited answers so far: a failure rate that
        costs it traffic (app.audits calls this; probation is its route_filter's rule)."""
        self._audits[owner] = (passed, failed)
        if owner in self._miners:
            self.scheduler.set_audit_record(owner, passed=passed, failed=failed, probation=False)

    # -- routing -----------------------------------------------------------------------------

    def pick(
        self,
        model: str,
        exclude: Iterable[MinerState] = (),
        *,
        canary: bool = False,
        request: RouteRequest | None = None,
        hedge: bool = False,
    ) -> Slot:
        """A slot on a miner for `model`, outside `exclude` (the miners already tried), that
        `route_filter` lets this request go to: the scheduler's choice (module docstring), or
        for a canary request the least loaded healthy miner of its filter.

        Raises ModelNotServed, NoHealthyMiner, NoMinerWithinPrice or NetworkSaturated (only
        for a request that has not failed over yet, or a `hedge`: a request failing over was
        admitted, while a hedge is extra load that a full network does not take).
        """
        serving = self._by_model.get(model)
        if not serving:
            raise ModelNotServed(model)
        if canary:
            return self._pick_canary(model, serving, exclude)
        excluded = {state.owner for state in exclude}
        failing_over = bool(excluded) and not hedge
        if self.route_filter is not None:
            allowed = {id(state) for state in self.route_filter(serving, False)}
            excluded.update(state.owner for state in serving if id(state) not in allowed)
        request = request or RouteRequest(model)
        name = self.offer_name(model)
        while True:
            parked = self.standby.parked(name)
            # A request failing over was admitted already: it is not shed (compute.scheduler).
            decision = self.scheduler.pick(
                request, self.clock(), excluded | parked, admitted=failing_over
            )
            # Standing by while a request would be shed or overflow: activate the best parked
            # miner and pick again. A hedge is extra load: it activates nobody.
            overflowing = isinstance(decision, Picked) and decision.reason == "overflow"
            if hedge or not parked or (isinstance(decision, Picked) and not overflowing):
                break
            if not self.standby.activate(name):
                break
            if isinstance(decision, Picked):
                self.scheduler.release(decision, self.clock(), Cancelled())
        if isinstance(decision, Shed):
            raise NetworkSaturated(model, decision.retry_after_header)
        if isinstance(decision, NoMiner):
            if decision.reason == "none_within_price":
                raise NoMinerWithinPrice(model)
            raise NoHealthyMiner(model)
        state = self._miners[decision.miner_id]
        state.inflight += 1
        return Slot(state, decision, self.offer_name(model), self.clock())

    def _pick_canary(
        self, model: str, serving: list[MinerState], exclude: Iterable[MinerState]
    ) -> Slot:
        if self.route_filter is not None:
            serving = self.route_filter(serving, True)
        excluded = set(exclude)
        candidates = [s for s in serving if s.healthy is True and s not in excluded]
        if not candidates:
            raise NoHealthyMiner(model)
        least = min(s.inflight for s in candidates)
        state = self.rng.choice([s for s in candidates if s.inflight == least])
        state.inflight += 1
        return Slot(state, None, self.offer_name(model), self.clock())

    def can_serve(
        self, model: str, exclude: Iterable[MinerState] = (), *, canary: bool = False
    ) -> bool:
        """Whether another miner for `model` outside `exclude` could take the request: healthy,
        allowed by `route_filter` and, for the scheduler, not behind an open breaker (it may be
        at capacity: then the request waits in its queue or is shed)."""
        excluded = set(exclude)
        serving = self._by_model.get(model, [])
        if self.route_filter is not None and serving:
            serving = self.route_filter(serving, canary)
        return any(self.in_service(state) and state not in excluded for state in serving)

    def hedge_delay(self, slot: Slot) -> float | None:
        """Seconds from now until the slot's first token is late enough to hedge (0 if it is
        already), or None when it is not the scheduler's (a canary) or nothing is measured."""
        if slot.ticket is None:
            return None
        due = self.scheduler.hedge_due_at(slot.ticket)
        return None if due is None else max(0.0, due - self.clock())

    def should_hedge(self, slot: Slot) -> bool:
        """Whether to hedge the slot's attempt now; True spends hedge budget."""
        if slot.ticket is None or slot.released:
            return False
        return self.scheduler.should_hedge(slot.ticket, self.clock(), first_token_seen=False)

    def in_service(self, state: MinerState) -> bool:
        """Its last health check passed and its breaker is not open."""
        if state.healthy is not True:
            return False
        if self.scheduler.get(state.owner) is None:
            return True  # dropped from the registry meanwhile: its breaker is gone with it
        return self.scheduler.breaker_state(state.owner, self.clock()) is not BreakerState.OPEN

    def latency(self, model: str) -> ModelLatency | None:
        """What has been observed of the model's speed (None: nothing yet)."""
        return self._latency.get(model)

    def observed_latency(self, model: str) -> ModelLatency:
        """The model's latency record, to add an observation to; call only for a model that
        some miner served, so that the records stay as few as the models."""
        latency = self._latency.get(model)
        if latency is None:
            latency = self._latency[model] = ModelLatency()
        return latency

    def release(self, slot: Slot, outcome: Outcome) -> None:
        """The attempt in `slot` ended with `outcome` (once; a second call changes nothing).

        `Served`: its time to first token (non-streamed: to the whole answer) feeds the
        scheduler's latency EWMAs; `Failed`: it counts against the miner, and the scheduler's
        breaker may open, which takes the miner out for its cooldown (requests waiting on it
        for their first token move on); `Cancelled` (the request's own fault, a client that left, a
        hedge that lost) teaches nothing."""
        if slot.released:
            return
        slot.released = True
        state = slot.miner
        state.inflight -= 1
        self.demand.busy(slot.model, self.clock() - slot.picked_at, time.time())
        if isinstance(outcome, Served):
            state.served += 1
        elif isinstance(outcome, Failed):
            state.failed += 1
        if slot.ticket is None:
            return
        self.scheduler.release(slot.ticket, self.clock(), outcome)
        stats = self.scheduler.get(state.owner)
        if isinstance(outcome, Failed) and stats is not None and not self.in_service(state):
            state.last_error = f"{stats.consecutive_failures} failed requests in a row"
            _taken_out(state)


def _taken_out(state: MinerState) -> None:
    for watcher in tuple(state.down_watchers):  # a watcher may unregister itself
        watcher()


def health_ok(payload: object) -> bool:
    return isinstance(payload, dict) and payload.get("status") == "ok"


class PoolMaintainer:
    """Keeps a MinerPool current: registry discovery in a thread, HTTP health checks."""

    def __init__(
        self,
        pool: MinerPool,
        discover: Callable[[], list[NodeRecord]],
        *,
        discovery_interval_s: float = 10.0,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 1.0,
    ) -> None:
        self.pool = pool
        self.discover = discover
        self.discovery_interval_s = discovery_interval_s
        self.health_interval_s = health_interval_s
        self.health_timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        self.discovery_error: str | None = None
        self.discovered = False  # whether the registry has been read successfully yet

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Discover once and health-check the miners that are new."""
        try:
            records = await asyncio.to_thread(self.discover)
        except Exception as exc:
            # A chain outage must stop settlement, not serving: keep routing to the miners
            # we already know.
            self.discovery_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "miner discovery failed, keeping %d known miners: %s",
                len(self.pool.miners()),
                self.discovery_error,
            )
            return
        self.discovery_error = None
        self.discovered = True
        new = self.pool.update(records)
        if new:
            await self.check_all(session, new)

    async def check_all(
        self, session: aiohttp.ClientSession, states: Iterable[MinerState] | None = None
    ) -> None:
        targets = list(self.pool.miners() if states is None else states)
        if targets:
            await asyncio.gather(*(self.check(session, state) for state in targets))

    async def check(self, session: aiohttp.ClientSession, state: MinerState) -> None:
        started = time.perf_counter()
        try:
            async with session.get(state.base_url + "/health", timeout=self.health_timeout) as r:
                payload = await r.json(content_type=None) if r.status == 200 else None
            if health_ok(payload):
                rtt = (time.perf_counter() - started) * 1000
                concurrency = declared_concurrency(payload)
                self.pool.set_health(state, True, rtt_ms=rtt, max_concurrency=concurrency)
            else:
                self.pool.set_health(state, False, error=f"/health answered {r.status}")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self.pool.set_health(state, False, error=f"/health: {type(exc).__name__}: {exc}")

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Discover every discovery_interval_s and health-check every health_interval_s, until
        cancelled. Two loops, so a slow registry read never delays health checks."""
        await asyncio.gather(self._discovery_loop(session), self._health_loop(session))

    async def _discovery_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval_s)
            await self.refresh(session)

    async def _health_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all(session)
            self.pool.sample_capacity()
