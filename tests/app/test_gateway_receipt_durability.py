"""When a receipt is durable: committed before its answer, on the disk before any voucher or
anchor covers it (infergrid.wal_sync's background fsync), or on the disk before its answer
with wait_for_disk."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from test_gateway_receipts import DOMAIN, GATEWAY, MINER, make

from infergrid import wal_sync
from infergrid.app.receipts import ReceiptStore
from infergrid.wal_sync import DurabilityLost, WalSync


def _synchronous(store: ReceiptStore) -> int:
    (level,) = store._wconn.execute("PRAGMA synchronous").fetchone()
    return int(level)


def _wal_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (x INTEGER)")
    return conn


def test_sync_returns_once_every_reported_commit_had_an_fsync(tmp_path: Path) -> None:
    conn = _wal_db(tmp_path / "a.db")
    syncer = WalSync(tmp_path / "a.db")
    try:
        syncer.sync(timeout=5)  # nothing reported: nothing to wait for
        assert syncer.syncs == 0
        for i in range(50):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            syncer.committed()
        syncer.sync(timeout=5)
        assert syncer.synced == 50
        # Grouped: the thread fsyncs whatever was reported while its last fsync ran.
        assert 1 <= syncer.syncs <= 50
    finally:
        syncer.close()
        conn.close()


def test_close_syncs_what_was_reported(tmp_path: Path) -> None:
    conn = _wal_db(tmp_path / "a.db")
    syncer = WalSync(tmp_path / "a.db")
    conn.execute("INSERT INTO t VALUES (1)")
    syncer.committed()
    syncer.close()
    assert syncer.synced == 1
    conn.execute("INSERT INTO t VALUES (2)")
    syncer.committed()  # after close: synced at once, in the caller's thread
    assert syncer.synced == 2
    conn.close()


def test_a_failed_fsync_is_sticky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux may report the fsync after a failed one as a success although the failed pages
    were dropped, so one failure makes every later sync() raise."""
    conn = _wal_db(tmp_path / "a.db")
    syncer = WalSync(tmp_path / "a.db")
    real = wal_sync._fsync_path
    failing = threading.Event()
    failing.set()

    def fsync_of_a_failing_disk(path: Path) -> None:  # a fake: no disk here fails on demand
        if failing.is_set():
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(wal_sync, "_fsync_path", fsync_of_a_failing_disk)
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        syncer.committed()
        with pytest.raises(DurabilityLost, match="Input/output error"):
            syncer.sync(timeout=5)
        failing.clear()
        conn.execute("INSERT INTO t VALUES (2)")
        syncer.committed()
        with pytest.raises(DurabilityLost):
            syncer.sync(timeout=5)
        assert syncer.synced == 0
    finally:
        syncer.close()
        conn.close()


async def test_by_default_answers_wait_for_the_commit_and_vouchers_for_the_disk(
    tmp_path: Path,
) -> None:
    store = ReceiptStore(tmp_path / "g.db", DOMAIN, GATEWAY)
    try:
        assert _synchronous(store) == 1  # NORMAL: a commit is in the kernel's hands
        assert store.wal_sync is not None
        for i in range(20):
            await store.commit(*make(i))
        vouchers = store.vouchers_for(MINER)
        # Every transaction that wrote one of the receipts it covers had its fsync first.
        assert store.wal_sync.synced == store.batches_written
        assert [v.receipt_count for v in vouchers] == [20]
        await store.commit(*make(20))
        seqs, _ = store.unanchored_leaves(100)
        assert len(seqs) == 21 and store.wal_sync.synced == store.batches_written
    finally:
        store.close()


async def test_wait_for_disk_makes_every_commit_an_fsync(tmp_path: Path) -> None:
    store = ReceiptStore(tmp_path / "g.db", DOMAIN, GATEWAY, wait_for_disk=True)
    try:
        assert _synchronous(store) == 2  # FULL: the WAL is fsynced at every commit
        assert store.wal_sync is None
        await store.commit(*make(1))
        store.sync()  # nothing to wait for
        assert [v.receipt_count for v in store.vouchers_for(MINER)] == [1]
    finally:
        store.close()


async def test_vouchers_are_refused_after_a_failed_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync_of_a_failing_disk(path: Path) -> None:  # a fake, as above
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wal_sync, "_fsync_path", fsync_of_a_failing_disk)
    store = ReceiptStore(tmp_path / "g.db", DOMAIN, GATEWAY)
    try:
        await store.commit(*make(1))  # the answer still goes: the row is committed
        with pytest.raises(DurabilityLost, match="No space left"):
            store.vouchers_for(MINER)
        with pytest.raises(DurabilityLost):
            store.unanchored(10)
    finally:
        monkeypatch.undo()
        store.close()


