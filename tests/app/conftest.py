"""Fixtures for the gateway tests: key and trace stores sharing one SQLite file, as in
production."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    store = KeyStore(tmp_path / "gateway.db", refresh_s=0.1)
    yield store
    store.close()


@pytest.fixture
def traces(tmp_path: Path) -> Iterator[TraceStore]:
    store = TraceStore(tmp_path / "gateway.db", flush_interval_s=0.05)
    yield store
    store.close()


@pytest.fixture
def api_key(keys: KeyStore) -> str:
    return keys.create("tests")[1]
