"""The miner's own record of every response it attested, to check gateways' vouchers against.

A gateway signs the receipts and vouchers the escrow pays on; the miner keeps this log so it
can tell when a gateway's cumulative voucher for a payer says less than the miner served
(a shortfall) and stop trusting that gateway. It is SQLite, written by one background thread
in group commits (every `flush_interval_s`): a crash loses at most that last slice, which
only weakens this check, never the money (the gateway's receipts are the durable record).
A response that cannot be stored (a count past SQLite's 64 bits) is dropped alone and counted
(`rejected`, in /health); it never stops the writer or the other responses of its batch.

Amounts are wei and exceed SQLite's 64-bit integers, so they are stored as decimal text and
added up in Python; a `totals` table, updated in the same transaction as each batch, keeps
the per-(payer, gateway) sums so the collector never scans every response.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from eth_utils import is_address, to_checksum_address

from infergrid.batch_writes import BatchOutcome, FailureLog, write_isolating
from infergrid.settle.binding import ChainBinding, bind_database

log = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL_S = 0.05
# Upper bound on rows per transaction, so one commit never holds the write lock for long.
MAX_BATCH = 4096
# Absent payer or gateway headers (a client calling the miner directly) are stored as ''.
NO_ADDRESS = ""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY,  -- the order responses were logged in
    request_hash BLOB NOT NULL UNIQUE,
    request_id TEXT NOT NULL,
    payer TEXT NOT NULL,
    gateway TEXT NOT NULL,
    model_id TEXT NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    value_wei TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_pair_time ON responses (payer, gateway, created_at);
CREATE TABLE IF NOT EXISTS totals (
    payer TEXT NOT NULL,
    gateway TEXT NOT NULL,
    responses INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    value_wei TEXT NOT NULL,
    PRIMARY KEY (payer, gateway)
) WITHOUT ROWID;
"""


def normalize_address(value: str | None) -> str | None:
    """Checksummed address, or None for None/''; ValueError for anything else."""
    if value is None or value == "":
        return None
    if not is_address(value):
        raise ValueError(f"{value!r} is not an address")
    return to_checksum_address(value)


@dataclass(frozen=True)
class LoggedResponse:
    """One attested response, as the miner saw it."""

    request_id: str
    request_hash: bytes
    payer: str | None  # from x-infergrid-payer; None when the request had none
    gateway: str | None  # from x-infergrid-gateway: the signer that will sign the receipt
    model_id: str
    tokens_in: int
    tokens_out: int
    value_wei: int  # at the miner's own registered prices (pricing.request_value)
    created_at: float  # unix seconds when the miner signed the attestation


@dataclass(frozen=True)
class PairTotal:
    """Everything logged for one (payer, gateway)."""

    payer: str | None
    gateway: str | None
    responses: int
    tokens_in: int
    tokens_out: int
    value_wei: int


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Stop:
    pass


_Item = LoggedResponse | _Flush | _Stop


