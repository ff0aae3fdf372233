"""Routing and body rules as pure logic: MinerPool and the relay transformations."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest

from infergrid.app import relay
from infergrid.app.miners import (
    QUEUE_FACTOR,
    MinerPool,
    MinerState,
    ModelNotServed,
    NetworkSaturated,
    NoHealthyMiner,
    NoMinerWithinPrice,
    declared_concurrency,
    health_ok,
)
from infergrid.compute.routing import (
    Cancelled,
    Failed,
    RoutePreferences,
    RouteRequest,
    Served,
)
from infergrid.protocol import json_body
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.wire import EXTENSION_KEY


def node(
    n: int, *models: str, role: Role = Role.MINER, active: bool = True, port: int = 0
) -> NodeRecord:
    offers = tuple(ModelOffer(m, model_id(m), 1, 1) for m in models)
    return NodeRecord(
        owner=f"0x{n:040x}",
        role=role,
        endpoint=f"http://127.0.0.1:{port or 9000 + n}/",
        signer=f"0x{n:040x}",
        models=offers,
        active=active,
    )


def model_id(name: str) -> str:
    return "0x" + name.encode().hex().rjust(64, "0")


def healthy_pool(*records: NodeRecord, **options: Any) -> MinerPool:
    pool = MinerPool(rng=random.Random(0), **options)
    for state in pool.update(records):
        pool.set_health(state, True, rtt_ms=1.0)
    return pool


def owner(state: MinerState) -> int:
    return int(state.owner, 16)


def test_update_keeps_only_active_miners_with_models() -> None:
    pool = MinerPool()
    new = pool.update(
        [
            node(1, "a"),
            node(2, "a", role=Role.VERIFIER),
            node(3, "a", active=False),
            node(4),  # serves nothing
            node(5, "b", "a"),
        ]
    )
    assert sorted(owner(s) for s in new) == [1, 5]
    assert [m for m, _ in pool.models()] == ["a", "b"]
    assert pool.get(node(1).owner).base_url == "http://127.0.0.1:9001"  # trailing slash dropped


def test_unchecked_and_unhealthy_get_no_traffic() -> None:
    pool = MinerPool()
    pool.update([node(1, "a"), node(2, "a")])
    with pytest.raises(NoHealthyMiner):
        pool.pick("a")  # nobody health-checked yet
    one, two = pool.miners()
    pool.set_health(one, True)
    pool.set_health(two, False, error="down")
    for _ in range(10):
        slot = pool.pick("a")
        assert slot.miner is one
        pool.release(slot, Served(ttft_s=0.1))
    pool.mark_unreachable(one, "refused")
    with pytest.raises(NoHealthyMiner):
        pool.pick("a")


def test_model_filter_and_unknown_model() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "b"))
    assert owner(pool.pick("a").miner) == 1
    assert owner(pool.pick("b").miner) == 2
    assert owner(pool.pick(model_id("b")).miner) == 2  # pinned by protocol id
    assert [name for name, _ in pool.models()] == ["a", "b"]  # names only
    with pytest.raises(ModelNotServed):
        pool.pick("c")


def test_a_loaded_miner_loses_to_an_idle_one() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    held = [pool.pick("a") for _ in range(3)]
    # Power of two choices over two miners compares both: the less loaded wins each time.
    assert sorted(s.inflight for s in pool.miners()) == [1, 2]
    lighter = min(pool.miners(), key=lambda s: s.inflight)
    assert pool.pick("a").miner is lighter
    for slot in held:
        pool.release(slot, Cancelled())
    assert sum(s.inflight for s in pool.miners()) == 1


def test_equal_miners_share_and_a_faster_one_wins() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    picks: set[int] = set()
    for _ in range(50):
        slot = pool.pick("a")
        picks.add(owner(slot.miner))
        pool.release(slot, Cancelled())
    assert picks == {1, 2}  # equal miners share sequential traffic
    one, two = pool.miners()
    for state, ttft in ((one, 2.0), (two, 0.2)):
        slot = pool.pick("a", [s for s in pool.miners() if s is not state])
        pool.release(slot, Served(ttft_s=ttft, output_tokens=10, decode_s=ttft))
    ttft = {s.owner: pool.scheduler.get(s.owner).ttft.value for s in (one, two)}  # type: ignore[union-attr]
    assert ttft == {one.owner: 2.0, two.owner: 0.2}
    fastest = set()
    for _ in range(50):
        slot = pool.pick("a")
        fastest.add(owner(slot.miner))
        pool.release(slot, Cancelled())
    assert fastest == {2}


def test_exclude_for_failover() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    first = pool.pick("a").miner
    second = pool.pick("a", [first]).miner
    assert second is not first
    with pytest.raises(NoHealthyMiner):
        pool.pick("a", [first, second])


def test_repeated_failures_open_the_breaker_until_a_probe_succeeds() -> None:
    now = [1000.0]
    pool = healthy_pool(node(1, "a"), clock=lambda: now[0])
    [state] = pool.miners()
    down: list[str] = []
    state.down_watchers.add(lambda: down.append("down"))
    for _ in range(pool.scheduler_config.breaker_failures):
        pool.release(pool.pick("a"), Failed("HTTP 500"))
    assert down == ["down"] and not pool.can_serve("a")
    with pytest.raises(NoHealthyMiner):
        pool.pick("a")
    pool.set_health(state, True)  # answering /health does not close a breaker
    with pytest.raises(NoHealthyMiner):
        pool.pick("a")
    now[0] += pool.scheduler_config.breaker_cooldown_s
    probe = pool.pick("a")  # half-open: one probe, and the rest wait for it
    with pytest.raises(NetworkSaturated):
        pool.pick("a")
    pool.release(probe, Served(ttft_s=0.1))
    pool.release(pool.pick("a"), Served(ttft_s=0.1))  # closed again


def test_a_miner_full_to_its_declared_capacity_sheds_with_a_retry_after() -> None:
    pool = MinerPool(rng=random.Random(0))
    [state] = pool.update([node(1, "a")])
    pool.set_health(state, True, max_concurrency=2)
    assert state.capacity == 2 * QUEUE_FACTOR
    held = [pool.pick("a") for _ in range(state.capacity)]
    with pytest.raises(NetworkSaturated) as shed:
        pool.pick("a")
    assert int(shed.value.retry_after) >= 1
    pool.release(held.pop(), Served(ttft_s=0.5, output_tokens=4, decode_s=0.3))
    held.append(pool.pick("a"))  # a slot came free
    # A miner that declares more later gets the room at once.
    pool.set_health(state, True, max_concurrency=3)
    held.append(pool.pick("a"))
    assert state.inflight == len(held) == 5


@pytest.mark.parametrize(
    ("payload", "declared"),
    [
        ({"max_concurrency": 8}, 8),
        ({"max_concurrency": 0}, None),
        ({"max_concurrency": True}, None),
        ({"max_concurrency": "8"}, None),
        ({"max_concurrency": 10**9}, None),
        ({}, None),
        ([], None),
    ],
)
def test_declared_concurrency_takes_only_a_sane_integer(payload: object, declared: int) -> None:
    assert declared_concurrency(payload) == declared


def test_a_miner_with_failed_audits_loses_to_a_clean_one() -> None:
    pool = MinerPool(rng=random.Random(0))
    pool.set_audit_record(node(2).owner, passed=1, failed=1)  # before discovery: kept
    for state in pool.update([node(1, "a"), node(2, "a")]):
        pool.set_health(state, True)
    chosen = set()
    for _ in range(30):
        slot = pool.pick("a")
        chosen.add(owner(slot.miner))
        pool.release(slot, Cancelled())
    assert chosen == {1}


def test_a_maximum_price_filters_miners_and_names_itself_when_none_is_left() -> None:
    cheap = replace(node(1, "a"), models=(ModelOffer("a", model_id("a"), 1, 5),))
    dear = replace(node(2, "a"), models=(ModelOffer("a", model_id("a"), 1, 50),))
    pool = healthy_pool(cheap, dear)
    within = RouteRequest("a", prefs=RoutePreferences(max_completion_wei=10))
    assert {owner(pool.pick("a", request=within).miner) for _ in range(10)} == {1}
    nobody = RouteRequest("a", prefs=RoutePreferences(max_completion_wei=4))
    with pytest.raises(NoMinerWithinPrice):
        pool.pick("a", request=nobody)


def test_canary_requests_follow_the_route_filter_and_hold_no_scheduler_slot() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    one, two = pool.miners()
    # As app.audits routes while qualifying: canaries to `two` (on probation), others to `one`.
    pool.route_filter = lambda serving, canary: [s for s in serving if (s is two) == canary]
    slot = pool.pick("a", canary=True)
    assert slot.miner is two and slot.ticket is None and two.inflight == 1
    assert all(pool.pick("a").miner is one for _ in range(5))
    pool.release(slot, Failed("HTTP 500"))
    assert two.inflight == 0 and two.failed == 1
    pool.release(slot, Failed("twice"))  # a slot is released once
    assert two.failed == 1


def test_rediscovery_keeps_state_unless_endpoint_moves() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    one = pool.get(node(1).owner)
    assert one is not None
    pool.pick("a", [s for s in pool.miners() if s is not one])
    new = pool.update([node(1, "a"), node(2, "a", port=7777)])
    assert [owner(s) for s in new] == [2]  # moved: needs a fresh health check
    assert pool.get(node(1).owner) is one and one.inflight == 1 and one.healthy
    moved = pool.get(node(2).owner)
    assert moved is not None and moved.healthy is None and moved.inflight == 0
    assert all(pool.pick("a").miner is one for _ in range(5))  # the moved one is unchecked
    pool.update([node(1, "b")])
    assert [m for m, _ in pool.models()] == ["b"] and pool.get(node(2).owner) is None
    with pytest.raises(ModelNotServed):
        pool.pick("a")


def test_health_payload() -> None:
    assert health_ok({"status": "ok", "extra": 1})
    assert not health_ok({"status": "down"})
    assert not health_ok(["ok"])


# -- relay -------------------------------------------------------------------------------------


def test_upstream_body_adds_seed_and_usage() -> None:
    payload, seed = relay.upstream_body({"model": "a", "stream": True}, stream=True, seed=42)
    body = json.loads(payload)
    assert seed == 42 and body["seed"] == 42
    assert body["stream_options"] == {"include_usage": True}

    payload, seed = relay.upstream_body(
        {"model": "a", "seed": 7, "stream_options": {"include_usage": False}, "x": [1]},
        stream=True,
        seed=42,
    )
    body = json.loads(payload)
    assert seed == 7 and body["seed"] == 7 and body["x"] == [1]
    assert body["stream_options"]["include_usage"] is True

    payload, _ = relay.upstream_body({"model": "a"}, stream=False, seed=1)
    assert "stream_options" not in json.loads(payload)
    assert "max_tokens" not in json.loads(payload)  # unmetered: the client's limit, or none


def test_upstream_body_states_the_limit_a_metered_gateway_reserved_for() -> None:
    payload, _ = relay.upstream_body({"model": "a"}, stream=False, seed=1, max_tokens=1024)
    assert json.loads(payload)["max_tokens"] == 1024


def test_client_view_strips_extension_and_unasked_logprobs() -> None:
    answer = {
        "choices": [{"index": 0, "logprobs": {"content": []}, "message": {"content": "hi"}}],
        EXTENSION_KEY: {"output_token_ids": [1]},
    }
    out = relay.client_view(json.loads(json.dumps(answer)), wants_logprobs=False)
    assert EXTENSION_KEY not in out and out["choices"][0]["logprobs"] is None
    kept = relay.client_view(json.loads(json.dumps(answer)), wants_logprobs=True)
    assert EXTENSION_KEY not in kept and kept["choices"][0]["logprobs"] == {"content": []}
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None}
    assert "usage" not in relay.client_view(dict(chunk), wants_logprobs=False, drop_usage=True)
    assert "usage" in relay.client_view(dict(chunk), wants_logprobs=False)


def test_usage_and_output_detection() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    assert relay.is_usage_chunk(usage) and relay.usage_of(usage) == (3, 4)
    role_only = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert not relay.carries_output(role_only)
    assert relay.carries_output({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    assert relay.carries_output({"choices": [{"index": 0, "text": "x"}]})
    assert relay.carries_output({"choices": [{"index": 0, "finish_reason": "stop"}]})
    assert relay.carries_output(usage)


@pytest.mark.parametrize(
    "raw", [b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"a": NaN}', b""]
)
def test_bad_json_is_a_400(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        json_body.decode_request_json(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_nesting_limit_is_linear_and_exact() -> None:
    deep = b"[" * (json_body.MAX_JSON_DEPTH + 1) + b"]" * (json_body.MAX_JSON_DEPTH + 1)
    ok = b"[" * json_body.MAX_JSON_DEPTH + b"]" * json_body.MAX_JSON_DEPTH
    assert json_body.too_deep(deep) and not json_body.too_deep(ok)
    # Brackets inside strings (escaped quotes too) do not count.
    assert not json_body.too_deep(b'{"a": "' + b'[\\"[' * 1000 + b'"}')
    assert not json_body.too_deep(b"[{}]" * 10_000)  # many objects, shallow
    with pytest.raises(ValueError):
        json_body.loads(deep)
    assert json_body.loads(b"[-Infinity]", strict=False) == [float("-inf")]
    # Hostile input that would make a naive string regex quadratic stays fast.
    import time

    hostile = b"[" * 200 + b'"' + b'a\\"' * 2_000_000
    started = time.perf_counter()
    json_body.too_deep(hostile)
    assert time.perf_counter() - started < 1.0


def test_sse_helpers() -> None:
    assert relay.parse_sse_data(b"data: {}\n") == b"{}"
    assert relay.parse_sse_data(b": keepalive\n") is None
    event = relay.stream_error_event("broke")
    assert event.startswith(b"data: ") and json.loads(event[6:])["error"]["message"] == "broke"


def test_spare_miners_stand_by_until_the_active_ones_are_full() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"), node(3, "a"))
    for state in pool.miners():
        pool.set_health(state, True, max_concurrency=1)  # two slots each
    pool.sample_capacity()  # a health round: the idle model keeps two active
    [parked] = pool.standby.parked("a")
    spare = pool.get(parked)
    assert spare is not None
    held = [pool.pick("a") for _ in range(4)]  # the active tier's four slots
    assert spare.inflight == 0
    held.append(pool.pick("a"))  # full: the spare is activated instead of shedding
    assert spare.inflight == 1 and pool.standby.parked("a") == set()
    for slot in held:
        pool.release(slot, Cancelled())
    # A failover that would overflow the full active tier takes the parked one instead.
    pool = healthy_pool(node(1, "a"), node(2, "a"), node(3, "a"))
    for state in pool.miners():
        pool.set_health(state, True, max_concurrency=1)
    pool.sample_capacity()
    [parked] = pool.standby.parked("a")
    active = [s for s in pool.miners() if s.owner != parked]
    held = [pool.pick("a") for _ in range(4)]
    moved = pool.pick("a", [active[0]])
    assert moved.miner.owner == parked
