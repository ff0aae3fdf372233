"""protocol.scoring: a miner's epoch score is quality × stake-backed effective workload; quality
is non-decreasing in latency, stability and accuracy; splitting a miner into k identities, with
its stake, never raises what they earn together; a failed audit costs more than the cheat it
caught could gain; allocations are integer wei summing exactly to the pool; the early-miner
multiplier follows its schedule and never falls below 1x."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import pytest
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.protocol.pricing import PPM
from infergrid.protocol.scoring import (
    DEFAULT_WEIGHTS,
    EarlyMinerSchedule,
    MinerObservation,
    ScoringWeights,
    accuracy,
    allocate,
    early_multiplier_ppm,
    effective_workload,
    latency,
    quality,
    score,
    score_shares_ppm,
    stability,
)

C = DEFAULT_WEIGHTS.stake_per_token_wei


def addr(i: int) -> str:
    return to_checksum_address("0x" + f"{i:040x}")


def observe(**changes: Any) -> MinerObservation:
    """A miner at the model's medians, always up, no errors, every audit passed, stake that
    backs its tokens."""
    base: dict[str, Any] = dict(
        miner=addr(1), verified_tokens=1_000_000, ttft_s=0.5, tpot_s=0.05, model_ttft_s=0.5,
        model_tpot_s=0.05, health_checks=1000, health_ok=1000, requests=2000, errors=0,
        audits_passed=100, audits_failed=0, stake_wei=1_000_000 * C,
    )  # fmt: skip
    base.update(changes)
    return MinerObservation(**base)


# -- weights and observations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"latency": -0.1}, "latency"),
        ({"stability": math.nan}, "stability"),
        ({"accuracy": math.inf}, "accuracy"),
        ({"latency": 0, "stability": 0, "accuracy": 0}, "sum to zero"),
        ({"accuracy_penalty": 0.5}, "accuracy_penalty"),
        ({"workload_exponent": 0}, "workload_exponent"),
        ({"workload_exponent": 1.5}, "workload_exponent"),
        ({"stake_per_token_wei": 0}, "stake_per_token_wei"),
        ({"stake_per_token_wei": 1.5}, "stake_per_token_wei"),
    ],
)
def test_weights_refuse_bad_values_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ScoringWeights(**changes)


def test_default_weights_are_published_and_frozen() -> None:
    assert DEFAULT_WEIGHTS.as_dict() == {
        "latency": 0.5, "stability": 1.0, "accuracy": 1.0, "accuracy_penalty": 4.0,
        "workload_exponent": 0.5, "stake_per_token_wei": 4 * 10**13,
    }  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_WEIGHTS.latency = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"miner": "0x1234"}, "miner"),
        ({"verified_tokens": -1}, "verified_tokens"),
        ({"stake_wei": 1.0}, "stake_wei"),
        ({"ttft_s": math.nan}, "ttft_s"),
        ({"tpot_s": -0.01}, "tpot_s"),
        ({"model_ttft_s": 0.0}, "model_ttft_s"),
        ({"health_ok": 1001}, "health_ok"),
        ({"errors": 2001}, "errors"),
        ({"audits_failed": True}, "audits_failed"),
    ],
)
def test_observations_refuse_impossible_values(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        observe(**changes)


# -- the factors -----------------------------------------------------------------------------


def test_a_miner_at_the_medians_always_up_and_never_failing_has_quality_one() -> None:
    obs = observe()
    assert latency(obs) == stability(obs) == accuracy(obs) == quality(obs) == 1.0
    assert score(obs) == 1_000_000


def test_latency_is_two_thirds_at_twice_the_medians_and_capped_at_one_below_them() -> None:
    assert latency(observe(ttft_s=1.0, tpot_s=0.1)) == pytest.approx(2 / 3)
    assert latency(observe(ttft_s=0.0, tpot_s=0.0)) == 1.0


def test_stability_is_uptime_times_one_minus_error_rate() -> None:
    assert stability(observe(health_ok=900, errors=100)) == pytest.approx(0.9 * 0.95)
    assert stability(observe(health_checks=0, health_ok=0)) == 0.0  # nothing vouches for it


def test_accuracy_loses_lambda_times_the_failure_rate_and_is_one_unaudited() -> None:
    assert accuracy(observe(audits_passed=90, audits_failed=10)) == pytest.approx(0.6)
    assert accuracy(observe(audits_passed=70, audits_failed=30)) == 0.0
    assert accuracy(observe(audits_passed=0, audits_failed=0)) == 1.0


def test_a_weight_of_zero_removes_its_dimension() -> None:
    slow = observe(ttft_s=5.0, tpot_s=0.5)
    assert quality(slow, ScoringWeights(latency=0.0)) == 1.0
    assert quality(slow) < 1.0


def test_effective_workload_is_the_tokens_when_stake_backs_them_and_concave_below() -> None:
    assert effective_workload(1000, 1000 * C) == 1000
    assert effective_workload(1000, 10**9 * C) == 1000  # extra stake earns nothing
    assert effective_workload(1000, 250 * C) == pytest.approx(500)  # sqrt(1000 * 250)
    assert effective_workload(0, 10 * C) == 0
    assert effective_workload(1000, 0) == 0
    assert effective_workload(1000, 0, ScoringWeights(workload_exponent=1.0)) == 1000
    # Concave in tokens at fixed stake: each further token adds less.
    gains = [effective_workload(t + 100, 100 * C) - effective_workload(t, 100 * C) for t in
             (100, 200, 400, 800)]  # fmt: skip
    assert gains == sorted(gains, reverse=True)


# -- properties ------------------------------------------------------------------------------

rates = st.integers(0, 1000)
ratios = st.floats(0.0, 20.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    ttft=ratios, tpot=ratios, ok=rates, errors=rates, failed=st.integers(0, 100),
    which=st.sampled_from(["ttft_s", "tpot_s", "health_ok", "errors", "audits_failed"]),
    step=st.floats(0.01, 5.0),
)  # fmt: skip
def test_quality_is_monotone_in_each_dimension(
    ttft: float, tpot: float, ok: int, errors: int, failed: int, which: str, step: float
) -> None:
    obs = observe(ttft_s=ttft, tpot_s=tpot * 0.1, health_ok=ok, errors=errors,
                  audits_passed=100, audits_failed=failed)  # fmt: skip
    worse: dict[str, Any] = {
        "ttft_s": obs.ttft_s + step,
        "tpot_s": obs.tpot_s + step * 0.1,
        "health_ok": max(0, obs.health_ok - 1 - int(step * 10)),
        "errors": min(obs.requests, obs.errors + 1 + int(step * 10)),
        "audits_failed": obs.audits_failed + 1,
    }
    other = dataclasses.replace(obs, **{which: worse[which]})
    assert 0.0 <= quality(other) <= quality(obs) <= 1.0
    assert score(other) <= score(obs)


@settings(max_examples=100, deadline=None)
@given(tokens=st.integers(0, 10**9), stake=st.integers(0, 10**9), more=st.integers(1, 10**9))
def test_score_is_non_decreasing_in_tokens_and_in_stake(tokens: int, stake: int, more: int) -> None:
    assert effective_workload(tokens + more, stake * C) >= effective_workload(tokens, stake * C)
    assert effective_workload(tokens, (stake + more) * C) >= effective_workload(tokens, stake * C)


@st.composite
def splits(draw: st.DrawFn) -> tuple[int, int, list[int], list[int]]:
    """A miner's (tokens, stake) and any split of both into k parts."""
    k = draw(st.integers(1, 16))
    tokens = draw(st.lists(st.integers(0, 10**8), min_size=k, max_size=k))
    stake = draw(st.lists(st.integers(0, 10**8), min_size=k, max_size=k))
    return sum(tokens), sum(stake), tokens, stake


