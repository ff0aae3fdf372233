"""The gateway over real HTTP on 127.0.0.1: the official openai client, streaming, failover,
and every kind of bad input answered with an OpenAI-shaped 4xx.

Upstreams are ScriptedMiners (see scripted_miner.py): they stand in for miners so gateway logic
can be tested without a model; end-to-end tests use real miners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import MODEL, RunningGateway, miners_running, running_gateway
from multidict import CIMultiDict
from scripted_miner import ScriptedMiner, address, serve

from infergrid.app.config import GatewayConfig
from infergrid.app.gateway import create_gateway_app
from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.protocol.wire import EXTENSION_KEY, MINER_HEADER, REQUEST_ID_HEADER

MESSAGES = [{"role": "user", "content": "hi"}]


def client(gw: RunningGateway, key: str) -> openai.AsyncOpenAI:
    return gw.client(key)


async def raw_post(
    gw: RunningGateway, path: str, body: Any, key: str | None, *, raw: bytes | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + path, data=data, headers=headers) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.read()


async def wait_flushed(traces: TraceStore, request_id: str) -> Any:
    for _ in range(100):
        trace = traces.get(request_id)
        if trace is not None and trace.status:
            return trace
        await asyncio.sleep(0.02)
    raise AssertionError(f"no trace for {request_id}")


def assert_openai_error(status: int, headers: Mapping[str, str], body: bytes, want: int) -> dict:
    assert status == want, body
    assert headers.get(REQUEST_ID_HEADER), headers
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# -- the happy paths, through the official client -------------------------------------------


async def test_chat_non_streamed(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        raw = await client(gw, api_key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        assert raw.headers[MINER_HEADER] == miners[0].owner
        body = json.loads(raw.content)
        assert EXTENSION_KEY not in body
        completion = raw.parse()
        assert completion.id == f"chatcmpl-{rid}"
        assert completion.choices[0].message.content.startswith("Hello from")
        assert completion.choices[0].logprobs is None
        assert completion.usage is not None and completion.usage.completion_tokens > 0

        # What the miner got: the gateway's request id, a seed it assigned.
        headers, sent = miners[0].seen[-1]
        assert headers[REQUEST_ID_HEADER] == rid
        assert isinstance(sent["seed"], int)

        trace = await wait_flushed(traces, rid)
        assert trace.status == 200 and trace.miner == miners[0].owner
        assert trace.miner_endpoint == miners[0].base_url
        assert trace.prompt_tokens == completion.usage.prompt_tokens
        assert trace.completion_tokens == completion.usage.completion_tokens
        assert trace.seed == sent["seed"] and trace.total_ms > 0


async def test_chat_streamed_with_and_without_usage(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        oa = client(gw, api_key)
        stream = await oa.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("Hello from")
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(text.split())
        assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
        _, sent = miners[0].seen[-1]
        assert sent["stream_options"]["include_usage"] is True

        stream = await oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        assert all(c.usage is None for c in chunks)
        assert all(c.choices for c in chunks)  # no usage chunk when not asked
        _, sent = miners[0].seen[-1]
        assert sent["stream_options"]["include_usage"] is True  # metering always asks
        rid = chunks[0].id.removeprefix("chatcmpl-")
        trace = await wait_flushed(traces, rid)
        assert trace.stream and trace.completion_tokens and trace.ttft_ms is not None


async def test_raw_sse_has_no_extension(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        body = {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        assert EXTENSION_KEY.encode() not in data
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["usage"]["total_tokens"] > 0


async def test_long_usage_line_across_reads(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """A long prompt makes the usage chunk's extension megabytes long: one SSE line that
    arrives in many reads."""
    async with (
        miners_running(1, prompt_len=300_000) as miners,
        running_gateway(miners, keys, traces) as gw,
    ):
        stream = await client(gw, api_key).chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 300_000


async def test_completions_endpoint(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        oa = client(gw, api_key)
        raw = await oa.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=3)
        assert EXTENSION_KEY not in json.loads(raw.content)
        completion = raw.parse()
        assert completion.id == "cmpl-" + raw.headers[REQUEST_ID_HEADER]
        assert completion.choices[0].text == "Hello from a "
        assert completion.choices[0].finish_reason == "length"
        stream = await oa.completions.create(
            model=MODEL, prompt="hi", stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("Hello")
        assert chunks[-1].usage is not None


async def test_logprobs_only_when_asked(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        oa = client(gw, api_key)
        asked = await oa.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True)
        content = asked.choices[0].logprobs.content
        assert content and content[0].logprob < 0
        stream = await oa.chat.completions.create(
            model=MODEL, messages=MESSAGES, logprobs=True, stream=True
        )
        assert any([c.choices and c.choices[0].logprobs async for c in stream])

        # A miner that sends logprobs nobody asked for does not get them to the client.
        miners[0].mode = "leak_logprobs"
        plain = await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert plain.choices[0].logprobs is None
        stream = await oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert all([c.choices[0].logprobs is None async for c in stream if c.choices])
        legacy = await oa.completions.create(model=MODEL, prompt="x")
        assert legacy.choices[0].logprobs is None
        legacy = await oa.completions.create(model=MODEL, prompt="x", logprobs=0)
        assert legacy.choices[0].logprobs.token_logprobs


async def test_client_seed_is_kept(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        oa = client(gw, api_key)
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1234)
        assert miners[0].seen[-1][1]["seed"] == 1234
        seeds = set()
        for _ in range(3):
            await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
            seeds.add(miners[0].seen[-1][1]["seed"])
        assert len(seeds) == 3  # every request gets its own


async def test_models_health_metrics(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with (
        miners_running(2, models=(MODEL, "other-model")) as miners,
        running_gateway(miners, keys, traces) as gw,
    ):
        oa = client(gw, api_key)
        models = await oa.models.list()
        assert sorted(m.id for m in models.data) == sorted([MODEL, "other-model"])
        assert all(m.owned_by == "infergrid" for m in models.data)
        assert (await oa.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await oa.models.retrieve("nope")
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/health") as resp:
                health = await resp.json()
                assert resp.headers[REQUEST_ID_HEADER]
            assert health["status"] == "ok" and health["miners"]["healthy"] == 2
            async with session.get(gw.url + "/metrics") as resp:
                text = await resp.text()
            assert 'infergrid_gateway_miners{state="healthy"} 2.0' in text
            assert "infergrid_gateway_requests_total" in text
            assert 'infergrid_gateway_tokens_total{kind="completion"}' in text
            async with session.get(gw.v1 + "/models") as resp:  # no key
                assert resp.status == 401


# -- load sharing and failover --------------------------------------------------------------


async def test_two_miners_share_load(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with (
        miners_running(2, token_delay_s=0.005) as miners,
        running_gateway(miners, keys, traces) as gw,
    ):
        oa = client(gw, api_key)
        raws = await asyncio.gather(
            *(
                oa.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
                for _ in range(16)
            )
        )
        served_by = [r.headers[MINER_HEADER] for r in raws]
        assert {served_by.count(m.owner) for m in miners} == {8}  # least-loaded: an even split
        assert len({r.headers[REQUEST_ID_HEADER] for r in raws}) == 16


async def test_failover_on_5xx(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(2) as miners, running_gateway(miners, keys, traces) as gw:
        miners[0].mode = "http_500"
        oa = client(gw, api_key)
        # Ties are broken at random: go on until the failing miner was tried both ways.
        tried = {False: 0, True: 0}
        for i in range(40):
            stream = bool(i % 2)
            before = miners[0].served
            # A prompt of its own each time: no prefix affinity to the miner that served last.
            raw = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], stream=stream
            )
            assert raw.headers[MINER_HEADER] == miners[1].owner
            tried[stream] += miners[0].served - before
            if i >= 3 and all(tried.values()):
                break
        assert all(tried.values())  # it was tried, and the client never saw it


async def test_failover_on_dead_miner(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as healthy, contextlib.AsyncExitStack() as doomed_stack:
        doomed = await doomed_stack.enter_async_context(ScriptedMiner(address(99)).running())
        miners = [*healthy, doomed]
        # Slow health checks: the gateway still believes the dead miner is up when it routes.
        async with running_gateway(miners, keys, traces, health_interval_s=60) as gw:
            await doomed_stack.aclose()  # the miner's server is gone; its port refuses
            state = gw.gateway.pool.get(doomed.owner)
            assert state is not None and state.healthy is True
            oa = client(gw, api_key)
            for i in range(30):
                raw = await oa.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}]
                )
                assert raw.headers[MINER_HEADER] == healthy[0].owner
                if not state.healthy:
                    break
            assert state.healthy is False  # marked down on the first refused connection
            assert gw.gateway.pool.get(healthy[0].owner).served >= 1  # type: ignore[union-attr]


async def test_failover_when_stream_dies_before_first_token(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(2) as miners, running_gateway(miners, keys, traces) as gw:
        miners[0].mode = "die_before_first"
        oa = client(gw, api_key)
        for _ in range(3):
            raw = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, stream=True
            )
            assert raw.headers[MINER_HEADER] == miners[1].owner
            text = "".join(
                [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
            )
            assert text.startswith("Hello")


async def test_mid_stream_death_ends_with_error_event(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        miners[0].mode = "die_mid_stream"
        oa = client(gw, api_key)
        raw = await oa.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, stream=True
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        got: list[str] = []
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            async for chunk in raw.parse():
                if chunk.choices:
                    got.append(chunk.choices[0].delta.content or "")
        assert "".join(got) == "Hello from "
        trace = await wait_flushed(traces, rid)
        assert trace.status == 502 and "broke after the first token" in trace.error
        assert trace.completion_tokens is None  # not metered, so not charged


async def test_client_hanging_up_frees_the_miner(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with (
        miners_running(1, token_delay_s=0.05) as miners,
        running_gateway(miners, keys, traces) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES, "stream": True}
        headers = {"authorization": f"Bearer {api_key}"}
        async with aiohttp.ClientSession() as session:
            resp = await session.post(gw.v1 + "/chat/completions", json=body, headers=headers)
            rid = resp.headers[REQUEST_ID_HEADER]
            await resp.content.readuntil(b"\n\n")
            resp.close()  # hang up mid-stream
        trace = await wait_flushed(traces, rid)
        assert trace.status == 499 and trace.completion_tokens is None
        state = gw.gateway.pool.get(miners[0].owner)
        assert state is not None and state.inflight == 0 and state.healthy


async def test_no_miner_available_is_503(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(2) as miners, running_gateway(miners, keys, traces) as gw:
        for m in miners:
            m.mode = "http_500"
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 503)
        assert err["code"] == "no_miner_available" and headers["Retry-After"] == "1"
        for m in miners:
            m.healthy = False
        await asyncio.sleep(1.2)  # two health rounds
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        assert_openai_error(status, headers, data, 503)


# -- auth and bad input: OpenAI-shaped 4xx, never 5xx ---------------------------------------


async def test_auth_errors(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, None)
        assert assert_openai_error(status, headers, data, 401)["code"] == "missing_api_key"
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, "ig-wrong-key")
        err = assert_openai_error(status, headers, data, 401)
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"

        with pytest.raises(openai.AuthenticationError):
            await client(gw, "ig-nope-nope-nope").chat.completions.create(
                model=MODEL, messages=MESSAGES
            )

        # Revoked from "another process": a separate connection, as the CLI would use.
        key_id, secret = keys.create("short-lived")
        oa = client(gw, secret)
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        cli = KeyStore(keys.db_path)
        assert cli.revoke(key_id)
        cli.close()
        revoked_at = time.monotonic()
        while True:
            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, secret)
            if status == 401:
                break
            assert time.monotonic() - revoked_at < 1.5, "revoked key still works"
            await asyncio.sleep(0.05)
        assert_openai_error(status, headers, data, 401)


BAD_BODIES: list[tuple[str, Any]] = [
    ("max_tokens zero", {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}),
    ("max_tokens negative", {"model": MODEL, "messages": MESSAGES, "max_tokens": -5}),
    ("max_tokens huge", {"model": MODEL, "messages": MESSAGES, "max_tokens": 10**12}),
    ("max_tokens string", {"model": MODEL, "messages": MESSAGES, "max_tokens": "5"}),
    ("max_tokens float", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5.5}),
    ("empty messages", {"model": MODEL, "messages": []}),
    ("messages number", {"model": MODEL, "messages": 3}),
    ("message not object", {"model": MODEL, "messages": ["hi"]}),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    ("no model", {"messages": MESSAGES}),
    ("model number", {"model": 7, "messages": MESSAGES}),
    ("n=2", {"model": MODEL, "messages": MESSAGES, "n": 2}),
    ("temperature string", {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}),
    ("stream string", {"model": MODEL, "messages": MESSAGES, "stream": "yes"}),
    ("body is a list", [{"model": MODEL}]),
    ("body is a string", "hello"),
    ("body is null", None),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_bodies_are_400(
    case: tuple[str, Any], keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        status, headers, data = await raw_post(gw, "/v1/chat/completions", case[1], api_key)
        err = assert_openai_error(status, headers, data, 400)
        assert err["type"] == "invalid_request_error"
        assert miners[0].served == 0  # rejected at the gateway, never forwarded


async def test_malformed_requests(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        for raw in (b"{not json", b"", b"\xff\xfe\x00", b'{"model": NaN}', b"[" * 50_000):
            status, headers, data = await raw_post(
                gw, "/v1/chat/completions", None, api_key, raw=raw
            )
            assert assert_openai_error(status, headers, data, 400)["code"] == "invalid_json"
        # Bad completions bodies too.
        for body in (
            {"model": MODEL, "prompt": ""},
            {"model": MODEL, "prompt": 5},
            {"model": MODEL},
        ):
            status, headers, data = await raw_post(gw, "/v1/completions", body, api_key)
            assert_openai_error(status, headers, data, 400)
        # Unknown model.
        body = {"model": "no-such-model", "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            await client(gw, api_key).chat.completions.create(model="nope", messages=MESSAGES)
        # Wrong method and unknown path.
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.v1 + "/chat/completions") as resp:
                err = assert_openai_error(resp.status, resp.headers, await resp.read(), 405)
                assert resp.headers["Allow"] == "POST"
            async with session.post(gw.v1 + "/nothing-here", json={}) as resp:
                assert_openai_error(resp.status, resp.headers, await resp.read(), 404)
        assert miners[0].served == 0
        # A body past the size limit.
        async with running_gateway(miners, keys, traces, max_body_bytes=1000) as small:
            big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}
            status, headers, data = await raw_post(small, "/v1/chat/completions", big, api_key)
            assert_openai_error(status, headers, data, 413)


async def test_miner_4xx_passes_through(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    """The registry says the miner serves a model it then refuses: the client gets its 404."""
    async with miners_running(1) as miners:
        record = miners[0].record
        miners[0].record = lambda: _with_model(record(), "ghost")  # type: ignore[method-assign]
        async with running_gateway(miners, keys, traces) as gw:
            body = {"model": "ghost", "messages": MESSAGES}
            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
            err = assert_openai_error(status, headers, data, 404)
            assert "not served here" in err["message"]
            assert headers[MINER_HEADER] == miners[0].owner


def _with_model(record: Any, name: str) -> Any:
    from dataclasses import replace

    from infergrid.protocol.nodes import ModelOffer

    return replace(record, models=(*record.models, ModelOffer(name, "0x" + "11" * 32, 1, 1)))


async def test_miner_4xx_is_always_openai_shaped(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        miners[0].mode = "text_400"
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 400)
        assert "bad things" in err["message"]
        state = gw.gateway.pool.get(miners[0].owner)
        assert state is not None and state.healthy  # the request's fault, not the miner's


async def test_registry_down_is_503_not_404(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    def broken() -> list:
        raise ConnectionError("chain unreachable")

    app = create_gateway_app(GatewayConfig(), discover=broken, keys=keys, traces=traces)
    async with serve(app) as url:
        gw = RunningGateway(url, app.state.gateway, [])
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        assert assert_openai_error(status, headers, data, 503)["code"] == "registry_unavailable"
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
            health = await resp.json()
        assert "chain unreachable" in health["discovery_error"]


def test_build_server_serves_fast_on_loopback(keys: KeyStore, traces: TraceStore) -> None:
    from infergrid.app.gateway import build_server

    server = build_server(GatewayConfig(port=0), lambda: [], keys=keys, traces=traces)
    config = server.config
    assert (config.host, config.loop, config.http) == ("127.0.0.1", "uvloop", "httptools")
    assert config.access_log is False


# -- one rule with the miner: ranges, refused parameters, encodable strings ----------------


async def test_seed_outside_64_bits_is_refused_before_any_miner(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        for seed in (2**63, 2**64 + 5, -(2**63) - 1):
            body = {"model": MODEL, "messages": MESSAGES, "seed": seed}
            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
            err = assert_openai_error(status, headers, data, 400)
            assert (err["param"], err["code"]) == ("seed", "invalid_value")
            assert "64-bit" in err["message"]
        assert miners[0].served == 0
        # The ends of the range are served, and their traces are stored.
        oa = client(gw, api_key)
        for seed in (2**63 - 1, -(2**63)):
            raw = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, seed=seed
            )
            trace = await wait_flushed(traces, raw.headers[REQUEST_ID_HEADER])
            assert trace.status == 200 and trace.seed == seed


async def test_every_unsupported_parameter_is_refused_by_name(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    from infergrid.protocol.params import REFUSED

    asking = {"asks": "for something"}  # no parameter's neutral value
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        for rule in REFUSED:
            for path, body in (
                ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}),
                ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
            ):
                status, headers, data = await raw_post(
                    gw, path, {**body, rule.name: asking}, api_key
                )
                err = assert_openai_error(status, headers, data, 400)
                assert (err["param"], err["code"]) == (rule.name, "unsupported_parameter")
        assert miners[0].served == 0  # refused before a miner was picked

        # Through the official client, as an application would call it.
        oa = client(gw, api_key)
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        with pytest.raises(openai.BadRequestError) as info:
            await oa.chat.completions.create(
                model=MODEL, messages=MESSAGES, tools=[tool], tool_choice="required"
            )
        assert info.value.param == "tools" and info.value.code == "unsupported_parameter"
        schema = {"name": "Answer", "strict": True, "schema": {"type": "object"}}
        with pytest.raises(openai.BadRequestError) as info:
            await oa.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                response_format={"type": "json_schema", "json_schema": schema},
            )
        assert info.value.param == "response_format"
        image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
        with pytest.raises(openai.BadRequestError) as info:
            await oa.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, image]}],
            )
        assert info.value.param == "messages[0].content[1]"
        assert "images are not supported" in str(info.value)
        # What client libraries send by default to mean "off" is served.
        await oa.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            n=1,
            tool_choice="none",
            response_format={"type": "text"},
            logit_bias={},
            presence_penalty=0,
            store=False,
        )
        assert miners[0].served == 1


# The bodies LangChain's ChatOpenAI (langchain-openai 0.3) sends for bind_tools and for each
# method of with_structured_output: each must be a 400, never a 200 without the tool call.
_WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
_LC_TOOL = {
    "type": "function",
    "function": {"name": "GetWeather", "description": "Weather.", "parameters": _WEATHER},
}
LANGCHAIN_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("bind_tools", {"tools": [_LC_TOOL]}, "tools"),
    (
        "with_structured_output function_calling",
        {
            "tools": [_LC_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "GetWeather"}},
            "parallel_tool_calls": False,
        },
        "tools",
    ),
    (
        "with_structured_output json_schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "GetWeather", "strict": True, "schema": _WEATHER},
            }
        },
        "response_format",
    ),
    (
        "with_structured_output json_mode",
        {"response_format": {"type": "json_object"}},
        "response_format",
    ),
]


@pytest.mark.parametrize("case", LANGCHAIN_BODIES, ids=[c[0] for c in LANGCHAIN_BODIES])
async def test_langchain_tools_and_structured_output_get_a_400(
    case: tuple[str, dict[str, Any], str], keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    _, extra, param = case
    body = {"model": MODEL, "messages": MESSAGES, "n": 1, "stream": False, "temperature": 0.7}
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        status, headers, data = await raw_post(
            gw, "/v1/chat/completions", {**body, **extra}, api_key
        )
        err = assert_openai_error(status, headers, data, 400)
        assert (err["param"], err["code"]) == (param, "unsupported_parameter")
        assert miners[0].served == 0


_SURROGATES: list[tuple[bytes, str | None]] = [
    (rb'"messages":[{"role":"user","content":"\ud800"}]', "messages[0].content"),
    (rb'"messages":[{"role":"user","content":"x","name":"\udfff"}]', "messages[0].name"),
    (rb'"messages":[{"role":"user","content":"x"}],"user":"\ud800"', "user"),
    (
        rb'"messages":[{"role":"user","content":[{"type":"text","text":"\ud83d"}]}]',
        "messages[0].content[0].text",
    ),
    (rb'"messages":[{"role":"user","content":"x"}],"extension":{"a":"\ude00"}', "extension.a"),
    (rb'"messages":[{"role":"user","content":"x"}],"\ud800":true', None),
]


async def test_unencodable_strings_are_400_and_keep_the_connection(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
        # One connection for everything: a 400 must not drop it.
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for fragment, param in _SURROGATES:
                raw = b'{"model":"' + MODEL.encode() + b'",' + fragment + b"}"
                async with session.post(
                    gw.v1 + "/chat/completions", data=raw, headers=headers
                ) as resp:
                    err = assert_openai_error(resp.status, resp.headers, await resp.read(), 400)
                    assert (err["code"], err["param"]) == ("invalid_unicode", param)
            body = {"model": MODEL, "messages": MESSAGES}
            async with session.post(
                gw.v1 + "/chat/completions", json=body, headers=headers
            ) as resp:
                assert resp.status == 200
        assert miners[0].served == 1


async def test_validation_errors_name_the_parameter_as_written(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        body = {"model": MODEL, "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 400)
        assert err["param"] == "stop" and "at most 4 stop sequences" in err["message"]
        assert "constrained-str" not in err["message"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": 5}]}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 400)
        assert err["param"] == "messages[0].content"
        assert ".str" not in err["message"] and "list[" not in err["message"]


# -- bodies that stall, clients that leave ---------------------------------------------------


def _partial_post(path: str, key: str, raw: bytes, declared: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {declared}\r\n\r\n"
    ).encode() + raw


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    received = b""
    while chunk := await reader.read(65536):
        received += chunk
    return received


async def test_stalled_body_is_timed_out(keys: KeyStore, traces: TraceStore, api_key: str) -> None:
    async with (
        miners_running(1) as miners,
        running_gateway(miners, keys, traces, body_timeout_s=0.5) as gw,
    ):
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_partial_post("/v1/chat/completions", api_key, b'{"model": "ti', 400))
        await writer.drain()
        # The gateway answers 408 and closes the connection; the bound is generous.
        received = await asyncio.wait_for(_read_until_closed(reader), 10)
        writer.close()
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), received
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert miners[0].served == 0


async def test_clients_leaving_are_one_log_line_not_a_traceback(
    keys: KeyStore, traces: TraceStore, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="infergrid.app.gateway")
    async with miners_running(1, token_delay_s=0.05) as miners:
        app = create_gateway_app(
            GatewayConfig(discovery_interval_s=0.5, health_interval_s=0.5),
            discover=lambda: [m.record() for m in miners],
            keys=keys,
            traces=traces,
        )
        async with serve(app, log_level="info") as url:
            uvicorn_errors = logging.getLogger("uvicorn.error")
            uvicorn_errors.addHandler(caplog.handler)
            try:
                host, port = url.removeprefix("http://").split(":")
                # Gone half-way through the body.
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(_partial_post("/v1/chat/completions", api_key, b'{"mo', 400))
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.close()
                # Gone mid-stream.
                body = {"model": MODEL, "messages": MESSAGES, "stream": True}
                headers = {"authorization": f"Bearer {api_key}"}
                async with aiohttp.ClientSession() as session:
                    resp = await session.post(
                        url + "/v1/chat/completions", json=body, headers=headers
                    )
                    rid = resp.headers[REQUEST_ID_HEADER]
                    await resp.content.readuntil(b"\n\n")
                    resp.close()
                await wait_flushed(traces, rid)
                await asyncio.sleep(0.2)
            finally:
                uvicorn_errors.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    left = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(left) == 2 and all(r.exc_info is None for r in left), caplog.text


async def test_a_client_leaving_a_plain_request_stops_its_miner(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """A non-streamed request whose client hangs up is given up at once: the gateway closes
    its upstream request (so the miner stops generating for nobody) and traces a 499, instead
    of waiting for an answer nobody will read."""
    async with (
        miners_running(1, hang_s=20, mode="hang_before_first") as miners,
        running_gateway(
            miners,
            keys,
            traces,
            read_timeout_s=30,
            first_token_timeout_floor_s=25,
            first_token_timeout_cap_s=25,
        ) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES}
        headers = {"authorization": f"Bearer {api_key}"}
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                await session.post(
                    gw.url + "/v1/chat/completions",
                    json=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=0.5),
                )
        deadline = time.monotonic() + 3  # far inside every timeout the gateway has
        while miners[0].hung_up < 1:
            assert time.monotonic() < deadline, "the gateway kept the miner generating"
            await asyncio.sleep(0.02)
        recent = []
        while not recent:
            assert time.monotonic() < deadline, "no trace of the abandoned request"
            recent = [t for t in traces.recent(5) if t.status == 499]
            await asyncio.sleep(0.05)
        assert recent[0].error == "The client closed the connection."
        pool_state = gw.gateway.pool.get(miners[0].owner)
        assert pool_state is not None and pool_state.inflight == 0
