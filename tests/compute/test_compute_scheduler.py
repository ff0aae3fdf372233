"""The scheduling policy (compute.scheduler) as a specification: filter, affinity, score and
power of two choices, the circuit breaker, hedging, shedding, developer preferences and
failover, all on a simulated clock."""

from __future__ import annotations

import math
import random

import pytest

from infergrid.compute.scheduler import (
    BreakerState,
    Cancelled,
    Failed,
    NoMiner,
    Picked,
    Price,
    RoutePreferences,
    RouteRequest,
    Scheduler,
    SchedulerConfig,
    Served,
    Shed,
    Sort,
    prefix_key,
)

MODEL = "tiny"
CHEAP = Price(1, 1)


def scheduler(**config: float) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), rng=random.Random(7))  # type: ignore[arg-type]


def add(s: Scheduler, miner: str, *, capacity: int = 4, price: Price = CHEAP, **kw: int) -> None:
    s.add_miner(miner, {MODEL: price}, capacity=capacity, **kw)  # type: ignore[arg-type]


def picked(decision: object) -> Picked:
    assert isinstance(decision, Picked), decision
    return decision


def serve(s: Scheduler, miner: str, ttft_s: float, now: float = 0.0, n: int = 1) -> None:
    """Teach the scheduler `n` answers of `miner` with the given time to first token."""
    for _ in range(n):
        p = picked(s.pick(RouteRequest(MODEL), now, exclude=set(s_miners(s)) - {miner}))
        s.release(p, now, Served(ttft_s, output_tokens=11, decode_s=0.1))


def s_miners(s: Scheduler) -> list[str]:
    return [m for m in ("a", "b", "c", "d") if s.get(m) is not None]


def fail(s: Scheduler, miner: str, now: float = 0.0, n: int = 1) -> None:
    for _ in range(n):
        p = picked(s.pick(RouteRequest(MODEL), now, exclude=set(s_miners(s)) - {miner}))
        s.release(p, now, Failed("HTTP 500"))


# -- filtering ---------------------------------------------------------------------------------


def test_a_model_nobody_serves_is_not_served() -> None:
    s = scheduler()
    add(s, "a")
    assert s.pick(RouteRequest("other"), 0.0) == NoMiner("other", "model_not_served")


def test_unhealthy_and_probation_miners_get_no_traffic() -> None:
    s = scheduler()
    add(s, "a")
    add(s, "b")
    add(s, "c")
    s.set_health("a", False)
    s.set_audit_record("b", passed=3, failed=1, probation=True)
    for _ in range(20):
        p = picked(s.pick(RouteRequest(MODEL), 0.0))
        assert p.miner_id == "c"
        s.release(p, 0.0, Cancelled())
    s.set_health("c", False)
    assert s.pick(RouteRequest(MODEL), 0.0) == NoMiner(MODEL, "none_eligible")
    s.set_health("a", True)
    assert picked(s.pick(RouteRequest(MODEL), 0.0)).miner_id == "a"


def test_a_miner_with_an_open_breaker_is_filtered() -> None:
    s = scheduler(breaker_failures=2)
    add(s, "a")
    add(s, "b")
    fail(s, "a", n=2)
    assert s.breaker_state("a", 0.0) is BreakerState.OPEN
    assert {picked(s.pick(RouteRequest(MODEL), 0.1)).miner_id for _ in range(4)} == {"b"}


def test_max_price_filters_and_says_so_when_nobody_fits() -> None:
    s = scheduler()
    add(s, "a", price=Price(10, 100))
    add(s, "b", price=Price(10, 20))
    cap = RoutePreferences(max_completion_wei=50)
    for _ in range(10):
        p = picked(s.pick(RouteRequest(MODEL, prefs=cap), 0.0))
        assert p.miner_id == "b"
        s.release(p, 0.0, Cancelled())
    too_low = RoutePreferences(max_prompt_wei=5)
    assert s.pick(RouteRequest(MODEL, prefs=too_low), 0.0) == NoMiner(MODEL, "none_within_price")


# -- score and power of two choices ---------------------------------------------------------------


