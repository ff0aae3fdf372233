"""What a gateway observed of each miner over a window (app.miner_epochs, `GET
/v1/miners/epoch`): the counts on traces and verdicts as the gateway writes them, the health
log's buckets, and the endpoint end to end on a gateway serving scripted miners."""

from __future__ import annotations

import asyncio
import time

import pytest
from audit_harness import get_json
from gateway_harness import MODEL, miners_running, running_gateway

from infergrid.app.keys import KeyStore
from infergrid.app.miner_epochs import HealthLog, TraceRow, VerdictRow, observe
from infergrid.app.traces import TraceStore
from infergrid.verify.score_duty import fetch_miner_epoch

A, B, C = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20


def trace(
    rid: str,
    miner: str,
    *,
    status: int = 200,
    stream: bool = True,
    tokens: int = 11,
    ttft_ms: float = 100.0,
    total_ms: float = 1100.0,
    model: str = "m",
) -> TraceRow:
    return TraceRow(rid, miner, model, status, stream, tokens, ttft_ms, total_ms)


def test_counts_requests_errors_tokens_latency_and_audits_per_miner() -> None:
    health = HealthLog()
    for minute in range(10):
        health.record(A, True, 60.0 * minute)
        health.record(B, minute % 2 == 0, 60.0 * minute)
    traces = [
        # A: the model's typical pace (0.1 s to the first token, 0.1 s a token after it).
        trace("a1", A),
        trace("a2", A),
        trace("a3", A, tokens=21, total_ms=2100.0),
        # B: twice as slow on both, one failure, one answer not streamed.
        trace("b1", B, ttft_ms=200.0, total_ms=2200.0),
        trace("b2", B, status=502, tokens=0),
        trace("b3", B, stream=False, tokens=10, ttft_ms=0.0, total_ms=2000.0),
    ]
    verdicts = [
        VerdictRow("a1", A, (True,)),
        VerdictRow("a2", A, (False, True)),  # failed, then a re-audit passed: both count
        VerdictRow("b1", B, (True,)),
    ]
    found = {m.miner: m for m in observe(traces, verdicts, health, 0, 600, miners=[C])}
    a, b, c = found[A], found[B], found[C]
    assert (a.requests, a.errors, b.requests, b.errors) == (3, 0, 3, 1)
    # a2 had a failed verdict: its tokens are not verified.
    assert a.verified_tokens == 11 + 21 and b.verified_tokens == 11 + 10
    assert (a.audits_passed, a.audits_failed, b.audits_passed, b.audits_failed) == (2, 1, 1, 0)
    assert (a.health_checks, a.health_ok, b.health_checks, b.health_ok) == (10, 10, 10, 5)
    # Medians against the model's: A is at or under its pace, B about twice it.
    assert a.ttft_ratio is not None and b.ttft_ratio is not None
    assert a.ttft_ratio <= 1.0 < 1.5 < b.ttft_ratio
    assert a.tpot_ratio == pytest.approx(1.0) and b.tpot_ratio == pytest.approx(2.0)
    assert a.models["m"]["ttft_s"] == pytest.approx(0.1)
    assert b.models["m"]["tpot_s"] == pytest.approx(0.2)
    # A miner nothing names is listed with zeros; the order is by address.
    assert (c.requests, c.verified_tokens, c.ttft_ratio, c.health_checks) == (0, 0, None, 0)
    assert [m.miner for m in observe(traces, verdicts, health, 0, 600)] == [A, B]
    assert a.to_json()["audits"] == {"passed": 2, "failed": 1}


def test_latency_is_judged_against_each_models_own_pace() -> None:
    """A miner on a slow model is not slow: its ratio is against that model's median."""
    traces = [
        trace("f1", A, model="fast"),
        trace("f2", B, model="fast", ttft_ms=300.0, total_ms=3300.0),
        trace("s1", C, model="slow", ttft_ms=1000.0, total_ms=11000.0),
    ]
    found = {m.miner: m for m in observe(traces, [], HealthLog(), 0, 1)}
    assert found[C].ttft_ratio == pytest.approx(1.0) and found[C].tpot_ratio == pytest.approx(1.0)
    assert found[B].tpot_ratio is not None and found[B].tpot_ratio > found[A].tpot_ratio  # type: ignore[operator]


def test_the_health_log_counts_buckets_inside_the_window_and_forgets_old_ones() -> None:
    log = HealthLog(bucket_s=60, retention_s=600)
    for second in range(0, 1200, 30):  # two checks a minute for 20 minutes
        log.record(A, second < 600, float(second))
    # Only the last 10 minutes are kept.
    assert log.counts(A, 0, 10_000) == (22, 2)  # buckets 540..1140: 11 of them
    assert log.counts(A, 600, 660) == (2, 0)
    assert log.counts(A, 601, 660) == (0, 0)  # a bucket counts where it starts
    assert log.counts(B, 0, 10_000) == (0, 0)
    with pytest.raises(ValueError, match="bucket_s"):
        HealthLog(bucket_s=0)
    with pytest.raises(ValueError, match="retention_s"):
        HealthLog(bucket_s=60, retention_s=59)


async def test_the_endpoint_reports_what_the_gateway_served(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    started = time.time()
    async with miners_running(2) as miners, running_gateway(miners, keys, traces) as gw:
        client = gw.client(api_key)
        for _ in range(4):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        status, body = await get_json(gw, "/v1/miners/epoch", api_key)
        assert status == 200, body
        served = {m["miner"]: m for m in body["data"]}
        assert {m.lower() for m in served} == {m.owner.lower() for m in miners}
        assert sum(m["requests"] for m in served.values()) == 4
        assert sum(m["verified_tokens"] for m in served.values()) > 0
        assert all(m["health_checks"] >= 1 and m["errors"] == 0 for m in served.values())
        # A window before anything happened is empty but lists the miners.
        status, early = await get_json(
            gw, f"/v1/miners/epoch?since=0&until={started - 3600}", api_key
        )
        assert status == 200 and all(m["requests"] == 0 for m in early["data"])
        status, bad = await get_json(gw, "/v1/miners/epoch?since=soon", api_key)
        assert status == 400 and bad["error"]["param"] == "since"
        # A parameter it does not take is refused by name, not ignored.
        status, bad = await get_json(gw, "/v1/miners/epoch?since=0&miner=0x1", api_key)
        assert status == 400 and bad["error"]["param"] == "miner"
        assert bad["error"]["code"] == "unsupported_parameter"
        status, bad = await get_json(gw, "/v1/miners/epoch?since=0.0&=null", api_key)
        assert status == 400 and bad["error"]["param"] == ""
        status, _ = await get_json(gw, "/v1/miners/epoch", "sk-wrong")
        assert status == 401
        # The verifiers' client for it (verify.score_duty) reads the same rows.
        rows = await asyncio.to_thread(fetch_miner_epoch, gw.url, api_key, 0, time.time())
        assert sum(r["requests"] for r in rows) == 4
        with pytest.raises(RuntimeError, match="the gateway answered"):
            await asyncio.to_thread(fetch_miner_epoch, gw.v1, "ig-not-a-key", 0, 1)
