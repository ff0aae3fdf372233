"""The devnet's state directory: one network at a time (flock), a fresh start on every new
chain (the old state moved aside), and ports in TIME_WAIT counted as free."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infergrid.devnet import Devnet, DevnetOptions, _pick_port
from infergrid.devnet_state import (
    LOCK_FILE,
    PREVIOUS_DIR,
    DevnetRunning,
    StateLock,
    move_previous_state,
)
from infergrid.processes import free_port, port_is_free


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    first.acquire()
    first.acquire()  # idempotent
    refused = rf"already running from {tmp_path} \(pid {os.getpid()}"
    with pytest.raises(DevnetRunning, match=refused):
        second.acquire()
    assert not second.held
    first.release()
    second.acquire()
    assert second.held
    second.release()


def test_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            " from infergrid.devnet_state import StateLock;"
            " lock = StateLock(Path(sys.argv[1])); lock.acquire();"
            " print('held', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DevnetRunning, match=f"pid {holder.pid}"):
            StateLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)  # as a crashed or kill -9'd devnet
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the stale file stays; it blocks nothing
    lock = StateLock(tmp_path)
    lock.acquire()
    lock.release()


def test_previous_state_is_moved_aside(tmp_path: Path) -> None:
    previous = [
        "devnet.json",
        "gateway.db",
        "gateway.db-wal",
        "gateway.receipts.db",
        "gateway.receipts.db-shm",
        "miner-0xabc.receipts.db",
        "miner-0xabc.receipts.db-wal",
        "verifier-scores-0xAbC.json",
        "verifier-pay.json",
        "miner-rewards.json",
    ]
    for name in previous:
        (tmp_path / name).write_text(name)
    # A verifier's evidence bundles: disputes of the earlier chain's failures.
    (tmp_path / "verifier-0xabc.evidence").mkdir()
    (tmp_path / "verifier-0xabc.evidence" / "bundle.json").write_text("{}")
    previous.append("verifier-0xabc.evidence")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gateway.log").write_text("old log")
    (tmp_path / "up.log").write_text("not the network's")  # e.g. a test's own output
    (tmp_path / LOCK_FILE).write_text("")
    moved = move_previous_state(tmp_path, now=1_700_000_000)
    assert moved is not None
    folder, count = moved
    assert folder.parent == tmp_path / PREVIOUS_DIR and count == len(previous) + 1
    assert sorted(p.name for p in folder.iterdir()) == sorted([*previous, "logs"])
    assert (folder / "logs" / "gateway.log").read_text() == "old log"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_FILE, PREVIOUS_DIR, "up.log"])
    assert move_previous_state(tmp_path) is None
    # A second fresh start within the same second does not mix the two runs' state.
    (tmp_path / "gateway.db").write_text("second")
    again = move_previous_state(tmp_path, now=1_700_000_000)
    assert again is not None and again[0] != folder
    assert (again[0] / "gateway.db").read_text() == "second"


def test_a_devnet_refused_by_a_running_one_touches_nothing(tmp_path: Path) -> None:
    running = Devnet(DevnetOptions(state_dir=tmp_path))
    running.acquire()
    description = {"base_url": "http://127.0.0.1:1/v1", "chain_id": 1337}
    (tmp_path / "devnet.json").write_text(json.dumps(description))
    (tmp_path / "gateway.db").write_text("the running network's")

    second = Devnet(DevnetOptions(state_dir=tmp_path))
    with pytest.raises(DevnetRunning, match="already running"):
        second.start()
    second.stop()  # what run_devnet's cleanup would do: must not delete the other's file
    assert json.loads((tmp_path / "devnet.json").read_text()) == description
    assert (tmp_path / "gateway.db").read_text() == "the running network's"
    assert not (tmp_path / PREVIOUS_DIR).exists()

    running.stop()
    assert not (tmp_path / "devnet.json").exists()
    third = Devnet(DevnetOptions(state_dir=tmp_path))
    third.acquire()  # the next network moves the stopped one's state aside
    assert [p.name for p in (tmp_path / PREVIOUS_DIR).iterdir()] and not (
        tmp_path / "gateway.db"
    ).exists()
    third.stop()


def _leave_time_wait(port: int) -> None:
    """Serve one connection on `port` and close it from the server's side first, as a stopped
    server does: the server's end of it lingers in TIME_WAIT on `port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
        time.sleep(0.05)
        client.close()


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    port = free_port()
    _leave_time_wait(port)
    assert port_is_free(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        assert not port_is_free(port)
        picked, note = _pick_port(port, "127.0.0.1")
        assert picked != port and note is not None
        assert f"port {port} on 127.0.0.1 is in use" in note and f"using {picked}" in note
    assert _pick_port(port, "127.0.0.1") == (port, None)
