"""Traces: queued on the request path, written in batches, readable from another connection."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from gateway_harness import MODEL, miners_running, running_gateway

from infergrid.app.keys import KeyStore
from infergrid.app.traces import Trace, TraceStore
from infergrid.protocol.wire import REQUEST_ID_HEADER


def _trace(i: int, **kw: object) -> Trace:
    return Trace(
        request_id=f"req{i}",
        key_id="key_1",
        model="tiny-test",
        route="/v1/chat/completions",
        stream=bool(i % 2),
        created_at=time.time() + i * 0.001,
        status=200,
        **kw,  # type: ignore[arg-type]
    )


def test_record_is_queued_until_flush(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    reader = TraceStore(tmp_path / "t.db")  # as the CLI would open it
    store.record(_trace(1, prompt_tokens=5, completion_tokens=7, miner="0xabc", ttft_ms=1.5))
    assert store.pending == 1
    assert reader.get("req1") is None
    assert store.get("req1") is not None  # the gateway's own process sees the queue
    assert store.flush() == 1 and store.pending == 0
    got = reader.get("req1")
    assert got is not None
    assert (got.prompt_tokens, got.completion_tokens, got.miner, got.ttft_ms) == (
        5,
        7,
        "0xabc",
        1.5,
    )
    assert got.stream is True
    store.close()
    reader.close()


def test_recent_newest_first_and_by_key(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    for i in range(5):
        store.record(_trace(i))
    other = _trace(9)
    other.key_id = "key_2"
    store.record(other)
    store.flush()
    assert [t.request_id for t in store.recent(3)] == ["req9", "req4", "req3"]
    assert [t.request_id for t in store.recent(10, key_id="key_2")] == ["req9"]
    store.close()


async def test_background_flusher_and_final_flush(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db", flush_interval_s=0.05)
    reader = TraceStore(tmp_path / "t.db")
    task = asyncio.create_task(store.run_flusher())
    store.record(_trace(1))
    for _ in range(40):
        await asyncio.sleep(0.025)
        if reader.get("req1") is not None:
            break
    assert reader.get("req1") is not None, "not flushed within a second"
    store.record(_trace(2))
    task.cancel()  # shutdown: what is queued still gets written
    await asyncio.gather(task, return_exceptions=True)
    assert reader.get("req2") is not None
    store.close()
    reader.close()


# -- a trace that cannot be stored blocks no other ---------------------------------------------


class Unstorable:
    """A value no SQLite column takes: stands for any value a future field might carry."""


def _stored_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT request_id FROM traces")}


def test_unstorable_traces_are_isolated_and_the_rest_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = TraceStore(tmp_path / "t.db")
    store.record(_trace(1))
    store.record(_trace(2, seed=2**63))  # past SQLite's INTEGER: OverflowError
    store.record(_trace(3, error="bad \ud800 text"))  # a lone surrogate: UnicodeEncodeError
    store.record(_trace(4, miner=Unstorable()))  # nothing makes this storable
    store.record(_trace(5))
    with caplog.at_level(logging.WARNING, logger="infergrid.app.traces"):
        assert store.flush() == 4
    # Nothing is re-queued: the next flush has nothing to retry.
    assert store.pending == 0 and store.flush() == 0
    assert _stored_ids(tmp_path / "t.db") == {"req1", "req2", "req3", "req5"}
    assert (store.rejected, store.degraded) == (1, 2)
    # The requests stay findable; only the values SQLite cannot hold were made storable.
    degraded = store.get("req2")
    assert degraded is not None and degraded.seed is None and degraded.status == 200
    escaped = store.get("req3")
    assert escaped is not None and escaped.error == "bad \\ud800 text"
    assert store.get("req4") is None

    # The same failure again is counted but not logged again.
    store.record(_trace(6, miner=Unstorable()))
    store.record(_trace(7))
    with caplog.at_level(logging.WARNING, logger="infergrid.app.traces"):
        assert store.flush() == 1
    assert store.rejected == 2
    rejected_lines = [r for r in caplog.records if "cannot store trace 'req4'" in r.getMessage()]
    assert len(rejected_lines) == 1
    assert not [r for r in caplog.records if "req6" in r.getMessage()]
    store.close()


async def test_poisoned_trace_does_not_stop_the_flusher(tmp_path: Path) -> None:
    # Before: the flusher re-queued the whole batch every 0.1 s, forever; nothing was stored.
    store = TraceStore(tmp_path / "t.db", flush_interval_s=0.02)
    task = asyncio.create_task(store.run_flusher())
    try:
        store.record(_trace(1, seed=2**64))
        store.record(_trace(2, miner=Unstorable()))
        for i in range(3, 6):
            store.record(_trace(i))
        deadline = time.monotonic() + 5
        while store.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert store.pending == 0, "the flusher keeps retrying a poisoned batch"
        assert _stored_ids(tmp_path / "t.db") == {"req1", "req3", "req4", "req5"}
        store.record(_trace(6))
        while store.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert "req6" in _stored_ids(tmp_path / "t.db")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()


def test_a_failing_database_keeps_the_traces_queued(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    store.record(_trace(1))
    store.record(_trace(2))
    # Another connection holds the write lock past the store's busy timeout: the database
    # fails, not a row, so nothing is dropped and the traces wait for the next flush.
    blocker = sqlite3.connect(tmp_path / "t.db", timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    store._conn.execute("PRAGMA busy_timeout = 0")
    try:
        assert store.flush() == 0
        assert store.pending == 2 and store.rejected == 0
        assert store.failures.database_errors == 1
    finally:
        blocker.rollback()
        blocker.close()
    assert store.flush() == 2 and store.pending == 0
    assert [t.request_id for t in store.recent(5)] == ["req2", "req1"]
    store.close()


async def test_metrics_count_rejected_traces(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        traces.record(_trace(1, miner=Unstorable()))  # as if a request had produced it
        oa = openai.AsyncOpenAI(base_url=gw.v1, api_key=api_key, max_retries=0, timeout=10)
        raw = await oa.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        await oa.close()
        request_id = raw.headers[REQUEST_ID_HEADER]
        deadline = time.monotonic() + 5
        while traces.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert traces.get_flushed(request_id) is not None  # the real request's trace is stored
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as r:
            text = await r.text()
        assert 'infergrid_writer_rejected_rows_total{writer="traces"} 1.0' in text