def test_power_of_two_choices_takes_the_better_of_two() -> None:
    s = scheduler()
    add(s, "a")
    add(s, "b")
    serve(s, "a", 0.1, n=5)
    serve(s, "b", 2.0, n=5)
    chosen = []
    for _ in range(20):
        p = picked(s.pick(RouteRequest(MODEL), 1.0))
        chosen.append(p.miner_id)
        s.release(p, 1.0, Cancelled())
    assert chosen == ["a"] * 20


def test_load_errors_and_audit_failures_each_make_a_miner_worse() -> None:
    s = scheduler()
    add(s, "a")
    add(s, "b")
    request = RouteRequest(MODEL)
    a, b = s.get("a"), s.get("b")
    assert a is not None and b is not None
    assert s.score(a, request) == s.score(b, request)
    a.inflight = 2
    assert s.score(a, request) > s.score(b, request)
    a.inflight = 0
    a.error_rate = 0.2
    assert s.score(a, request) > s.score(b, request)
    a.error_rate = 0.0
    s.set_audit_record("a", passed=9, failed=1, probation=False)
    assert s.score(a, request) > s.score(b, request)
    s.set_audit_record("a", passed=10, failed=0, probation=False)
    b.stake_wei = 10**21
    assert s.score(b, request) < s.score(a, request)


def test_a_pick_reserves_a_slot_until_released_once() -> None:
    s = scheduler()
    add(s, "a", capacity=2)
    p = picked(s.pick(RouteRequest(MODEL), 0.0))
    assert s.get("a").inflight == 1  # type: ignore[union-attr]
    s.release(p, 0.0, Cancelled())
    assert s.get("a").inflight == 0  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already released"):
        s.release(p, 0.0, Cancelled())


# -- prefix affinity ---------------------------------------------------------------------------


def test_affinity_holds_while_the_home_miner_has_room_and_yields_under_load() -> None:
    s = scheduler(affinity_max_load=0.5)
    for m in ("a", "b", "c", "d"):
        add(s, m, capacity=4)
    key = prefix_key(b"You are a helpful assistant." * 10)
    request = RouteRequest(MODEL, prefix=key)
    first = picked(s.pick(request, 0.0))
    s.release(first, 0.1, Served(0.1, 5, 0.1))
    home = first.miner_id
    assert s.affinity_home(key, 0.2) == home
    held = [picked(s.pick(request, 0.2)) for _ in range(2)]
    assert [p.reason for p in held] == ["affinity", "affinity"]
    assert {p.miner_id for p in held} == {home}
    # Two of four slots taken: at the 0.5 load limit, the prefix goes elsewhere.
    spill = picked(s.pick(request, 0.3))
    assert spill.miner_id != home and spill.reason != "affinity"


def test_affinity_entries_expire_and_stay_bounded() -> None:
    s = scheduler(affinity_entries=3, affinity_ttl_s=10.0)
    add(s, "a")
    for key in range(5):
        p = picked(s.pick(RouteRequest(MODEL, prefix=key), 0.0))
        s.release(p, 0.0, Served(0.1))
    assert [s.affinity_home(k, 1.0) for k in range(5)] == [None, None, "a", "a", "a"]
    assert s.affinity_home(4, 11.0) is None


def test_prefix_key_hashes_the_shared_beginning_only() -> None:
    system = b"x" * 1024
    assert prefix_key(system + b"question 1") == prefix_key(system + b"question 2")
    assert prefix_key(b"a" + system) != prefix_key(system)
    with pytest.raises(ValueError, match="prefix length"):
        prefix_key(b"x", 0)


# -- the circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_probes_once_when_half_open_and_closes_on_success() -> None:
    s = scheduler(breaker_failures=3, breaker_cooldown_s=5.0)
    add(s, "a")
    add(s, "b")
    fail(s, "a", now=0.0, n=2)
    assert s.breaker_state("a", 0.0) is BreakerState.CLOSED
    fail(s, "a", now=0.0)
    assert s.breaker_state("a", 4.9) is BreakerState.OPEN
    assert s.breaker_state("a", 5.0) is BreakerState.HALF_OPEN
    probe = picked(s.pick(RouteRequest(MODEL), 5.0, exclude={"b"}))
    assert probe.probe and probe.miner_id == "a"
    # One probe at a time: the half-open miner takes nothing else meanwhile.
    assert {picked(s.pick(RouteRequest(MODEL), 5.0)).miner_id for _ in range(3)} == {"b"}
    s.release(probe, 5.5, Served(0.2))
    assert s.breaker_state("a", 5.5) is BreakerState.CLOSED