def test_a_commit_waits_for_the_window_but_sync_does_not(tmp_path: Path) -> None:
    """Commits reported within delay_s share one fsync; a sync() caller gets its fsync at
    once (with an hour's window, sync() returning at all shows it did not wait for it)."""
    conn = _wal_db(tmp_path / "a.db")
    syncer = WalSync(tmp_path / "a.db", delay_s=3600)
    try:
        for i in range(20):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            syncer.committed()
        assert syncer.synced == 0  # still inside the window
        syncer.sync(timeout=30)
        assert syncer.synced == 20 and syncer.syncs == 1
    finally:
        syncer.close()
        conn.close()


def test_a_negative_window_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delay_s"):
        WalSync(tmp_path / "a.db", delay_s=-1)


# -- where a commit runs -----------------------------------------------------------------------


async def test_an_idle_store_commits_on_the_callers_thread(tmp_path: Path) -> None:
    store = ReceiptStore(tmp_path / "g.db", DOMAIN, GATEWAY)
    try:
        signature = await store.commit(*make(1))
        # No writer thread was needed: the row was signed and committed before commit returned.
        assert store._thread is None
        stored = store.get("req-1")
        assert stored is not None and stored.signature == signature and store.pending == 0
    finally:
        store.close()


async def test_a_commit_never_waits_on_the_loop_for_another_connections_lock(
    tmp_path: Path,
) -> None:
    """Another connection (the trace writer shares the file) holding SQLite's write lock sends
    the receipt to the writer thread: the event loop goes on serving meanwhile."""
    db = tmp_path / "g.db"
    store = ReceiptStore(db, DOMAIN, GATEWAY)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(store.commit(*make(1)))
        # The loop keeps serving while the commit waits: a commit that waited for the lock on
        # the loop would have failed ("database is locked") by the time this returns.
        await asyncio.sleep(0.1)
        assert not task.done() and store.pending == 1
        other.execute("COMMIT")
        signature = await asyncio.wait_for(task, 10)
        stored = store.get("req-1")
        assert stored is not None and stored.signature == signature and stored.seq == 1
        assert store._thread is not None  # the writer thread took it
        # Once the lock is free again, commits run inline again, in order.
        await store.commit(*make(2))
        assert store.get("req-2").seq == 2  # type: ignore[union-attr]
    finally:
        other.close()
        store.close()


def test_commits_from_many_threads_share_one_order(tmp_path: Path) -> None:
    """Inline commits and the writer thread's batches interleave: every receipt gets one seq,
    the totals count each exactly once."""
    store = ReceiptStore(tmp_path / "g.db", DOMAIN, GATEWAY)
    per_thread, threads = 40, 4

    async def commit_range(first: int) -> None:
        await asyncio.gather(*(store.commit(*make(i)) for i in range(first, first + per_thread)))

    try:
        workers = [
            threading.Thread(target=asyncio.run, args=(commit_range(t * per_thread),))
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        n = per_thread * threads
        stored = [store.get(f"req-{i}") for i in range(n)]
        assert all(s is not None for s in stored)
        assert sorted(s.seq for s in stored) == list(range(1, n + 1))  # type: ignore[union-attr]
        assert store.payer_total(make(0)[1].payer) == sum(make(i)[1].value for i in range(n))
        assert [v.receipt_count for v in store.vouchers_for(MINER)] == [n]
    finally:
        store.close()


async def test_wait_for_disk_commits_go_through_the_writer_thread(tmp_path: Path) -> None:
    store = ReceiptStore(tmp_path / "g.db", DOMAIN, GATEWAY, wait_for_disk=True)
    try:
        await store.commit(*make(1))
        assert store._thread is not None  # an fsync per commit never runs on the event loop
    finally:
        store.close()


async def test_checkpoints_run_on_the_sync_thread_not_in_a_commit(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    store = ReceiptStore(db, DOMAIN, GATEWAY)
    try:
        (autocheckpoint,) = store._wconn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert autocheckpoint == 0  # SQLite never checkpoints inside one of our commits
        assert store.wal_sync is not None
        every = store.wal_sync.checkpoint_every
        assert every is not None
        for i in range(every + 1):
            await store.commit(*make(i))
        store.sync()
        for _ in range(500):  # the checkpoint follows the fsync on the sync thread
            if store.wal_sync.checkpoints:
                break
            await asyncio.sleep(0.01)
        assert store.wal_sync.checkpoints >= 1
        # The checkpoint copied the receipts into the database file itself.
        (busy, frames, copied) = store._rconn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and copied == frames
    finally:
        store.close()


def test_checkpoint_every_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint_every"):
        WalSync(tmp_path / "x.db", checkpoint_every=0)


def test_wal_sync_checkpoints_every_n_commits(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    conn = _wal_db(path)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    syncer = WalSync(path, delay_s=0, checkpoint_every=3)
    try:
        for i in range(7):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            syncer.committed()
            syncer.sync()
        deadline = 500
        while syncer.checkpoints < 2 and deadline:
            threading.Event().wait(0.01)
            deadline -= 1
        assert syncer.checkpoints == 2  # after commits 3 and 6, not 7
    finally:
        syncer.close()
        conn.close()
