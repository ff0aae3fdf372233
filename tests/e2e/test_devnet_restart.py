"""End to end: `infergrid up` restarted in the same directory starts a fresh chain with fresh
state, so the developer pays exactly for the second run's requests (not again for the first's);
and a second `infergrid up` beside a running one is refused without touching it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from infergrid.compute.model_store import served_model_name
from infergrid.devnet import FIRST_MINER_KEY_INDEX
from infergrid.devnet_state import PREVIOUS_DIR
from infergrid.settle.chain import Chain, dev_private_keys
from infergrid.settle.escrow import PaymentEscrow

from .devnet_process import DevnetProcess

pytestmark = pytest.mark.slow

MODEL = served_model_name("tiny")
MINER_KEY = dev_private_keys(FIRST_MINER_KEY_INDEX + 1)[-1]
QUESTION = [{"role": "user", "content": "Hello"}]


def _start(state_dir: Path) -> DevnetProcess:
    # Collection only by hand: the test decides when vouchers are paid.
    net = DevnetProcess(
        state_dir, "--miners", "1", "--model", "tiny", "--collect-interval", "0", "--verifiers", "0"
    )
    try:
        net.wait_up()
    except BaseException:
        net.stop()
        raise
    return net


def _spend(net: DevnetProcess, requests: int) -> int:
    """Serve `requests` chat completions; what their usage says they cost, in wei."""
    info = net.info
    client = openai.OpenAI(base_url=info["base_url"], api_key=info["api_key"], max_retries=0)
    charged = 0
    for _ in range(requests):
        usage = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4).usage
        assert usage is not None
        charged += int(usage.model_extra["cost_wei"])
    assert charged > 0
    return charged


def _collect(net: DevnetProcess) -> list[dict[str, Any]]:
    result = net.cli("miner", "collect", "--json", key=MINER_KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _developer_balance(net: DevnetProcess) -> int:
    chain = Chain.connect(net.info["chain_rpc"])
    escrow = PaymentEscrow(chain, net.info["contracts"]["PaymentEscrow"])
    return escrow.account(net.info["developer"]).balance_wei


def test_a_restarted_devnet_bills_only_its_own_requests(tmp_path: Path) -> None:
    state_dir = tmp_path / "net"
    first = _start(state_dir)
    try:
        _spend(first, 3)
        description = (state_dir / "devnet.json").read_text()

        # A second network in the same directory is refused at once, with one line ...
        second = subprocess.run(
            [sys.executable, "-m", "infergrid.cli", "up", "--state-dir", str(state_dir),
             "--model", "tiny", "--miners", "1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: a network is already running")
        # ... and the running one is untouched: its description, and it still serves.
        assert (state_dir / "devnet.json").read_text() == description
        _spend(first, 1)
    finally:
        assert first.stop() == 0

    again = _start(state_dir)
    try:
        log = again.log_path.read_text(errors="replace")
        assert "moved to" in log and "starts fresh" in log, log
        moved = list((state_dir / PREVIOUS_DIR).iterdir())
        assert len(moved) == 1 and (moved[0] / "gateway.receipts.db").exists()

        before = _developer_balance(again)
        charged = _spend(again, 3)
        rows = [row for row in _collect(again) if row["status"] == "collected"]
        assert rows and all(row["discrepancy"] == "match" for row in rows), rows
        # Exactly this run's requests: before, the restarted gateway's vouchers also carried
        # every receipt of the first run, and the miner collected them again.
        assert sum(row["paid_wei"] for row in rows) == charged
        assert before - _developer_balance(again) == charged
    finally:
        again.stop()
