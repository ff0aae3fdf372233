"""protocol.supply: emission shares follow demand, exactly and boundedly; splitting cannot gain."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.protocol.pricing import PPM
from infergrid.protocol.supply import (
    DEFAULT_SUPPLY,
    ModelDemand,
    SupplyParams,
    allocate_by_model,
    demand_from_network,
    emission_weights_ppm,
    model_weight,
)

A = "0x" + "11" * 20
B = "0x" + "22" * 20
C = "0x" + "33" * 20


def row(**fields: object) -> dict[str, object]:
    """A /v1/network models[] row as the gateway publishes it (docs in /v1/network)."""
    base: dict[str, object] = {
        "model": "SmolLM2-135M-Instruct",
        "model_id": "0x" + "ab" * 32,
        "miners": 2,
        "healthy": 2,
        "capacity": 16,
        "in_flight": 3,
        "requests": 120,
        "shed": 4,
        "tokens_requested": 40000,
        "tokens_served": 21000,
        "busy_slot_s": 410.5,
        "capacity_slot_s": 4800.0,
        "utilization": 0.0855,
        "price_wei": {"prompt": 1, "completion": 2},
        "reward_share_ppm": 612000,
    }
    base.update(fields)
    return base


def demand(
    model: str, served: int, *, busy: float = 0.0, capacity: float = 100.0, requests: int = 100,
    shed: int = 0,
) -> ModelDemand:  # fmt: skip
    return ModelDemand(model, requests, shed, served, served, busy, capacity)


# -- reading the gateway's rows ----------------------------------------------------------------


def test_a_network_row_is_read_with_its_utilization() -> None:
    d = ModelDemand.from_json(row())
    assert (d.model, d.requests, d.shed, d.tokens_served) == (
        "SmolLM2-135M-Instruct",
        120,
        4,
        21000,
    )
    assert d.utilization == pytest.approx(410.5 / 4800.0)
    assert ModelDemand.from_json(row(capacity_slot_s=0, busy_slot_s=0)).utilization == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requests", -1),
        ("shed", True),
        ("tokens_served", 1.5),
        ("tokens_requested", "40000"),
        ("busy_slot_s", -0.5),
        ("capacity_slot_s", float("inf")),
        ("capacity_slot_s", None),
        ("model", ""),
        ("model", 7),
    ],
)
def test_a_bad_field_is_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelDemand.from_json(row(**{field: value}))


@pytest.mark.parametrize("field", ["model", "requests", "shed", "tokens_served", "busy_slot_s"])
def test_a_missing_field_is_refused_by_name(field: str) -> None:
    data = row()
    del data[field]
    with pytest.raises(ValueError, match=f"{field} is missing"):
        ModelDemand.from_json(data)


def test_more_shed_than_requests_and_a_non_object_are_refused() -> None:
    with pytest.raises(ValueError, match="shed"):
        ModelDemand.from_json(row(requests=3, shed=4))
    with pytest.raises(ValueError, match="object"):
        ModelDemand.from_json([1, 2])


def test_a_whole_network_answer_is_read_by_model() -> None:
    body = {"object": "network", "models": [row(), row(model="other", shed=0)]}
    demands = demand_from_network(body)
    assert list(demands) == ["SmolLM2-135M-Instruct", "other"]
    assert demands["other"].shed == 0
    with pytest.raises(ValueError, match="not a network"):
        demand_from_network({"object": "list", "data": []})
    with pytest.raises(ValueError, match="models"):
        demand_from_network({"object": "network"})
    with pytest.raises(ValueError, match="twice"):
        demand_from_network({"object": "network", "models": [row(), row()]})
    with pytest.raises(ValueError, match="tokens_served"):
        demand_from_network({"object": "network", "models": [row(tokens_served=-3)]})


@pytest.mark.parametrize(
    "params",
    [
        {"target_utilization": 0},
        {"target_utilization": 1.5},
        {"shed_weight": -1},
        {"max_boost": 0.5},
        {"max_boost": float("nan")},
        {"floor_total_ppm": PPM},
        {"floor_total_ppm": 0.5},
    ],
)
def test_parameters_out_of_range_are_refused_by_name(params: dict[str, object]) -> None:
    (name,) = params
    with pytest.raises(ValueError, match=name):
        SupplyParams(**params)  # type: ignore[arg-type]


# -- the weights -----------------------------------------------------------------------------


def test_shares_move_toward_the_model_short_of_capacity() -> None:
    idle = demand("idle", 1000, busy=5, capacity=100)
    busy = demand("busy", 1000, busy=60, capacity=100)
    shedding = demand("shedding", 1000, busy=60, capacity=100, shed=20)
    weights = emission_weights_ppm([idle, busy, shedding])
    assert sum(weights.values()) == PPM
    assert weights["idle"] < weights["busy"] < weights["shedding"]


def test_a_model_nobody_asks_for_or_serves_gets_nothing() -> None:
    weights = emission_weights_ppm([demand("a", 500), ModelDemand("ghost")])
    assert weights == {"a": PPM, "ghost": 0}


def test_without_any_served_demand_every_weight_is_zero() -> None:
    starved = ModelDemand("starved", requests=10, shed=10, tokens_requested=900)
    assert emission_weights_ppm([starved, ModelDemand("idle", capacity_slot_s=50.0)]) == {
        "starved": 0,
        "idle": 0,
    }
    assert emission_weights_ppm([]) == {}


def test_the_boost_is_bounded_by_max_boost() -> None:
    # However starved, a model's token weighs less than max_boost tokens of an idle one.
    starved = demand("starved", 1000, busy=10**9, capacity=1, shed=100)
    assert model_weight(starved) < 4 * 1000
    assert model_weight(demand("idle", 1000)) == 1000
    at_target = demand("t", 1000, busy=50, capacity=100)  # pressure 1: boost (1 + G) / 2
    assert model_weight(at_target) == Fraction(2500)
    flat = SupplyParams(max_boost=1)
    assert model_weight(starved, flat) == 1000


def test_the_floor_is_a_fixed_total_shared_by_the_models_with_capacity() -> None:
    params = SupplyParams(floor_total_ppm=100_000)
    weights = emission_weights_ppm(
        [demand("a", 1000), demand("b", 0), demand("c", 0), ModelDemand("no-capacity")], params
    )
    assert sum(weights.values()) == PPM
    assert weights["b"] == weights["c"] == 33_333  # 100,000 in three parts, a has the 34
    assert weights["a"] == PPM - 66_666
    assert weights["no-capacity"] == 0


def test_a_model_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        emission_weights_ppm([demand("a", 1), demand("a", 2)])


# -- properties ------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**9)
seconds = st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False)


@st.composite
def model_demands(draw: st.DrawFn, name: str) -> ModelDemand:
    requests = draw(st.integers(min_value=0, max_value=10**6))
    return ModelDemand(
        name,
        requests,
        draw(st.integers(min_value=0, max_value=requests)),
        draw(counts),
        draw(counts),
        draw(seconds),
        draw(seconds),
    )


@st.composite
def markets(draw: st.DrawFn) -> list[ModelDemand]:
    n = draw(st.integers(min_value=1, max_value=6))
    return [draw(model_demands(f"model-{i}")) for i in range(n)]


@settings(max_examples=80, deadline=None)
@given(markets())
def test_weights_sum_exactly_when_anything_was_served(models: list[ModelDemand]) -> None:
    weights = emission_weights_ppm(models)
    assert set(weights) == {m.model for m in models}
    assert all(w >= 0 for w in weights.values())
    served = any(m.tokens_served for m in models)
    assert sum(weights.values()) == (PPM if served else 0)
    for m in models:
        if m.tokens_served == 0:
            assert weights[m.model] == 0


@settings(max_examples=80, deadline=None)
@given(markets())
def test_no_model_takes_more_than_its_served_demand_justifies(models: list[ModelDemand]) -> None:
    weights = emission_weights_ppm(models)
    total = sum(m.tokens_served for m in models)
    for m in models:
        if total:  # below G x its part of the tokens served, one ppm of rounding aside
            assert weights[m.model] <= 4 * PPM * m.tokens_served / total + 1


@settings(max_examples=80, deadline=None)
@given(
    markets(),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.integers(min_value=0, max_value=10**6),
)
def test_shares_are_monotone_in_shortage(
    models: list[ModelDemand], more_busy: float, more_shed: int
) -> None:
    first = models[0]
    pressed = ModelDemand(
        first.model, first.requests + more_shed, first.shed + more_shed, first.tokens_requested,
        first.tokens_served, first.busy_slot_s + more_busy, first.capacity_slot_s,
    )  # fmt: skip
    before = emission_weights_ppm(models)[first.model]
    after = emission_weights_ppm([pressed, *models[1:]])[first.model]
    assert after >= before
    assert model_weight(pressed) >= model_weight(first)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=2, max_value=10**6),
    st.integers(min_value=1, max_value=999),
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=1, max_value=10**6),
)
def test_higher_utilization_or_shed_is_strictly_heavier(
    served: int, busy_permille: int, shed: int, other: int
) -> None:
    low = demand("m", served, busy=busy_permille, capacity=1000)
    high = demand("m", served, busy=busy_permille + 1, capacity=1000)
    shedding = demand("m", served, busy=busy_permille, capacity=1000, shed=min(shed + 1, 100))
    assert model_weight(high) > model_weight(low)
    assert model_weight(shedding) > model_weight(low)


@settings(max_examples=80, deadline=None)
@given(markets(), st.integers(min_value=1, max_value=9))
def test_splitting_a_model_name_cannot_gain(models: list[ModelDemand], tenths: int) -> None:
    # The same traffic under two names, at the same utilization and shed fraction.
    first = models[0]
    part = Fraction(tenths, 10)
    halves = []
    for name, f in ((first.model + "-a", part), (first.model + "-b", 1 - part)):
        halves.append(
            ModelDemand(
                name, first.requests * 10, first.shed * 10, first.tokens_requested,
                int(first.tokens_served * 10 * f), first.busy_slot_s * float(f),
                first.capacity_slot_s * float(f),
            )
        )  # fmt: skip
    scaled = [
        ModelDemand(
            m.model, m.requests, m.shed, m.tokens_requested, m.tokens_served * 10, m.busy_slot_s,
            m.capacity_slot_s,
        )
        for m in models
    ]  # fmt: skip
    whole = emission_weights_ppm(scaled)[first.model]
    split = emission_weights_ppm([*halves, *scaled[1:]])
    assert split[first.model + "-a"] + split[first.model + "-b"] <= whole + 1


# -- allocations by model --------------------------------------------------------------------


def test_each_model_pool_goes_to_its_miners_by_share() -> None:
    weights = {"a": 750_000, "b": 250_000}
    result = allocate_by_model(
        1_000_000, {A: 600_000, B: 200_000, C: 200_000}, {A: ["a"], B: ["a", "b"], C: ["b"]},
        weights,
    )  # fmt: skip
    assert result.pools == {"a": 750_000, "b": 250_000}
    # a: A 600k vs B 100k (half of its share); b: B 100k vs C 200k.
    assert result.allocations == {
        A: 642_857,
        B: 107_143 + 83_333,
        C: 166_667,
    }
    assert sum(result.allocations.values()) == 1_000_000
    assert result.unpaid == {}


def test_a_model_whose_miners_have_no_share_leaves_its_pool_unpaid() -> None:
    result = allocate_by_model(
        1000, {A: 500_000, B: 0}, {A: ["a"], B: ["b"]}, {"a": 400_000, "b": 500_000, "c": 100_000}
    )
    assert result.allocations == {A: 400}
    assert result.unpaid == {"b": 500, "c": 100}
    assert result.unpaid_wei + sum(result.allocations.values()) == 1000


def test_the_early_multiplier_weighs_a_claim_within_its_model() -> None:
    result = allocate_by_model(
        900, {A: 500_000, B: 500_000}, {A: ["a"], B: ["a"]}, {"a": PPM}, {A: 2 * PPM}
    )
    assert result.allocations == {A: 600, B: 300}
    with pytest.raises(ValueError, match="multiplier"):
        allocate_by_model(900, {A: 1}, {A: ["a"]}, {"a": PPM}, {A: PPM - 1})


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="emission"):
        allocate_by_model(-1, {}, {}, {})
    with pytest.raises(ValueError, match="weight"):
        allocate_by_model(1, {}, {}, {"a": -1})
    with pytest.raises(ValueError, match="address"):
        allocate_by_model(1, {"nobody": 1}, {"nobody": ["a"]}, {"a": PPM})


addresses = st.sampled_from([A, B, C, "0x" + "44" * 20])
model_names = st.sampled_from(["a", "b", "c"])


@settings(max_examples=80, deadline=None)
@given(
    st.integers(min_value=0, max_value=10**24),
    st.dictionaries(addresses, st.integers(min_value=0, max_value=PPM // 4)),
    st.dictionaries(addresses, st.lists(model_names, max_size=3)),
    st.dictionaries(model_names, st.integers(min_value=0, max_value=PPM)),
)
def test_allocations_never_exceed_the_emission(
    emission: int,
    shares: dict[str, int],
    offers: dict[str, list[str]],
    weights: dict[str, int],
) -> None:
    result = allocate_by_model(emission, shares, offers, weights)
    paid = sum(result.allocations.values())
    assert all(v > 0 for v in result.allocations.values())
    if any(weights.values()):
        assert paid + result.unpaid_wei == emission
    else:
        assert paid == 0
    for miner in result.allocations:
        assert shares.get(miner, 0) > 0 and offers.get(miner)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=10**20), st.integers(min_value=1, max_value=PPM // 2))
def test_offering_another_model_spreads_a_share_it_does_not_multiply_it(
    emission: int, share: int
) -> None:
    # A miner alone in a model with all the weight: offering a second model it serves nothing
    # of moves half its claim there; it never gets more than when it offered one.
    alone = allocate_by_model(emission, {A: share, B: share}, {A: ["a"], B: ["a"]}, {"a": PPM})
    spread = allocate_by_model(
        emission, {A: share, B: share}, {A: ["a", "z"], B: ["a"]}, {"a": PPM, "z": 0}
    )
    assert spread.allocations.get(A, 0) <= alone.allocations[A]


def test_default_parameters_are_the_documented_ones() -> None:
    assert (
        DEFAULT_SUPPLY.target_utilization,
        DEFAULT_SUPPLY.shed_weight,
        DEFAULT_SUPPLY.max_boost,
        DEFAULT_SUPPLY.floor_total_ppm,
    ) == (0.5, 4.0, 4.0, 0)
