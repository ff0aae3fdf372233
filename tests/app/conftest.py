"""Fixtures for the gateway tests: key and trace stores sharing one SQLite file, as in
production; for the metered ones, an embedded chain per module with fresh contracts per test
(settlement_harness.py) and a funded payer's key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from settlement_harness import PAYER_A, Network, addr, deploy_network

from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.settle.chain import Chain, EmbeddedEVM


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


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=10))


@pytest.fixture
def net(chain: Chain) -> Network:
    return deploy_network(chain)


@pytest.fixture
def payer_key(keys: KeyStore, net: Network) -> str:
    """An API key for payer A, who deposited 1 BTT and authorized the gateway."""
    net.fund_payer(PAYER_A, WEI_PER_BTT)
    return keys.create("payer-a", payer=addr(PAYER_A))[1]
