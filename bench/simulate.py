"""Network simulator: pure logic in simulated time (a heapq of events, no sleeps, no I/O).

``routing``: thousands of miners of different speeds (time to first token and per output
token, log-normal), capacities (1–8 concurrent requests) and failure behaviour: a
``--failing`` fraction of them, half *flaky* (pass health checks but fail 30–90 % of requests
with a 5xx after 0.1–1 s) and half *dying* (stop answering at a random time; health checks,
every 2 s with a 1 s timeout, notice). The workload is Poisson arrivals whose rate follows a
diurnal swing (±30 %, one "day" per run) with bursts (×1.6 for 3 s, every 15 s on average);
70 % of requests carry one of 300 shared prompt prefixes (Zipf), and a miner that served a
prefix recently (an LRU of 16) answers it with a 65 % shorter time to first token, as its KV
cache does. Miners slow down as their batch fills (TTFT ×(1 + 0.3 u), per-token ×(1 + 0.5 u)
at occupancy u), 1 % of starts straggle (5× TTFT), and requests beyond a miner's capacity
queue at the miner.

Every policy runs the same workload on the same miners, with the gateway's rules of today
(app.forwarding): up to 3 attempts, failover before the first token excluding the miners tried,
a 10 s first-token deadline, an attempt moved at once when its miner is found down; a failure
after the first token fails the request. Policies:

* ``round-robin``: the next healthy miner in turn.
* ``least-loaded``: today's MinerPool.pick: fewest in flight, ties to the lower latency EWMA
  (within 1.25× or 5 ms), then random; 3 failures in a row take a miner out until its next
  health check passes.
* ``ours``: infergrid.compute.scheduler.Scheduler itself, hedging and shedding included (a shed
  client retries after ``retry-after``, up to 5 times; the wait counts in its latency).
* ``oracle``: full knowledge: each request goes to the working miner with the lowest true
  expected time to first token and completion given its real speed, queue and prefix cache.

``--scale``: the simulator's own wall time for ``ours`` at 1,000 / 3,000 / 10,000 miners with
proportional request rates (100 / 300 / 1,000 requests per simulated second): time per
simulated request stays flat when the cost grows linearly.

``economics``: the economics runs, in bench/sim_economics.py (its own ``--help``).
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import json
import math
import platform
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from infergrid.compute.scheduler import (
    Cancelled,
    Failed,
    NoMiner,
    Picked,
    Price,
    RouteRequest,
    Scheduler,
    SchedulerConfig,
    Served,
    Shed,
)

MODEL = "sim-model"
MAX_ATTEMPTS = 3
FIRST_TOKEN_DEADLINE_S = 10.0
HEALTH_INTERVAL_S = 2.0
HEALTH_TIMEOUT_S = 1.0
MAX_SHEDS = 5
CACHE_SLOTS = 16
PREFIX_DISCOUNT = 0.35  # TTFT multiplier when the prefix is in the miner's cache
STRAGGLE_P = 0.01
STRAGGLE_X = 5.0
TOKENS_MEDIAN, TOKENS_SIGMA = 80, 0.7  # output tokens: log-normal, 2..512
MEAN_TOKENS = TOKENS_MEDIAN * math.exp(TOKENS_SIGMA**2 / 2)

# -- the world -----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class SimMiner:
    idx: int
    ttft_s: float
    tpot_s: float
    capacity: int
    kind: str  # "ok", "flaky", "dies"
    fail_p: float = 0.0
    die_at: float = math.inf
    alive: bool = True
    active: int = 0
    queue: deque[Attempt] = field(default_factory=deque)
    # Insertion-ordered (a set of objects iterates in address order: not reproducible).
    live: dict[Attempt, None] = field(default_factory=dict)
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)


@dataclass(slots=True, eq=False)
class SimRequest:
    rid: int
    arrival: float
    tokens: int
    prompt_tokens: int
    prefix: int | None
    tried: set[int] = field(default_factory=set)
    attempts: int = 0
    live: list[Attempt] = field(default_factory=list)
    first_token_at: float | None = None
    finished: bool = False
    sheds: int = 0
    route: RouteRequest | None = None


@dataclass(slots=True, eq=False)
class Attempt:
    req: SimRequest
    miner: SimMiner
    sent: float
    state: int = 0  # 0 queued at the miner, 1 running, 2 streaming, 3 ended
    ticket: object = None  # the policy's handle


@dataclass(frozen=True, slots=True)
class World:
    miners: list[tuple[float, float, int, str, float, float]]  # ttft, tpot, cap, kind, p, die
    arrivals: list[tuple[float, int, int, int | None]]  # time, tokens, prompt tokens, prefix
    duration_s: float


def build_world(
    seed: int, miners: int, rate: float, duration_s: float, failing: float, bursts: bool = True
) -> World:
    """Miners and arrivals, the same for every policy of a run."""
    rng = random.Random(seed)
    specs = []
    dying_or_flaky = set(rng.sample(range(miners), round(failing * miners)))
    for i in range(miners):
        ttft = min(5.0, rng.lognormvariate(math.log(0.4), 0.5))
        tpot = min(0.2, rng.lognormvariate(math.log(0.03), 0.4))
        cap = rng.choices((1, 2, 4, 8), weights=(2, 3, 3, 2))[0]
        kind, p, die = "ok", 0.0, math.inf
        if i in dying_or_flaky:
            if rng.random() < 0.5:
                kind, p = "flaky", rng.uniform(0.3, 0.9)
            else:
                kind, die = "dies", rng.uniform(0.05, 0.9) * duration_s
        specs.append((ttft, tpot, cap, kind, p, die))
    burst_windows: list[tuple[float, float]] = []
    t = rng.expovariate(1 / 15)
    while bursts and t < duration_s:
        burst_windows.append((t, t + 3.0))
        t += 3.0 + rng.expovariate(1 / 15)
    zipf = [1 / (k + 1) for k in range(300)]
    peak = rate * 1.3 * 1.6
    arrivals = []
    t = 0.0
    bi = 0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            break
        while bi < len(burst_windows) and burst_windows[bi][1] < t:
            bi += 1
        burst = 1.6 if bi < len(burst_windows) and burst_windows[bi][0] <= t else 1.0
        here = rate * (1 + 0.3 * math.sin(2 * math.pi * t / duration_s)) * burst
        if rng.random() * peak > here:
            continue  # thinning: keeps a Poisson process of rate `here`
        tokens = max(2, min(512, round(rng.lognormvariate(math.log(TOKENS_MEDIAN), TOKENS_SIGMA))))
        prompt = max(8, round(rng.lognormvariate(math.log(400), 0.8)))
        prefix = rng.choices(range(300), weights=zipf)[0] if rng.random() < 0.7 else None
        arrivals.append((t, tokens, prompt, prefix))
    return World(specs, arrivals, duration_s)


# -- policies ------------------------------------------------------------------------------------


class Policy(Protocol):
    name: str
    hedging: bool

    def pick(self, req: SimRequest, now: float) -> tuple[int, object] | Shed | None: ...
    def release(self, att: Attempt, now: float, outcome: Served | Failed | Cancelled) -> None: ...
    def set_health(self, idx: int, ok: bool, now: float) -> None: ...
    def hedge_at(self, att: Attempt) -> float | None: ...
    def should_hedge(self, att: Attempt, now: float) -> bool: ...


class _Pool:
    """Today's MinerPool bookkeeping: health, in-flight, a latency EWMA, 3 strikes out."""

    def __init__(self, n: int) -> None:
        self.healthy = [True] * n
        self.inflight = [0] * n
        self.latency: list[float | None] = [None] * n
        self.strikes = [0] * n

    def release(self, idx: int, outcome: Served | Failed | Cancelled) -> None:
        self.inflight[idx] -= 1
        if isinstance(outcome, Served):
            self.strikes[idx] = 0
            prev = self.latency[idx]
            ms = outcome.ttft_s * 1000
            self.latency[idx] = ms if prev is None else prev + 0.2 * (ms - prev)
        elif isinstance(outcome, Failed):
            self.strikes[idx] += 1
            if self.strikes[idx] >= 3:
                self.out(idx)

    def out(self, idx: int) -> None:
        self.healthy[idx] = False

    def set_health(self, idx: int, ok: bool) -> None:
        if ok:
            self.strikes[idx] = 0
        self.healthy[idx] = ok