def test_a_failed_probe_reopens_with_a_doubled_cooldown() -> None:
    s = scheduler(breaker_failures=1, breaker_cooldown_s=5.0, breaker_cooldown_max_s=15.0)
    add(s, "a")
    fail(s, "a", now=0.0)
    for opened_at, cooldown in ((5.0, 10.0), (15.0, 15.0)):
        probe = picked(s.pick(RouteRequest(MODEL), opened_at))
        assert probe.probe
        s.release(probe, opened_at, Failed("HTTP 503"))
        assert s.breaker_state("a", opened_at + cooldown - 0.01) is BreakerState.OPEN
        assert s.breaker_state("a", opened_at + cooldown) is BreakerState.HALF_OPEN


def test_a_cancelled_probe_leaves_the_breaker_half_open_for_another() -> None:
    s = scheduler(breaker_failures=1, breaker_cooldown_s=1.0)
    add(s, "a")
    fail(s, "a")
    probe = picked(s.pick(RouteRequest(MODEL), 1.0))
    s.release(probe, 1.0, Cancelled())
    assert s.breaker_state("a", 1.0) is BreakerState.HALF_OPEN
    assert picked(s.pick(RouteRequest(MODEL), 1.0)).probe


# -- hedging ------------------------------------------------------------------------------------


def test_a_first_token_later_than_the_hedge_factor_times_the_ewma_is_hedged() -> None:
    s = scheduler(hedge_factor=3.0, hedge_min_s=0.1, ewma_alpha=1.0)
    add(s, "a")
    add(s, "b")
    serve(s, "a", 0.5)
    p = picked(s.pick(RouteRequest(MODEL), 10.0, exclude={"b"}))
    assert s.hedge_due_at(p) == pytest.approx(11.5)
    assert not s.should_hedge(p, 11.4, first_token_seen=False)
    assert not s.should_hedge(p, 11.6, first_token_seen=True)
    assert s.should_hedge(p, 11.6, first_token_seen=False)
    hedge = picked(s.pick(RouteRequest(MODEL), 11.6, exclude={p.miner_id}))
    assert hedge.miner_id == "b"


def test_hedging_waits_for_a_measurement_and_respects_its_budget() -> None:
    s = scheduler(hedge_budget=0.0, hedge_burst=1, hedge_min_s=0.1)
    add(s, "a")
    unmeasured = picked(s.pick(RouteRequest(MODEL), 0.0))
    assert s.hedge_due_at(unmeasured) is None
    s.release(unmeasured, 0.2, Served(0.2))
    first = picked(s.pick(RouteRequest(MODEL), 1.0))
    second = picked(s.pick(RouteRequest(MODEL), 1.0))
    assert s.should_hedge(first, 100.0, first_token_seen=False)
    assert not s.should_hedge(second, 100.0, first_token_seen=False)  # budget spent


# -- shedding -----------------------------------------------------------------------------------


def test_when_every_miner_is_at_capacity_the_request_is_shed_with_a_retry_after() -> None:
    s = scheduler(ewma_alpha=1.0, retry_after_min_s=0.5, default_output_tokens=11)
    add(s, "a", capacity=1)
    # Service time: 1.0 s to the first token + 10 tokens × 0.1 s = 2 s: 0.5 requests/s drain.
    p = picked(s.pick(RouteRequest(MODEL), 0.0))
    s.release(p, 2.0, Served(1.0, output_tokens=11, decode_s=1.0))
    busy = picked(s.pick(RouteRequest(MODEL), 2.0))
    shed = s.pick(RouteRequest(MODEL), 2.0)
    assert isinstance(shed, Shed)
    assert shed.retry_after_s == pytest.approx(2.0)  # one request backlog / 0.5 per second
    assert shed.retry_after_header == "2"
    again = s.pick(RouteRequest(MODEL), 2.0)
    assert isinstance(again, Shed) and again.retry_after_s == pytest.approx(4.0)
    s.release(busy, 3.0, Cancelled())
    assert isinstance(s.pick(RouteRequest(MODEL), 3.0), Picked)


