"""Fixtures for the settlement tests: a real EVM in process, a fresh registry per test, the
embedded chain served over HTTP, and anvil as a separate process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.anvil import AnvilNode
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.registry import Registry, deploy_registry
from infergrid.settle.rpc_server import EmbeddedChainServer

N_KEYS = 10
MIN_STAKES = {
    Role.MINER: 1 * WEI_PER_BTT,
    Role.VERIFIER: 2 * WEI_PER_BTT,
    Role.GATEWAY: WEI_PER_BTT // 2,
}
UNBONDING_DELAY_S = 3600
ADMIN, SLASHER = 0, 9  # indexes into the dev keys


def offer(name: str = "SmolLM2-135M-Instruct", fill: str = "11", price: int = 7) -> ModelOffer:
    return ModelOffer(name, "0x" + fill * 32, price, 2 * price)


@pytest.fixture(scope="session")
def keys() -> list[str]:
    return dev_private_keys(N_KEYS)


@pytest.fixture(scope="session")
def addrs(keys: list[str]) -> list[str]:
    return [as_account(k).address for k in keys]


@pytest.fixture(scope="session")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=N_KEYS))


def _deploy(chain: Chain, keys: list[str]) -> Registry:
    address = deploy_registry(chain, keys[ADMIN], MIN_STAKES, UNBONDING_DELAY_S)
    registry = Registry(chain, address)
    registry.set_slasher(keys[ADMIN], as_account(keys[SLASHER]).address)
    return registry


@pytest.fixture
def registry(chain: Chain, keys: list[str]) -> Registry:
    return _deploy(chain, keys)


@pytest.fixture(scope="module")
def rpc_url() -> Iterator[str]:
    with EmbeddedChainServer(EmbeddedEVM(accounts=N_KEYS)) as server:
        yield server.url


@pytest.fixture(scope="module")
def anvil_url(anvil_binary: str) -> Iterator[str]:
    with AnvilNode(chain_id=199, hardfork="berlin", accounts=N_KEYS, binary=anvil_binary) as node:
        yield node.url
