"""The standby tier (compute.standby): as many active miners per model as the load needs."""

from __future__ import annotations

import pytest

from infergrid.compute.standby import StandbyConfig, StandbyTier

MINERS = [("a", 4), ("b", 4), ("c", 4), ("d", 4)]  # best first, four slots each


def tier(**options: float) -> StandbyTier:
    return StandbyTier(StandbyConfig(alpha=1.0, **options))  # type: ignore[arg-type]


def test_an_idle_model_keeps_its_two_best_miners_active() -> None:
    t = tier()
    t.update("m", MINERS, inflight=0, now=0.0)
    assert t.active("m") == ["a", "b"] and t.parked("m") == {"c", "d"}
    t.update("m", MINERS[:1], inflight=0, now=1.0)  # fewer miners than min_active: all
    assert t.active("m") == ["a"] and t.parked("m") == set()


def test_rising_load_activates_the_best_parked_one_update_at_a_time() -> None:
    t = tier()
    t.update("m", MINERS, inflight=0, now=0.0)
    t.update("m", MINERS, inflight=7, now=1.0)  # 7 of 8 slots: above 0.7
    assert t.active("m") == ["a", "b", "c"]
    t.update("m", MINERS, inflight=11, now=2.0)  # 11 of 12
    assert t.parked("m") == set()
    t.update("m", MINERS, inflight=16, now=3.0)  # nothing left to activate
    assert len(t.active("m")) == 4


def test_falling_load_parks_the_worst_only_after_a_sustained_lull() -> None:
    t = tier(park_after_s=60.0)
    t.update("m", MINERS, inflight=0, now=0.0)
    for now, inflight in ((1.0, 7), (2.0, 11)):
        t.update("m", MINERS, inflight=inflight, now=now)
    assert len(t.active("m")) == 4
    t.update("m", MINERS, inflight=1, now=10.0)  # the lull starts
    t.update("m", MINERS, inflight=1, now=40.0)
    t.update("m", MINERS, inflight=9, now=50.0)  # a burst in between: the clock restarts
    t.update("m", MINERS, inflight=1, now=60.0)
    t.update("m", MINERS, inflight=1, now=110.0)
    assert len(t.active("m")) == 4
    t.update("m", MINERS, inflight=1, now=121.0)  # 61 s of lull
    assert t.parked("m") == {"d"}  # the worst one
    t.update("m", MINERS, inflight=0, now=182.0)
    t.update("m", MINERS, inflight=0, now=500.0)
    assert t.active("m") == ["a", "b"]  # never below min_active


def test_a_full_tier_activates_at_once_and_departed_miners_leave_it() -> None:
    t = tier()
    t.update("m", MINERS, inflight=0, now=0.0)
    assert t.activate("m") and t.active("m") == ["a", "b", "c"]
    t.update("m", [("b", 4), ("c", 4), ("d", 4)], inflight=0, now=1.0)  # "a" is down
    assert t.active("m") == ["b", "c"] and t.parked("m") == {"d"}
    assert not tier().activate("unknown")
    assert tier().parked("unknown") == set()  # before any update nothing is parked


@pytest.mark.parametrize(
    "options",
    [
        {"min_active": 0},
        {"park_below": 0.8, "activate_above": 0.7},
        {"park_after_s": -1.0},
        {"activate_above": 1.5},
    ],
)
def test_nonsense_configurations_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StandbyConfig(**options)  # type: ignore[arg-type]