class RoundRobin:
    name = "round-robin"
    hedging = False

    def __init__(self, n: int, rng: random.Random) -> None:
        self.pool = _Pool(n)
        self.n = n
        self.next = 0

    def pick(self, req: SimRequest, now: float) -> tuple[int, object] | Shed | None:
        healthy = self.pool.healthy
        for _ in range(self.n):
            i = self.next
            self.next = (i + 1) % self.n
            if healthy[i] and i not in req.tried:
                self.pool.inflight[i] += 1
                return i, None
        return None

    def release(self, att: Attempt, now: float, outcome: Served | Failed | Cancelled) -> None:
        self.pool.release(att.miner.idx, outcome)

    def set_health(self, idx: int, ok: bool, now: float) -> None:
        self.pool.set_health(idx, ok)

    def hedge_at(self, att: Attempt) -> float | None:
        return None

    def should_hedge(self, att: Attempt, now: float) -> bool:
        return False


class LeastLoaded(RoundRobin):
    name = "least-loaded"

    def __init__(self, n: int, rng: random.Random) -> None:
        super().__init__(n, rng)
        self.rng = rng
        # Healthy miners by in-flight count, so the least loaded are found without a scan.
        self.buckets: dict[int, set[int]] = {0: set(range(n))}

    def _move(self, idx: int, old: int | None, new: int | None) -> None:
        if old is not None:
            self.buckets[old].discard(idx)
        if new is not None:
            self.buckets.setdefault(new, set()).add(idx)

    def pick(self, req: SimRequest, now: float) -> tuple[int, object] | Shed | None:
        pool = self.pool
        for load in sorted(k for k, v in self.buckets.items() if v):
            best = [i for i in self.buckets[load] if i not in req.tried]
            if not best:
                continue
            known = [pool.latency[i] for i in best if pool.latency[i] is not None]
            if known:
                fastest = min(known)  # type: ignore[type-var]
                cutoff = max(fastest * 1.25, fastest + 5.0)  # type: ignore[operator]
                best = [i for i in best if pool.latency[i] is None or pool.latency[i] <= cutoff]  # type: ignore[operator]
            i = best[0] if len(best) == 1 else self.rng.choice(best)
            self._move(i, load, load + 1)
            pool.inflight[i] += 1
            return i, None
        return None

    def release(self, att: Attempt, now: float, outcome: Served | Failed | Cancelled) -> None:
        i = att.miner.idx
        was_healthy = self.pool.healthy[i]
        load = self.pool.inflight[i]
        self.pool.release(i, outcome)
        if was_healthy:
            self._move(i, load, self.pool.inflight[i] if self.pool.healthy[i] else None)

    def set_health(self, idx: int, ok: bool, now: float) -> None:
        was = self.pool.healthy[idx]
        self.pool.set_health(idx, ok)
        load = self.pool.inflight[idx]
        if was and not ok:
            self._move(idx, load, None)
        elif ok and not was:
            self._move(idx, None, load)


