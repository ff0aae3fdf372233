"""The gateway's durable receipt store: receipts, vouchers, anchor batches and inclusion proofs.

A receipt is money: once the gateway tells a client that a request is done, the receipt behind
it must survive the gateway dying, kill -9 included (DESIGN.md §8), and once a miner holds a
voucher over it, a power cut too. So `commit()` returns only after its row is committed to the
file, and what can leave the gateway for good waits for the disk:

- **the answer** waits for the commit, not for the disk: the WAL runs at `synchronous=NORMAL`,
  so a committed row is in the kernel's hands and survives the process dying. `WalSync`
  (infergrid.wal_sync) fsyncs the WAL in the background within 10 ms of a commit, so a power
  cut loses at most the receipts of the last 10 ms and an fsync (their answers are free to the
  payer, and no voucher or anchor covers them);
- **vouchers and anchors** (`vouchers_for`, `unanchored*`) and voids first wait until every
  receipt committed before them is on the disk (`sync()`): a miner never holds a signed voucher
  over, nor does the chain hold a root of, a receipt a power cut could take back.

`wait_for_disk=True` (`infergrid gateway --receipts-wait-for-disk`) makes every answer wait
for the fsync instead (`synchronous=FULL`), for an operator who would rather pay the disk's
fsync time on each response than give a power cut's answers away.

Writes are grouped: `commit()` queues the receipt and awaits a future; one writer thread takes
everything queued, signs it, writes all rows in a single transaction and resolves every waiter.
Under load a batch holds all the requests that arrived during the previous transaction.
When nothing is queued and SQLite's write lock is free at once, `commit()` signs and writes its
receipt on the caller's thread instead: at `synchronous=NORMAL` a commit hands a few pages to
the kernel and waits for no disk, so it costs less than the two thread hand-offs it saves
(about 0.3 ms of latency per answer on a 2-core VM, bench/metering_crypto.py). It never waits
there: a lock held by another connection (the trace writer) or another thread sends the receipt
to the writer thread, as does `wait_for_disk`, whose commits wait for an fsync. Checkpoints,
which SQLite would otherwise run inside a commit every 1000 pages (an fsync or two), run on
`WalSync`'s thread instead.
A receipt that cannot be stored (a value SQLite cannot hold) fails its own commit and no other:
the batch is written again receipt by receipt (infergrid.batch_writes), and the rejects are
counted (`rejected`, `infergrid_writer_rejected_rows_total{writer="receipts"}`).

Per (miner, payer) the store keeps the count, the cumulative value and the seq of the last
receipt in memory (loaded from `receipt_totals` at open, which the writer updates in the same
transaction as the receipts), so headroom checks (`payer_total`) are a dict lookup. Voucher
roots are kept incrementally: per pair, the peaks of the Merkle tree over its receipts so far,
so a voucher after N new receipts costs about N hashes, not a rebuild.

Tables (in the gateway's one SQLite file, beside api keys and traces):
- `receipts`: one row per receipt; seq is the rowid, 1-based, in commit order; `leaf` is the
  receipt's struct hash (its Merkle leaf); `value` is decimal text (uint256 overflows SQLite's
  64-bit integers); the attestation is kept as its JSON, as evidence.
- `receipt_totals`: count, value and last seq per (gateway, miner, payer).
- `receipt_anchors`: one row per on-chain anchor: root, count, tx hash, and the seq range it
  covers. An anchor covers all of its gateway's receipts since the previous anchor, so ranges
  are disjoint and a receipt's anchor is found by its seq: recording one writes one row.

Everything but `get()` and `anchor_proof()` is scoped to this store's gateway address: if the
operator rotates the gateway key, the old key's receipts stay in the file (and provable) but
count neither towards the new key's vouchers, which the escrow books per gateway, nor towards
its anchors, which the contract keeps per sender.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from eth_utils import to_checksum_address

from infergrid.app.keys import BUSY_TIMEOUT_MS, connect
from infergrid.batch_writes import FailureLog, write_isolating
from infergrid.protocol import merkle
from infergrid.protocol.eip712 import Domain, Signer, hex32, signature_bytes
from infergrid.protocol.merkle import MerkleAccumulator
from infergrid.protocol.messages import (
    Attestation,
    Receipt,
    Voucher,
    signed_json,
)
from infergrid.protocol.vouchers import SignedVoucher
from infergrid.settle.binding import ChainBinding, bind_database
from infergrid.wal_sync import WalSync

log = logging.getLogger(__name__)


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS receipts (
        seq                   INTEGER PRIMARY KEY,
        request_id            TEXT NOT NULL UNIQUE,
        request_hash          BLOB NOT NULL,
        payer                 TEXT NOT NULL,
        miner                 TEXT NOT NULL,
        gateway               TEXT NOT NULL,
        model_id              BLOB NOT NULL,
        tokens_in             INTEGER NOT NULL,
        tokens_out            INTEGER NOT NULL,
        value                 TEXT NOT NULL,
        timestamp             INTEGER NOT NULL,
        attestation_hash      BLOB NOT NULL,
        signature             BLOB NOT NULL,
        attestation           TEXT NOT NULL,
        attestation_signature BLOB NOT NULL,
        leaf                  BLOB NOT NULL
    )""",
    # Vouchers read one pair's leaves in seq order; the rowid (seq) is implicitly the last
    # column of every index, so this index also yields them sorted.
    "CREATE INDEX IF NOT EXISTS receipts_pair ON receipts (gateway, miner, payer)",
    """CREATE TABLE IF NOT EXISTS receipt_totals (
        gateway  TEXT NOT NULL,
        miner    TEXT NOT NULL,
        payer    TEXT NOT NULL,
        count    INTEGER NOT NULL,
        value    TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (gateway, miner, payer)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS receipt_anchors (
        gateway      TEXT NOT NULL,
        anchor_index INTEGER NOT NULL,  -- the contract's, per gateway
        root         BLOB NOT NULL,
        count        INTEGER NOT NULL,
        tx_hash      TEXT,
        first_seq    INTEGER NOT NULL,
        last_seq     INTEGER NOT NULL,
        anchored_at  REAL NOT NULL,
        PRIMARY KEY (gateway, anchor_index)
    )""",
    # Which anchor covers a seq: the first whose last_seq is at or after it.
    "CREATE INDEX IF NOT EXISTS receipt_anchors_range ON receipt_anchors (gateway, last_seq)",
]

