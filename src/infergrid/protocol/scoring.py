"""Epoch scoring: what each miner earns of an epoch's reward pool, and the early-miner multiplier.

Every role imports these rules and nothing else computes them: a verifier scores the miners it
observed (`score`), turns the scores into a share vector (`score_shares_ppm`) that it commits to
and reveals (protocol.consensus), the network pays the consensus shares times each miner's
early multiplier (`allocate`, `early_multiplier_ppm`), and anyone can recompute the result.

**The observation** (`MinerObservation`), per miner per epoch, from what gateways and verifiers
saw: verified tokens served (tokens of responses that passed every gateway check and were not
voided by a failed audit), the miner's median time to first token and time per output token
next to the model's median over all its miners, health checks answered of those sent, requests
and errors, audits passed and failed (canaries included), and the miner's bonded stake in wei.

**The score** of a miner is

    score = quality × effective_workload

    effective_workload = W^a × min(W, stake / c)^(1 − a)      (tokens; 0 when W = 0)
    quality            = latency^w_lat × stability^w_stab × accuracy^w_acc       in [0, 1]
    latency            = sqrt( 1/(1 + ttft/ttft_median) × 1/(1 + tpot/tpot_median) ) × 2
                         capped at 1 (a miner at the model's median scores 1; one twice as slow
                         on both 2/3; faster than the median earns no more than 1)
    stability          = uptime × (1 − error_rate)
    accuracy           = max(0, 1 − accuracy_penalty × failed / (passed + failed)), 1 unaudited

with W the verified tokens, `c = stake_per_token_wei` the stake that fully backs one token and
`a = workload_exponent` (`ScoringWeights` holds every number; the defaults are the published
ones). The exponents are weights: a dimension with weight 0 does not count, and each factor is
in [0, 1], so quality is too; it is non-decreasing in each dimension.

**Why this resists splitting.** `effective_workload(W, s)` is concave and homogeneous of degree
1 in (W, s): it is the minimum of W^a (s/c)^(1−a) (Cobb-Douglas) and W. Such a function is
superadditive: f(W1 + W2, s1 + s2) ≥ f(W1, s1) + f(W2, s2). So a miner that splits its tokens
and its stake among k identities, whatever the split, never scores more in total than the one
identity did (equal only when every identity keeps the same tokens-to-stake ratio), and since
the pool is shared in proportion to scores, the others' shares only grow. Quality does not
depend on size, so splitting leaves it as it was. What each gets:

- a **large miner** earns in proportion to its verified tokens, times its quality, as long as
  its stake backs them (stake ≥ c × W): no discount for size, but no more either, and stake
  beyond that backing earns nothing, so capital alone cannot buy a monopoly of rewards;
- an **under-staked miner** earns W^a (s/c)^(1−a) < W: concave in its tokens, so serving more
  than its stake can be slashed for pays less and less per token;
- a **small reliable miner** earns more per unit of compute than a large unreliable one,
  because quality multiplies its whole workload: uptime 0.9 with 5 % errors and latency 1.5x
  the median costs a large miner about a quarter of its reward per token (quality 0.76);
- a **Sybil** (one operator, k identities, its stake split) earns at most what it would as one
  identity: nothing to gain, and each identity must still post the registry's minimum stake.

No score can pay small miners more per token *because* they are small without paying a Sybil
for splitting: any per-identity term strictly concave in size rewards splitting. Small miners
win here by the quality of their service, which size does not buy.

**Accuracy.** A miner that cheats on a fraction f of its requests, at audit probability p and
detection d, fails about p·d·f·N of its p·N audits: a failure rate of d·f. Cheating saves at
most the compute of those requests, so it can serve at most 1/(1 − f) times the tokens;
effective workload grows at most as fast. Accuracy falls to (1 − λ·d·f)^w_acc, and since
(1 − λ·d·f) ≤ (1 − f) whenever λ·d ≥ 1, the product never exceeds 1: with λ = 4 (default) and
w_acc ≥ 1, any attack detected with d ≥ 0.25 loses epoch reward, before the slash (DESIGN §6)
even counts. `ScoringWeights` refuses λ × w_acc < 1. The failed audits' tokens are not verified
tokens either. Honest miners fail no audit (zero honest slashes is a hard rule), so the
penalty costs them nothing.

**Allocations** (`allocate`): integer wei proportional to the scores, summing exactly to the
pool: each account gets the floor of its exact share (rational arithmetic, no float rounding),
and the wei left over go one each to the largest remainders, ties broken by the lower address
(the 20-byte value). A zero score gets zero. Deterministic for the same inputs on any machine.

**Early-miner multiplier** (`early_multiplier_ppm`): a miner whose registration time lies in
[genesis, genesis + early_period) earns `multiplier_ppm` (1,000,000 = 1x) until the period
ends, then linearly less, to 1x after `decay_s` more seconds (integer maths, the subtraction
rounded down so the multiplier rounds up); 1x for every other miner and for an unregistered one
(registered_at 0). The NodeRegistry contract holds the schedule as immutable parameters
(`genesis`, `early_period`, `early_multiplier_ppm`, `early_decay`), visible to anyone, and
computes the same function on-chain (`early_multiplier_at`). The registration time must be one
that re-registering cannot move back into the period: either the address's first registration
(kept forever) or its current registration (reset by every register(), so leaving gives the
bonus up). Both mean a node registering after the period, new or returning, gets 1x.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from fractions import Fraction

from eth_utils import is_address, to_bytes, to_checksum_address

from infergrid.protocol.pricing import PPM

__all__ = [
    "DEFAULT_WEIGHTS",
    "MAX_EARLY_MULTIPLIER_PPM",
    "MAX_EARLY_SPAN_S",
    "EarlyMinerSchedule",
    "MinerObservation",
    "ScoringWeights",
    "accuracy",
    "allocate",
    "early_multiplier_ppm",
    "effective_workload",
    "latency",
    "quality",
    "score",
    "score_shares_ppm",
    "stability",
]

# Mirror MAX_EARLY_MULTIPLIER_PPM and MAX_EARLY_SPAN in NodeRegistry.vy.
MAX_EARLY_MULTIPLIER_PPM = 10 * PPM
MAX_EARLY_SPAN_S = 10 * 365 * 86400

Score = int | float | Fraction


def _finite(value: float, name: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        bound = f"[{low}, {high}]" if math.isfinite(high) else f">= {low} and finite"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ScoringWeights:
    """The published scoring parameters (see the module's formula).

    - `latency`, `stability`, `accuracy`: the exponents of the quality factors, each >= 0
      and finite, not all zero;
    - `accuracy_penalty` (λ): how many times the audit failure rate accuracy loses; λ times
      the accuracy exponent must be at least 1, so that a failed audit costs more reward than
      the cheat it caught could gain (module docstring);
    - `workload_exponent` (a): in (0, 1]; 1 ignores stake;
    - `stake_per_token_wei` (c): the stake that fully backs one verified token of an epoch,
      > 0. The default, 4·10^13 wei, is 40 times the default price of a prompt token (10^12
      wei): DESIGN §6's deterrence needs a stake of 2·(1/(p·d) − 1) ≈ 38 times the reward at
      risk at p = 0.05 with a 50 % slash.

    ValueError, naming the field, for anything else.
    """

    latency: float = 0.5
    stability: float = 1.0
    accuracy: float = 1.0
    accuracy_penalty: float = 4.0
    workload_exponent: float = 0.5
    stake_per_token_wei: int = 4 * 10**13

    def __post_init__(self) -> None:
        for name in ("latency", "stability", "accuracy", "accuracy_penalty"):
            _finite(getattr(self, name), f"weight {name!r}")
        if self.latency + self.stability + self.accuracy <= 0:
            raise ValueError(
                "weights 'latency', 'stability' and 'accuracy' sum to zero: quality would"
                " not depend on the service"
            )
        if self.accuracy * self.accuracy_penalty < 1:
            raise ValueError(
                f"weight 'accuracy_penalty' ({self.accuracy_penalty}) times 'accuracy'"
                f" ({self.accuracy}) must be at least 1, or a failed audit costs less than the"
                " cheat gains"
            )
        a = _finite(self.workload_exponent, "weight 'workload_exponent'", high=1.0)
        if a <= 0:
            raise ValueError("weight 'workload_exponent' must be in (0, 1], got 0")
        c = self.stake_per_token_wei
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise ValueError(f"weight 'stake_per_token_wei' must be a positive integer, got {c!r}")

    def as_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT_WEIGHTS = ScoringWeights()


@dataclass(frozen=True)
class MinerObservation:
    """What the network observed of one miner in one epoch.

    - `miner`: its registry address (stored checksummed);
    - `verified_tokens`: tokens of its responses that passed the gateway's checks and no
      failed audit voided;
    - `ttft_s`, `tpot_s`: its median time to first token and per output token (seconds, >= 0);
    - `model_ttft_s`, `model_tpot_s`: the model's medians over all its miners (> 0);
    - `health_checks`, `health_ok`: health checks sent to it and answered (ok <= sent);
    - `requests`, `errors`: requests routed to it and those that failed (errors <= requests);
    - `audits_passed`, `audits_failed`: audit verdicts on its responses, canaries included;
    - `stake_wei`: its bonded stake.

    ValueError naming the field for a negative, non-finite or impossible value.
    """

    miner: str
    verified_tokens: int
    ttft_s: float
    tpot_s: float
    model_ttft_s: float
    model_tpot_s: float
    health_checks: int
    health_ok: int
    requests: int
    errors: int
    audits_passed: int
    audits_failed: int
    stake_wei: int

    def __post_init__(self) -> None:
        if not isinstance(self.miner, str) or not is_address(self.miner):
            raise ValueError(f"observation: 'miner' {self.miner!r} is not an address")
        object.__setattr__(self, "miner", to_checksum_address(self.miner))
        for name in (
            "verified_tokens", "health_checks", "health_ok", "requests", "errors",
            "audits_passed", "audits_failed", "stake_wei",
        ):  # fmt: skip
            _count(getattr(self, name), f"observation: {name!r}")
        for name in ("ttft_s", "tpot_s"):
            _finite(getattr(self, name), f"observation: {name!r}")
        for name in ("model_ttft_s", "model_tpot_s"):
            if _finite(getattr(self, name), f"observation: {name!r}") <= 0:
                raise ValueError(f"observation: {name!r} must be positive")
        if self.health_ok > self.health_checks:
            raise ValueError(
                f"observation: 'health_ok' ({self.health_ok}) exceeds 'health_checks'"
                f" ({self.health_checks})"
            )
        if self.errors > self.requests:
            raise ValueError(
                f"observation: 'errors' ({self.errors}) exceeds 'requests' ({self.requests})"
            )

    @property
    def uptime(self) -> float:
        """Health checks answered of those sent; 0 when none was sent (nothing vouches)."""
        return self.health_ok / self.health_checks if self.health_checks else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def audit_failure_rate(self) -> float:
        audits = self.audits_passed + self.audits_failed
        return self.audits_failed / audits if audits else 0.0


def latency(obs: MinerObservation) -> float:
    """The latency factor in [0, 1]: 1 at or below the model's medians, 2/3 at twice them, → 0
    as the miner slows; non-increasing in TTFT and in time per output token."""
    ttft = 2.0 / (1.0 + obs.ttft_s / obs.model_ttft_s)
    tpot = 2.0 / (1.0 + obs.tpot_s / obs.model_tpot_s)
    return min(1.0, math.sqrt(ttft * tpot))


def stability(obs: MinerObservation) -> float:
    """uptime × (1 − error rate), in [0, 1]."""
    return obs.uptime * (1.0 - obs.error_rate)


def accuracy(obs: MinerObservation, weights: ScoringWeights = DEFAULT_WEIGHTS) -> float:
    """max(0, 1 − λ × audit failure rate), in [0, 1]; 1 with no audit this epoch (a miner
    with so few requests that none was audited has almost no workload to be paid for)."""
    return max(0.0, 1.0 - weights.accuracy_penalty * obs.audit_failure_rate)


def quality(obs: MinerObservation, weights: ScoringWeights = DEFAULT_WEIGHTS) -> float:
    """latency^w_lat × stability^w_stab × accuracy^w_acc, in [0, 1] (0^0 counts as 1: a
    dimension of weight 0 does not count)."""
    value = 1.0
    for factor, weight in (
        (latency(obs), weights.latency),
        (stability(obs), weights.stability),
        (accuracy(obs, weights), weights.accuracy),
    ):
        if weight:
            value *= factor**weight
    return value


def effective_workload(
    tokens: int, stake_wei: int, weights: ScoringWeights = DEFAULT_WEIGHTS
) -> float:
    """W^a × min(W, stake / c)^(1 − a): W when the stake backs every token, less (concave in W)
    when it does not; 0 for no tokens or no stake (unless a = 1). Homogeneous of degree 1 and
    superadditive in (tokens, stake): splitting never raises the total."""
    _count(tokens, "tokens")
    _count(stake_wei, "stake_wei")
    if tokens == 0:
        return 0.0
    a = weights.workload_exponent
    if a == 1.0:
        return float(tokens)
    backed = min(float(tokens), stake_wei / weights.stake_per_token_wei)
    if backed <= 0.0:
        return 0.0
    return tokens**a * backed ** (1.0 - a)


def score(obs: MinerObservation, weights: ScoringWeights = DEFAULT_WEIGHTS) -> float:
    """quality × effective workload, >= 0: the miner's claim on the epoch's pool."""
    return quality(obs, weights) * effective_workload(obs.verified_tokens, obs.stake_wei, weights)


# -- allocations -----------------------------------------------------------------------------


def _address_key(address: str) -> bytes:
    return to_bytes(hexstr=address)


def _normalized(scores: Mapping[str, Score]) -> dict[str, Fraction]:
    out: dict[str, Fraction] = {}
    for account, value in scores.items():
        if not isinstance(account, str) or not is_address(account):
            raise ValueError(f"allocation: {account!r} is not an address")
        key = to_checksum_address(account)
        if key in out:
            raise ValueError(f"allocation: {key} appears twice (differently cased)")
        if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
            raise ValueError(f"allocation: the score of {key} is not a number: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"allocation: the score of {key} is not finite: {value!r}")
        exact = Fraction(value)
        if exact < 0:
            raise ValueError(f"allocation: the score of {key} is negative: {value!r}")
        out[key] = exact
    return out


def allocate(pool_wei: int, scores: Mapping[str, Score]) -> dict[str, int]:
    """Split `pool_wei` among the accounts in proportion to their scores, in integer wei that
    add up to the pool exactly (largest remainder; ties to the lower address), keyed by the
    checksummed address, every account present (zero for a zero score). With no positive
    score nothing is paid: every account gets 0 (the pool stays where it is).

    Scores may be ints, floats or Fractions; they are used exactly. ValueError for a negative
    or non-finite score, a bad or repeated address, or a negative pool.
    """
    _count(pool_wei, "pool_wei")
    exact = _normalized(scores)
    total = sum(exact.values(), Fraction(0))
    if total == 0:
        return dict.fromkeys(exact, 0)
    shares: dict[str, int] = {}
    remainders: list[tuple[Fraction, bytes, str]] = []
    for account, value in exact.items():
        share = pool_wei * value / total
        whole = share.numerator // share.denominator
        shares[account] = whole
        if value:
            remainders.append((share - whole, _address_key(account), account))
    left = pool_wei - sum(shares.values())
    # Largest remainder first; the lower address first among equal remainders.
    remainders.sort(key=lambda item: (-item[0], item[1]))
    for _, _, account in remainders[:left]:
        shares[account] += 1
    return shares


def score_shares_ppm(scores: Mapping[str, Score]) -> dict[str, int]:
    """A verifier's report: each miner's share of the epoch in ppm, rounded down (so the
    shares sum to at most 1,000,000; all zeros when no score is positive).

    Down, not to the largest remainder: the floors of k parts never add up to more than the
    floor of their sum, so splitting a miner cannot win ppm from the rounding either (largest
    remainder would hand up to one ppm to each identity). The ppm lost are not lost to the
    miners: they are paid in proportion to the consensus shares, whatever these sum to."""
    exact = _normalized(scores)
    total = sum(exact.values(), Fraction(0))
    if total == 0:
        return dict.fromkeys(exact, 0)
    return {account: int(PPM * value / total) for account, value in exact.items()}


# -- the early-miner multiplier --------------------------------------------------------------


def _uint(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**256:
        raise ValueError(f"early multiplier: {name} must be a uint256, got {value!r}")
    return value


@dataclass(frozen=True)
class EarlyMinerSchedule:
    """The contract's early-miner parameters: `genesis` (unix seconds, its deployment),
    `early_period_s`, `multiplier_ppm` (1,000,000 = 1x; from 1x to 10x) and `decay_s` (each
    span at most ten years). ValueError naming the parameter otherwise."""

    genesis: int
    early_period_s: int
    multiplier_ppm: int
    decay_s: int

    def __post_init__(self) -> None:
        for name in ("genesis", "early_period_s", "multiplier_ppm", "decay_s"):
            _uint(getattr(self, name), name)
        if not PPM <= self.multiplier_ppm <= MAX_EARLY_MULTIPLIER_PPM:
            raise ValueError(
                f"early multiplier: multiplier_ppm must be between {PPM} (1x) and"
                f" {MAX_EARLY_MULTIPLIER_PPM} (10x), got {self.multiplier_ppm}"
            )
        for name in ("early_period_s", "decay_s"):
            if getattr(self, name) > MAX_EARLY_SPAN_S:
                raise ValueError(
                    f"early multiplier: {name} must be at most {MAX_EARLY_SPAN_S} s (ten"
                    f" years), got {getattr(self, name)}"
                )

    @property
    def period_end(self) -> int:
        return self.genesis + self.early_period_s

    def multiplier_ppm_at(self, registered_at: int, now: int) -> int:
        """`early_multiplier_ppm` under this schedule."""
        _uint(registered_at, "registered_at")
        _uint(now, "now")
        end = self.period_end
        if registered_at == 0 or registered_at >= end or self.multiplier_ppm == PPM:
            return PPM
        if now < end:
            return self.multiplier_ppm
        elapsed = now - end
        if elapsed >= self.decay_s:
            return PPM
        return self.multiplier_ppm - (self.multiplier_ppm - PPM) * elapsed // self.decay_s


def early_multiplier_ppm(
    registered_at: int,
    genesis: int,
    early_period_s: int,
    multiplier_ppm: int,
    decay_s: int,
    now: int,
) -> int:
    """A miner's reward multiplier in ppm at time `now` (module docstring): `multiplier_ppm`
    for a registration in [genesis, genesis + early_period_s) until the period ends, then
    falling linearly to 1,000,000 over `decay_s` seconds, never below; 1,000,000 for anyone
    else and for registered_at 0 (not registered). Equal to NodeRegistry.early_multiplier_at.
    """
    schedule = EarlyMinerSchedule(genesis, early_period_s, multiplier_ppm, decay_s)
    return schedule.multiplier_ppm_at(registered_at, now)