class Ours:
    name = "ours"
    hedging = True

    def __init__(self, n: int, rng: random.Random, world: World) -> None:
        self.scheduler = Scheduler(SchedulerConfig(), rng=rng)
        self.ids = [f"m{i}" for i in range(n)]
        self.index = {m: i for i, m in enumerate(self.ids)}
        price = {MODEL: Price(1, 1)}
        for i, spec in enumerate(world.miners):
            self.scheduler.add_miner(self.ids[i], price, capacity=spec[2])

    def pick(self, req: SimRequest, now: float) -> tuple[int, object] | Shed | None:
        if req.route is None:
            req.route = RouteRequest(
                MODEL, prompt_tokens=req.prompt_tokens, max_tokens=512, prefix=req.prefix
            )
        tried = {self.ids[i] for i in req.tried}
        decision = self.scheduler.pick(req.route, now, tried)
        if isinstance(decision, Picked):
            return self.index[decision.miner_id], decision
        if isinstance(decision, NoMiner):
            return None
        return decision

    def release(self, att: Attempt, now: float, outcome: Served | Failed | Cancelled) -> None:
        assert isinstance(att.ticket, Picked)
        self.scheduler.release(att.ticket, now, outcome)

    def set_health(self, idx: int, ok: bool, now: float) -> None:
        self.scheduler.set_health(self.ids[idx], ok)

    def hedge_at(self, att: Attempt) -> float | None:
        assert isinstance(att.ticket, Picked)
        return self.scheduler.hedge_due_at(att.ticket)

    def should_hedge(self, att: Attempt, now: float) -> bool:
        assert isinstance(att.ticket, Picked)
        return self.scheduler.should_hedge(att.ticket, now, first_token_seen=att.state >= 2)