# A receipt's anchor is not stored in its row (anchoring would then rewrite every row it
# covers, stalling commits behind a 100k-row UPDATE); it is the anchor whose seq range holds it.
_ANCHOR_OF = (
    "(SELECT a.anchor_index FROM receipt_anchors a WHERE a.gateway = receipts.gateway"
    " AND a.last_seq >= receipts.seq AND a.first_seq <= receipts.seq"
    " ORDER BY a.last_seq LIMIT 1)"
)
_RECEIPT_COLUMNS = (
    "seq, request_id, request_hash, payer, miner, gateway, model_id, tokens_in, tokens_out,"
    " value, timestamp, attestation_hash, signature, attestation, attestation_signature, "
    + _ANCHOR_OF
)
_SELECT = f"SELECT {_RECEIPT_COLUMNS} FROM receipts"
# Receipts after this gateway's last anchor. (Unary + keeps the planner on the seq range
# instead of the pair index, which would visit every receipt of the gateway.)
_AFTER_LAST_ANCHOR = (
    " WHERE +gateway = ? AND seq > (SELECT coalesce(max(last_seq), 0) FROM receipt_anchors"
    " WHERE gateway = ?)"
)
_INSERT = (
    "INSERT INTO receipts (request_id, request_hash, payer, miner, gateway, model_id,"
    " tokens_in, tokens_out, value, timestamp, attestation_hash, signature, attestation,"
    " attestation_signature, leaf) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_TOTAL = (
    "INSERT INTO receipt_totals (gateway, miner, payer, count, value, last_seq)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gateway, miner, payer) DO UPDATE"
    " SET count = excluded.count, value = excluded.value, last_seq = excluded.last_seq"
)

# Commits between two WAL checkpoints (run by WalSync's thread): about SQLite's default of
# 1000 pages, at 3-4 pages a receipt.
_CHECKPOINT_EVERY = 256

# Anchors whose Merkle layers are kept for proofs: a trace lookup usually asks about recent
# requests, and one 100k-receipt anchor's layers are ~13 MB.
_PROOF_CACHE_ANCHORS = 4


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store made by an older version up to this schema: `voided` (ReceiptStore.void)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(receipts)")}
    if "voided" not in columns:
        try:
            conn.execute("ALTER TABLE receipts ADD COLUMN voided INTEGER NOT NULL DEFAULT 0")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


class ReceiptCollected(ValueError):
    """The receipt cannot be voided: the escrow may already have paid it."""


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


_T = TypeVar("_T")
_FIELD_NAMES: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in fields(cls)) for cls in (Receipt, Attestation)
}


def _trusted(cls: type[_T], **values: Any) -> _T:
    """A frozen message dataclass built without __post_init__'s validation, for rows this
    store validated before writing them. Every field must be given (checked), so a field added
    to the message later fails loudly here instead of going missing."""
    if values.keys() != _FIELD_NAMES[cls]:
        raise TypeError(f"{cls.__name__} fields changed: rebuild _trusted's callers")
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


def _unhex(value: str) -> bytes:
    return bytes.fromhex(value[2:])


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredReceipt:
    seq: int  # 1-based order of commit at this gateway
    request_id: str
    receipt: Receipt
    signature: bytes  # the gateway's EIP-712 signature of the receipt
    attestation: Attestation
    attestation_signature: bytes  # the miner's
    anchor_index: int | None  # on-chain anchor that covers it, once anchored

    @property
    def leaf(self) -> bytes:
        """The receipt's Merkle leaf in vouchers and anchors."""
        return self.receipt.struct_hash()

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "receipt": signed_json(self.receipt, self.signature),
            "attestation": signed_json(self.attestation, self.attestation_signature),
            "anchor_index": self.anchor_index,
        }


