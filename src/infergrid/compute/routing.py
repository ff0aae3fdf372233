"""The scheduler's vocabulary (compute.scheduler): what a request asks for, what the scheduler
decides, and what the gateway reports back about the attempt.

- asked: `RouteRequest` (model, token estimates, prompt-prefix key, `RoutePreferences`: the
  developer's maximum price and sort order from the request's `infergrid.route` extension);
- decided: `Picked` (a reserved slot on one miner), `Shed` (every eligible miner is at
  capacity: 429 with its `retry_after_s`) or `NoMiner` (why nobody can serve it);
- reported: `Served`, `Failed` or `Cancelled`, once per `Picked`;
- configured: `SchedulerConfig` (every number of the policy, validated), `Price`, `Sort`,
  `BreakerState`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "BreakerState",
    "Cancelled",
    "Decision",
    "Failed",
    "NoMiner",
    "Outcome",
    "Picked",
    "Price",
    "RoutePreferences",
    "RouteRequest",
    "SchedulerConfig",
    "Served",
    "Shed",
    "Sort",
    "prefix_key",
]


class Sort(StrEnum):
    """How a developer asks candidates to be ranked."""

    LATENCY = "latency"  # the policy's score: expected latency, load, reliability
    PRICE = "price"  # cheapest first, latency among equals


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Price:
    """A miner's price for one model, in wei per token."""

    prompt_wei: int
    completion_wei: int


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """The policy's parameters; the module docstring says what each one does."""

    ewma_alpha: float = 0.2
    error_alpha: float = 0.1
    model_alpha: float = 0.02  # the model-wide averages: many miners' samples, a slower EWMA
    default_ttft_s: float = 1.0  # before anything was measured for a model
    default_tpot_s: float = 0.05
    default_output_tokens: int = 256
    load_weight: float = 1.0
    error_weight: float = 4.0
    audit_weight: float = 2.0
    stake_weight: float = 0.05
    stake_ref_wei: int = 10**21  # 1,000 BTT: the stake at which half the stake bonus is earned
    choices: int = 2
    sample_tries: int = 8
    slow_factor: float = 1.25
    slow_margin_s: float = 0.02
    affinity_entries: int = 65536
    affinity_ttl_s: float = 600.0
    affinity_max_load: float = 0.75
    breaker_failures: int = 3
    breaker_cooldown_s: float = 5.0
    breaker_cooldown_max_s: float = 120.0
    hedge_factor: float = 3.0
    hedge_min_s: float = 0.25
    hedge_budget: float = 0.1
    hedge_burst: int = 10
    shed_tau_s: float = 1.0
    shed_drain_cache_s: float = 1.0
    retry_after_min_s: float = 1.0
    retry_after_max_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("ewma_alpha", "error_alpha", "model_alpha"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {value}")
        if self.slow_margin_s < 0:
            raise ValueError(f"slow_margin_s must not be negative, not {self.slow_margin_s}")
        for name in ("affinity_max_load", "hedge_budget"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {value}")
        if self.choices < 2:
            raise ValueError(f"choices must be at least 2, not {self.choices}")
        positive = (
            "default_ttft_s",
            "default_tpot_s",
            "default_output_tokens",
            "sample_tries",
            "slow_factor",
            "affinity_entries",
            "affinity_ttl_s",
            "breaker_failures",
            "breaker_cooldown_s",
            "hedge_factor",
            "shed_tau_s",
            "retry_after_min_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.breaker_cooldown_max_s < self.breaker_cooldown_s:
            raise ValueError("breaker_cooldown_max_s must be at least breaker_cooldown_s")
        if self.retry_after_max_s < self.retry_after_min_s:
            raise ValueError("retry_after_max_s must be at least retry_after_min_s")


# -- developer preferences -----------------------------------------------------------------------

_PREFS_FIELD = "infergrid.route"


def _wei(value: object, name: str) -> int:
    """A wei amount: a JSON integer or a decimal string (JSON numbers lose precision past
    2^53 in many clients), never negative, never a bool or float."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(
        f"{name} must be a non-negative integer in wei per token (a number or a decimal"
        f" string), not {value!r}"
    )


@dataclass(frozen=True, slots=True)
class RoutePreferences:
    """What a developer may ask of routing in the request's extension::

        {"infergrid": {"route": {"max_price": {"prompt": 1000, "completion": "2000"},
                                 "sort": "price"}}}

    `max_price` caps the miner's price per prompt and per completion token (wei; either may be
    left out); `sort` is "latency" (the default: the policy's score) or "price".
    """

    max_prompt_wei: int | None = None
    max_completion_wei: int | None = None
    sort: Sort = Sort.LATENCY

    @classmethod
    def parse(cls, value: object, *, field_name: str = _PREFS_FIELD) -> RoutePreferences:
        """Preferences from the extension's `route` object (None: the defaults).

        Raises ValueError naming the offending field, e.g. ``infergrid.route.sort``.
        """
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ValueError(f"{field_name} must be an object, not {type(value).__name__}")
        unknown = sorted(str(k) for k in value if k not in ("max_price", "sort"))
        if unknown:
            raise ValueError(
                f"{field_name} has unknown field(s) {', '.join(unknown)} (expected max_price, sort)"
            )
        sort = Sort.LATENCY
        if "sort" in value:
            raw = value["sort"]
            try:
                sort = Sort(raw)
            except ValueError:
                raise ValueError(
                    f"{field_name}.sort must be 'latency' or 'price', not {raw!r}"
                ) from None
        max_prompt = max_completion = None
        if "max_price" in value:
            price = value["max_price"]
            where = f"{field_name}.max_price"
            if not isinstance(price, Mapping):
                raise ValueError(f"{where} must be an object with prompt and/or completion")
            extra = sorted(str(k) for k in price if k not in ("prompt", "completion"))
            if extra:
                raise ValueError(
                    f"{where} has unknown field(s) {', '.join(extra)} (expected prompt, completion)"
                )
            if "prompt" in price:
                max_prompt = _wei(price["prompt"], f"{where}.prompt")
            if "completion" in price:
                max_completion = _wei(price["completion"], f"{where}.completion")
        return cls(max_prompt_wei=max_prompt, max_completion_wei=max_completion, sort=sort)

    def admits(self, price: Price) -> bool:
        """Whether a miner at `price` is within the maximum price."""
        if self.max_prompt_wei is not None and price.prompt_wei > self.max_prompt_wei:
            return False
        return self.max_completion_wei is None or price.completion_wei <= self.max_completion_wei


def prefix_key(prompt: bytes, length: int = 1024) -> int:
    """The affinity key of a prompt: a 64-bit hash of its first `length` bytes (the part a
    miner's prefix cache is likely to share between requests, such as a system prompt)."""
    if length <= 0:
        raise ValueError(f"prefix length must be positive, not {length}")
    digest = hashlib.blake2b(prompt[:length], digest_size=8).digest()
    return int.from_bytes(digest, "big")


# -- requests and results --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the policy needs to know of one request."""

    model: str
    prompt_tokens: int = 0  # an estimate is enough: it weighs prices
    max_tokens: int | None = None
    prefix: int | None = None  # prefix_key() of the prompt, for affinity
    prefs: RoutePreferences = field(default_factory=RoutePreferences)

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must not be negative, not {self.prompt_tokens}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, not {self.max_tokens}")


@dataclass(eq=False, slots=True)
class Picked:
    """A reserved slot on a miner; hand it back once with `Scheduler.release`."""

    miner_id: str
    request: RouteRequest
    started_at: float
    reason: str  # "affinity", "p2c", "only", "price"
    probe: bool = False  # the half-open breaker's one probe
    released: bool = False


@dataclass(frozen=True, slots=True)
class Shed:
    """Every eligible miner is at capacity: answer 429 with ``retry-after``."""

    model: str
    retry_after_s: float

    @property
    def retry_after_header(self) -> str:
        """The ``retry-after`` header's value: whole seconds, rounded up."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True, slots=True)
class NoMiner:
    """Nobody can take the request. `reason`: "model_not_served" (404), "none_eligible"
    (503: unhealthy, open breakers, probation, or all tried), "none_within_price" (the
    developer's maximum price leaves nobody: a 4xx naming infergrid.route.max_price)."""

    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class Served:
    """The attempt answered. `ttft_s`: request sent to first token; `decode_s`: time after the
    first token; `output_tokens`: completion tokens."""

    ttft_s: float
    output_tokens: int = 0
    decode_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Failed:
    """The attempt failed (an error, a broken connection, a missed first-token deadline)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The attempt was abandoned for no fault of the miner (a hedge that lost, a client that
    left): it frees the slot and teaches nothing."""


Outcome = Served | Failed | Cancelled
Decision = Picked | Shed | NoMiner
