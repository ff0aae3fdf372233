"""The gateway's scheduler over real HTTP on 127.0.0.1 (compute.scheduler through app.miners):
a saturated network sheds with 429 and `retry-after`, the developer's `infergrid.route`
preferences are honoured or refused by name, and requests carry their prompt-prefix affinity.

Upstreams are ScriptedMiners (scripted_miner.py) that declare their concurrency on /health as
real miners do; the killed-miner case with a real miner process is in
test_gateway_frozen_miner.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import MODEL, miners_running, running_gateway
from scripted_miner import ScriptedMiner
from test_gateway_http import assert_openai_error, raw_post

from infergrid.app.keys import KeyStore
from infergrid.app.miners import QUEUE_FACTOR
from infergrid.app.traces import TraceStore
from infergrid.protocol.wire import MINER_HEADER

MESSAGES = [{"role": "user", "content": "hi"}]
# Long enough that held requests are still held when the next one comes, short enough that
# the test ends soon after.
HOLD_S = 3.0


async def test_a_saturated_network_sheds_with_429_and_retry_after(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """One miner declaring one concurrent request has QUEUE_FACTOR slots at the gateway; with
    all of them taken, the next request is refused at once, in OpenAI's shape, with a
    retry-after, and the official client reads it as a rate limit. Once a slot is free the
    network serves again."""
    async with (
        miners_running(1, max_concurrency=1, hang_s=HOLD_S) as miners,
        running_gateway(
            miners, keys, traces, first_token_timeout_floor_s=30, first_token_timeout_cap_s=30
        ) as gw,
    ):
        [miner] = miners
        oa = gw.client(api_key)
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES)  # serves while idle
        miner.mode = "hang_before_first"
        state = gw.gateway.pool.get(miner.owner)
        assert state is not None and state.capacity == QUEUE_FACTOR
        held = [
            asyncio.create_task(oa.chat.completions.create(model=MODEL, messages=MESSAGES))
            for _ in range(state.capacity)
        ]
        for _ in range(200):
            if state.inflight == state.capacity:
                break
            await asyncio.sleep(0.02)
        assert state.inflight == state.capacity
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 429)
        assert err["code"] == "network_saturated" and err["type"] == "server_error"
        assert int(headers["retry-after"]) >= 1 and MODEL in err["message"]
        no_retries = gw.client(api_key).with_options(max_retries=0)
        with pytest.raises(openai.RateLimitError) as refused:
            await no_retries.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert refused.value.code == "network_saturated"
        assert refused.value.response.headers["retry-after"].isdigit()
        shed = gw.gateway.metrics.registry.get_sample_value(
            "infergrid_gateway_shed_total", {"model": MODEL}
        )
        assert shed == 2
        miner.mode = "ok"
        answers = await asyncio.gather(*held)  # the held ones are answered, not dropped
        assert all(a.choices[0].message.content for a in answers)
        assert state.inflight == 0
        again = await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert again.choices[0].message.content


async def test_route_preferences_pick_within_the_price_or_are_refused_by_name(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(2) as miners:
        cheap, dear = miners
        cheap.price_out_wei, dear.price_out_wei = 2, 20  # as registered
        async with running_gateway(miners, keys, traces) as gw:
            await _prefer_within_price(gw, api_key, cheap, dear)


async def _prefer_within_price(
    gw: Any, api_key: str, cheap: ScriptedMiner, dear: ScriptedMiner
) -> None:
    oa = gw.client(api_key)

    async def served_by(route: dict[str, Any]) -> str:
        raw = await oa.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, extra_body={"infergrid": {"route": route}}
        )
        return raw.headers[MINER_HEADER]

    within = {"max_price": {"completion": "10"}}
    assert {await served_by(within) for _ in range(6)} == {cheap.owner}
    assert {await served_by({"sort": "price"}) for _ in range(4)} == {cheap.owner}

    async def refused(ext: Any) -> dict[str, Any]:
        body = {"model": MODEL, "messages": MESSAGES, "infergrid": ext}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        return assert_openai_error(status, headers, data, 400)

    err = await refused({"route": {"max_price": {"completion": 1}}})
    assert err["code"] == "no_miner_within_price"
    assert err["param"] == "infergrid.route.max_price"
    err = await refused("fast")
    assert err["param"] == "infergrid" and err["code"] == "invalid_type"
    err = await refused({"priority": "high"})
    assert err["param"] == "infergrid.priority" and err["code"] == "unsupported_parameter"
    err = await refused({"route": {"sort": "cheapest"}})
    assert err["code"] == "invalid_value" and "infergrid.route.sort" in err["message"]
    err = await refused({"route": {"max_price": {"completion": -1}}})
    assert "infergrid.route.max_price.completion" in err["message"]
    err = await refused({"route": {"max_price": {"completion": 1.5}}})
    assert "infergrid.route.max_price.completion" in err["message"]
    err = await refused({"route": {"avoid": ["0x00"]}})
    assert "avoid" in err["message"]
    assert cheap.served + dear.served == 10  # no refused request reached a miner


async def test_a_shared_prompt_prefix_stays_on_the_miner_that_served_it(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    async with miners_running(3) as miners, running_gateway(miners, keys, traces) as gw:
        oa = gw.client(api_key)
        homes = set()
        for i in range(8):
            raw = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=[system, {"role": "user", "content": f"question {i}"}]
            )
            homes.add(raw.headers[MINER_HEADER])
        assert len(homes) == 1  # its KV cache may still hold the system prompt


async def test_the_network_publishes_each_models_demand_against_its_supply(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """GET /v1/network after traffic that saturated the one miner: its requests, the shed ones,
    tokens asked and served, slot time busy and offered (sampled each health round), price."""
    async with (
        miners_running(1, max_concurrency=1, hang_s=1.0) as miners,
        running_gateway(
            miners, keys, traces, first_token_timeout_floor_s=30, first_token_timeout_cap_s=30
        ) as gw,
    ):
        [miner] = miners
        oa = gw.client(api_key).with_options(max_retries=0)
        miner.mode = "hang_before_first"
        results = await asyncio.gather(
            *(oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
              for _ in range(QUEUE_FACTOR + 2)),
            return_exceptions=True,
        )  # fmt: skip
        shed = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(shed) == 2
        await asyncio.sleep(1.0)  # health rounds sample the offered slots
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                gw.url + "/v1/network", headers={"authorization": f"Bearer {api_key}"}
            ) as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
        assert body["object"] == "network" and body["until"] - body["since"] == 300
        [row] = body["models"]
        assert row["model"] == MODEL and row["miners"] == row["healthy"] == 1
        assert row["capacity"] == QUEUE_FACTOR and row["in_flight"] == 0
        assert row["requests"] == QUEUE_FACTOR + 2 and row["shed"] == 2
        assert row["tokens_requested"] >= row["requests"] * 5
        assert row["tokens_served"] > 0
        assert row["busy_slot_s"] >= QUEUE_FACTOR * 1.0  # each held its slot for the hang
        assert row["capacity_slot_s"] > 0 and row["utilization"] > 0
        assert row["price_wei"] == {"prompt": miner.price_in_wei, "completion": miner.price_out_wei}
        assert row["reward_share_ppm"] == 1_000_000 and row["standby"] == 0  # the only model
        for query, param in (("?since=-1", "since"), ("?window=5", "window")):
            status, headers, data = await _get(gw.url + "/v1/network" + query, api_key)
            assert assert_openai_error(status, headers, data, 400)["param"] == param
        status, headers, data = await _get(gw.url + "/v1/network", None)
        assert_openai_error(status, headers, data, 401)


async def _get(url: str, key: str | None) -> tuple[int, Any, bytes]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def _served_streams(
    oa: openai.AsyncOpenAI, count: int, tag: str
) -> list[tuple[float, str, str]]:
    """(seconds, serving miner, text) of `count` streamed requests, one at a time, each with a
    prompt of its own (no affinity: the scheduler's choice each time)."""
    out = []
    for i in range(count):
        started = time.monotonic()
        raw = await oa.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"{tag} {i}"}],
            max_tokens=8,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        out.append((time.monotonic() - started, raw.headers[MINER_HEADER], text))
    return out


