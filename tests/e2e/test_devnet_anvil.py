"""`infergrid up --chain-rpc URL`: the same network on anvil run as a BTTC-like node
(Berlin rules, chain id 199), a separate process."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from infergrid.compute.model_store import served_model_name

from .devnet_process import DevnetProcess

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


def test_devnet_runs_on_an_external_chain(anvil_rpc: str, tmp_path: Path) -> None:
    net = DevnetProcess(
        tmp_path / "net", "--miners", "1", "--model", "tiny", "--verifiers", "0",
        "--chain-rpc", anvil_rpc,
    )  # fmt: skip
    try:
        info = net.wait_up()
        assert info["chain_rpc"] == anvil_rpc
        assert info["chain_id"] == 199
        assert [node["name"] for node in info["nodes"]] == ["miner-1", "gateway"]

        client = openai.OpenAI(base_url=info["base_url"], api_key=info["api_key"], max_retries=0)
        completion = client.chat.completions.create(
            model=served_model_name("tiny"),
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
        )
        assert completion.usage is not None and completion.usage.completion_tokens > 0

        status = net.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        miners = [node for node in json.loads(status.stdout) if node["role"] == "miner"]
        assert len(miners) == 1 and miners[0]["stake_btt"] == 100.0 and miners[0]["health"] == "ok"
    finally:
        assert net.stop() == 0