@dataclass(frozen=True)
class AnchorProof:
    anchor_index: int
    root: bytes
    count: int
    position: int  # of the receipt among the anchor's receipts, in seq order
    leaf: bytes
    proof: list[bytes]
    tx_hash: str | None

    def verify(self) -> bool:
        return merkle.verify_proof(self.leaf, self.proof, self.root)

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor_index": self.anchor_index,
            "root": hex32(self.root),
            "count": self.count,
            "position": self.position,
            "leaf": hex32(self.leaf),
            "proof": [hex32(node) for node in self.proof],
            "tx_hash": self.tx_hash,
        }


# -- incremental Merkle roots ------------------------------------------------------------------


class _PairRoot(MerkleAccumulator):
    """A pair's incremental receipts root, and how far into its receipts it has read."""

    __slots__ = ("last_seq",)

    def __init__(self) -> None:
        super().__init__()
        self.last_seq = 0  # of the last receipt appended, for the store's incremental reads


# -- the store ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    request_id: str
    receipt: Receipt
    attestation: Attestation
    attestation_signature: bytes
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[bytes]
    # Filled in by the writer thread.
    signature: bytes = b""
    leaf: bytes = b""
    seq: int = 0
    error: BaseException | None = None


@dataclass(slots=True)
class _PairTotal:
    count: int = 0
    value: int = 0
    last_seq: int = 0


@dataclass(slots=True)
class _AnchorTree:
    root: bytes
    count: int
    tx_hash: str | None
    seqs: list[int]  # of its receipts, ascending: a receipt's position is a bisection
    tree: merkle.MerkleTree


def _settle(
    results: list[tuple[asyncio.Future[bytes], bytes | None, BaseException | None]],
) -> None:
    """Runs on the waiter's event loop: resolve each commit's future."""
    for future, signature, error in results:
        if future.done():  # the caller was cancelled; the receipt is stored all the same
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(signature)  # type: ignore[arg-type]


