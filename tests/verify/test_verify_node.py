"""`infergrid verifier` as an operator runs it: a real process against a chain served over
JSON-RPC (the embedded EVM behind settle.rpc_server) with every contract deployed.

It registers as a verifier with its endpoint and a zero-price offer for each model it audits,
staking the registry's minimum; it serves /health and the audit API; a restart (on another
port) updates its record instead of registering again. Every operator mistake is one line and
exit code 1: no key, missing chain options, canaries half-configured, a chain that does not
answer, a model the store does not know.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from verify_helpers import get

from infergrid.cli import app
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.nodes import ModelOffer, Role
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.deploy import NetworkContracts, deploy_network
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.registry import Registry
from infergrid.settle.rpc_server import EmbeddedChainServer

KEYS = dev_private_keys(10)
VERIFIER_KEY = KEYS[6]
VERIFIER = as_account(VERIFIER_KEY).address


@pytest.fixture(scope="module")
def network() -> Iterator[tuple[str, NetworkContracts]]:
    with EmbeddedChainServer(EmbeddedEVM(accounts=10)) as server:
        yield server.url, deploy_network(Chain.connect(server.url), KEYS[0], DEVNET_PARAMS)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def invoke(*args: str, key: str = "") -> Any:
    return CliRunner().invoke(
        app, ["verifier", *args], env={"INFERGRID_PRIVATE_KEY": key, "COLUMNS": "200"}
    )


def one_error_line(result: Any, *, progress: int = 0) -> str:
    """The one error line (after `progress` lines of what it was doing), exit code 1."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == progress + 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: ")
    return lines[-1]


ADDRESS = "0x" + "22" * 20


def test_without_a_key_it_says_which_variable_to_set() -> None:
    line = one_error_line(
        invoke("--chain-rpc", "http://127.0.0.1:9", "--registry", ADDRESS, "--escrow", ADDRESS)
    )
    assert line == "error: set INFERGRID_PRIVATE_KEY to the node's private key (0x… hex)"


def test_without_the_chain_options_it_names_them() -> None:
    line = one_error_line(invoke("--registry", ADDRESS, key=VERIFIER_KEY))
    assert line == "error: a verifier needs --chain-rpc, --registry and --escrow (or --devnet)"


def test_canaries_need_both_a_gateway_and_a_key() -> None:
    args = ("--chain-rpc", "http://127.0.0.1:9", "--registry", ADDRESS, "--escrow", ADDRESS)
    line = one_error_line(invoke(*args, "--gateway", "http://127.0.0.1:8000", key=VERIFIER_KEY))
    assert line == "error: canaries need both --gateway and --canary-key (or neither)"


def test_a_chain_that_does_not_answer_is_one_line() -> None:
    port = free_port()  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    line = one_error_line(
        invoke("--chain-rpc", url, "--registry", ADDRESS, "--escrow", ADDRESS, key=VERIFIER_KEY)
    )
    assert line.startswith(f"error: cannot reach the chain at {url}")


def test_an_unknown_model_is_one_line(network: tuple[str, NetworkContracts]) -> None:
    url, contracts = network
    line = one_error_line(
        invoke(
            "--chain-rpc",
            url,
            "--registry",
            contracts.NodeRegistry,
            "--escrow",
            contracts.PaymentEscrow,
            "--model",
            "no-such-model",
            key=VERIFIER_KEY,
        ),
        progress=1,  # "loading no-such-model"
    )
    assert "unknown model 'no-such-model'" in line


def start(
    url: str, contracts: NetworkContracts, port: int, state_dir: Path
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infergrid.cli",
            "verifier",
            "--chain-rpc",
            url,
            "--registry",
            contracts.NodeRegistry,
            "--escrow",
            contracts.PaymentEscrow,
            "--model",
            "tiny",
            "--port",
            str(port),
            "--threads",
            "1",
            "--state-dir",
            str(state_dir),
        ],
        env={**os.environ, "INFERGRID_PRIVATE_KEY": VERIFIER_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(process: subprocess.Popen[str], port: int) -> dict[str, Any]:
    for _ in range(1200):
        if process.poll() is not None:
            raise AssertionError(f"the verifier exited: {process.stdout.read()}")  # type: ignore[union-attr]
        try:
            status, _, body = get(f"http://127.0.0.1:{port}/health")
        except OSError:
            time.sleep(0.1)
            continue
        if status == 200:
            return dict(json.loads(body))
    raise AssertionError("the verifier never became healthy")


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def test_a_verifier_registers_serves_and_restarts_without_registering_again(
    network: tuple[str, NetworkContracts], tmp_path: Path
) -> None:
    url, contracts = network
    registry = Registry(Chain.connect(url), contracts.NodeRegistry)
    tiny = TransformersEngine.load("tiny", num_threads=1, quiet=True)
    port = free_port()
    process = start(url, contracts, port, tmp_path)
    try:
        health = wait_healthy(process, port)
    finally:
        first_log = stop(process)
    assert health["address"] == VERIFIER
    assert health["models"] == [{"name": tiny.name, "model_id": tiny.model_id}]
    assert (health["audits"], health["failed"], health["evidence"]) == (0, 0, 0)
    node = registry.node(VERIFIER)
    assert node is not None, first_log
    assert (node.role, node.endpoint, node.signer) == (
        Role.VERIFIER,
        f"http://127.0.0.1:{port}",
        VERIFIER,
    )
    assert node.models == (ModelOffer(tiny.name, tiny.model_id, 0, 0),)
    assert node.stake_wei == DEVNET_PARAMS.min_stake_verifier_wei
    assert "registered as verifier" in first_log
    registered_at = registry.registered_at(VERIFIER)

    other_port = free_port()
    process = start(url, contracts, other_port, tmp_path)
    try:
        wait_healthy(process, other_port)
    finally:
        stop(process)
    again = registry.node(VERIFIER)
    assert again is not None and again.endpoint == f"http://127.0.0.1:{other_port}"
    assert again.stake_wei == node.stake_wei
    assert registry.registered_at(VERIFIER) == registered_at  # updated, not registered again
