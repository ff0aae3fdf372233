"""Child processes of a local network: started with their output in log files, stopped cleanly."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick), for a server started next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR, as every server here binds
    with (uvicorn, the chain's RPC server): connections of a stopped server that linger in
    TIME_WAIT do not make its port busy, so a restarted devnet gets its ports back; only a
    socket that listens there does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def infergrid_command(*args: str) -> list[str]:
    """Run the `infergrid` CLI with this interpreter, so children share the parent's venv."""
    return [sys.executable, "-m", "infergrid.cli", *args]


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def rpc_ready(url: str) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return "result" in json.loads(response.read())
    except (OSError, ValueError):
        return False


def health_ok(url: str) -> bool:
    try:
        return get_json(url).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, even by kill -9,
    so a crashed `infergrid up` leaves no node running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup still applies
        pass


@dataclass
class ManagedProcess:
    """One child: its command, its log file, and how to stop it."""

    name: str
    argv: list[str]
    log_path: Path
    endpoint: str = ""  # the URL the process serves, for people and tools to find it
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            # Own process group: Ctrl-C in the terminal reaches only `infergrid up`, which then
            # stops the children in order instead of all of them dying at once.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited before {what} (see {self.log_path}):\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no {what} after {timeout_s:.0f} s (see {self.log_path})")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