class Oracle(RoundRobin):
    """Knows every miner's true speed, queue, cache and whether it works."""

    name = "oracle"

    def __init__(self, n: int, rng: random.Random, sim: Simulation) -> None:
        super().__init__(n, rng)
        self.sim = sim
        ms = sim.miners
        self.ttft = np.array([m.ttft_s for m in ms])
        self.tpot = np.array([m.tpot_s for m in ms])
        self.cap = np.array([m.capacity for m in ms], dtype=float)
        self.works = np.array([m.kind != "flaky" for m in ms])

    def pick(self, req: SimRequest, now: float) -> tuple[int, object] | Shed | None:
        active = self.sim.active
        queued = self.sim.queued
        alive = self.works & self.sim.alive
        u = np.minimum(active + 1, self.cap) / self.cap
        # The miners' truth, not the request's: its length is known to nobody in advance.
        decode = (MEAN_TOKENS - 1) * self.tpot * (1 + 0.5 * u)
        wait = np.where(active < self.cap, 0.0, (queued + 1) / self.cap * (self.ttft + decode))
        first = self.ttft * (1 + 0.3 * u)
        score = wait + first + decode
        if req.prefix is not None:
            for i in self.sim.cached_by.get(req.prefix, ()):
                score[i] -= first[i] * (1 - PREFIX_DISCOUNT)
        score[~alive] = np.inf
        for i in req.tried:
            score[i] = np.inf
        i = int(np.argmin(score))
        if not math.isfinite(score[i]):
            return None
        return i, None


# -- the simulation ------------------------------------------------------------------------------

ARRIVE, FAIL, FIRST, DONE, TIMEOUT, HEDGE, DIE, HEALTH, RETRY = range(9)


@dataclass
class Result:
    policy: str
    requests: int
    succeeded: int
    shed_429: int
    failed_before_first_token: int
    failed_streaming: int
    hedges: int
    success_rate: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    throughput_rps: float
    wall_s: float
    wall_us_per_request: float


