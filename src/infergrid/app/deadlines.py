"""How long the gateway waits for a miner: the rules, as pure functions, and the two small
timers that enforce them on the event loop.

Three waits are bounded, each tighter than the socket read timeout (`read_timeout_s`, the hard
ceiling on any silence):

* **Streamed, before the first token.** The deadline is `factor × high × scale`, clamped to
  `[floor_s, cap_s]`, where `high` is the model's observed time to first token
  (`Estimator.high`: smoothed mean + 4 × smoothed deviation over recent streams, measured per
  attempt from sending the request to the first output event) and `scale` is how many times
  larger this request's body is than the model's recent average (never below 1): prefill grows
  with the prompt, so a long prompt gets proportionally longer. A model with too few
  observations gets `cap_s`.
* **Non-streamed.** Nothing reaches the client before the whole answer, so its "first token"
  is the answer: the deadline is the first-token part above plus `factor × high per-token
  time × max_tokens` (the request's limit, or the default a miner applies), bounded by
  `answer_cap_s`. Per-token time comes from streams (time after the first token over the
  tokens after it) and from whole answers (time over tokens, prefill included: an upper
  bound). Until the model has a per-token estimate the deadline is `answer_cap_s`; until it
  has a first-token estimate (non-streamed traffic only) the first-token part is the floor,
  scaled by prompt size, since whole-answer times already fold their prefill in.
* **Streamed, after the first token.** A silence longer than `stall_timeout_s` ends the stream.

A deadline only fails a request over when another miner could take it (or the miner is known
to be down): if every miner is slow, cutting each one off would turn slow answers into
errors, so an attempt with nowhere to go waits on, up to the cap. The same goes for a miner
that is taken out of service while requests wait for its first token: they move at once when
another miner can take them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

# RFC 6298's smoothing weights for the mean and the mean deviation.
_ALPHA = 0.125
_BETA = 0.25
# Observations before an estimate is trusted; until then the caps apply.
MIN_SAMPLES = 3


@dataclass(slots=True)
class Estimator:
    """A smoothed latency and its spread, as TCP estimates round-trip times (RFC 6298).

    `high()` is mean + 4 × mean deviation: a bound that ordinary samples stay under whatever
    the latency's scale, that widens when samples scatter and follows a drift within a few
    dozen samples. None until MIN_SAMPLES samples were seen.
    """

    mean: float = 0.0
    dev: float = 0.0
    samples: int = 0

    def observe(self, value: float) -> None:
        if self.samples == 0:
            self.mean, self.dev = value, value / 2
        else:
            self.dev += _BETA * (abs(value - self.mean) - self.dev)
            self.mean += _ALPHA * (value - self.mean)
        self.samples += 1

    def high(self) -> float | None:
        if self.samples < MIN_SAMPLES:
            return None
        return self.mean + 4 * self.dev


@dataclass(slots=True)
class ModelLatency:
    """What the gateway has seen of one model's speed, over all its miners."""

    first_token: Estimator = field(default_factory=Estimator)  # seconds, streams only
    per_token: Estimator = field(default_factory=Estimator)  # seconds per completion token
    prompt_bytes: float = 0.0  # smoothed request body size of the observations
    _sized: bool = False

    def _observe_size(self, prompt_bytes: int) -> None:
        if not self._sized:
            self.prompt_bytes, self._sized = float(prompt_bytes), True
        else:
            self.prompt_bytes += _ALPHA * (prompt_bytes - self.prompt_bytes)

    def observe_first_token(self, prompt_bytes: int, seconds: float) -> None:
        """A stream's time from sending the request to its first output event."""
        self._observe_size(prompt_bytes)
        self.first_token.observe(seconds)

    def observe_rest(self, seconds: float, tokens: int | None) -> None:
        """A finished stream's time after its first token, and its completion tokens."""
        if tokens is not None and tokens > 1:
            self.per_token.observe(seconds / (tokens - 1))

    def observe_answer(self, prompt_bytes: int, total_s: float, tokens: int | None) -> None:
        """A whole non-streamed answer: its time over its tokens bounds the per-token time."""
        self._observe_size(prompt_bytes)
        if tokens:
            self.per_token.observe(total_s / tokens)

    def prompt_scale(self, prompt_bytes: int) -> float:
        """How many times the recent average body this one is (1 at least)."""
        if not self._sized or self.prompt_bytes <= 0:
            return 1.0
        return max(1.0, prompt_bytes / self.prompt_bytes)


