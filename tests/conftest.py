"""Fixtures every test folder can use: a real anvil node as a separate process."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergrid.processes import free_port, rpc_ready

REPO = Path(__file__).resolve().parent.parent


def find_anvil() -> str | None:
    """anvil from INFERGRID_ANVIL, from ./dev's .tools/, or from PATH."""
    candidates = [
        os.environ.get("INFERGRID_ANVIL", ""),
        str(REPO / ".tools" / "node_modules" / ".bin" / "anvil"),
        shutil.which("anvil") or "",
    ]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


@pytest.fixture
def anvil_rpc() -> Iterator[str]:
    """A fresh anvil with BTTC's rules (Berlin, chain id 199) on a free loopback port."""
    anvil = find_anvil()
    if anvil is None:
        if os.environ.get("CI"):
            pytest.fail("anvil is not installed: ./dev test installs it from npm")
        pytest.skip("anvil not found (./dev test installs it from npm)")
    port = free_port()
    process = subprocess.Popen(
        [anvil, "--host", "127.0.0.1", "--port", str(port), "--hardfork", "berlin",
         "--chain-id", "199", "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if rpc_ready(url):
                break
            if process.poll() is not None:
                pytest.fail(
                    f"anvil exited: {process.stderr.read().decode() if process.stderr else ''}"
                )
            time.sleep(0.1)
        else:
            pytest.fail("anvil did not answer within 10 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