async def test_a_late_first_token_is_hedged_on_another_miner(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """A miner that holds its first token (a stuck generation, /health still ok) costs a
    stream only the hedge delay: the request is also sent to the other miner, which answers
    first; the slow one is hung up on. Deadlines are far off here: the hedge does it."""
    async with (
        miners_running(2, hang_s=HOLD_S) as miners,
        running_gateway(
            miners, keys, traces, first_token_timeout_floor_s=30, first_token_timeout_cap_s=30
        ) as gw,
    ):
        slow, fast = miners
        oa = gw.client(api_key).with_options(max_retries=0)
        # The first-token times are learnt, the soon-slow miner's as the faster: the policy
        # picks it first (of two, the better always wins), so every request below needs a hedge.
        fast.token_delay_s = 0.05
        scheduler = gw.gateway.pool.scheduler
        for i in range(10):  # until both are measured: concurrent, so load spreads them
            await asyncio.gather(*(_served_streams(oa, 1, f"warm {i} {j}") for j in range(4)))
            stats = [scheduler.get(m.owner) for m in miners]
            if all(st is not None and st.ttft.value is not None for st in stats):
                break
        slow_stats, fast_stats = (scheduler.get(m.owner) for m in miners)
        assert slow_stats is not None and fast_stats is not None
        assert slow_stats.ttft.value is not None and fast_stats.ttft.value is not None
        assert slow_stats.ttft.value < fast_stats.ttft.value
        fast.token_delay_s = 0.0
        slow.mode = "hang_before_first"
        served = await _served_streams(oa, 8, "hedged")
        assert {miner for _, miner, _ in served} == {fast.owner}
        assert all(text.startswith("Hello") and elapsed < HOLD_S for elapsed, _, text in served)
        hedges = gw.gateway.metrics.registry.get_sample_value("infergrid_gateway_hedges_total")
        assert hedges == len(served) and slow.hung_up == len(served)
        state = gw.gateway.pool.get(slow.owner)
        assert state is not None and state.inflight == 0 and state.failed == 0  # not its fault
