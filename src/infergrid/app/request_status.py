"""Per-request records of a metered gateway, their audit state, and `GET /v1/requests/{id}`.

For every metered request whose receipt was stored the gateway keeps what an audit of it needs
(the exact forwarded body, prompt and output token ids, the output logprobs, the text the
client got, finish reason, usage, the attestation and the receipt: one `AuditJob`), and where
its verification stands (protocol.audits.AuditState), the signed verdicts, the dispute about it
and what was refunded. Kept in their own SQLite file beside the receipts, written by one writer
thread (`RequestLog`), so nothing on the request path touches disk: `add()` only queues.

Retention is bounded: at most `max_records` records and none older than `retention_s`; the
oldest go first, except the ones whose audit is still pending or disputed.

The same file holds the gateway's audit secret (32 random bytes made on first open, never
shown) and the gateway's view of each miner (app.audits.MinerRecord).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infergrid.app.keys import connect
from infergrid.app.traces import TraceStore
from infergrid.protocol.audits import AuditState
from infergrid.protocol.openai_types import APIError

__all__ = [
    "RequestLog",
    "RequestRecord",
    "request_not_found",
    "request_status_for",
    "requests_db_path",
    "status_body",
]

log = logging.getLogger("infergrid.app.gateway")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS requests (
        seq          INTEGER PRIMARY KEY,
        request_id   TEXT NOT NULL UNIQUE,
        key_id       TEXT NOT NULL,
        created      REAL NOT NULL,
        model        TEXT NOT NULL,
        miner        TEXT NOT NULL,
        request_hash BLOB NOT NULL,
        job          TEXT NOT NULL,
        state        TEXT NOT NULL,
        verdicts     TEXT NOT NULL DEFAULT '[]',
        dispute      TEXT,
        refund_wei   TEXT NOT NULL DEFAULT '0',
        refund       TEXT,
        note         TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS requests_hash ON requests (request_hash)",
    "CREATE INDEX IF NOT EXISTS requests_created ON requests (created)",
    """CREATE TABLE IF NOT EXISTS audit_secret (
        id     INTEGER PRIMARY KEY CHECK (id = 0),
        secret BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS miner_audits (
        miner  TEXT PRIMARY KEY,
        record TEXT NOT NULL
    ) WITHOUT ROWID""",
]
_COLUMNS = (
    "request_id, key_id, created, model, miner, request_hash, job, state, verdicts, dispute,"
    " refund_wei, refund, note"
)
# Records that must outlive retention until their audit or dispute ends.
_KEEP = (AuditState.PENDING.value, AuditState.DISPUTED.value)


@dataclass
class RequestRecord:
    """One metered request and where its verification stands."""

    request_id: str
    key_id: str
    created: float
    model: str
    miner: str
    request_hash: bytes
    job: dict[str, Any]  # protocol.audits.AuditJob JSON
    state: str = AuditState.NOT_SELECTED.value
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # SignedVerdict JSON
    dispute: dict[str, Any] | None = None  # {"id", "tx", "status"}
    refund_wei: int = 0
    refund: str | None = None  # "voided_receipt" | "slash"
    note: str = ""

    def row(self) -> tuple[Any, ...]:
        return (
            self.request_id,
            self.key_id,
            self.created,
            self.model,
            self.miner,
            self.request_hash,
            json.dumps(self.job, separators=(",", ":")),
            self.state,
            json.dumps(self.verdicts, separators=(",", ":")),
            None if self.dispute is None else json.dumps(self.dispute),
            str(self.refund_wei),
            self.refund,
            self.note,
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> RequestRecord:
        (rid, key_id, created, model, miner, rhash, job, state, verdicts, dispute) = row[:10]
        refund_wei, refund, note = row[10:]
        return cls(
            request_id=rid,
            key_id=key_id,
            created=created,
            model=model,
            miner=miner,
            request_hash=bytes(rhash),
            job=json.loads(job),
            state=state,
            verdicts=json.loads(verdicts),
            dispute=None if dispute is None else json.loads(dispute),
            refund_wei=int(refund_wei),
            refund=refund,
            note=note,
        )


def status_body(
    request_id: str,
    *,
    created: float,
    model: str,
    miner: str | None,
    record: RequestRecord | None,
) -> dict[str, Any]:
    """The JSON of `GET /v1/requests/{id}`; without a record (an unmetered request, or one the
    gateway did not keep) the state is not_selected and there is no attestation."""
    job = record.job if record is not None else None
    audit = {
        "state": record.state if record else AuditState.NOT_SELECTED.value,
        "verdicts": record.verdicts if record else [],
        "dispute": record.dispute if record else None,
        "refund_wei": str(record.refund_wei if record else 0),
        "refund": record.refund if record else None,
        "note": record.note if record else "",
    }
    return {
        "id": request_id,
        "object": "infergrid.request",
        "created": int(created),
        "model": model,
        "miner": miner,
        "audit": audit,
        "attestation": job.get("attestation") if job else None,
        "receipt": job.get("receipt") if job else None,
        "job": job,
    }


def requests_db_path(db_path: Path) -> Path:
    """Where a metered gateway keeps its request records: beside its keys-and-traces file
    (gateway.db -> gateway.requests.db), so neither writer waits on the other's lock."""
    return db_path.with_name(db_path.stem + ".requests" + (db_path.suffix or ".db"))


def request_not_found(request_id: str) -> APIError:
    return APIError(404, f"No request `{request_id}` under this API key.", code="request_not_found")


async def request_status_for(
    request_id: str, key_id: str, traces: TraceStore, requests: RequestLog | None
) -> dict[str, Any]:
    """The body of `GET /v1/requests/{id}` for the key `key_id`; APIError 404
    request_not_found when the request is unknown or another key made it."""
    record = None
    if requests is not None:
        record = await asyncio.to_thread(requests.get, request_id)
    if record is not None:
        if record.key_id != key_id:
            raise request_not_found(request_id)
        return status_body(
            request_id,
            created=record.created,
            model=record.model,
            miner=record.miner,
            record=record,
        )
    trace = traces.get_pending(request_id) or await asyncio.to_thread(
        traces.get_flushed, request_id
    )
    if trace is None or trace.key_id != key_id:
        raise request_not_found(request_id)
    return status_body(
        request_id, created=trace.created_at, model=trace.model, miner=trace.miner, record=None
    )


class RequestLog:
    """The request records, the audit secret and the miners' audit records, in SQLite.

    Writes go through one writer thread in the order they were asked for (`add`, `update`,
    `save_miner` return at once); reads (`get`, `by_hash`) first wait for the writes queued
    before them, so call them from a worker thread (asyncio.to_thread)."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        max_records: int = 100_000,
        retention_s: float = 7 * 86400.0,
        prune_every: int = 1000,
    ) -> None:
        if max_records < 1 or retention_s <= 0:
            raise ValueError("request retention must keep at least one record for some time")
        self.db_path = Path(db_path)
        self.max_records = max_records
        self.retention_s = retention_s
        self.prune_every = prune_every
        self._conn = connect(self.db_path, synchronous="NORMAL")
        for statement in _SCHEMA:
            self._conn.execute(statement)
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[sqlite3.Connection], None] | None] = queue.Queue()
        self._since_prune = 0
        self.secret = self._load_secret()
        self._thread = threading.Thread(target=self._writer, name="request-log", daemon=True)
        self._thread.start()
        self._closed = False

    def _load_secret(self) -> bytes:
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO audit_secret (id, secret) VALUES (0, ?)", (os.urandom(32),)
            )
            (secret,) = self._conn.execute(
                "SELECT secret FROM audit_secret WHERE id = 0"
            ).fetchone()
        return bytes(secret)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        with self._lock:
            self._conn.close()

    # -- writing ---------------------------------------------------------------------------

    def _writer(self) -> None:
        """Run what is queued, everything waiting at once in one transaction."""
        while True:
            ops = [self._queue.get()]
            while True:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in ops
            try:
                with self._lock:
                    self._conn.execute("BEGIN")
                    try:
                        for op in ops:
                            if op is not None:
                                try:
                                    op(self._conn)
                                except sqlite3.Error:
                                    log.exception("request log write failed")
                    finally:
                        self._conn.execute("COMMIT")
            except Exception:
                log.exception("request log write failed")
            finally:
                for _ in ops:
                    self._queue.task_done()
            if stop:
                return

    def submit(self, op: Callable[[sqlite3.Connection], None]) -> None:
        """Run `op(connection)` in the writer thread, after everything queued before it."""
        self._queue.put(op)

    def add(self, build: Callable[[], RequestRecord | None]) -> None:
        """Store the record `build()` makes, built in the writer thread (the base64 and JSON
        of a job stay off the event loop)."""

        def write(conn: sqlite3.Connection) -> None:
            record = build()
            if record is None:
                return
            conn.execute(
                f"INSERT OR REPLACE INTO requests ({_COLUMNS}) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                record.row(),
            )
            self._since_prune += 1
            if self._since_prune >= self.prune_every:
                self._since_prune = 0
                self._prune(conn)

        self.submit(write)

    def update(self, record: RequestRecord) -> None:
        """Store a record's new audit state (the job is never rewritten)."""
        values = (
            record.state,
            json.dumps(record.verdicts, separators=(",", ":")),
            None if record.dispute is None else json.dumps(record.dispute),
            str(record.refund_wei),
            record.refund,
            record.note,
            record.request_id,
        )
        self.submit(
            lambda conn: conn.execute(
                "UPDATE requests SET state = ?, verdicts = ?, dispute = ?, refund_wei = ?,"
                " refund = ?, note = ? WHERE request_id = ?",
                values,
            )
        )

    def save_miner(self, miner: str, record: dict[str, Any]) -> None:
        text = json.dumps(record, separators=(",", ":"))
        self.submit(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO miner_audits (miner, record) VALUES (?, ?)", (miner, text)
            )
        )

    def prune(self) -> None:
        """Apply the retention bounds now (the writer also does every `prune_every` adds)."""
        self.submit(self._prune)
        self.flush()

    def _prune(self, conn: sqlite3.Connection) -> None:
        cutoff = time.time() - self.retention_s
        keep = ", ".join("?" * len(_KEEP))
        conn.execute(
            f"DELETE FROM requests WHERE created < ? AND state NOT IN ({keep})", (cutoff, *_KEEP)
        )
        (count,) = conn.execute("SELECT count(*) FROM requests").fetchone()
        if count > self.max_records:
            conn.execute(
                f"DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE state NOT IN"
                f" ({keep}) ORDER BY seq LIMIT ?)",
                (*_KEEP, count - self.max_records),
            )

    def flush(self) -> None:
        """Wait until every write queued so far is done (blocking)."""
        self._queue.join()

    # -- reading ---------------------------------------------------------------------------

    def _select(self, where: str, args: tuple[Any, ...]) -> list[RequestRecord]:
        self.flush()
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM requests WHERE {where}", args)
            return [RequestRecord.from_row(tuple(row)) for row in rows.fetchall()]

    def get(self, request_id: str) -> RequestRecord | None:
        found = self._select("request_id = ?", (request_id,))
        return found[0] if found else None

    def by_hash(self, request_hash: bytes) -> RequestRecord | None:
        found = self._select("request_hash = ?", (request_hash,))
        return found[0] if found else None

    def count(self) -> int:
        self.flush()
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM requests").fetchone()[0])

    def verdict_counts(
        self, since: float | None = None, until: float | None = None
    ) -> dict[str, tuple[int, int]]:
        """Per verifier address (as its verdicts name it): (passed, failed), over the verdicts
        recorded for requests created in [since, until) (None: unbounded). One grouped query
        over the `created` index; what retention pruned is no longer counted."""
        # As floats, like the column: a bound past SQLite's 64-bit integers still compares.
        low = float("-inf") if since is None else float(since)
        high = float("inf") if until is None else float(until)
        self.flush()
        with self._lock:
            rows = self._conn.execute(
                "SELECT json_extract(v.value, '$.verifier'), json_extract(v.value, '$.passed'),"
                " count(*) FROM requests, json_each(requests.verdicts) AS v"
                " WHERE requests.created >= ? AND requests.created < ?"
                " AND requests.verdicts != '[]' GROUP BY 1, 2",
                (low, high),
            ).fetchall()
        counts: dict[str, tuple[int, int]] = {}
        for verifier, passed, count in rows:
            if not isinstance(verifier, str):
                continue  # a verdict without a verifier is nobody's work
            ok, failed = counts.get(verifier, (0, 0))
            counts[verifier] = (ok + count, failed) if passed else (ok, failed + count)
        return counts

    def verdicts_in(
        self, since: float, until: float
    ) -> dict[str, tuple[str, list[dict[str, Any]]]]:
        """Request id -> (its miner, its verdicts as SignedVerdict JSON), for the audited
        requests created in [since, until) (app.miner_epochs)."""
        self.flush()
        with self._lock:
            rows = self._conn.execute(
                "SELECT request_id, miner, verdicts FROM requests WHERE created >= ?"
                " AND created < ? AND verdicts != '[]'",
                (float(since), float(until)),
            ).fetchall()
        return {rid: (miner, json.loads(text)) for rid, miner, text in rows}

    def miners(self) -> dict[str, dict[str, Any]]:
        self.flush()
        with self._lock:
            rows = self._conn.execute("SELECT miner, record FROM miner_audits").fetchall()
        return {miner: json.loads(text) for miner, text in rows}


