"""Routing and body rules as pure logic: MinerPool and the relay transformations."""

from __future__ import annotations

import json
import random

import pytest

from infergrid.app import relay
from infergrid.app.miners import (
    MAX_CONSECUTIVE_FAILURES,
    MinerPool,
    MinerState,
    ModelNotServed,
    NoHealthyMiner,
    health_ok,
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


def healthy_pool(*records: NodeRecord) -> MinerPool:
    pool = MinerPool(rng=random.Random(0))
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
    assert all(pool.pick("a") is one for _ in range(10))
    pool.mark_unreachable(one, "refused")
    with pytest.raises(NoHealthyMiner):
        pool.pick("a")


def test_model_filter_and_unknown_model() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "b"))
    assert owner(pool.pick("a")) == 1
    assert owner(pool.pick("b")) == 2
    assert owner(pool.pick(model_id("b"))) == 2  # pinned by protocol id
    assert [name for name, _ in pool.models()] == ["a", "b"]  # names only
    with pytest.raises(ModelNotServed):
        pool.pick("c")


def test_least_loaded_wins() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"), node(3, "a"))
    one, two, three = pool.miners()
    pool.acquire(one)
    pool.acquire(one)
    pool.acquire(two)
    assert pool.pick("a") is three
    pool.acquire(three)
    pool.acquire(three)
    assert pool.pick("a") is two
    pool.release(one, ok=True)
    pool.release(one, ok=True)
    assert one.inflight == 0 and pool.pick("a") is one


def test_ties_share_load_and_latency_breaks_clear_ties() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    picks = {owner(pool.pick("a")) for _ in range(50)}
    assert picks == {1, 2}  # equal miners share sequential traffic
    one, two = pool.miners()
    pool.acquire(one)
    pool.release(one, ok=True, latency_ms=200.0)
    pool.acquire(two)
    pool.release(two, ok=True, latency_ms=20.0)
    assert {owner(pool.pick("a")) for _ in range(50)} == {2}
    # Within the tie margin both stay in the running.
    one.latency_ewma_ms = 21.0
    assert {owner(pool.pick("a")) for _ in range(50)} == {1, 2}


def test_exclude_for_failover() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    first = pool.pick("a")
    second = pool.pick("a", [first])
    assert second is not first
    with pytest.raises(NoHealthyMiner):
        pool.pick("a", [first, second])


def test_repeated_failures_take_a_miner_out() -> None:
    pool = healthy_pool(node(1, "a"))
    [state] = pool.miners()
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        pool.acquire(state)
        pool.release(state, ok=False)
    assert state.healthy is False
    pool.set_health(state, True)
    assert pool.pick("a") is state and state.consecutive_failures == 0


def test_rediscovery_keeps_state_unless_endpoint_moves() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    one = pool.get(node(1).owner)
    assert one is not None
    pool.acquire(one)
    new = pool.update([node(1, "a"), node(2, "a", port=7777)])
    assert [owner(s) for s in new] == [2]  # moved: needs a fresh health check
    assert pool.get(node(1).owner) is one and one.inflight == 1 and one.healthy
    moved = pool.get(node(2).owner)
    assert moved is not None and moved.healthy is None and moved.inflight == 0
    pool.update([node(1, "b")])
    assert [m for m, _ in pool.models()] == ["b"] and pool.get(node(2).owner) is None


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