@dataclass(frozen=True, slots=True)
class DeadlineRule:
    """The deadlines of the module docstring; every argument is a GatewayConfig field."""

    floor_s: float
    cap_s: float
    factor: float
    answer_cap_s: float

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.cap_s:
            raise ValueError(
                f"the first-token timeout floor ({self.floor_s} s) must be positive and at most"
                f" its cap ({self.cap_s} s)"
            )
        if self.factor <= 0:
            raise ValueError(f"the first-token timeout factor must be positive, not {self.factor}")
        if self.answer_cap_s <= 0:
            raise ValueError(f"the answer timeout must be positive, not {self.answer_cap_s} s")

    def _clamp(self, seconds: float) -> float:
        return min(max(seconds, self.floor_s), self.cap_s)

    def first_token_s(self, latency: ModelLatency | None, prompt_bytes: int) -> float:
        """Seconds a stream may wait for its first token from one miner."""
        high = latency.first_token.high() if latency is not None else None
        if latency is None or high is None:
            return self.cap_s
        return self._clamp(self.factor * high * latency.prompt_scale(prompt_bytes))

    def answer_s(self, latency: ModelLatency | None, prompt_bytes: int, max_tokens: int) -> float:
        """Seconds a non-streamed request may wait for one miner's whole answer."""
        per_token = latency.per_token.high() if latency is not None else None
        if latency is None or per_token is None:
            return self.answer_cap_s
        first_high = latency.first_token.high()
        scale = latency.prompt_scale(prompt_bytes)
        if first_high is None:
            first = self._clamp(self.floor_s * scale)
        else:
            first = self._clamp(self.factor * first_high * scale)
        return min(first + self.factor * per_token * max(1, max_tokens), self.answer_cap_s)


class FirstTokenWatch:
    """Ends one attempt's wait for its first token by expiring the `asyncio.timeout` scope
    around that wait: at `deadline_s` if another miner could take the request (or this one is
    down), otherwise at `cap_s`; and at once when its miner is taken out of service while
    another could take the request. `reason` tells which ("deadline" or "miner_down")."""

    __slots__ = ("_can_fail_over", "_cap_at", "_handle", "_loop", "_miner_down", "_scope", "reason")

    def __init__(
        self,
        scope: asyncio.Timeout,
        deadline_s: float,
        cap_s: float,
        *,
        can_fail_over: Callable[[], bool],
        miner_down: Callable[[], bool],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope = scope
        self._can_fail_over = can_fail_over
        self._miner_down = miner_down
        now = self._loop.time()
        self._cap_at = now + max(cap_s, deadline_s)
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            now + deadline_s, self._on_deadline
        )
        self.reason: str | None = None

    def _fire(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._scope.reschedule(self._loop.time())

    def _on_deadline(self) -> None:
        self._handle = None
        if self._loop.time() >= self._cap_at or self._can_fail_over() or self._miner_down():
            self._fire("deadline")
        else:
            self._handle = self._loop.call_at(self._cap_at, self._on_deadline)

    def on_miner_down(self) -> None:
        """The pool took the miner out of service."""
        if self._can_fail_over():
            self._fire("miner_down")

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.reason = self.reason or "stopped"  # a late miner-down call does nothing now


class StallWatch:
    """Calls `on_stall` once when a read (between `reading()` and `idle()`) has waited
    `gap_s`. Costs two assignments per read and one timer per gap, not one per read."""

    __slots__ = ("_gap", "_handle", "_loop", "_on_stall", "_since", "fired")

    def __init__(self, gap_s: float, on_stall: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._gap = gap_s
        self._on_stall = on_stall
        self._since: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.fired = False

    def reading(self) -> None:
        self._since = self._loop.time()
        if self._handle is None and not self.fired:
            self._handle = self._loop.call_at(self._since + self._gap, self._check)

    def idle(self) -> None:
        self._since = None

    def _check(self) -> None:
        self._handle = None
        since = self._since
        if since is None:
            return  # not reading now; the next read arms the timer again
        due = since + self._gap
        if self._loop.time() >= due:
            self.fired = True
            self._on_stall()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
