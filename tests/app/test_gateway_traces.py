"""Traces: queued on the request path, written in batches, readable from another connection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from infergrid.app.traces import Trace, TraceStore


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
