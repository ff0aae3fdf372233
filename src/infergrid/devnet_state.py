"""A devnet's state directory: one running network at a time, and a fresh start on every chain.

`infergrid up` starts a new chain each time (a fresh embedded EVM, or fresh contracts on the
chain it is given), so whatever an earlier network left in the directory — the gateway's keys,
traces and receipts, the miners' receipt logs, devnet.json, the logs — belongs to another chain
(see settle.binding). Reused, it would bill the developer again for the earlier runs. So a new
devnet moves that state aside, into `previous/<time>/`, and starts fresh.

Two devnets in one directory would share those files and each overwrite (then delete) the
other's devnet.json, so a devnet holds `devnet.lock` with fcntl.flock for as long as it runs. A
devnet that was killed, even with kill -9, holds nothing: the kernel drops a flock with the
last descriptor of its process, so a stale lock file never blocks the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import IO

LOCK_FILE = "devnet.lock"
PREVIOUS_DIR = "previous"
# SQLite's companions of a database file: they belong with it wherever it goes.
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class DevnetRunning(RuntimeError):
    """Another devnet runs from this state directory."""


class StateLock:
    """`devnet.lock` in a state directory, held (flock, exclusive) by the running devnet."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock or raise DevnetRunning naming the holder; idempotent."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            state_dir = self.path.parent
            raise DevnetRunning(
                f"a network is already running from {state_dir} (pid {holder}; see"
                f" {state_dir / 'devnet.json'}): stop it first, or give this one another"
                " --state-dir"
            ) from None
        except BaseException:
            file.close()
            raise
        # Only the holder writes: who holds it, for the message above.
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a devnet taking it)."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            file.close()


def previous_state(state_dir: Path) -> list[Path]:
    """What an earlier network left in `state_dir`: its description, the gateway's database
    and receipt store, the miners' receipt logs (each with SQLite's companion files), the
    verifiers' evidence bundles and epoch scores, the treasury's pay records, and the node
    logs. Not the lock, not `previous/`, not files of anyone else."""
    from infergrid.app.node import receipts_db_path
    from infergrid.compute.node import default_receipt_log_path
    from infergrid.devnet import DEVNET_FILE, GATEWAY_DB
    from infergrid.verify.miner_pay import PAY_STATE_FILE as MINER_PAY_FILE
    from infergrid.verify.node import default_evidence_dir
    from infergrid.verify.pay_epoch import PAY_STATE_FILE as VERIFIER_PAY_FILE
    from infergrid.verify.score_duty import STATE_FILE as SCORE_STATE_FILE

    gateway_db = state_dir / GATEWAY_DB
    databases = [gateway_db, receipts_db_path(gateway_db)]
    # The miners' logs are named by owner: the default path with a wildcard for it.
    miner_logs = default_receipt_log_path("*", state_dir).name
    databases += sorted(path for path in state_dir.glob(miner_logs) if path.name.endswith(".db"))
    found = [state_dir / DEVNET_FILE, state_dir / "logs"]
    found += [db.with_name(db.name + suffix) for db in databases for suffix in _SQLITE_SUFFIXES]
    # Each verifier's are named by owner, too. Kept, a verifier would dispute the earlier
    # chain's failures again and skip the epochs it had scored there.
    for pattern in (default_evidence_dir("*", state_dir).name, SCORE_STATE_FILE.format("*")):
        found += sorted(state_dir.glob(pattern))
    found += [state_dir / VERIFIER_PAY_FILE, state_dir / MINER_PAY_FILE]
    return [path for path in found if path.exists()]


def move_previous_state(state_dir: Path, *, now: float | None = None) -> tuple[Path, int] | None:
    """Move previous_state(state_dir) into `previous/<YYYYmmdd-HHMMSS>/`; returns that folder
    and how many entries moved, or None when there was nothing. Call it holding the lock."""
    found = previous_state(state_dir)
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    target = state_dir / PREVIOUS_DIR / stamp
    suffix = 1
    while target.exists():  # two starts within a second
        suffix += 1
        target = state_dir / PREVIOUS_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), target / path.name)
    return target, len(found)
