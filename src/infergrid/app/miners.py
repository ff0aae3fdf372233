"""Which miners exist, which are healthy, and which one gets the next request.

`MinerPool` is pure bookkeeping that tests drive directly: the registry's records go in through
`update()`, health results through `set_health()`, the gateway's own in-flight counts through
`acquire()`/`release()`, and `pick()` chooses. `PoolMaintainer` is the I/O shell: it calls the
discovery function in a thread every few seconds and health-checks every endpoint.
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
from infergrid.app.miner_epochs import HealthLog
from infergrid.protocol.nodes import NodeRecord, Role

log = logging.getLogger(__name__)

# A latency EWMA this much worse than the best candidate's (relatively, and absolutely for fast
# miners whose few milliseconds are mostly noise) still counts as a tie, so equal miners share
# sequential traffic instead of the marginally faster one taking all of it.
LATENCY_TIE_RATIO = 1.25
LATENCY_TIE_MS = 5.0
EWMA_ALPHA = 0.2
# Upstream 5xx in a row before a miner that still answers /health is taken out anyway.
MAX_CONSECUTIVE_FAILURES = 3


class ModelNotServed(LookupError):
    """No registered, active miner serves the model (the client's problem: 404)."""


class NoHealthyMiner(LookupError):
    """Miners serve the model but none can take a request now (our problem: 503)."""


@dataclass(eq=False)
class MinerState:
    record: NodeRecord
    base_url: str
    # None until the first health check answers: an unchecked miner gets no traffic.
    healthy: bool | None = None
    inflight: int = 0
    latency_ewma_ms: float | None = None  # time to first byte of the miner's answer
    health_rtt_ms: float | None = None
    consecutive_failures: int = 0
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


@dataclass
class MinerPool:
    """Routing state for one gateway; every method is synchronous and does no I/O."""

    rng: random.Random = field(default_factory=random.Random)
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
        self._miners = fresh
        # A client may name a model or pin its exact weights by protocol id; both route.
        by_model: dict[str, list[MinerState]] = {}
        names: set[str] = set()
        for state in fresh.values():
            for offer in state.record.models:
                names.add(offer.name)
                by_model.setdefault(offer.name, []).append(state)
                if offer.model_id and offer.model_id != offer.name:
                    by_model.setdefault(offer.model_id, []).append(state)
        now = int(time.time())
        for name in names:
            self._first_seen.setdefault(name, now)
        self._by_model = by_model
        self._names = sorted(names)
        return to_check

    def miners(self) -> list[MinerState]:
        return list(self._miners.values())

    def get(self, owner: str) -> MinerState | None:
        return self._miners.get(owner)

    def models(self) -> list[tuple[str, int]]:
        """(model name, first seen) for every model some registered active miner serves."""
        return [(name, self._first_seen[name]) for name in self._names]

    def serves(self, model: str) -> bool:
        return model in self._by_model

    # -- health ------------------------------------------------------------------------------

    def set_health(
        self, state: MinerState, ok: bool, *, rtt_ms: float | None = None, error: str | None = None
    ) -> None:
        state.healthy = ok
        self.health_log.record(state.owner, ok, time.time())
        if ok:
            state.consecutive_failures = 0
            state.health_rtt_ms = rtt_ms
        else:
            state.last_error = error
            _taken_out(state)

    def mark_unreachable(self, state: MinerState, error: str) -> None:
        """A connection to the miner failed: no more traffic until a health check passes."""
        state.healthy = False
        state.last_error = error
        _taken_out(state)

    # -- routing -----------------------------------------------------------------------------

    def pick(
        self, model: str, exclude: Iterable[MinerState] = (), *, canary: bool = False
    ) -> MinerState:
        """A healthy miner for `model` that `route_filter` lets this request (a canary one or
        not) go to: least in-flight first, then lower latency, then random.

        Raises ModelNotServed or NoHealthyMiner.
        """
        serving = self._by_model.get(model)
        if not serving:
            raise ModelNotServed(model)
        if self.route_filter is not None:
            serving = self.route_filter(serving, canary)
        best: list[MinerState] = []
        least = -1
        for state in serving:
            if state.healthy is not True or state in exclude:
                continue
            if not best or state.inflight < least:
                best = [state]
                least = state.inflight
            elif state.inflight == least:
                best.append(state)
        if not best:
            raise NoHealthyMiner(model)
        if len(best) == 1:
            return best[0]
        known = [s.latency_ewma_ms for s in best if s.latency_ewma_ms is not None]
        if known:
            fastest = min(known)
            cutoff = max(fastest * LATENCY_TIE_RATIO, fastest + LATENCY_TIE_MS)
            # A miner with no latency yet stays in the running: that is how it gets measured.
            best = [s for s in best if s.latency_ewma_ms is None or s.latency_ewma_ms <= cutoff]
        return best[0] if len(best) == 1 else self.rng.choice(best)

    def can_serve(
        self, model: str, exclude: Iterable[MinerState] = (), *, canary: bool = False
    ) -> bool:
        """Whether pick() would find a miner for `model` outside `exclude`."""
        excluded = set(exclude)
        serving = self._by_model.get(model, [])
        if self.route_filter is not None and serving:
            serving = self.route_filter(serving, canary)
        return any(state.healthy is True and state not in excluded for state in serving)

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

    def acquire(self, state: MinerState) -> None:
        state.inflight += 1

    def release(self, state: MinerState, *, ok: bool, latency_ms: float | None = None) -> None:
        """A request on `state` ended; `latency_ms` is its time to first byte when known."""
        state.inflight -= 1
        if ok:
            state.served += 1
            state.consecutive_failures = 0
            if latency_ms is not None:
                prev = state.latency_ewma_ms
                state.latency_ewma_ms = (
                    latency_ms if prev is None else prev + EWMA_ALPHA * (latency_ms - prev)
                )
        else:
            state.failed += 1
            state.consecutive_failures += 1
            if state.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                state.healthy = False
                state.last_error = f"{state.consecutive_failures} failed requests in a row"
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
                self.pool.set_health(state, True, rtt_ms=rtt)
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
