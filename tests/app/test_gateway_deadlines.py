"""Deadlines: the rule as pure logic (app.deadlines), the timers that enforce it, and a real
gateway in front of scripted miners that hang before their first token or stall mid-stream
while their /health still says ok."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_harness import MODEL, RunningGateway, miners_running, running_gateway
from settlement_harness import (
    PAYER_A,
    PAYER_B,
    addr,
    deploy_network,
    metered_gateway,
    registered_miners,
)
from test_gateway_http import wait_flushed
from test_gateway_routing import healthy_pool, node

from infergrid.app.deadlines import (
    MIN_SAMPLES,
    DeadlineRule,
    Estimator,
    FirstTokenWatch,
    ModelLatency,
    StallWatch,
)
from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.compute.routing import Failed
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.protocol.wire import MINER_HEADER, REQUEST_ID_HEADER
from infergrid.settle.chain import Chain

MESSAGES = [{"role": "user", "content": "hi"}]
RULE = DeadlineRule(floor_s=5.0, cap_s=60.0, factor=3.0, answer_cap_s=120.0)

# -- the rule ----------------------------------------------------------------------------------


def latency(ttft_s: float | None, per_token_s: float | None, prompt_bytes: int = 1000) -> Any:
    """A ModelLatency whose high estimates are exactly these (None: not observed)."""
    seen = ModelLatency()
    seen.observe_answer(prompt_bytes, 1.0, None)  # sets the usual prompt size only
    if ttft_s is not None:
        seen.first_token = Estimator(mean=ttft_s, dev=0.0, samples=MIN_SAMPLES)
    if per_token_s is not None:
        seen.per_token = Estimator(mean=per_token_s, dev=0.0, samples=MIN_SAMPLES)
    return seen


def test_latency_observations() -> None:
    seen = ModelLatency()
    for _ in range(MIN_SAMPLES):
        seen.observe_first_token(1000, 0.5)
        seen.observe_rest(1.0, 11)  # ten tokens after the first, in a second
        seen.observe_answer(3000, 2.0, 4)
    assert seen.first_token.mean == pytest.approx(0.5)
    assert seen.per_token.samples == 2 * MIN_SAMPLES
    assert 0.1 <= seen.per_token.mean <= 0.5
    assert 1000 < seen.prompt_bytes < 3000 and seen.prompt_scale(10) == 1.0
    seen.observe_rest(1.0, 1)  # one token: nothing to learn about per-token time
    seen.observe_answer(1000, 1.0, 0)
    assert seen.per_token.samples == 2 * MIN_SAMPLES


def test_estimator_bounds_ordinary_samples_and_follows_drift() -> None:
    est = Estimator()
    for value in (1.0, 1.2):
        est.observe(value)
        assert est.high() is None  # too few samples to trust
    rng = random.Random(1)
    samples = [rng.uniform(0.8, 1.2) for _ in range(200)]
    for value in samples:
        est.observe(value)
    high = est.high()
    assert high is not None and 1.2 < high < 2.5
    for _ in range(100):
        est.observe(10.0)  # the model got slower: the estimate follows
    high = est.high()
    assert high is not None and 9.5 < high < 11


def test_first_token_deadline() -> None:
    assert RULE.first_token_s(None, 1000) == 60.0  # nothing observed: the cap
    assert RULE.first_token_s(ModelLatency(), 1000) == 60.0
    assert RULE.first_token_s(latency(0.2, None), 1000) == 5.0  # fast: the floor
    assert RULE.first_token_s(latency(4.0, None), 1000) == pytest.approx(12.0)  # 3 × 4 s
    assert RULE.first_token_s(latency(30.0, None), 1000) == 60.0  # slow: the cap
    # A prompt four times the usual size gets four times as long; a short one no less.
    assert RULE.first_token_s(latency(4.0, None), 4000) == pytest.approx(48.0)
    assert RULE.first_token_s(latency(4.0, None), 10) == pytest.approx(12.0)


def test_answer_deadline_adds_per_token_time() -> None:
    assert RULE.answer_s(None, 1000, 100) == 120.0
    assert RULE.answer_s(latency(4.0, None), 1000, 100) == 120.0  # no per-token estimate
    # 12 s to the first token, plus 3 × 0.05 s for each of 100 tokens.
    assert RULE.answer_s(latency(4.0, 0.05), 1000, 100) == pytest.approx(27.0)
    assert RULE.answer_s(latency(4.0, 0.05), 1000, 10_000) == 120.0  # bounded
    # Only whole answers seen (no stream): the first-token part is the floor, scaled.
    assert RULE.answer_s(latency(None, 0.05), 1000, 100) == pytest.approx(20.0)
    assert RULE.answer_s(latency(None, 0.05), 2000, 100) == pytest.approx(25.0)


def test_rule_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="floor"):
        DeadlineRule(floor_s=10, cap_s=5, factor=3, answer_cap_s=120)
    with pytest.raises(ValueError, match="floor"):
        DeadlineRule(floor_s=0, cap_s=5, factor=3, answer_cap_s=120)
    with pytest.raises(ValueError, match="factor"):
        DeadlineRule(floor_s=1, cap_s=5, factor=0, answer_cap_s=120)


# -- the timers --------------------------------------------------------------------------------


async def _watched(
    deadline_s: float,
    cap_s: float,
    alternative: list[bool],
    down: list[bool],
    *,
    signal_down_after: float | None = None,
) -> tuple[float, str | None]:
    """How long a wait of 5 s lasts under a FirstTokenWatch, and why it ended."""
    started = time.monotonic()
    scope = asyncio.timeout(None)
    watch: FirstTokenWatch | None = None
    try:
        async with scope:
            watch = FirstTokenWatch(
                scope,
                deadline_s,
                cap_s,
                can_fail_over=lambda: alternative[0],
                miner_down=lambda: down[0],
            )
            if signal_down_after is not None:
                asyncio.get_running_loop().call_later(signal_down_after, watch.on_miner_down)
            await asyncio.sleep(5)
    except TimeoutError:
        assert scope.expired()
    finally:
        assert watch is not None
        watch.stop()
    return time.monotonic() - started, watch.reason


async def test_first_token_watch() -> None:
    # Another miner could take it: given up at the deadline.
    elapsed, reason = await _watched(0.2, 1.0, [True], [False])
    assert reason == "deadline" and 0.15 < elapsed < 0.8
    # Nowhere to go and the miner looks fine: waits on to the cap.
    elapsed, reason = await _watched(0.2, 1.0, [False], [False])
    assert reason == "deadline" and 0.95 < elapsed < 2
    # Nowhere to go but the miner is known down: no point waiting past the deadline.
    elapsed, reason = await _watched(0.2, 1.0, [False], [True])
    assert reason == "deadline" and elapsed < 0.8
    # Taken out of service with another miner available: at once.
    elapsed, reason = await _watched(3.0, 4.0, [True], [True], signal_down_after=0.1)
    assert reason == "miner_down" and elapsed < 1
    # ... but with no other miner, it keeps its deadline.
    elapsed, reason = await _watched(0.5, 0.5, [False], [True], signal_down_after=0.1)
    assert reason == "deadline" and elapsed > 0.45


async def test_stall_watch_counts_only_reads() -> None:
    fired: list[float] = []
    started = time.monotonic()
    watch = StallWatch(0.2, lambda: fired.append(time.monotonic() - started))
    for _ in range(5):  # reads that each end in time keep it quiet, however long in total
        watch.reading()
        await asyncio.sleep(0.1)
        watch.idle()
    await asyncio.sleep(0.4)  # not reading: a slow client is not a stalled miner
    assert fired == []
    started = time.monotonic()
    watch.reading()
    await asyncio.sleep(0.5)
    assert len(fired) == 1 and 0.15 < fired[0] < 0.45 and watch.fired
    watch.stop()


# -- the pool ----------------------------------------------------------------------------------


def test_pool_tells_waiters_when_a_miner_is_taken_out() -> None:
    pool = healthy_pool(node(1, "a"), node(2, "a"))
    one, two = pool.miners()
    calls: list[str] = []
    one.down_watchers.add(lambda: calls.append("one"))
    assert pool.can_serve("a", [one]) and not pool.can_serve("b")
    pool.set_health(one, True)
    assert calls == []
    pool.set_health(one, False, error="/health timed out")
    pool.mark_unreachable(one, "refused")
    assert calls == ["one", "one"]
    pool.set_health(one, True)
    for _ in range(pool.scheduler_config.breaker_failures):
        pool.release(pool.pick("a", [two]), Failed("HTTP 500"))
    assert calls == ["one"] * 3  # its breaker opened
    assert pool.can_serve("a", [two]) is False


# -- a real gateway --------------------------------------------------------------------------


def sample(gw: RunningGateway, name: str, **labels: str) -> float:
    value = gw.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def timed_request(
    oa: openai.AsyncOpenAI, stream: bool, question: str = ""
) -> tuple[float, str, str]:
    """(seconds, serving miner, text) of one chat request, streamed or not. A `question` of
    its own gives it its own prompt prefix: no affinity to the miner that served the last."""
    started = time.monotonic()
    messages = [{"role": "user", "content": question}] if question else MESSAGES
    if stream:
        raw = await oa.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=20, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    else:
        raw = await oa.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=20
        )
        text = raw.parse().choices[0].message.content or ""
    return time.monotonic() - started, raw.headers[MINER_HEADER], text


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_hung_miner_misses_its_deadline_and_requests_move(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """A miner that still answers /health but never produces a first token holds no request
    past its deadline: streamed and non-streamed alike go to the other miner, unseen by the
    client, and the gateway hangs up on the hung one."""
    async with (
        # Two slots each at the gateway (one running, one queued): load weighs in the choice.
        miners_running(2, hang_s=20, max_concurrency=1) as miners,
        running_gateway(
            miners,
            keys,
            traces,
            read_timeout_s=30,
            first_token_timeout_floor_s=0.5,
            first_token_timeout_cap_s=1.5,
            hedge_streams=False,  # the deadline, not a hedge, is what this is about
        ) as gw,
    ):
        oa = gw.client(api_key)
        for stream in (True, False) * 3:  # the gateway learns how fast the model is
            await timed_request(oa, stream)
        miners[0].mode = "hang_before_first"
        # Concurrent requests, each its own prompt, spread over both miners by their load.
        results = await asyncio.gather(
            *(timed_request(oa, s, f"q{i}") for i, s in enumerate((True, False) * 2))
        )
        for elapsed, miner, text in results:
            assert miner == miners[1].owner and text.startswith("Hello")
            assert elapsed < 1.5 + 3.0  # the cap, and a generous margin
        assert sample(gw, "infergrid_gateway_first_token_timeouts_total", reason="deadline") >= 2
        assert sample(gw, "infergrid_gateway_failovers_total") >= 2
        await wait_until(lambda: miners[0].hung_up >= 2)  # it was told to stop


async def test_miner_taken_out_of_service_releases_its_requests(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """Requests waiting for a first token move as soon as the health check takes their miner
    out, long before their deadline."""
    async with (
        miners_running(2, hang_s=20) as miners,
        running_gateway(
            miners,
            keys,
            traces,
            read_timeout_s=30,
            first_token_timeout_floor_s=25,
            first_token_timeout_cap_s=25,
            hedge_streams=False,  # what moves them here is the miner going down
        ) as gw,
    ):
        oa = gw.client(api_key)
        miners[0].mode = "hang_before_first"
        hung = gw.gateway.pool.get(miners[0].owner)
        assert hung is not None
        pending = [asyncio.create_task(timed_request(oa, s)) for s in (True, False) * 2]
        await wait_until(lambda: hung.inflight == 2)
        miners[0].healthy = False
        taken_out = time.monotonic()
        results = await asyncio.gather(*pending)
        assert time.monotonic() - taken_out < 0.5 + 0.5 + 3.0  # a health round, and margin
        assert {miner for _, miner, _ in results} == {miners[1].owner}
        assert sample(gw, "infergrid_gateway_first_token_timeouts_total", reason="miner_down") == 2


async def test_stall_after_first_token_ends_the_stream_uncharged(
    chain: Chain, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    net = deploy_network(chain)
    net.fund_payer(PAYER_A, WEI_PER_BTT)
    key = keys.create("payer-a", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net, mode="stall_mid_stream", hang_s=20) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, stream_stall_timeout_s=1.0) as gw,
    ):
        started = time.monotonic()
        raw = await gw.client(key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, stream=True
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        text = ""
        with pytest.raises(openai.APIError, match="sent nothing for 1 s"):
            async for chunk in raw.parse():
                text += "".join(c.delta.content or "" for c in chunk.choices)
        assert time.monotonic() - started < 1.0 + 3.0
        assert text == "Hello from "  # the two tokens before the stall
        trace = await wait_flushed(traces, rid)
        assert trace.status == 502 and trace.cost_wei is None and "stalled" in trace.error
        settlement = gw.gateway.settlement
        assert settlement is not None
        assert settlement.store.get(rid) is None and settlement.store.count() == 0
        account = settlement.ledger.get(addr(PAYER_A))
        assert account is not None and account.reserved_wei == 0 and account.inflight == 0
        assert sample(gw, "infergrid_gateway_stream_stalls_total") == 1
        await wait_until(lambda: miners[0].hung_up == 1)


async def test_miner_dying_after_its_usage_chunk_still_finishes_the_paid_stream(
    chain: Chain, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    """Once the attested usage chunk has been settled the receipt is stored and the client is
    charged, so a miner that dies before its [DONE] must not turn the paid response into an
    error: the stream ends normally, with the usage and cost it was charged."""
    net = deploy_network(chain)
    net.fund_payer(PAYER_B, WEI_PER_BTT)
    key = keys.create("payer-b", payer=addr(PAYER_B))[1]
    async with (
        registered_miners(net, mode="die_after_usage") as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        stream = await gw.client(key).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]  # raises on an error event
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("Hello from")
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens > 0
        cost_wei = int(usage.model_extra["cost_wei"])
        assert cost_wei > 0
        settlement = gw.gateway.settlement
        assert settlement is not None and settlement.store.count() == 1
        rid = stream.response.headers[REQUEST_ID_HEADER]
        stored = settlement.store.get(rid)
        assert stored is not None and stored.receipt.value == cost_wei
        trace = await wait_flushed(traces, rid)
        assert trace.status == 200 and trace.cost_wei == str(cost_wei) and trace.error is None
