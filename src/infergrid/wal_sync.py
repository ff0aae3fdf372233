"""Power-loss durability for a SQLite WAL database, paid in the background (group fsync).

SQLite in WAL mode with `synchronous=NORMAL` hands each commit's pages to the operating system
(write(2)) and fsyncs only at checkpoints. A committed transaction then survives the process
dying, kill -9 included, since the kernel holds its pages; only a power cut or a kernel crash
before the kernel writes them back can lose it. `WalSync` closes that window without making
any commit wait for the disk: its thread fsyncs the WAL at most `delay_s` (default 10 ms) after
a commit was reported, so one fsync covers every commit of that window (and, under load, of
the previous fsync), and `sync()` fsyncs at once and blocks until everything committed before
it is on the disk. The window bounds what a power cut can take: the commits of the last
`delay_s` plus one fsync. Why not an fsync per commit, in the background: on a small virtual
machine each fsync also costs CPU (about 0.2 ms here) and stalls its neighbours, so a gateway
answering one request at a time would pay it on every request all the same.

A writer reports each commit (`committed()`) after SQLite's COMMIT returned; whoever is about to
let a commit's effects leave the process in a form that cannot be taken back (a signed voucher,
an on-chain anchor) calls `sync()` first.

With `checkpoint_every=N`, the thread also checkpoints the WAL into the database after every N
commits (SQLite's PASSIVE checkpoint, on a connection of its own), for a writer that turned
SQLite's own checkpoints off (`PRAGMA wal_autocheckpoint=0`) because they would otherwise run,
with their fsyncs, inside whichever commit crosses 1000 pages.

An fsync that fails is sticky: Linux may drop the failed pages and report the next fsync as a
success, so after one failure nothing written before it can be called durable, and every later
`sync()` raises `DurabilityLost` until the process restarts and SQLite recovers from what is
really on the disk.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

__all__ = ["DurabilityLost", "WalSync"]

log = logging.getLogger(__name__)


class DurabilityLost(RuntimeError):
    """An fsync of the database failed: what was committed may not be on the disk."""


class WalSync:
    """Background fsync of `db_path`'s write-ahead log, for commits reported by `committed()`.

    Thread-safe. `start()` starts the thread (idempotent); `close()` syncs what was reported
    and stops it. `syncs` counts the fsyncs paid, `synced` the commits they covered."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        delay_s: float = 0.01,
        name: str = "wal-sync",
        checkpoint_every: int | None = None,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self._checkpointed = 0  # commits reported before the last checkpoint
        self._checkpoint_conn: sqlite3.Connection | None = None
        self.checkpoints = 0
        self.db_path = Path(db_path)
        self.delay_s = delay_s
        self.wal_path = Path(f"{self.db_path}-wal")
        self.name = name
        self._cond = threading.Condition()
        self._reported = 0  # commits reported so far
        self._synced = 0  # commits known to be on the disk
        self._attempted = 0  # commits an fsync was tried for (failed ones are not synced)
        self._error: OSError | None = None
        self._urgent = 0  # sync() callers waiting: no delay while there are any
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.syncs = 0

    @property
    def synced(self) -> int:
        return self._synced

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                # Daemon: what a process exiting without close() had not synced is exactly
                # what a power cut at that moment would lose, no more.
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def committed(self) -> None:
        """Report one more commit to make durable (call after SQLite's COMMIT returned)."""
        with self._cond:
            self._reported += 1
            reported, stopping = self._reported, self._stopping
            # The thread waits for a commit only when it has tried every earlier one; waking
            # it for each commit of a window would cost a context switch per commit.
            if reported == self._attempted + 1:
                self._cond.notify_all()
        if stopping:  # after close(): nobody syncs in the background any more
            self._sync_once(reported)
        elif self._thread is None:
            self.start()

    def sync(self, timeout: float | None = None) -> None:
        """Block until every commit reported before this call is on the disk. Raises
        DurabilityLost if an fsync failed, TimeoutError after `timeout` seconds."""
        with self._cond:
            target = self._reported
            self._urgent += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(
                    lambda: self._synced >= target or self._error is not None, timeout
                ):
                    raise TimeoutError(f"{self.db_path} was not synced within {timeout} s")
            finally:
                self._urgent -= 1
            self._raise_if_failed()

    def close(self) -> None:
        """Sync what was reported, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self._attempted < self._reported:
            self._sync_once(self._reported)
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise DurabilityLost(
                f"fsync of {self.wal_path} failed ({self._error}); what was committed since the"
                " last successful fsync may not be on the disk: restart the process"
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._reported > self._attempted or self._stopping)
                # Let the window's other commits arrive, unless someone waits for the disk.
                self._cond.wait_for(lambda: self._urgent > 0 or self._stopping, self.delay_s)
                target = self._reported
                if target <= self._attempted:
                    return  # stopping, and every reported commit had its fsync
            self._sync_once(target)
            if self.checkpoint_every is not None and (
                target - self._checkpointed >= self.checkpoint_every
            ):
                self._checkpoint(target)

    def _checkpoint(self, target: int) -> None:
        """Copy the WAL's committed pages into the database (never blocking a writer)."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(
                    self.db_path, isolation_level=None, check_same_thread=False
                )
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            # Harmless for durability (the WAL holds every commit): the WAL grows until the
            # next checkpoint; say it once per failure.
            log.warning("checkpoint of %s failed: %s", self.db_path, exc)
        self._checkpointed = target
        self.checkpoints += 1

    def _sync_once(self, target: int) -> None:
        error: OSError | None = None
        try:
            _fsync_path(self.wal_path)
        except FileNotFoundError:
            # No WAL: the last connection closed and checkpointed it into the database file,
            # which SQLite syncs at a checkpoint; sync it again, it costs nothing if clean.
            try:
                _fsync_path(self.db_path)
            except OSError as exc:
                error = exc
        except OSError as exc:
            error = exc
        with self._cond:
            self.syncs += 1
            self._attempted = max(self._attempted, target)
            if error is not None:
                if self._error is None:
                    log.error("fsync of %s failed: %s", self.wal_path, error)
                self._error = error
            elif self._error is None:
                self._synced = max(self._synced, target)
            self._cond.notify_all()


def _fsync_path(path: Path) -> None:
    """fsync a file through a descriptor of our own: Linux writes back the file's dirty pages
    whichever descriptor wrote them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
