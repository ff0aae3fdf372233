"""API keys: created and revoked by the CLI, verified by the gateway, stored in SQLite.

Only a SHA-256 of each secret is stored. That is enough because secrets carry 256 random bits:
there is nothing to brute-force, so a slow password hash would only slow the hot path.

The gateway and the CLI share one database file (WAL mode, so neither blocks the other). The
gateway keeps every live key's hash in memory and verifies with a dict lookup; it re-reads the
table only when SQLite's `data_version` says another connection committed, which it checks on
every unknown key and at most every `refresh_s` otherwise. A key revoked from another process
therefore stops working within `refresh_s` (0.25 s by default), and a new key works at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eth_utils import is_address, to_checksum_address

if TYPE_CHECKING:
    from infergrid.settle.binding import ChainBinding

SECRET_PREFIX = "ig-"

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id      TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash BLOB NOT NULL UNIQUE,
        hint        TEXT NOT NULL,
        created_at  REAL NOT NULL,
        revoked_at  REAL,
        payer       TEXT,
        canary      INTEGER NOT NULL DEFAULT 0
    )""",
    # Bumped with every key change. The file may hold other tables (traces), whose commits
    # also move data_version; this row tells a key change from those without a reload.
    """CREATE TABLE IF NOT EXISTS api_keys_version (
        id      INTEGER PRIMARY KEY CHECK (id = 0),
        version INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO api_keys_version (id, version) VALUES (0, 0)",
]
_BUMP = "UPDATE api_keys_version SET version = version + 1 WHERE id = 0"
_RECORD_COLUMNS = "key_id, name, hint, created_at, revoked_at, payer, canary"


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    hint: str  # "ig-…wxyz": enough for an operator to tell keys apart, useless to an attacker
    created_at: float
    revoked_at: float | None = None
    # The escrow account (checksummed address) this key's requests are charged to; None for
    # a key made before settlement, which a metered gateway refuses with a 402.
    payer: str | None = None
    # A verifier's key for canary prompts: its requests go to miners on probation first
    # (app.audits has the routing rule), and every one of them is audited.
    canary: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "canary", bool(self.canary))  # SQLite gives 0 or 1

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def mask_secret(secret: str) -> str:
    """How an error message may quote a presented key without echoing it."""
    if len(secret) <= 12:
        return "****"
    return f"{secret[:5]}****{secret[-4:]}"


def normalize_payer(payer: str | None) -> str | None:
    """A payer address, checksummed; raises ValueError for anything that is not one."""
    if payer is None:
        return None
    if not isinstance(payer, str) or not is_address(payer.strip()):
        raise ValueError(f"payer {payer!r} is not an address")
    return to_checksum_address(payer.strip())


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an older version up to this schema."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(api_keys)")}
    for name, definition in (("payer", "TEXT"), ("canary", "INTEGER NOT NULL DEFAULT 0")):
        if name in columns:
            continue
        try:
            conn.execute(f"ALTER TABLE api_keys ADD COLUMN {name} {definition}")
        except sqlite3.OperationalError as exc:
            # Another process opening the same file may have just added it.
            if "duplicate column" not in str(exc):
                raise


# How long a statement waits for another connection's write lock before "database is locked".
BUSY_TIMEOUT_MS = 10_000


def connect(db_path: str | Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """A WAL-mode connection shared by this module and traces.py."""
    path = Path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN ourselves, so nothing holds a write lock by accident.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


class NoGatewayDatabase(FileNotFoundError):
    """The file named as a gateway's database is not one: missing, or without a keys table.

    A key written anywhere else than the database a gateway reads is one no gateway will ever
    accept, so the CLI refuses instead of creating a new database there."""

    def __init__(self, db_path: Path, why: str) -> None:
        self.db_path = db_path
        super().__init__(
            f"{why}: start the gateway first (`infergrid gateway --db {db_path}` or"
            " `infergrid up`), pass the --db it uses, or create one with `keys create --init`"
        )


def _check_gateway_database(db_path: Path) -> None:
    if not db_path.is_file():
        raise NoGatewayDatabase(db_path, f"no gateway database at {db_path}")
    # Read-only: looking must not create the file or a table in someone else's database.
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'"
        ).fetchone()
    except sqlite3.DatabaseError as exc:
        raise NoGatewayDatabase(db_path, f"{db_path} is not a gateway database ({exc})") from None
    finally:
        conn.close()
    if found is None:
        raise NoGatewayDatabase(db_path, f"{db_path} is not a gateway database (no API keys)")


class KeyStore:
    """API keys in one SQLite file; safe to open from several processes at once.

    The gateway creates its database on start (`create=True`, the default). Tools that manage
    a gateway's keys open it with `create=False`: a missing file, or one that is not a
    gateway's, raises NoGatewayDatabase and nothing is created."""

    def __init__(
        self, db_path: str | Path, *, refresh_s: float = 0.25, create: bool = True
    ) -> None:
        self.db_path = Path(db_path)
        self.refresh_s = refresh_s
        if not create:
            _check_gateway_database(self.db_path)
        self._conn = connect(self.db_path)
        for statement in _SCHEMA:
            self._conn.execute(statement)
        _migrate(self._conn)
        self._lock = threading.Lock()
        self._live: dict[bytes, KeyRecord] = {}
        self._data_version = -1
        self._keys_version = -1
        self._checked_at = float("-inf")
        self._reload()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def chain_binding(self) -> ChainBinding | None:
        """The deployment the gateway using this database is bound to (settle.binding): its
        PaymentEscrow is there when that gateway bills. None until a gateway has opened it."""
        from infergrid.settle.binding import META_TABLE, read_binding

        with self._lock:
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (META_TABLE,)
            ).fetchone()
            return read_binding(self._conn) if exists else None

    # -- CLI side ----------------------------------------------------------------------------

    def create(
        self, name: str, payer: str | None = None, *, canary: bool = False
    ) -> tuple[str, str]:
        """Make a key, optionally bound to the escrow account `payer` that its requests are
        charged to, and marked as a verifier's `canary` key; returns (key_id, secret). The
        secret exists only in this return value."""
        payer = normalize_payer(payer)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        record = KeyRecord(
            key_id=key_id,
            name=name,
            hint=f"{SECRET_PREFIX}…{secret[-4:]}",
            created_at=time.time(),
            payer=payer,
            canary=canary,
        )
        digest = hash_secret(secret)
        with self._lock, self._transaction():
            self._conn.execute(
                "INSERT INTO api_keys (key_id, name, secret_hash, hint, created_at, payer,"
                " canary) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key_id,
                    record.name,
                    digest,
                    record.hint,
                    record.created_at,
                    payer,
                    int(canary),
                ),
            )
            self._conn.execute(_BUMP)
            self._live[digest] = record
        return key_id, secret

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        return KeyRecord(*row) if row else None

    def revoke(self, key_id: str) -> bool:
        """Revoke a key; False if no active key has that id."""
        with self._lock, self._transaction():
            cursor = self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
            changed = cursor.rowcount > 0
            if changed:
                self._conn.execute(_BUMP)
                self._live = {h: r for h, r in self._live.items() if r.key_id != key_id}
        return changed

    # -- gateway side ------------------------------------------------------------------------

    def verify(self, secret: str) -> KeyRecord | None:
        """The active key with this secret, or None. Microseconds: a hash and a dict lookup."""
        if not secret.startswith(SECRET_PREFIX):
            return None
        digest = hash_secret(secret)
        now = time.monotonic()
        record = self._live.get(digest)
        # A miss may be a key created a moment ago by the CLI, so a miss always re-checks; a hit
        # re-checks only every refresh_s, which bounds how long a revoked key keeps working.
        if record is None or now - self._checked_at >= self.refresh_s:
            self._refresh(now)
            record = self._live.get(digest)
        return record

    def _refresh(self, now: float) -> None:
        with self._lock:
            self._checked_at = now
            # data_version moves only when another connection commits: a few microseconds to
            # learn that nothing changed, which is the common case.
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            if version == self._data_version:
                return
            self._data_version = version
            if self._read_keys_version() != self._keys_version:
                self._reload_locked()

    def _reload(self) -> None:
        with self._lock:
            (self._data_version,) = self._conn.execute("PRAGMA data_version").fetchone()
            self._reload_locked()
            self._checked_at = time.monotonic()

    def _read_keys_version(self) -> int:
        (version,) = self._conn.execute(
            "SELECT version FROM api_keys_version WHERE id = 0"
        ).fetchone()
        return int(version)

    def _reload_locked(self) -> None:
        # One read transaction, so the version and the rows agree.
        with self._transaction():
            self._keys_version = self._read_keys_version()
            rows = self._conn.execute(
                f"SELECT secret_hash, {_RECORD_COLUMNS} FROM api_keys WHERE revoked_at IS NULL"
            ).fetchall()
        self._live = {bytes(row[0]): KeyRecord(*row[1:]) for row in rows}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