def test_a_request_failing_over_is_not_shed_but_goes_where_there_is_most_room() -> None:
    s = scheduler()
    add(s, "a", capacity=1)
    add(s, "b", capacity=4)
    add(s, "c", capacity=2)
    held = [picked(s.pick(RouteRequest(MODEL), 0.0)) for _ in range(7)]  # every slot
    assert isinstance(s.pick(RouteRequest(MODEL), 0.0), Shed)  # a new request: shed
    # Requests that failed on "a" were admitted: each goes over capacity to the miner with
    # the most room for its size (b: 5/4 after one, so the next goes to c), never back to "a".
    first = s.pick(RouteRequest(MODEL), 0.0, exclude={"a"}, admitted=True)
    second = s.pick(RouteRequest(MODEL), 0.0, exclude={"a"}, admitted=True)
    assert isinstance(first, Picked) and isinstance(second, Picked)
    assert first.reason == second.reason == "overflow"
    assert {first.miner_id, second.miner_id} == {"b", "c"}
    assert isinstance(s.pick(RouteRequest(MODEL), 0.0, {"a", "b", "c"}, admitted=True), NoMiner)
    moved = second
    held.append(first)
    for p in [*held, moved]:
        s.release(p, 1.0, Cancelled())
    assert all(stats.inflight == 0 for stats in map(s.get, "abc") if stats is not None)


def test_retry_after_is_clamped() -> None:
    s = scheduler(retry_after_min_s=1.0, retry_after_max_s=3.0)
    add(s, "a", capacity=1)
    picked(s.pick(RouteRequest(MODEL), 0.0))
    delays = []
    for _ in range(10):
        shed = s.pick(RouteRequest(MODEL), 0.0)
        assert isinstance(shed, Shed)
        delays.append(shed.retry_after_s)
    assert min(delays) >= 1.0 and max(delays) == 3.0


# -- preferences --------------------------------------------------------------------------------


def test_preferences_parse_from_the_request_extension() -> None:
    prefs = RoutePreferences.parse({"max_price": {"prompt": 5, "completion": "7"}, "sort": "price"})
    assert prefs == RoutePreferences(max_prompt_wei=5, max_completion_wei=7, sort=Sort.PRICE)
    assert RoutePreferences.parse(None) == RoutePreferences()
    assert RoutePreferences.parse({}).sort is Sort.LATENCY


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("fast", "infergrid.route must be an object"),
        ({"sort": "fast"}, "infergrid.route.sort"),
        ({"speed": 1}, "infergrid.route has unknown field(s) speed"),
        ({"max_price": 5}, "infergrid.route.max_price must be an object"),
        ({"max_price": {"prompt": -1}}, "infergrid.route.max_price.prompt"),
        ({"max_price": {"completion": 1.5}}, "infergrid.route.max_price.completion"),
        ({"max_price": {"completion": True}}, "infergrid.route.max_price.completion"),
        ({"max_price": {"output": 1}}, "unknown field(s) output"),
    ],
)
def test_bad_preferences_are_a_value_error_naming_the_field(value: object, field: str) -> None:
    with pytest.raises(ValueError) as err:
        RoutePreferences.parse(value)
    assert field in str(err.value)


def test_sort_by_price_takes_the_cheapest_and_latency_among_equals() -> None:
    s = scheduler()
    add(s, "a", price=Price(1, 10))
    add(s, "b", price=Price(1, 3))
    add(s, "c", price=Price(1, 3))
    serve(s, "b", 2.0, n=3)
    serve(s, "c", 0.1, n=3)
    by_price = RouteRequest(MODEL, prefs=RoutePreferences(sort=Sort.PRICE))
    p = picked(s.pick(by_price, 1.0))
    assert (p.miner_id, p.reason) == ("c", "price")


# -- failover and determinism ------------------------------------------------------------------


def test_failover_picks_the_next_miner_excluding_those_tried() -> None:
    s = scheduler()
    for m in ("a", "b", "c"):
        add(s, m)
    tried: list[str] = []
    for _ in range(3):
        p = picked(s.pick(RouteRequest(MODEL), 0.0, exclude=tried))
        assert p.miner_id not in tried
        tried.append(p.miner_id)
        s.release(p, 0.0, Failed("broke before the first token"))
    assert sorted(tried) == ["a", "b", "c"]
    assert s.pick(RouteRequest(MODEL), 0.0, exclude=tried) == NoMiner(MODEL, "none_eligible")


