"""Start `infergrid up` as a real process for end-to-end tests, and stop it like Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infergrid.processes import free_port

START_TIMEOUT_S = 300


def _ctrl_c_stops() -> None:
    """In the child: SIGINT back to its default. A test run started in the background of a
    non-interactive shell inherits SIGINT ignored, and so would `infergrid up`, which could then
    never be stopped the way a user's Ctrl-C stops it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class DevnetProcess:
    def __init__(self, state_dir: Path, *args: str) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir / "up.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "infergrid.cli", "up",
            "--state-dir", str(state_dir),
            "--port", str(free_port()),
            "--chain-port", str(free_port()),
            *args,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_ctrl_c_stops,
            )  # fmt: skip
        self.info: dict[str, Any] = {}

    def wait_up(self) -> dict[str, Any]:
        description = self.state_dir / "devnet.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`infergrid up` exited early:\n{self.log()}")
            if description.exists():
                self.info = json.loads(description.read_text())
                return self.info
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"`infergrid up` not ready after {START_TIMEOUT_S} s:\n{self.log()}")

    def cli(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run an `infergrid` command against this network, as a user in another terminal
        (with INFERGRID_PRIVATE_KEY set to `key`, if given)."""
        env = {k: v for k, v in os.environ.items() if k != "INFERGRID_PRIVATE_KEY"}
        if key is not None:
            env["INFERGRID_PRIVATE_KEY"] = key
        return subprocess.run(
            [sys.executable, "-m", "infergrid.cli", *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    def node_pids(self) -> list[int]:
        return [node["pid"] for node in self.info.get("nodes", [])]

    def stop(self) -> int:
        """Send SIGINT (what Ctrl-C sends) and wait for a clean exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in self.node_pids():  # never leak a child, even when the test failed
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        return self.process.returncode

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        for log in sorted((self.state_dir / "logs").glob("*.log")):
            text += f"\n--- {log.name} ---\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-30:]
            )
        return text


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
