"""Find and run anvil (foundry's dev node) as a separate chain process.

The binary comes from the npm package @foundry-rs/anvil; ./dev installs it under
.tools/node_modules/.bin. `INFERGRID_ANVIL` overrides where to find it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from infergrid.processes import free_port, rpc_ready
from infergrid.settle.chain import BTTC_MAINNET_CHAIN_ID, DEV_MNEMONIC

ANVIL_ENV = "INFERGRID_ANVIL"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_TOOLS_BIN = Path(".tools") / "node_modules" / ".bin" / "anvil"


def find_anvil() -> str | None:
    """The anvil binary: $INFERGRID_ANVIL, then .tools/ of the repo or cwd, then PATH."""
    configured = os.environ.get(ANVIL_ENV)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for base in (_REPO_ROOT, Path.cwd()):
        candidate = base / _TOOLS_BIN
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("anvil")


class AnvilNode:
    """An anvil process with BTTC's rules by default (Berlin, chain id 199).

    with AnvilNode() as node:
        chain = Chain.connect(node.url)
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        chain_id: int = BTTC_MAINNET_CHAIN_ID,
        hardfork: str = "berlin",
        accounts: int = 10,
        binary: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        found = binary or find_anvil()
        if found is None:
            raise FileNotFoundError(
                f"anvil not found: set {ANVIL_ENV}, run ./dev to install it into .tools/, "
                "or put it on PATH"
            )
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self.chain_id = chain_id
        self.hardfork = hardfork
        self.accounts = accounts
        self.url = f"http://{host}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> str:
        if self.process is not None:
            raise RuntimeError("anvil already started")
        cmd = [
            self.binary,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--hardfork",
            self.hardfork,
            "--accounts",
            str(self.accounts),
            "--mnemonic",
            DEV_MNEMONIC,
            "--silent",
        ]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                self.process = None
                raise RuntimeError(f"anvil exited at start: {err.strip()}")
            if rpc_ready(self.url):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"anvil did not answer on {self.url} within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if process.stderr:
            process.stderr.close()

    def __enter__(self) -> AnvilNode:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