@settings(max_examples=200, deadline=None)
@given(split=splits(), a=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_splitting_into_k_identities_with_the_stake_gains_nothing(
    split: tuple[int, int, list[int], list[int]], a: float
) -> None:
    tokens, stake, parts, stakes = split
    weights = ScoringWeights(workload_exponent=a, stake_per_token_wei=C)
    whole = effective_workload(tokens, stake * C, weights)
    pieces = sum(effective_workload(t, s * C, weights) for t, s in zip(parts, stakes, strict=True))
    assert pieces <= whole * (1 + 1e-12) + 1e-9


@settings(max_examples=50, deadline=None)
@given(k=st.integers(2, 16))
def test_a_sybil_earns_no_more_of_the_pool_than_the_miner_it_split(k: int) -> None:
    pool = 10**21
    others = {addr(100 + i): score(observe(miner=addr(100 + i))) for i in range(5)}
    big = observe(miner=addr(1), verified_tokens=4_000_000, stake_wei=1_000_000 * C)
    alone = allocate(pool, {**others, big.miner: score(big)})[big.miner]
    identities = {
        addr(1000 + i): score(observe(miner=addr(1000 + i), verified_tokens=4_000_000 // k,
                                      stake_wei=1_000_000 * C // k))
        for i in range(k)
    }  # fmt: skip
    split = allocate(pool, {**others, **identities})
    # An equal split is the break-even case: what floats round (1e-16 of a score) is all
    # that can differ.
    assert sum(split[a] for a in identities) <= alone + pool * 1e-12


def test_a_small_reliable_miner_earns_more_per_token_than_a_large_unreliable_one() -> None:
    small = observe(miner=addr(1), verified_tokens=100_000)
    large = observe(miner=addr(2), verified_tokens=10_000_000, stake_wei=10_000_000 * C,
                    ttft_s=0.75, tpot_s=0.075, health_ok=900, errors=100)  # fmt: skip
    rewards = allocate(10**18, {small.miner: score(small), large.miner: score(large)})
    per_token_small = rewards[small.miner] / small.verified_tokens
    per_token_large = rewards[large.miner] / large.verified_tokens
    assert per_token_small > 1.3 * per_token_large


def test_stake_beyond_what_backs_the_tokens_buys_no_share() -> None:
    backed = observe(miner=addr(1))
    whale = observe(miner=addr(2), stake_wei=10**6 * backed.stake_wei)
    rewards = allocate(10**18, {backed.miner: score(backed), whale.miner: score(whale)})
    assert rewards[backed.miner] == rewards[whale.miner] == 5 * 10**17


@pytest.mark.parametrize("d", [0.767, 0.862, 0.967, 1.0])
@pytest.mark.parametrize("f", [0.01, 0.1, 0.3, 0.6])
def test_cheating_loses_epoch_reward_even_if_the_saved_compute_serves_more(
    d: float, f: float
) -> None:
    """A miner cheating on a fraction f of its requests, detected with d, fails d·f of its
    audits; even if cheating cost nothing, so that it served 1/(1-f) times the tokens, its
    score falls."""
    honest = observe()
    audits = 10_000
    failed = round(audits * d * f)
    cheat = observe(verified_tokens=round(honest.verified_tokens / (1 - f)),
                    audits_passed=audits - failed, audits_failed=failed)  # fmt: skip
    assert score(cheat) < score(honest)


# -- allocations -----------------------------------------------------------------------------


def test_allocation_is_floor_shares_plus_largest_remainders_ties_to_the_lower_address() -> None:
    assert allocate(10, {addr(3): 1, addr(2): 1, addr(1): 1}) == {
        addr(3): 3, addr(2): 3, addr(1): 4,
    }  # fmt: skip
    assert allocate(100, {addr(1): 1, addr(2): 2, addr(3): 0}) == {
        addr(1): 33, addr(2): 67, addr(3): 0,
    }  # fmt: skip
    assert allocate(5, {addr(1): 0, addr(2): 0}) == {addr(1): 0, addr(2): 0}
    assert allocate(0, {addr(1): 5}) == {addr(1): 0}


def test_allocation_keys_are_checksummed_and_refuse_bad_input() -> None:
    upper = "0x" + "AB" * 20
    assert list(allocate(1, {upper: 1})) == [to_checksum_address(upper)]
    with pytest.raises(ValueError, match="twice"):
        allocate(1, {upper: 1, upper.lower(): 1})
    with pytest.raises(ValueError, match="negative"):
        allocate(1, {addr(1): -1})
    with pytest.raises(ValueError, match="finite"):
        allocate(1, {addr(1): math.inf})
    with pytest.raises(ValueError, match="not an address"):
        allocate(1, {"miner": 1})
    with pytest.raises(ValueError, match="pool_wei"):
        allocate(-1, {addr(1): 1})


@settings(max_examples=200, deadline=None)
@given(
    pool=st.integers(0, 10**27),
    values=st.lists(
        st.one_of(st.integers(0, 10**12), st.floats(0, 1e12), st.fractions(0, 10**6)),
        min_size=1, max_size=40,
    ),
)  # fmt: skip
def test_allocations_sum_exactly_are_proportional_and_deterministic(
    pool: int, values: list[int | float | Fraction]
) -> None:
    scores = {addr(i + 1): v for i, v in enumerate(values)}
    shares = allocate(pool, scores)
    assert shares == allocate(pool, dict(reversed(list(scores.items()))))
    total = sum(Fraction(v) for v in values)
    if total == 0:
        assert set(shares.values()) == {0}
        return
    assert sum(shares.values()) == pool
    for account, value in scores.items():
        exact = pool * Fraction(value) / total
        assert exact - 1 < shares[account] < exact + 1
        if value == 0:
            assert shares[account] == 0


def test_score_shares_are_ppm_rounded_down() -> None:
    shares = score_shares_ppm({addr(1): 1.0, addr(2): 2.0, addr(3): 0.5})
    assert shares == {addr(1): 285714, addr(2): 571428, addr(3): 142857}
    assert score_shares_ppm({addr(1): 0.0}) == {addr(1): 0}


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.integers(1, 10**9), min_size=1, max_size=16),
    others=st.lists(st.integers(0, 10**9), min_size=0, max_size=8),
)
def test_splitting_gains_nothing_from_the_rounding_of_reported_shares(
    parts: list[int], others: list[int]
) -> None:
    rest = {addr(100 + i): v for i, v in enumerate(others)}
    alone = score_shares_ppm({addr(1): sum(parts), **rest})[addr(1)]
    split = score_shares_ppm({**{addr(10 + i): v for i, v in enumerate(parts)}, **rest})
    assert sum(split[addr(10 + i)] for i in range(len(parts))) <= alone


# -- the early-miner multiplier --------------------------------------------------------------

GENESIS, PERIOD, MULT, DECAY = 1_700_000_000, 30 * 86400, 2 * PPM, 60 * 86400
END = GENESIS + PERIOD


def mult(registered_at: int, now: int) -> int:
    return early_multiplier_ppm(registered_at, GENESIS, PERIOD, MULT, DECAY, now)


def test_a_miner_registered_in_the_period_gets_the_full_multiplier_until_it_ends() -> None:
    assert mult(GENESIS, GENESIS) == MULT
    assert mult(END - 1, END - 1) == MULT


def test_the_multiplier_then_decays_linearly_to_1x() -> None:
    assert mult(GENESIS, END) == MULT
    assert mult(GENESIS, END + DECAY // 4) == 1_750_000
    assert mult(GENESIS, END + DECAY // 2) == 1_500_000
    assert mult(GENESIS, END + DECAY - 1) == PPM + 1  # the subtraction rounds down
    assert mult(GENESIS, END + DECAY) == PPM
    assert mult(GENESIS, END + 100 * DECAY) == PPM


def test_registering_at_or_after_the_period_end_or_never_earns_1x() -> None:
    assert mult(END, END) == PPM  # the period is [genesis, genesis + period)
    assert mult(END + 1, END + 5) == PPM
    assert mult(0, GENESIS) == PPM


def test_no_decay_drops_to_1x_when_the_period_ends() -> None:
    assert early_multiplier_ppm(GENESIS, GENESIS, PERIOD, MULT, 0, END - 1) == MULT
    assert early_multiplier_ppm(GENESIS, GENESIS, PERIOD, MULT, 0, END) == PPM


@settings(max_examples=200, deadline=None)
@given(
    registered=st.integers(GENESIS, END + DECAY), now=st.integers(GENESIS, END + 2 * DECAY),
    later=st.integers(0, 2 * DECAY), m=st.integers(PPM, 10 * PPM),
)  # fmt: skip
def test_the_multiplier_is_between_1x_and_the_maximum_and_never_rises(
    registered: int, now: int, later: int, m: int
) -> None:
    schedule = EarlyMinerSchedule(GENESIS, PERIOD, m, DECAY)
    value = schedule.multiplier_ppm_at(registered, now)
    assert PPM <= value <= m
    assert schedule.multiplier_ppm_at(registered, now + later) <= value


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((GENESIS, PERIOD, PPM - 1, DECAY), "multiplier_ppm"),
        ((GENESIS, PERIOD, 10 * PPM + 1, DECAY), "multiplier_ppm"),
        ((GENESIS, -1, MULT, DECAY), "early_period_s"),
        ((GENESIS, 11 * 365 * 86400, MULT, DECAY), "early_period_s"),
        ((GENESIS, PERIOD, MULT, 11 * 365 * 86400), "decay_s"),
        ((-5, PERIOD, MULT, DECAY), "genesis"),
        ((GENESIS, PERIOD, 1.5 * PPM, DECAY), "multiplier_ppm"),
    ],
)
def test_bad_schedules_are_refused(args: tuple[Any, ...], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EarlyMinerSchedule(*args)
    with pytest.raises(ValueError, match="registered_at"):
        mult(-1, GENESIS)
