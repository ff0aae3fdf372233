"""Per-request traces in SQLite, written in batches off the request path.

`record()` only appends to an in-memory queue; a background task flushes the queue in one
transaction every ~100 ms (in a worker thread, so disk waits never stall the event loop) and once
more on shutdown. A trace is an operator's record, not a receipt: losing the last 100 ms of them
in a crash is the accepted price of not paying a disk write per request.

No trace can block the others (infergrid.batch_writes): a batch that fails because of a row is
written again row by row; a trace that cannot be stored as it is (an integer past 64 bits, a
string with a lone surrogate) is stored with those values made storable (the integer dropped,
the string escaped), and only one that still fails is dropped. Both are counted
(`infergrid_writer_rejected_rows_total{writer="traces"}` counts the dropped) and logged once.
A database that fails as a whole (locked, disk full) loses nothing: the batch goes back to the
queue and the flusher retries it, backing off up to MAX_RETRY_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from infergrid.app.keys import connect
from infergrid.app.miner_epochs import TraceRow
from infergrid.batch_writes import FailureLog, write_isolating

log = logging.getLogger(__name__)

# Beyond this many unflushed traces the oldest are dropped (and counted) rather than letting a
# stuck disk grow the gateway's memory without bound.
MAX_PENDING = 100_000
# While the database itself fails, the flusher retries at most this far apart.
MAX_RETRY_INTERVAL_S = 5.0
# What SQLite's INTEGER holds.
_INT64 = range(-(2**63), 2**63)


@dataclass(slots=True)
class Trace:
    request_id: str
    key_id: str | None
    model: str | None
    route: str  # the API path the client called
    stream: bool
    created_at: float  # unix time the gateway received the request
    # HTTP status the client got; 502 for a stream that broke after its headers went out and
    # 499 for a client that hung up, as nginx counts them.
    status: int
    miner: str | None = None  # registry owner address of the miner that served
    miner_endpoint: str | None = None
    seed: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None  # streamed requests only: until the first content chunk
    total_ms: float | None = None
    attempts: int = 0  # miners tried; more than one means failover happened
    error: str | None = None
    # Settlement (a metered gateway only): who paid, what the receipt charged (decimal wei as
    # text: uint256 does not fit SQLite's integers), and why a miner's attestation was
    # rejected on the way (the request may still have succeeded on another miner).
    payer: str | None = None
    cost_wei: str | None = None
    attestation_error: str | None = None


_COLUMNS = [f.name for f in fields(Trace)]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS traces (
    {", ".join(_COLUMNS)},
    PRIMARY KEY (request_id)
)
"""
_INSERT = (
    f"INSERT OR REPLACE INTO traces ({', '.join(_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM traces"


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A database written by an older gateway lacks the newer columns: add them."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(traces)")}
    for name in _COLUMNS:
        if name in present:
            continue
        try:
            conn.execute(f"ALTER TABLE traces ADD COLUMN {name}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it meanwhile
                raise


def _storable(trace: Trace) -> Trace:
    """A copy of `trace` that SQLite can hold: integers past 64 bits become None, strings that
    are not valid UTF-8 (lone surrogates) are backslash-escaped."""
    values: dict[str, object] = {}
    for name in _COLUMNS:
        value = getattr(trace, name)
        if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
            value = None
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        values[name] = value
    return Trace(**values)  # type: ignore[arg-type]


def _row_to_trace(row: tuple[object, ...]) -> Trace:
    trace = Trace(*row)  # type: ignore[arg-type]
    trace.stream = bool(trace.stream)
    return trace


class TraceStore:
    """Durable traces with a batched writer; also what the CLI reads them through."""

    def __init__(self, db_path: str | Path, *, flush_interval_s: float = 0.1) -> None:
        self.db_path = Path(db_path)
        self.flush_interval_s = flush_interval_s
        # NORMAL is durable across process crashes in WAL mode; only power loss can cost the
        # last transactions, which is acceptable for traces (see module docstring).
        self._conn = connect(self.db_path, synchronous="NORMAL")
        self._conn.execute(_SCHEMA)
        _add_missing_columns(self._conn)
        self._conn.execute("CREATE INDEX IF NOT EXISTS traces_created ON traces (created_at)")
        self._lock = threading.Lock()
        self._pending: deque[Trace] = deque()
        self.dropped = 0  # oldest traces dropped from a full queue
        self.flushed = 0
        self.degraded = 0  # stored with unstorable values made storable
        # Rows dropped because they could not be stored, and database failures.
        self.failures = FailureLog("trace store", log)
        self._database_failing = False

    def record(self, trace: Trace) -> None:
        """Queue a trace; O(1) and no I/O, safe on the request path."""
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(trace)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def rejected(self) -> int:
        """Traces dropped because even their storable copy could not be written."""
        return self.failures.rejected

    def _write(self, batch: Sequence[Trace]) -> None:
        """All of `batch` in one transaction, or none of it (raising). Caller holds _lock."""
        rows = [tuple(getattr(trace, name) for name in _COLUMNS) for trace in batch]
        try:
            self._conn.execute("BEGIN")
            self._conn.executemany(_INSERT, rows)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def flush(self) -> int:
        """Write everything queued so far; returns how many traces were stored.

        Never raises for a trace: one that cannot be stored is stored degraded or dropped
        (module docstring). If the database fails, the unwritten traces go back to the front
        of the queue for the next flush."""
        batch: list[Trace] = []
        pending = self._pending
        # popleft on a deque is atomic, so record() from the loop thread can run concurrently.
        while pending:
            batch.append(pending.popleft())
        if not batch:
            return 0
        with self._lock:
            outcome = write_isolating(batch, self._write)
            copies = [(_storable(trace), exc) for trace, exc in outcome.rejected]
            retried = write_isolating([copy for copy, _ in copies], self._write)
        errors = {id(copy): exc for copy, exc in copies}
        for trace in retried.written:
            self.degraded += 1
            self.failures.note(
                f"trace {trace.request_id!r} as it was; stored it with those values made storable",
                errors[id(trace)],
            )
        for trace, exc in retried.rejected:
            self.failures.reject(f"trace {trace.request_id!r}", exc)
        failed = outcome.failed + retried.failed
        self._database_failing = bool(failed)
        error = outcome.error or retried.error
        if error is not None:
            self.failures.database_failed(error, len(failed), "they stay queued for a retry")
            # Back at the front, oldest first as before; newer traces keep queueing behind.
            pending.extendleft(reversed(failed))
        written = len(outcome.written) + len(retried.written)
        self.flushed += written
        return written

    async def run_flusher(self) -> None:
        """Flush every flush_interval_s until cancelled, then flush what is left. While the
        database fails, the interval doubles up to MAX_RETRY_INTERVAL_S."""
        interval = self.flush_interval_s
        try:
            while True:
                await asyncio.sleep(interval)
                if self._pending:
                    try:
                        await asyncio.to_thread(self.flush)
                    except Exception:  # a bug, not a trace: keep flushing the others
                        log.exception("writing traces failed")
                if self._database_failing:
                    interval = min(interval * 2, max(MAX_RETRY_INTERVAL_S, self.flush_interval_s))
                else:
                    interval = self.flush_interval_s
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    def get(self, request_id: str) -> Trace | None:
        found = self.get_flushed(request_id)
        # Not yet flushed: the gateway's own process can still answer from the queue.
        return found if found is not None else self.get_pending(request_id)

    def get_flushed(self, request_id: str) -> Trace | None:
        """From the database only: safe in a worker thread."""
        with self._lock:
            row = self._conn.execute(_SELECT + " WHERE request_id = ?", (request_id,)).fetchone()
        return _row_to_trace(row) if row is not None else None

    def get_pending(self, request_id: str) -> Trace | None:
        """From the unflushed queue only: call it on the thread that records (the loop)."""
        for trace in reversed(self._pending):
            if trace.request_id == request_id:
                return trace
        return None

    def window(self, since: float, until: float) -> list[TraceRow]:
        """The traces of requests received in [since, until) that name a miner, with the
        columns the epoch counts read (app.miner_epochs); safe in a worker thread."""
        self.flush()
        with self._lock:
            rows = self._conn.execute(
                "SELECT request_id, miner, model, status, stream, completion_tokens, ttft_ms,"
                " total_ms FROM traces WHERE created_at >= ? AND created_at < ?"
                " AND miner IS NOT NULL",
                (float(since), float(until)),
            ).fetchall()
        return [
            TraceRow(rid, miner, model or "", int(status or 0), bool(stream), tokens, ttft, total)
            for rid, miner, model, status, stream, tokens, ttft, total in rows
        ]

    def recent(self, limit: int = 20, *, key_id: str | None = None) -> list[Trace]:
        """The newest traces first, optionally only one API key's."""
        where, args = ("", ()) if key_id is None else (" WHERE key_id = ?", (key_id,))
        with self._lock:
            rows = self._conn.execute(
                _SELECT + where + " ORDER BY created_at DESC LIMIT ?", (*args, limit)
            ).fetchall()
        return [_row_to_trace(row) for row in rows]

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()
