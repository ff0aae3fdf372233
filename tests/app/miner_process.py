"""A real miner (compute.miner_server over a model directory) in a process of its own, so that
a test can freeze it with SIGSTOP, as a hung machine or a stopped VM freezes a miner: the
kernel still accepts its connections, and nothing answers them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from infergrid.processes import free_port
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role

START_TIMEOUT_S = 180

_SERVE = """
import sys
from pathlib import Path
from infergrid.compute.miner_server import create_miner_app, run_miner_server
from infergrid.compute.transformers_engine import TransformersEngine

engine = TransformersEngine.from_dir(Path(sys.argv[1]), device="cpu")
app = create_miner_app(engine, node_address=sys.argv[2], max_concurrency=2)
run_miner_server(app, "127.0.0.1", int(sys.argv[3]), log_level="warning")
"""


class MinerProcess:
    """`with MinerProcess(model_dir, owner) as miner:` starts it and waits until /health says
    ok; leaving the block resumes it if frozen and stops it."""

    def __init__(self, model_dir: Path, owner: str, log_path: Path) -> None:
        self.owner = owner
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health: dict[str, Any] = {}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # a shared box
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SERVE, str(model_dir), owner, str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self) -> MinerProcess:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the miner process exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    self.health = json.loads(resp.read())
                if self.health.get("status") == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the miner process did not start:\n{self.log_path.read_text()}")

    def record(self, price_in_wei: int = 1, price_out_wei: int = 2) -> NodeRecord:
        model = self.health["models"][0]
        offer = ModelOffer(model["name"], model["model_id"], price_in_wei, price_out_wei)
        return NodeRecord(self.owner, Role.MINER, self.base_url, self.owner, (offer,))

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> MinerProcess:
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