class ReceiptStore:
    """Durable, group-committed receipts of one gateway signer.

    `commit()` never blocks its event loop; `payer_total(s)` are memory reads. The other reads
    (get, receipts_for, vouchers_for, unanchored, anchor_proof) query SQLite and may take
    milliseconds (a first voucher or proof over 100k receipts, most of a second): serve them
    from a worker thread (asyncio.to_thread). All methods are thread-safe.
    """

    def __init__(
        self,
        db_path: str | Path,
        domain: Domain,
        signer: Signer,
        *,
        max_batch: int = 1024,
        chain: ChainBinding | None = None,
        wait_for_disk: bool = False,
    ) -> None:
        """Open (or create) the store; with `chain`, bind it to that deployment first
        (settle.binding: ChainMismatch if it holds another chain's receipts). `wait_for_disk`:
        commits return after the fsync (see the module's docstring)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.db_path = Path(db_path)
        self.domain = domain
        self.signer = signer
        self.gateway: str = signer.address
        self.max_batch = max_batch
        synchronous = "FULL" if wait_for_disk else "NORMAL"
        # Two connections: the writer's (only the writer thread and record_anchor, under
        # _write_lock) and the readers' (under _read_lock). WAL lets reads proceed during the
        # writer's fsync instead of queueing behind it.
        self._wconn = connect(self.db_path, synchronous=synchronous)
        for statement in _SCHEMA:
            self._wconn.execute(statement)
        _migrate(self._wconn)
        self.binding: ChainBinding | None = None
        if chain is not None:
            try:
                self.binding = bind_database(
                    self._wconn, chain, what="the gateway's receipt store", path=self.db_path
                )
            except BaseException:
                self._wconn.close()
                raise
        self._rconn = connect(self.db_path, synchronous=synchronous)
        # With FULL every commit is on the disk when it returns: nothing to sync later.
        self.wal_sync: WalSync | None = None
        if not wait_for_disk:
            # Commits may run on the event loop (commit()): they must never checkpoint there.
            self._wconn.execute("PRAGMA wal_autocheckpoint=0")
            self.wal_sync = WalSync(
                self.db_path, name="receipt-fsync", checkpoint_every=_CHECKPOINT_EVERY
            )
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        # Guards the in-memory totals, written by the writer thread and read by anyone.
        self._totals_lock = threading.Lock()
        self._pairs: dict[tuple[str, str], _PairTotal] = {}
        self._payers: dict[str, int] = {}
        self._miner_payers: dict[str, set[str]] = {}
        self._roots: dict[tuple[str, str], _PairRoot] = {}
        self._anchors: OrderedDict[tuple[str, int], _AnchorTree] = OrderedDict()
        self._queue: list[_Pending] = []
        self._unwritten = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        # Counters for tests, metrics and benchmarks.
        self.batches_written = 0  # write transactions committed
        self.receipts_written = 0
        # Receipts that could not be stored (their commits failed), and database failures.
        self.failures = FailureLog("receipt store", log)
        self._load_totals()

    # -- lifecycle -----------------------------------------------------------------------------

    def _load_totals(self) -> None:
        rows = self._rconn.execute(
            "SELECT miner, payer, count, value, last_seq FROM receipt_totals WHERE gateway = ?",
            (self.gateway,),
        ).fetchall()
        for miner, payer, count, value, last_seq in rows:
            self._add_total(miner, payer, count, int(value), last_seq)

    def _add_total(self, miner: str, payer: str, count: int, value: int, last_seq: int) -> None:
        pair = self._pairs.get((miner, payer))
        if pair is None:
            pair = self._pairs[(miner, payer)] = _PairTotal()
            self._miner_payers.setdefault(miner, set()).add(payer)
        pair.count += count
        pair.value += value
        pair.last_seq = max(pair.last_seq, last_seq)
        self._payers[payer] = self._payers.get(payer, 0) + value

    def start(self) -> None:
        """Start the writer thread; idempotent (commit() calls it too)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("receipt store is closed")
            if self._thread is None:
                # Daemon: a process that exits without close() loses only commits that had not
                # returned yet, which nobody was told about.
                self._thread = threading.Thread(
                    target=self._writer, name="receipt-writer", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """Write everything queued, stop the writer thread and close the database."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self.wal_sync is not None:
            self.wal_sync.close()
        with self._write_lock:
            self._wconn.close()
        with self._read_lock:
            self._rconn.close()

    # -- committing ----------------------------------------------------------------------------

    async def commit(
        self,
        request_id: str,
        receipt: Receipt,
        attestation: Attestation,
        attestation_signature: bytes,
    ) -> bytes:
        """Sign and durably store a receipt; returns the gateway's signature once the row is
        on disk. ValueError for a receipt that is not this gateway's, does not match its
        attestation, or reuses a request id. A caller cancelled while waiting may still have
        its receipt stored (and charged): it was queued, and the writer finishes what it took."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request id must be a non-empty string")
        if receipt.gateway != self.gateway:
            raise ValueError(
                f"receipt names gateway {receipt.gateway}, this store signs as {self.gateway}"
            )
        attestation_signature = signature_bytes(attestation_signature, "attestation signature")
        loop = asyncio.get_running_loop()
        pending = _Pending(
            request_id, receipt, attestation, attestation_signature, loop, loop.create_future()
        )
        with self._cond:
            if self._closed:
                raise RuntimeError("receipt store is closed")
            # Inline only behind nothing queued, so receipts keep their commit order.
            inline = (
                self.wal_sync is not None
                and self._unwritten == 0
                and self._write_lock.acquire(blocking=False)
            )
            self._unwritten += 1
        if inline:
            try:
                written = self._commit_inline(pending)
            finally:
                self._write_lock.release()
            if written:
                with self._cond:
                    self._unwritten -= 1
                if pending.error is not None:
                    raise pending.error
                return pending.signature
            pending.error = None  # another connection held the lock: the writer takes it
        with self._cond:
            self._queue.append(pending)
            self._cond.notify()
        if self._thread is None:
            self.start()
        return await pending.future

    def _commit_inline(self, item: _Pending) -> bool:
        """Sign and write `item` on this thread, if SQLite's write lock is free at once (caller
        holds _write_lock). False, with nothing written, when another connection holds it."""
        try:
            self._prepare(item)
        except Exception as exc:
            item.error = exc
            return True
        conn = self._wconn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        finally:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # _write_rows goes on in this transaction; one row is never written twice.
        self._write_prepared([item], lock_held=True)
        return True

    @property
    def rejected(self) -> int:
        """Receipts that could not be stored (their commits failed; nothing was charged)."""
        return self.failures.rejected

    @property
    def pending(self) -> int:
        """Commits waiting for the disk: queued, or taken by the writer and not yet resolved."""
        return self._unwritten

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, and everything queued has been written
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
            try:
                self._write_batch(batch)
            except BaseException as exc:  # never strand a waiter, whatever happened
                log.exception("receipt batch failed")
                for item in batch:
                    if item.error is None and not item.seq:
                        item.error = exc
                self._resolve(batch)
            with self._cond:
                self._unwritten -= len(batch)

    def _prepare(self, item: _Pending) -> None:
        """Check the receipt against its attestation, hash and sign it."""
        receipt, attestation = item.receipt, item.attestation
        if receipt.attestation_hash != attestation.struct_hash():
            raise ValueError("receipt's attestation hash does not match the attestation")
        # The attestation is the evidence for the receipt: a receipt charging for another
        # request, model, miner or token count than the miner attested is a gateway bug.
        for name in ("request_hash", "model_id", "miner", "tokens_in", "tokens_out"):
            if getattr(receipt, name) != getattr(attestation, name):
                raise ValueError(f"receipt's {name} differs from the attestation's")
        item.leaf = receipt.struct_hash()
        item.signature = self.signer.sign(self.domain.digest(item.leaf))

    def _write_batch(self, batch: list[_Pending]) -> None:
        rows: list[_Pending] = []
        for item in batch:
            try:
                self._prepare(item)
                rows.append(item)
            except Exception as exc:
                item.error = exc
        if rows:
            self._write_prepared(rows)
        self._resolve(batch)

    def _write_prepared(self, rows: list[_Pending], *, lock_held: bool = False) -> None:
        """Write signed `rows`, setting each one's seq or its error."""
        # One transaction for the batch; if a receipt cannot be stored (a value SQLite cannot
        # hold), each is written alone so only that one's commit fails.
        if lock_held:
            outcome = write_isolating(rows, self._write_rows)
        else:
            with self._write_lock:
                outcome = write_isolating(rows, self._write_rows)
        for item, exc in outcome.rejected:
            self.failures.reject(f"the receipt of request {item.request_id!r}", exc)
            item.error = ValueError(
                f"the receipt of request {item.request_id!r} cannot be stored:"
                f" {type(exc).__name__}: {exc}"
            )
        if outcome.error is not None:
            self.failures.database_failed(
                outcome.error, len(outcome.failed), "their commits fail, nothing is charged"
            )
            for item in outcome.failed:
                item.error = outcome.error

    def _write_rows(self, rows: Sequence[_Pending]) -> None:
        """Store `rows` and their pairs' new totals in one transaction, or none of them
        (raising). A duplicate request id fails only its own row. Caller holds _write_lock;
        a transaction it began (commit()'s inline path) is the one the rows go into."""
        conn = self._wconn
        written: list[_Pending] = []
        duplicates: list[_Pending] = []
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        try:
            for item in rows:
                r = item.receipt
                try:
                    cursor = conn.execute(
                        _INSERT,
                        (
                            item.request_id,
                            r.request_hash,
                            r.payer,
                            r.miner,
                            r.gateway,
                            r.model_id,
                            r.tokens_in,
                            r.tokens_out,
                            str(r.value),
                            r.timestamp,
                            r.attestation_hash,
                            item.signature,
                            json.dumps(item.attestation.to_json(), separators=(",", ":")),
                            item.attestation_signature,
                            item.leaf,
                        ),
                    )
                except sqlite3.IntegrityError:
                    # A failed statement rolls back only itself: the rest of the batch goes
                    # on in the same transaction.
                    item.error = ValueError(f"duplicate request id {item.request_id!r}")
                    duplicates.append(item)
                    continue
                item.seq = int(cursor.lastrowid or 0)
                written.append(item)
            conn.executemany(_UPSERT_TOTAL, self._batch_deltas(written))
            conn.execute("COMMIT")
            if self.wal_sync is not None:
                self.wal_sync.committed()
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for item in written:
                item.seq = 0
            for item in duplicates:  # tried again (alone), they are judged again
                item.error = None
            raise
        with self._totals_lock:
            for item in written:
                r = item.receipt
                self._add_total(r.miner, r.payer, 1, r.value, item.seq)
        self.batches_written += 1
        self.receipts_written += len(written)

    def _batch_deltas(
        self, written: Sequence[_Pending]
    ) -> list[tuple[str, str, str, int, str, int]]:
        """New receipt_totals rows for the pairs this batch touched (memory plus the batch)."""
        new: dict[tuple[str, str], _PairTotal] = {}
        for item in written:
            r = item.receipt
            key = (r.miner, r.payer)
            total = new.get(key)
            if total is None:
                old = self._pairs.get(key)
                total = new[key] = (
                    _PairTotal(old.count, old.value, old.last_seq) if old else _PairTotal()
                )
            total.count += 1
            total.value += r.value
            total.last_seq = item.seq
        return [
            (self.gateway, m, p, t.count, str(t.value), t.last_seq) for (m, p), t in new.items()
        ]

    def _resolve(self, batch: Iterable[_Pending]) -> None:
        # One wake-up per event loop per batch, not one per waiter.
        by_loop: dict[
            asyncio.AbstractEventLoop,
            list[tuple[asyncio.Future[bytes], bytes | None, BaseException | None]],
        ] = {}
        for item in batch:
            if item.error is not None:
                result = (item.future, None, item.error)
            else:
                result = (item.future, item.signature, None)
            by_loop.setdefault(item.loop, []).append(result)
        for loop, results in by_loop.items():
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, results)

    # -- totals --------------------------------------------------------------------------------

    def payer_total(self, payer: str) -> int:
        """Cumulative value of every receipt this gateway signed for `payer` (wei)."""
        total = self._payers.get(payer)
        if total is not None:  # the common case: already checksummed, no keccak on the hot path
            return total
        try:
            return self._payers.get(to_checksum_address(payer), 0)
        except ValueError:
            return 0

    def payer_totals(self) -> dict[str, int]:
        with self._totals_lock:
            return dict(self._payers)

    # -- voiding --------------------------------------------------------------------------------

    def void(self, request_id: str, collected_wei: int) -> int:
        """Void the receipt of `request_id` (its audit failed): every later voucher's
        valueAggregate leaves its value out, as do the payer's totals (payer_total), so the
        payer's headroom gets it back. The receipt stays in the file and in the vouchers'
        Merkle roots (they prove what was signed); only the money moves. Returns its value.

        `collected_wei` is what the escrow has collected for the receipt's (payer, gateway,
        miner): if the pair's value without this receipt would fall below it, the miner may
        already have been paid for it and ReceiptCollected is raised (nothing changes); a
        refund must then come from a slash. ValueError for an unknown or already voided one."""
        with self._write_lock:
            conn = self._wconn
            row = conn.execute(
                "SELECT payer, miner, value, voided FROM receipts WHERE request_id = ?"
                " AND gateway = ?",
                (request_id, self.gateway),
            ).fetchone()
            if row is None:
                raise ValueError(f"no receipt of request {request_id!r} at this gateway")
            payer, miner, value_text, voided = row
            if voided:
                raise ValueError(f"the receipt of request {request_id!r} is already voided")
            value = int(value_text)
            with self._totals_lock:
                pair = self._pairs[(miner, payer)]
                remaining = pair.value - value
            if remaining < collected_wei:
                raise ReceiptCollected(
                    f"the escrow collected {collected_wei} wei of {miner}'s receipts from"
                    f" {payer}; without this one they are worth {remaining}"
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE receipts SET voided = 1 WHERE request_id = ?", (request_id,))
                conn.execute(
                    "UPDATE receipt_totals SET value = ? WHERE gateway = ? AND miner = ?"
                    " AND payer = ?",
                    (str(remaining), self.gateway, miner, payer),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            with self._totals_lock:
                pair.value -= value
                self._payers[payer] = self._payers.get(payer, 0) - value
        # A refund is promised on the strength of it: a power cut must not bring it back.
        self._committed_and_synced()
        return value

    def is_voided(self, request_id: str) -> bool:
        rows = self._query("SELECT voided FROM receipts WHERE request_id = ?", (request_id,))
        return bool(rows and rows[0][0])

    # -- reading -------------------------------------------------------------------------------

    def _row_to_stored(self, row: Sequence[Any]) -> StoredReceipt:
        (
            seq,
            request_id,
            request_hash,
            payer,
            miner,
            gateway,
            model_id,
            tokens_in,
            tokens_out,
            value,
            timestamp,
            attestation_hash,
            signature,
            attestation,
            attestation_signature,
            anchor_index,
        ) = row
        # Rows were validated on the way in; re-validating (four address checksums, ~30 µs
        # each) would make listing 10,000 receipts take seconds.
        receipt = _trusted(
            Receipt,
            request_hash=bytes(request_hash),
            payer=payer,
            miner=miner,
            gateway=gateway,
            model_id=bytes(model_id),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            value=int(value),
            timestamp=timestamp,
            attestation_hash=bytes(attestation_hash),
        )
        att = json.loads(attestation)
        return StoredReceipt(
            seq=seq,
            request_id=request_id,
            receipt=receipt,
            signature=bytes(signature),
            attestation=_trusted(
                Attestation,
                request_hash=_unhex(att["requestHash"]),
                response_hash=_unhex(att["responseHash"]),
                model_id=_unhex(att["modelId"]),
                miner=att["miner"],
                tokens_in=att["tokensIn"],
                tokens_out=att["tokensOut"],
                proof_hash=_unhex(att["proofHash"]),
            ),
            attestation_signature=bytes(attestation_signature),
            anchor_index=anchor_index,
        )

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._read_lock:
            return self._rconn.execute(sql, args).fetchall()

    def get(self, request_id: str) -> StoredReceipt | None:
        rows = self._query(_SELECT + " WHERE request_id = ?", (request_id,))
        return self._row_to_stored(rows[0]) if rows else None

    def receipts_for(self, miner: str, payer: str) -> list[StoredReceipt]:
        """Every receipt for one (miner, payer), in seq order."""
        miner, payer = to_checksum_address(miner), to_checksum_address(payer)
        rows = self._query(
            _SELECT + " WHERE gateway = ? AND miner = ? AND payer = ? ORDER BY seq",
            (self.gateway, miner, payer),
        )
        return [self._row_to_stored(row) for row in rows]

    def count(self) -> int:
        """How many receipts are stored."""
        with self._totals_lock:
            return sum(pair.count for pair in self._pairs.values())

    # -- vouchers ------------------------------------------------------------------------------

    def _pair_root(self, miner: str, payer: str, count: int) -> bytes:
        """Merkle root over the first `count` receipts of a pair, extending the cached
        accumulator with only the receipts it has not seen. Caller holds _read_lock."""
        key = (miner, payer)
        acc = self._roots.get(key)
        if acc is None:
            acc = self._roots[key] = _PairRoot()
        if acc.count < count:
            # Receipts of a pair are appended in seq order, so "after last_seq, the next
            # count - acc.count" is exactly the receipts the snapshot's count covers.
            rows = self._rconn.execute(
                "SELECT seq, leaf FROM receipts WHERE gateway = ? AND miner = ? AND payer = ?"
                " AND seq > ? ORDER BY seq LIMIT ?",
                (self.gateway, miner, payer, acc.last_seq, count - acc.count),
            ).fetchall()
            for seq, leaf in rows:
                acc.append(bytes(leaf))
                acc.last_seq = seq
            if acc.count != count:
                raise RuntimeError(f"receipts of {miner}/{payer} changed under the store")
        return acc.root()

    def sync(self) -> None:
        """Block until every receipt committed so far is on the disk (at most an fsync or two
        while the background fsync catches up; nothing with wait_for_disk). Raises
        wal_sync.DurabilityLost after a failed fsync."""
        if self.wal_sync is not None:
            self.wal_sync.sync()

    def _committed_and_synced(self) -> None:
        if self.wal_sync is not None:
            self.wal_sync.committed()
            self.wal_sync.sync()

    def vouchers_for(self, miner: str, *, now: int | None = None) -> list[SignedVoucher]:
        """One signed cumulative voucher per payer with receipts for `miner`, sorted by payer;
        only after every receipt they cover is on the disk (`sync`)."""
        miner = to_checksum_address(miner)
        self.sync()
        timestamp = int(time.time()) if now is None else now
        with self._totals_lock:
            # One snapshot, so each voucher's value and root cover the same receipts.
            snapshot = [
                (payer, self._pairs[(miner, payer)].count, self._pairs[(miner, payer)].value)
                for payer in sorted(self._miner_payers.get(miner, ()))
            ]
        vouchers = []
        for payer, count, value in snapshot:
            with self._read_lock:
                root = self._pair_root(miner, payer, count)
            voucher = Voucher(
                payer=payer,
                miner=miner,
                gateway=self.gateway,
                value_aggregate=value,
                timestamp=timestamp,
                receipts_root=root,
            )
            signature = self.signer.sign(self.domain.digest(voucher.struct_hash()))
            vouchers.append(SignedVoucher(voucher, signature, count))
        return vouchers

    # -- anchoring -----------------------------------------------------------------------------

    def unanchored(self, limit: int) -> list[StoredReceipt]:
        """Receipts no anchor covers yet, oldest first; all on the disk (`sync`), since an
        anchor of them goes on-chain."""
        self.sync()
        rows = self._query(
            _SELECT + _AFTER_LAST_ANCHOR + " ORDER BY seq LIMIT ?",
            (self.gateway, self.gateway, limit),
        )
        return [self._row_to_stored(row) for row in rows]

    def unanchored_leaves(self, limit: int) -> tuple[list[int], list[bytes]]:
        """(seqs, leaves) of the oldest unanchored receipts: what the anchorer needs, without
        rebuilding every receipt object; all on the disk, as `unanchored`'s."""
        self.sync()
        rows = self._query(
            "SELECT seq, leaf FROM receipts" + _AFTER_LAST_ANCHOR + " ORDER BY seq LIMIT ?",
            (self.gateway, self.gateway, limit),
        )
        return [row[0] for row in rows], [bytes(row[1]) for row in rows]

    def record_anchor(
        self,
        anchor_index: int,
        receipts: Sequence[StoredReceipt],
        root: bytes,
        tx_hash: str | None,
    ) -> None:
        """Record that on-chain anchor `anchor_index` commits to `root` over these receipts,
        which must be the oldest unanchored ones (as `unanchored()` lists them): an anchor
        covers this gateway's receipts since its last anchor. ValueError, and nothing written,
        if they are not, if the root is not theirs (seq order) or the index is taken."""
        ordered = sorted(receipts, key=lambda stored: stored.seq)
        self.record_anchor_leaves(
            anchor_index,
            [stored.seq for stored in ordered],
            [stored.leaf for stored in ordered],
            root,
            tx_hash,
        )

    def record_anchor_leaves(
        self,
        anchor_index: int,
        seqs: Sequence[int],
        leaves: Sequence[bytes],
        root: bytes,
        tx_hash: str | None,
        *,
        verify: bool = True,
    ) -> None:
        """record_anchor by seqs and leaves (ascending seq), as unanchored_leaves gives them.
        verify=False skips recomputing the root and re-reading the leaves, for a caller that
        just took both from unanchored_leaves (the anchorer: ~1 s saved per 100k receipts);
        the run itself is checked either way."""
        if not seqs or len(seqs) != len(leaves):
            raise ValueError("an anchor covers at least one receipt, one leaf each")
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ValueError("anchored receipts must be in ascending seq order")
        if verify:
            if merkle.merkle_root(leaves) != root:
                raise ValueError("root is not the Merkle root of these receipts")
            stored = self._query(
                "SELECT seq, leaf FROM receipts WHERE +gateway = ? AND seq BETWEEN ? AND ?"
                " ORDER BY seq",
                (self.gateway, seqs[0], seqs[-1]),
            )
            if [(seq, bytes(leaf)) for seq, leaf in stored] != list(zip(seqs, leaves, strict=True)):
                raise ValueError("these are not this gateway's receipts, or not all of a run")
        with self._write_lock:
            conn = self._wconn
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Inside the write transaction, so a concurrent anchor cannot slip between.
                (first, last, count) = conn.execute(
                    "SELECT min(seq), max(seq), count(*) FROM receipts"
                    + _AFTER_LAST_ANCHOR
                    + " AND seq <= ?",
                    (self.gateway, self.gateway, seqs[-1]),
                ).fetchone()
                # All of them and only them: with ascending seqs taken from this gateway's
                # rows, equal ends and count mean the same set.
                if (first, last, count) != (seqs[0], seqs[-1], len(seqs)):
                    raise ValueError(
                        "an anchor must cover exactly the oldest unanchored receipts"
                        " (some are already anchored, missing or not this gateway's)"
                    )
                try:
                    conn.execute(
                        "INSERT INTO receipt_anchors (gateway, anchor_index, root, count,"
                        " tx_hash, first_seq, last_seq, anchored_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            self.gateway,
                            anchor_index,
                            root,
                            len(seqs),
                            tx_hash,
                            seqs[0],
                            seqs[-1],
                            time.time(),
                        ),
                    )
                except sqlite3.IntegrityError:
                    raise ValueError(f"anchor {anchor_index} is already recorded") from None
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self._committed_and_synced()  # the anchor is on-chain already: keep its record

    def anchors(self) -> list[tuple[int, bytes, int, str | None]]:
        """(anchor_index, root, count, tx_hash) of every recorded anchor, oldest first."""
        rows = self._query(
            "SELECT anchor_index, root, count, tx_hash FROM receipt_anchors WHERE gateway = ?"
            " ORDER BY first_seq",
            (self.gateway,),
        )
        return [(index, bytes(root), count, tx) for index, root, count, tx in rows]

    def anchor_proof(self, request_id: str) -> AnchorProof | None:
        """The inclusion proof of a receipt in its anchor; None if unknown or not anchored."""
        with self._read_lock:
            found = self._rconn.execute(
                "SELECT seq, leaf, gateway, " + _ANCHOR_OF + " FROM receipts WHERE request_id = ?",
                (request_id,),
            ).fetchone()
            if found is None or found[3] is None:
                return None
            seq, leaf, gateway, anchor_index = found
            anchor = self._anchor_tree(gateway, anchor_index)
        position = bisect.bisect_left(anchor.seqs, seq)
        leaf = bytes(leaf)
        if anchor.tree.leaves[position] != leaf:
            raise RuntimeError(f"anchor {anchor_index} changed under the store")
        return AnchorProof(
            anchor_index=anchor_index,
            root=anchor.root,
            count=anchor.count,
            position=position,
            leaf=leaf,
            proof=anchor.tree.proof(position),
            tx_hash=anchor.tx_hash,
        )

    def _anchor_tree(self, gateway: str, anchor_index: int) -> _AnchorTree:
        """An anchor with its tree's layers, from a small LRU. Caller holds _read_lock."""
        key = (gateway, anchor_index)
        anchor = self._anchors.get(key)
        if anchor is not None:
            self._anchors.move_to_end(key)
            return anchor
        root, count, tx_hash, first_seq, last_seq = self._rconn.execute(
            "SELECT root, count, tx_hash, first_seq, last_seq FROM receipt_anchors"
            " WHERE gateway = ? AND anchor_index = ?",
            (gateway, anchor_index),
        ).fetchone()
        rows = self._rconn.execute(
            "SELECT seq, leaf FROM receipts WHERE +gateway = ? AND seq BETWEEN ? AND ?"
            " ORDER BY seq",
            (gateway, first_seq, last_seq),
        ).fetchall()
        tree = merkle.MerkleTree([bytes(leaf) for _, leaf in rows])
        if len(rows) != count or tree.root != bytes(root):
            raise RuntimeError(f"anchor {anchor_index}'s receipts do not match its root")
        anchor = _AnchorTree(bytes(root), count, tx_hash, [seq for seq, _ in rows], tree)
        self._anchors[key] = anchor
        while len(self._anchors) > _PROOF_CACHE_ANCHORS:
            self._anchors.popitem(last=False)
        return anchor
