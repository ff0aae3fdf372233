"""A background writer's batch that fails: isolate the rows at fault, write the rest.

Every background writer (the gateway's traces and receipts, the miner's receipt log) writes rows
in batches, one transaction each. A batch fails for one of two reasons, and they need opposite
answers:

- **a row cannot be stored** (an integer past SQLite's 64 bits, a string with a lone surrogate,
  a type SQLite does not take, a constraint): retrying it can never succeed, and retrying the
  batch around it would block every row behind it forever. `write_isolating` writes such a
  batch again row by row, so the bad rows fail alone and every other row is written; the
  writer drops (or fails) the rejected rows for good and counts them.
- **the database failed** (locked past its timeout, disk full, I/O error, read-only, corrupt,
  closed): no row is at fault, nothing is rejected; the rows come back as `failed` and the
  writer decides (traces retry later, receipts fail their commits).

`FailureLog` logs each distinct failure once, not once per batch: a writer that meets the same
bad value every 100 ms must not grow its log by hundreds of megabytes a day.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Distinct failures remembered for log-once; past this, new ones are counted but not logged.
MAX_DISTINCT_FAILURES = 256


def is_database_error(exc: BaseException) -> bool:
    """Whether `exc` says the database failed rather than the row being written: busy or
    locked, I/O, disk full, read-only (OperationalError), corrupt (a plain DatabaseError), or
    a closed connection. Anything else raised while writing one row is that row's fault."""
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return True
    return isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)


@dataclass
class BatchOutcome(Generic[T]):
    written: list[T] = field(default_factory=list)
    rejected: list[tuple[T, Exception]] = field(default_factory=list)  # can never be stored
    failed: list[T] = field(default_factory=list)  # not written: the database failed
    error: Exception | None = None  # the database's error, when `failed` is not empty


def write_isolating(rows: Sequence[T], write: Callable[[Sequence[T]], None]) -> BatchOutcome[T]:
    """Write `rows` with `write`, which must write all the rows it is given in one transaction
    or none of them (raising). The batch is tried whole; if a row is at fault, each row is tried
    alone, once. Never raises for an Exception; never retries a rejected row."""
    outcome: BatchOutcome[T] = BatchOutcome()
    if not rows:
        return outcome
    try:
        write(rows)
    except Exception as exc:
        if is_database_error(exc):
            outcome.failed, outcome.error = list(rows), exc
            return outcome
        if len(rows) == 1:
            outcome.rejected.append((rows[0], exc))
            return outcome
    else:
        outcome.written = list(rows)
        return outcome
    for index, row in enumerate(rows):
        try:
            write([row])
        except Exception as exc:
            if is_database_error(exc):
                outcome.failed, outcome.error = list(rows[index:]), exc
                return outcome
            outcome.rejected.append((row, exc))
        else:
            outcome.written.append(row)
    return outcome


class FailureLog:
    """A writer's rejected rows and database failures: counted always, logged once each.

    Thread-safe. `rejected` counts rows dropped for good; `database_errors` counts batches the
    database failed. A failure is "the same" when its kind, exception type and message match.
    """

    def __init__(self, writer: str, logger: logging.Logger) -> None:
        self.writer = writer
        self._log = logger
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str, str]] = set()
        self.rejected = 0
        self.database_errors = 0

    def _first_time(self, kind: str, exc: BaseException) -> bool:
        key = (kind, type(exc).__name__, str(exc))
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= MAX_DISTINCT_FAILURES:
                return False
            self._seen.add(key)
            if len(self._seen) == MAX_DISTINCT_FAILURES:
                self._log.warning(
                    "%s: %d distinct write failures logged; further new ones are only counted",
                    self.writer,
                    MAX_DISTINCT_FAILURES,
                )
            return True

    def reject(self, row: str, exc: BaseException) -> None:
        """Count a row dropped for good (`row` says which, for the log)."""
        with self._lock:
            self.rejected += 1
        if self._first_time("row", exc):
            self._log.error(
                "%s: cannot store %s, dropped it and wrote the rest: %s: %s"
                " (logged once; see infergrid_writer_rejected_rows_total)",
                self.writer,
                row,
                type(exc).__name__,
                exc,
            )

    def note(self, row: str, exc: BaseException) -> None:
        """Log (once) a row that could not be stored as it was but was kept another way."""
        if self._first_time("note", exc):
            self._log.warning(
                "%s: cannot store %s: %s: %s (logged once)",
                self.writer,
                row,
                type(exc).__name__,
                exc,
            )

    def database_failed(self, exc: BaseException, rows: int, then: str) -> None:
        """Count a batch of `rows` the database failed; `then` says what happens to them."""
        with self._lock:
            self.database_errors += 1
        if self._first_time("database", exc):
            self._log.error(
                "%s: the database failed writing %d rows (%s: %s); %s (logged once)",
                self.writer,
                rows,
                type(exc).__name__,
                exc,
                then,
            )
