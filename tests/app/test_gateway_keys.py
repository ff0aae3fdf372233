"""API keys: lifecycle, hashing at rest, and visibility across processes' connections."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from eth_utils import to_checksum_address

from infergrid.app.keys import (
    SECRET_PREFIX,
    KeyStore,
    NoGatewayDatabase,
    hash_secret,
    mask_secret,
)
from infergrid.settle.binding import ChainBinding, bind_file


def test_create_list_verify_revoke(keys: KeyStore) -> None:
    key_id, secret = keys.create("alice")
    assert secret.startswith(SECRET_PREFIX)
    assert len(secret) >= len(SECRET_PREFIX) + 43  # 32 random bytes, urlsafe base64
    record = keys.verify(secret)
    assert record is not None and record.key_id == key_id and record.name == "alice"
    assert record.active

    [listed] = keys.list()
    assert listed.key_id == key_id and listed.hint.endswith(secret[-4:])
    assert secret not in repr(listed)

    assert keys.verify(secret + "x") is None
    assert keys.verify("sk-not-ours") is None
    assert keys.verify("") is None

    assert keys.revoke(key_id) is True
    assert keys.verify(secret) is None
    assert keys.revoke(key_id) is False  # already revoked
    assert keys.revoke("key_missing") is False
    [revoked] = keys.list()
    assert not revoked.active and revoked.revoked_at is not None


def test_secrets_are_unique(keys: KeyStore) -> None:
    made = [keys.create(f"k{i}") for i in range(20)]
    assert len({s for _, s in made}) == 20 and len({k for k, _ in made}) == 20
    assert all(keys.verify(s).key_id == k for k, s in made)  # type: ignore[union-attr]


def test_only_a_hash_is_stored(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    _, secret = store.create("bob")
    store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in on_disk
    assert secret[len(SECRET_PREFIX) :][:16].encode() not in on_disk
    assert hash_secret(secret) in on_disk


def test_other_process_changes_seen_quickly(tmp_path: Path) -> None:
    """The CLI writes through its own connection while the gateway's store keeps serving."""
    gateway = KeyStore(tmp_path / "keys.db", refresh_s=0.2)
    cli = KeyStore(tmp_path / "keys.db")
    key_id, secret = cli.create("carol")
    assert gateway.verify(secret) is not None  # a new key works at once
    assert cli.revoke(key_id)
    deadline = time.monotonic() + 1.0
    while gateway.verify(secret) is not None:
        assert time.monotonic() < deadline, "revoked key still accepted after 1 s"
        time.sleep(0.02)
    gateway.close()
    cli.close()


def test_mask_secret() -> None:
    assert mask_secret("ig-abcdefghijklmnopqrstuvwxyz") == "ig-ab****wxyz"
    assert mask_secret("short") == "****"


def test_trace_writes_in_the_same_file_do_not_reload_keys(tmp_path: Path) -> None:
    from infergrid.app.traces import Trace, TraceStore

    keys = KeyStore(tmp_path / "gateway.db", refresh_s=0.0)
    traces = TraceStore(tmp_path / "gateway.db")
    _, secret = keys.create("dave")
    reloads = 0
    original = keys._reload_locked

    def counting() -> None:
        nonlocal reloads
        reloads += 1
        original()

    keys._reload_locked = counting  # type: ignore[method-assign]
    keys.verify(secret)
    reloads = 0
    for i in range(5):
        traces.record(Trace(f"r{i}", None, None, "/x", False, 0.0, 200))
        traces.flush()
        assert keys.verify(secret) is not None
    assert reloads == 0
    other = KeyStore(tmp_path / "gateway.db")
    other.create("erin")
    keys.verify(secret)
    assert reloads == 1
    for store in (keys, other, traces):
        store.close()


def test_opening_without_create_refuses_a_missing_database_and_creates_nothing(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere" / "gateway.db"
    with pytest.raises(NoGatewayDatabase, match="no gateway database at"):
        KeyStore(missing, create=False)
    assert not missing.parent.exists()


def test_opening_without_create_refuses_a_database_without_keys(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(NoGatewayDatabase, match="not a gateway database"):
        KeyStore(other, create=False)
    tables = sqlite3.connect(other).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("t",)]  # looked at, not written to


def test_opening_without_create_uses_the_gateways_database(keys: KeyStore) -> None:
    key_id, secret = KeyStore(keys.db_path, create=False).create("from the cli")
    assert keys.verify(secret) is not None and keys.verify(secret).key_id == key_id  # type: ignore[union-attr]


def test_chain_binding_tells_whether_the_gateway_bills(keys: KeyStore) -> None:
    assert keys.chain_binding() is None  # no gateway has bound it yet
    escrow = "0x" + "e5" * 20
    bound = ChainBinding.make(1337, "0x" + "ab" * 32, {"PaymentEscrow": escrow})
    bind_file(keys.db_path, bound, what="gateway db")
    assert keys.chain_binding() == bound
    assert bound.contract("PaymentEscrow") == to_checksum_address(escrow)