def test_a_seed_fixes_every_decision() -> None:
    def run(seed: int) -> list[str]:
        s = Scheduler(rng=random.Random(seed))
        for n in range(50):
            s.add_miner(f"m{n}", {MODEL: CHEAP}, capacity=2)
        out = []
        for t in range(200):
            p = picked(s.pick(RouteRequest(MODEL), t * 0.01))
            out.append(p.miner_id)
            s.release(p, t * 0.01, Served(0.1 + int(p.miner_id[1:]) % 7 / 10))
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_bad_configuration_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="ewma_alpha"):
        SchedulerConfig(ewma_alpha=0)
    with pytest.raises(ValueError, match="affinity_max_load"):
        SchedulerConfig(affinity_max_load=1.5)
    s = scheduler()
    with pytest.raises(ValueError, match="capacity"):
        s.add_miner("a", {MODEL: CHEAP}, capacity=0)
    with pytest.raises(ValueError, match="serves no model"):
        s.add_miner("a", {}, capacity=1)
    with pytest.raises(ValueError, match="max_tokens"):
        RouteRequest(MODEL, max_tokens=0)


def test_a_miner_much_slower_than_the_model_typical_serves_only_what_others_cannot() -> None:
    s = scheduler(slow_factor=1.25, model_alpha=1.0)
    for m in ("a", "b", "c"):
        add(s, m, capacity=1)
    serve(s, "a", 5.0)  # slow
    serve(s, "b", 0.1)
    serve(s, "c", 0.1)  # last: the model's typical time is now c's
    held = []
    for _ in range(2):
        p = picked(s.pick(RouteRequest(MODEL), 1.0))
        assert p.miner_id in ("b", "c")
        held.append(p)
    # b and c are busy now: the slow miner is better than shedding.
    assert picked(s.pick(RouteRequest(MODEL), 1.0)).miner_id == "a"


def test_a_slow_home_miner_loses_its_prefixes() -> None:
    s = scheduler(slow_factor=1.25, model_alpha=1.0, ewma_alpha=1.0)
    add(s, "a")
    add(s, "b")
    key = 42
    home = picked(s.pick(RouteRequest(MODEL, prefix=key), 0.0, exclude={"b"}))
    s.release(home, 5.0, Served(5.0, output_tokens=11, decode_s=0.1))
    serve(s, "b", 0.1)
    assert s.affinity_home(key, 6.0) == "a"
    p = picked(s.pick(RouteRequest(MODEL, prefix=key), 6.0))
    assert (p.miner_id, p.reason) == ("b", "p2c")


def test_more_choices_take_the_best_of_more() -> None:
    s = scheduler(choices=4, sample_tries=64, slow_factor=100.0)
    for i, m in enumerate(("a", "b", "c", "d")):
        add(s, m)
        serve(s, m, 0.1 * (i + 1))
    for _ in range(10):
        p = picked(s.pick(RouteRequest(MODEL), 1.0))
        assert p.miner_id == "a"
        s.release(p, 1.0, Cancelled())
    with pytest.raises(ValueError, match="choices"):
        SchedulerConfig(choices=1)


def test_the_shed_backlog_forgets_at_the_pace_of_the_retry_after_it_hands_out() -> None:
    s = scheduler(ewma_alpha=1.0, model_alpha=1.0, shed_tau_s=1.0, default_output_tokens=11)
    add(s, "a", capacity=1)
    p = picked(s.pick(RouteRequest(MODEL), 0.0))
    s.release(p, 2.0, Served(1.0, output_tokens=11, decode_s=1.0))  # 2 s a request
    picked(s.pick(RouteRequest(MODEL), 2.0))
    first, second = s.pick(RouteRequest(MODEL), 2.0), s.pick(RouteRequest(MODEL), 2.0)
    assert isinstance(first, Shed) and isinstance(second, Shed)
    assert second.retry_after_s == pytest.approx(4.0)
    # 4 s later the clients told to wait 4 s are coming back: the backlog decays with the
    # 4 s retry interval (2/e + 1 requests), not with the 1 s floor of shed_tau_s.
    later = s.pick(RouteRequest(MODEL), 6.0)
    assert isinstance(later, Shed)
    assert later.retry_after_s == pytest.approx((2 / math.e + 1) / 0.5)