class ReceiptLog:
    """Append from any thread (never blocks), read from any thread.

    Use as a context manager or call close(); close() writes everything appended first.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        chain: ChainBinding | None = None,
    ) -> None:
        """Open (or create) the log; with `chain`, bind it to that deployment first
        (settle.binding: ChainMismatch if it holds another chain's responses)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._flush_interval = flush_interval_s
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self.write_errors = 0  # batches the database failed (see the log)
        # Responses that could not be stored, dropped alone (see infergrid.batch_writes).
        self.failures = FailureLog("receipt log", log)
        # Readers share one connection behind a lock; WAL lets them run beside the writer.
        self._reader = self._connect()
        self._reader.executescript(_SCHEMA)
        self.binding: ChainBinding | None = None
        if chain is not None:
            try:
                self.binding = bind_database(
                    self._reader, chain, what="the miner's receipt log", path=self.path
                )
            except BaseException:
                self._reader.close()
                raise
        self._read_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="receipt-log", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a power cut may lose the last commits, which the module doc accepts.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # --- writing -----------------------------------------------------------------------

    def append(self, record: LoggedResponse) -> None:
        """Queue one response; it is on disk within about flush_interval_s."""
        if self._closed:
            raise RuntimeError("the receipt log is closed")
        self._queue.put(record)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything appended before this call is written."""
        if self._closed:
            return
        marker = _Flush()
        self._queue.put(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            raise TimeoutError("the receipt log did not flush in time")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Stop())
        self._wake.set()
        self._writer.join(30.0)
        with self._read_lock:
            self._reader.close()

    def __enter__(self) -> ReceiptLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_loop(self) -> None:
        conn = self._connect()
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if isinstance(first, LoggedResponse):
                    # Group commit: let a slice of traffic gather into one transaction.
                    self._wake.wait(self._flush_interval)
                self._wake.clear()
                items: list[_Item] = [first]
                while len(items) < MAX_BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                records = [i for i in items if isinstance(i, LoggedResponse)]
                if records:
                    self._write_isolating(conn, records)
                for item in items:
                    if isinstance(item, _Flush):
                        item.done.set()
                    elif isinstance(item, _Stop):
                        stop = True
        finally:
            conn.close()

    def _write_isolating(self, conn: sqlite3.Connection, records: list[LoggedResponse]) -> None:
        """Write a batch; never fatal to the writer. A response that cannot be stored is
        dropped alone (the batch is written again row by row); if the database fails, the
        batch is lost: serving goes on, and the collector reports the gap."""
        try:
            outcome = write_isolating(records, lambda rows: self._write(conn, rows))
        except Exception as exc:  # a bug, not a row: the thread must survive it
            outcome = BatchOutcome(failed=records, error=exc)
        for record, exc in outcome.rejected:
            self.failures.reject(f"the response to request {record.request_id!r}", exc)
        if outcome.error is not None:
            self.write_errors += 1
            self.failures.database_failed(
                outcome.error, len(outcome.failed), "those responses are not in the log"
            )

    @property
    def rejected(self) -> int:
        """Responses dropped because they could not be stored."""
        return self.failures.rejected

    @staticmethod
    def _write(conn: sqlite3.Connection, records: Sequence[LoggedResponse]) -> None:
        sums: dict[tuple[str, str], list[int]] = {}
        with conn:  # one transaction: rows and totals agree even after a crash
            for r in records:
                payer = r.payer or NO_ADDRESS
                gateway = r.gateway or NO_ADDRESS
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO responses (request_hash, request_id, payer, gateway, "
                    "model_id, tokens_in, tokens_out, value_wei, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        r.request_hash,
                        r.request_id,
                        payer,
                        gateway,
                        r.model_id,
                        r.tokens_in,
                        r.tokens_out,
                        str(r.value_wei),
                        r.created_at,
                    ),
                )
                if cursor.rowcount != 1:
                    continue  # the same request hash twice: count it once
                pair = sums.setdefault((payer, gateway), [0, 0, 0, 0])
                pair[0] += 1
                pair[1] += r.tokens_in
                pair[2] += r.tokens_out
                pair[3] += r.value_wei
            for (payer, gateway), (count, tin, tout, value) in sums.items():
                row = conn.execute(
                    "SELECT responses, tokens_in, tokens_out, value_wei FROM totals "
                    "WHERE payer = ? AND gateway = ?",
                    (payer, gateway),
                ).fetchone()
                if row is not None:
                    count += row[0]
                    tin += row[1]
                    tout += row[2]
                    value += int(row[3])
                conn.execute(
                    "INSERT OR REPLACE INTO totals VALUES (?, ?, ?, ?, ?, ?)",
                    (payer, gateway, count, tin, tout, str(value)),
                )

    # --- reading -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            yield self._reader

    def contains(self, request_hash: bytes) -> bool:
        """Whether a response for this request hash is on disk (not counting the queue)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM responses WHERE request_hash = ?", (request_hash,)
            ).fetchone()
        return row is not None

    def totals(self) -> list[PairTotal]:
        """Per (payer, gateway) sums of everything on disk."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT payer, gateway, responses, tokens_in, tokens_out, value_wei FROM totals "
                "ORDER BY payer, gateway"
            ).fetchall()
        return [
            PairTotal(p or None, g or None, int(n), int(tin), int(tout), int(v))
            for p, g, n, tin, tout, v in rows
        ]

    def total(self, payer: str | None, gateway: str | None, until: float | None = None) -> int:
        """Wei logged for (payer, gateway); with `until`, only responses created before it.

        The cut-off lets the collector compare a voucher with what the miner had served when
        the voucher was signed, rather than count responses the gateway could not know yet.
        """
        p = normalize_address(payer) or NO_ADDRESS
        g = normalize_address(gateway) or NO_ADDRESS
        with self._read() as conn:
            row = conn.execute(
                "SELECT value_wei FROM totals WHERE payer = ? AND gateway = ?", (p, g)
            ).fetchone()
            value = int(row[0]) if row else 0
            if until is not None and value:
                # Few rows are newer than a fresh voucher: subtract them rather than add up
                # the whole history.
                newer = conn.execute(
                    "SELECT value_wei FROM responses "
                    "WHERE payer = ? AND gateway = ? AND created_at >= ?",
                    (p, g, until),
                ).fetchall()
                value -= sum(int(v) for (v,) in newer)
        return value

    def responses(self, limit: int | None = None) -> list[LoggedResponse]:
        """The logged responses, oldest first (for inspection and tests)."""
        sql = (
            "SELECT request_id, request_hash, payer, gateway, model_id, tokens_in, tokens_out, "
            "value_wei, created_at FROM responses ORDER BY seq"
        )
        params: tuple[int, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            LoggedResponse(rid, bytes(h), p or None, g or None, m, tin, tout, int(v), t)
            for rid, h, p, g, m, tin, tout, v, t in rows
        ]
