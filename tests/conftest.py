"""Fixtures every test folder can use: a real anvil node as a separate process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from infergrid.settle.anvil import AnvilNode, find_anvil


@pytest.fixture(scope="session")
def anvil_binary() -> str:
    """Skip without anvil on a developer's machine; fail in CI, where ./dev installs it."""
    binary = find_anvil()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("anvil is not installed: ./dev test installs it from npm")
        pytest.skip("anvil not found (./dev test installs it from npm into .tools/)")
    return binary


@pytest.fixture
def anvil_rpc(anvil_binary: str) -> Iterator[str]:
    """A fresh anvil with BTTC's rules (Berlin, chain id 199) on a free loopback port."""
    with AnvilNode(chain_id=199, hardfork="berlin", binary=anvil_binary) as node:
        yield node.url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist's `--dist loadgroup` (as ./dev test runs), each test module stays on
    one worker, in order (module-scoped fixtures hold state some tests build on), and the
    end-to-end tests, each running a whole devnet of processes, share one group: two devnets
    at once on a small machine would starve both."""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        group = "e2e" if module.startswith("tests/e2e/") else module
        item.add_marker(pytest.mark.xdist_group(group))