class Simulation:
    def __init__(self, world: World, policy_name: str, seed: int) -> None:
        self.world = world
        self.rng = random.Random(seed ^ 0x5EED)
        self.miners = [
            SimMiner(i, ttft, tpot, cap, kind, p, die)
            for i, (ttft, tpot, cap, kind, p, die) in enumerate(world.miners)
        ]
        n = len(self.miners)
        self.active = np.zeros(n)
        self.queued = np.zeros(n)
        self.alive = np.ones(n, dtype=bool)
        self.cached_by: dict[int, set[int]] = {}
        prng = random.Random(seed ^ 0xC0FFEE)
        self.policy: Policy
        if policy_name == "round-robin":
            self.policy = RoundRobin(n, prng)
        elif policy_name == "least-loaded":
            self.policy = LeastLoaded(n, prng)
        elif policy_name == "ours":
            self.policy = Ours(n, prng, world)
        elif policy_name == "oracle":
            self.policy = Oracle(n, prng, self)
        else:
            raise ValueError(f"unknown policy {policy_name!r}")
        self.events: list[tuple[float, int, int, object]] = []
        self.timeouts: deque[tuple[float, Attempt]] = deque()
        self.seq = 0
        self.ttfts: list[float] = []
        self.latencies: list[float] = []
        self.failed = 0
        self.failed_streaming = 0  # its miner died after the first token: no policy avoids it
        self.shed = 0
        self.hedges = 0
        self.health_unseen: set[int] = set()  # dead miners not yet noticed

    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self) -> Result:
        started = time.perf_counter()
        # Arrivals enter the heap one at a time, so that it holds only what is in flight and a
        # pop costs log(concurrency), not log(the whole run).
        arrivals = iter(enumerate(self.world.arrivals))
        self.next_arrival(arrivals)
        for m in self.miners:
            if m.die_at < math.inf:
                self.push(m.die_at, DIE, m)
        self.push(HEALTH_INTERVAL_S, HEALTH, None)
        horizon = self.world.duration_s + 120.0  # let the last requests finish
        events = self.events
        timeouts = self.timeouts
        while events or timeouts:
            if timeouts and (not events or timeouts[0][0] <= events[0][0]):
                t, payload = timeouts.popleft()
                kind = TIMEOUT
            else:
                t, _, kind, payload = heapq.heappop(events)
            if t > horizon:
                break
            if kind == ARRIVE:
                self.next_arrival(arrivals)
                self.route(payload, t)  # type: ignore[arg-type]
            elif kind == RETRY:
                self.route(payload, t)  # type: ignore[arg-type]
            elif kind == FIRST:
                self.on_first(payload, t)  # type: ignore[arg-type]
            elif kind == DONE:
                self.on_done(payload, t)  # type: ignore[arg-type]
            elif kind == FAIL:
                att = payload
                if att.state == 1 and att.miner.alive:  # type: ignore[attr-defined]
                    self.end(att, t, Failed("HTTP 500"))  # type: ignore[arg-type]
                    self.failover(att.req, t)  # type: ignore[attr-defined]
            elif kind == TIMEOUT:
                att = payload
                if att.state in (0, 1):  # type: ignore[attr-defined]
                    self.end(att, t, Failed("first-token deadline"))  # type: ignore[arg-type]
                    self.failover(att.req, t)  # type: ignore[attr-defined]
            elif kind == HEDGE:
                self.on_hedge(payload, t)  # type: ignore[arg-type]
            elif kind == DIE:
                self.on_die(payload, t)  # type: ignore[arg-type]
            elif kind == HEALTH:
                self.on_health(t)
                if t < self.world.duration_s + 30:
                    self.push(t + HEALTH_INTERVAL_S, HEALTH, None)
        wall = time.perf_counter() - started
        n = len(self.world.arrivals)
        ok = len(self.latencies)
        return Result(
            policy=self.policy.name,
            requests=n,
            succeeded=ok,
            shed_429=self.shed,
            failed_before_first_token=self.failed - self.failed_streaming,
            failed_streaming=self.failed_streaming,
            hedges=self.hedges,
            success_rate=ok / n if n else 0.0,
            ttft_p50_s=_pct(self.ttfts, 50),
            ttft_p99_s=_pct(self.ttfts, 99),
            latency_p50_s=_pct(self.latencies, 50),
            latency_p99_s=_pct(self.latencies, 99),
            throughput_rps=ok / self.world.duration_s,
            wall_s=wall,
            wall_us_per_request=wall / n * 1e6 if n else 0.0,
        )

    def next_arrival(
        self, arrivals: Iterator[tuple[int, tuple[float, int, int, int | None]]]
    ) -> None:
        for rid, (t, tokens, prompt, prefix) in arrivals:
            self.push(t, ARRIVE, SimRequest(rid, t, tokens, prompt, prefix))
            return

    # -- requests --

    def route(self, req: SimRequest, t: float) -> None:
        if req.finished:
            return
        if req.attempts >= MAX_ATTEMPTS:
            self.fail_request(req)
            return
        decision = self.policy.pick(req, t)
        if decision is None:
            self.fail_request(req)
        elif isinstance(decision, Shed):
            self.shed += 1
            req.sheds += 1
            if req.sheds > MAX_SHEDS:
                self.fail_request(req)
            else:
                self.push(t + decision.retry_after_s, RETRY, req)
        else:
            req.attempts += 1
            self.dispatch(req, decision[0], decision[1], t)

    def dispatch(self, req: SimRequest, idx: int, ticket: object, t: float) -> None:
        m = self.miners[idx]
        att = Attempt(req, m, t, ticket=ticket)
        req.tried.add(idx)
        req.live.append(att)
        m.live[att] = None
        # Every deadline is the same length, so they come due in the order they were set: a
        # FIFO instead of the heap (which would hold one stale entry per finished attempt).
        self.timeouts.append((t + FIRST_TOKEN_DEADLINE_S, att))
        if self.policy.hedging and req.first_token_at is None:
            due = self.policy.hedge_at(att)
            if due is not None:
                self.push(due, HEDGE, att)
        if not m.alive:
            att.state = 1  # a dead miner: nothing comes back until the deadline or a check
            return
        if m.active < m.capacity:
            self.start(att, t)
        else:
            m.queue.append(att)
            self.queued[idx] += 1

    def start(self, att: Attempt, t: float) -> None:
        m = att.miner
        rng = self.rng
        m.active += 1
        self.active[m.idx] += 1
        att.state = 1
        if m.kind == "flaky" and rng.random() < m.fail_p:
            self.push(t + rng.uniform(0.1, 1.0), FAIL, att)
            return
        u = m.active / m.capacity
        ttft = m.ttft_s * (1 + 0.3 * u) * rng.lognormvariate(0.0, 0.25)
        if att.req.prefix is not None and att.req.prefix in m.cache:
            ttft *= PREFIX_DISCOUNT
        if rng.random() < STRAGGLE_P:
            ttft *= STRAGGLE_X
        self.push(t + ttft, FIRST, att)

    def on_first(self, att: Attempt, t: float) -> None:
        m = att.miner
        if att.state != 1 or not m.alive:
            return
        req = att.req
        att.state = 2
        if req.first_token_at is None:
            req.first_token_at = t
            for other in list(req.live):
                if other is not att:
                    self.end(other, t, Cancelled())
        prefix = req.prefix
        if prefix is not None:
            cache = m.cache
            if prefix in cache:
                cache.move_to_end(prefix)
            else:
                cache[prefix] = None
                self.cached_by.setdefault(prefix, set()).add(m.idx)
                if len(cache) > CACHE_SLOTS:
                    old, _ = cache.popitem(last=False)
                    self.cached_by[old].discard(m.idx)
        u = m.active / m.capacity
        decode = (req.tokens - 1) * m.tpot_s * (1 + 0.5 * u) * self.rng.lognormvariate(0.0, 0.1)
        self.push(t + decode, DONE, att)

    def on_done(self, att: Attempt, t: float) -> None:
        if att.state != 2 or not att.miner.alive:
            return
        req = att.req
        assert req.first_token_at is not None
        ttft = req.first_token_at - att.sent
        self.end(att, t, Served(ttft, req.tokens, t - req.first_token_at))
        req.finished = True
        self.ttfts.append(req.first_token_at - req.arrival)
        self.latencies.append(t - req.arrival)

    def on_hedge(self, att: Attempt, t: float) -> None:
        req = att.req
        if att.state >= 2 or req.finished or req.first_token_at is not None:
            return
        if not self.policy.should_hedge(att, t):
            return
        decision = self.policy.pick(req, t)
        if decision is not None and not isinstance(decision, Shed):
            self.hedges += 1
            self.dispatch(req, decision[0], decision[1], t)

    def end(self, att: Attempt, t: float, outcome: Served | Failed | Cancelled) -> None:
        """Finish one attempt: free its slot (starting the miner's next queued one)."""
        m = att.miner
        if att.state == 0:
            m.queue.remove(att)
            self.queued[m.idx] -= 1
        elif m.alive and att.state in (1, 2):
            m.active -= 1
            self.active[m.idx] -= 1
            if m.queue:
                nxt = m.queue.popleft()
                self.queued[m.idx] -= 1
                self.start(nxt, t)
        att.state = 3
        m.live.pop(att, None)
        att.req.live.remove(att)
        self.policy.release(att, t, outcome)

    def failover(self, req: SimRequest, t: float) -> None:
        if req.finished or req.live:
            return  # a hedge is still running
        if req.first_token_at is not None:
            self.fail_request(req)  # something reached the client: a clean error
        else:
            self.route(req, t)

    def fail_request(self, req: SimRequest) -> None:
        if not req.finished:
            req.finished = True
            self.failed += 1
            if req.first_token_at is not None:
                self.failed_streaming += 1

    # -- miners --

    def on_die(self, m: SimMiner, t: float) -> None:
        m.alive = False
        self.alive[m.idx] = False
        self.active[m.idx] = 0
        self.queued[m.idx] = 0
        for att in m.queue:
            att.state = 1  # hangs like the rest
        m.queue.clear()
        m.active = 0
        self.health_unseen.add(m.idx)

    def on_health(self, t: float) -> None:
        # Dead miners are noticed when the check times out; the others answer.
        for idx in sorted(self.health_unseen):
            m = self.miners[idx]
            self.policy.set_health(idx, False, t + HEALTH_TIMEOUT_S)
            for att in list(m.live):
                streaming = att.state == 2
                self.end(att, t + HEALTH_TIMEOUT_S, Failed("miner down"))
                if streaming:
                    self.fail_request(att.req)
                else:
                    self.failover(att.req, t + HEALTH_TIMEOUT_S)
        self.health_unseen.clear()
        if not isinstance(self.policy, Ours):
            # Today's pool: a passing check restores a miner taken out for failures.
            pool = self.policy.pool  # type: ignore[attr-defined]
            for m in self.miners:
                if m.alive and not pool.healthy[m.idx]:
                    self.policy.set_health(m.idx, True, t)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