# -- for `infergrid trace` ---------------------------------------------------------------------


def fetch_request_status(
    base_url: str, api_key: str, request_id: str, timeout_s: float = 10.0
) -> dict[str, Any]:
    """GET {base_url}/requests/{id} (base_url ends in /v1); RuntimeError with the gateway's
    message, ConnectionError when it cannot be reached."""
    from infergrid.gateway_client import get_gateway_json, quoted

    body = get_gateway_json(
        base_url, f"/requests/{quoted(request_id)}", api_key, timeout_s=timeout_s
    )
    if not isinstance(body, dict) or not isinstance(body.get("audit"), dict):
        raise RuntimeError("the gateway's request status has no audit")
    return body


def status_lines(body: dict[str, Any]) -> list[str]:
    """A request status as `infergrid trace` prints it: state, verdicts, dispute, refund."""
    audit = body["audit"]
    lines = [
        f"audit     {audit.get('state')}" + (f" ({audit['note']})" if audit.get("note") else "")
    ]
    for verdict in audit.get("verdicts") or []:
        outcome = "passed" if verdict.get("passed") else "failed"
        reason = f": {verdict['reason']}" if verdict.get("reason") else ""
        lines.append(f"  verdict {outcome} by {verdict.get('verifier')}{reason}")
    dispute = audit.get("dispute")
    if dispute:
        lines.append(
            f"dispute   #{dispute.get('id')} {dispute.get('status')} tx {dispute.get('tx')}"
        )
    refund = int(audit.get("refund_wei") or 0)
    if refund or audit.get("refund"):
        lines.append(f"refund    {refund} wei ({audit.get('refund')})")
    return lines
