"""Off-chain stores are bound to one chain deployment (settle.binding): the rule, and the nodes
refusing another chain's state."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergrid.compute.collector import collect_now
from infergrid.compute.receipt_log import ReceiptLog
from infergrid.settle.binding import (
    ChainBinding,
    ChainMismatch,
    bind_file,
    gateway_binding,
    read_binding,
    reconcile,
)
from infergrid.settle.chain import Chain, dev_private_keys
from infergrid.settle.rpc_server import EmbeddedChainServer

GENESIS_A = "0x" + "aa" * 32
GENESIS_B = "0x" + "bb" * 32
REGISTRY = "0x" + "11" * 20
ESCROW = "0x" + "22" * 20
OTHER_ESCROW = "0x" + "23" * 20
REWARDS = "0x" + "33" * 20


def binding(
    chain_id: int = 1337, genesis: str = GENESIS_A, **contracts: str | None
) -> ChainBinding:
    return ChainBinding.make(chain_id, genesis, contracts)


BOUND = binding(NodeRegistry=REGISTRY, PaymentEscrow=ESCROW)


def test_the_same_deployment_reconciles_and_new_contracts_are_added() -> None:
    assert reconcile(None, BOUND, what="store", path="x") == BOUND
    assert reconcile(BOUND, BOUND, what="store", path="x") == BOUND
    # Addresses compare checksummed, whatever case the node was given them in.
    same = binding(genesis=GENESIS_A.upper().replace("0X", "0x"), NodeRegistry=REGISTRY.upper())
    assert reconcile(BOUND, same, what="store", path="x") == BOUND
    # Anchoring turned on later: the store learns the distributor and keeps the escrow.
    merged = reconcile(BOUND, binding(RewardDistributor=REWARDS), what="store", path="x")
    assert merged.contract("RewardDistributor") and merged.contract("PaymentEscrow")


@pytest.mark.parametrize(
    ("current", "why"),
    [
        (binding(chain_id=199, NodeRegistry=REGISTRY), "chain id 1337 is not 199"),
        (binding(genesis=GENESIS_B, NodeRegistry=REGISTRY), "the genesis block differs"),
        (binding(PaymentEscrow=OTHER_ESCROW), "PaymentEscrow was at"),
    ],
)
def test_another_deployment_is_refused_naming_both(current: ChainBinding, why: str) -> None:
    with pytest.raises(ChainMismatch) as caught:
        reconcile(BOUND, current, what="the gateway's database", path="/x/gateway.db")
    message = str(caught.value)
    assert "\n" not in message and why in message
    assert message.startswith("the gateway's database /x/gateway.db belongs to another chain")
    assert BOUND.describe() in message and current.describe() in message
    assert isinstance(caught.value, ValueError)  # what the CLI prints as one line


def test_bind_file_records_checks_and_merges(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    assert bind_file(path, BOUND, what="store") == BOUND
    with pytest.raises(ChainMismatch):
        bind_file(path, binding(genesis=GENESIS_B), what="store")
    bind_file(path, binding(RewardDistributor=REWARDS), what="store")
    with sqlite3.connect(path) as conn:
        stored = read_binding(conn)
    assert stored is not None and stored.contract("RewardDistributor") is not None
    assert stored.contract("PaymentEscrow") is not None


def test_chain_genesis_hash() -> None:
    chain = Chain.embedded()
    genesis = chain.genesis_hash()
    assert genesis.startswith("0x") and len(genesis) == 66 and genesis == genesis.lower()
    assert genesis == "0x" + bytes(chain.w3.eth.get_block(0)["hash"]).hex()
    bound = gateway_binding(chain, registry=REGISTRY, escrow=ESCROW)
    assert (bound.chain_id, bound.genesis_hash) == (chain.chain_id, genesis)
    assert bound.contract("RewardDistributor") is None


@pytest.fixture(scope="module")
def chain_url() -> Iterator[str]:
    with EmbeddedChainServer() as server:
        yield server.url


def test_gateway_refuses_a_database_of_another_chain(chain_url: str, tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    bind_file(db, binding(NodeRegistry=REGISTRY), what="the gateway's database")
    env = {k: v for k, v in os.environ.items() if k != "INFERGRID_PRIVATE_KEY"}
    result = subprocess.run(
        [
            sys.executable, "-m", "infergrid.cli", "gateway",
            "--chain-rpc", chain_url, "--registry", REGISTRY, "--db", str(db), "--port", "1",
        ],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: the gateway's database {db} belongs to another chain")
    assert "the genesis block differs" in lines[0]


def test_miner_collect_refuses_a_log_of_another_chain(chain_url: str, tmp_path: Path) -> None:
    path = tmp_path / "miner.receipts.db"
    ReceiptLog(path, chain=binding(NodeRegistry=REGISTRY, PaymentEscrow=ESCROW)).close()
    with pytest.raises(ChainMismatch, match=r"the miner.s receipt log .* genesis block differs"):
        collect_now(chain_url, REGISTRY, ESCROW, dev_private_keys(1)[0], path)