# -- commands ------------------------------------------------------------------------------------

POLICIES = ("round-robin", "least-loaded", "ours", "oracle")


def routing(args: argparse.Namespace) -> dict[str, object]:
    world = build_world(args.seed, args.miners, args.rate, args.duration, args.failing)
    results = []
    for name in args.policies:
        result = Simulation(world, name, args.seed).run()
        results.append(result)
        if not args.json:
            print(f"  {name}: {result.wall_s:.1f} s of wall time", file=sys.stderr)
    by = {r.policy: r for r in results}
    out: dict[str, object] = {
        "command": "routing",
        "seed": args.seed,
        "miners": args.miners,
        "rate_rps": args.rate,
        "duration_s": args.duration,
        "failing": args.failing,
        "requests": len(world.arrivals),
        "machine": machine(),
        "results": [asdict(r) for r in results],
    }
    if "ours" in by and "oracle" in by:
        out["ours_over_oracle_ttft_p99"] = by["ours"].ttft_p99_s / by["oracle"].ttft_p99_s
        out["ours_over_oracle_latency_p99"] = by["ours"].latency_p99_s / by["oracle"].latency_p99_s
    return out


def scale(args: argparse.Namespace) -> dict[str, object]:
    rows = []
    for miners in (1000, 3000, 10000):
        rate = miners / 10
        world = build_world(args.seed, miners, rate, args.scale_duration, args.failing)
        # The fastest of a few runs: the least disturbed by whatever else the machine runs.
        result = min(
            (Simulation(world, "ours", args.seed).run() for _ in range(args.scale_repeat)),
            key=lambda r: r.wall_s,
        )
        rows.append(
            {
                "miners": miners,
                "rate_rps": rate,
                "requests": result.requests,
                "wall_s": result.wall_s,
                "repeats": args.scale_repeat,
                "wall_us_per_request": result.wall_us_per_request,
                "success_rate": result.success_rate,
            }
        )
        if not args.json:
            print(f"  {miners} miners: {result.wall_s:.1f} s", file=sys.stderr)
    return {"command": "routing --scale", "seed": args.seed, "machine": machine(), "rows": rows}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def print_routing(out: dict[str, object]) -> None:
    print(
        f"routing: {out['miners']} miners, {out['rate_rps']} req/s mean, {out['duration_s']} s,"
        f" {out['failing']:.0%} failing, {out['requests']} requests, seed {out['seed']}"
    )
    print(f"machine: {out['machine']}")
    print(
        "| policy | success | failed before / after 1st token | TTFT p50 | TTFT p99 | latency p50"
        " | latency p99 | throughput | 429s | hedges |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["results"]:  # type: ignore[attr-defined]
        print(
            f"| {r['policy']} | {r['success_rate']:.2%}"
            f" | {r['failed_before_first_token']} / {r['failed_streaming']}"
            f" | {r['ttft_p50_s']:.2f} s"
            f" | {r['ttft_p99_s']:.2f} s | {r['latency_p50_s']:.2f} s | {r['latency_p99_s']:.2f} s"
            f" | {r['throughput_rps']:.1f} req/s | {r['shed_429']} | {r['hedges']} |"
        )
    if "ours_over_oracle_ttft_p99" in out:
        print(
            f"ours / oracle p99: TTFT {out['ours_over_oracle_ttft_p99']:.2f}x,"
            f" latency {out['ours_over_oracle_latency_p99']:.2f}x"
        )


def print_scale(out: dict[str, object]) -> None:
    print(f"routing --scale (ours), seed {out['seed']}; machine: {out['machine']}")
    print("| miners | req/s (simulated) | requests | wall | per simulated request |")
    print("|---|---|---|---|---|")
    for r in out["rows"]:  # type: ignore[attr-defined]
        print(
            f"| {r['miners']} | {r['rate_rps']:.0f} | {r['requests']} | {r['wall_s']:.1f} s"
            f" | {r['wall_us_per_request']:.0f} µs |"
        )


def economics(rest: Sequence[str]) -> int:
    """`sim_economics.main(rest)` from bench/sim_economics.py; 2, with one line on stderr,
    when that file does not exist."""
    path = Path(__file__).with_name("sim_economics.py")
    if not path.exists():
        print(f"simulate economics: {path} does not exist yet", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("sim_economics", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_economics"] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    code = module.main(list(rest))
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["economics"]:
        return economics(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands: routing (below); economics [ARGS] (bench/sim_economics.py)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("routing", help="compare routing policies (module docstring)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    r.add_argument("--miners", type=int, default=2000)
    r.add_argument("--rate", type=float, default=600.0, help="mean requests per simulated s")
    r.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals")
    r.add_argument("--failing", type=float, default=0.10, help="fraction of failing miners")
    r.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    r.add_argument("--scale", action="store_true", help="the simulator's cost at 1k/3k/10k miners")
    r.add_argument("--scale-duration", type=float, default=30.0, help="simulated s per size")
    r.add_argument("--scale-repeat", type=int, default=3, help="runs per size (the fastest)")
    sub.add_parser("economics", help="economics runs: bench/sim_economics.py", add_help=False)
    args = parser.parse_args(argv)
    if args.miners <= 0 or args.rate <= 0 or args.duration <= 0:
        parser.error("--miners, --rate and --duration must be positive")
    if not 0 <= args.failing < 1:
        parser.error("--failing must be in [0, 1)")
    out = scale(args) if args.scale else routing(args)
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.scale:
        print_scale(out)
    else:
        print_routing(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
