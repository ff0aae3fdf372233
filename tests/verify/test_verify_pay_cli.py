"""`infergrid verifier pay` and `infergrid verifier claim` against a devnet description: the
embedded EVM served over JSON-RPC with every contract of settle.deploy (the deployer is the
treasury and the verifier pool, as on a devnet), one collected voucher crediting the pool, and
a .infergrid/devnet.json naming it all. The gateway's `GET /v1/verifiers` is answered by
ScriptedVerifierCounts, a scripted stand-in for the gateway (the real endpoint is tested in
tests/app/test_gateway_verifier_work.py) that serves fixed counts.

- the dry run prints the work and the shares and sends nothing; --json gives them exactly;
- pay proposes epoch 1 with the devnet's deployer key; claim before the challenge window says
  "not final yet", after it pays each devnet verifier its share; a second claim is reported;
- errors are one line: an unknown --verifier, no state file yet, a key that is not the pool,
  a gateway that refuses the key.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from verify_helpers import ADDRS, KEYS, P

from infergrid.cli import app
from infergrid.protocol.eip712 import Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import Receipt, Voucher, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.settle.deploy import NetworkContracts, deploy_network
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor
from infergrid.settle.rpc_server import EmbeddedChainServer
from infergrid.verify.pay import VerifierWork, verifier_shares

POOL, GATEWAY, MINER, PAYER, V1, V2 = range(6)
API_KEY = "ig-scripted-key"
COUNTS = {ADDRS[V1]: 3, ADDRS[V2]: 1}
VALUE = 2 * WEI_PER_BTT


class ScriptedVerifierCounts:
    """A scripted stand-in for a gateway's GET /v1/verifiers: fixed `counts` for any window
    (passed, none failed) to the bearer of API_KEY, OpenAI's 401 to anyone else."""

    def __init__(self, counts: dict[str, int]) -> None:
        counts_json = [
            {"address": a, "audits": {"passed": n, "failed": 0, "total": n}}
            for a, n in sorted(counts.items())
        ]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("authorization") != f"Bearer {API_KEY}":
                    status, body = 401, {"error": {"message": "Incorrect API key provided."}}
                else:
                    status, body = 200, {"object": "list", "data": counts_json}
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @contextlib.contextmanager
    def running(self) -> Iterator[ScriptedVerifierCounts]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


@pytest.fixture(scope="module")
def chain_url() -> Iterator[str]:
    with EmbeddedChainServer(EmbeddedEVM(accounts=10)) as server:
        yield server.url


def _network(chain: Chain) -> tuple[NetworkContracts, int]:
    """Fresh contracts, two verifiers, and one collected voucher; returns the contracts and
    the verifier fee that collection credited."""
    contracts = deploy_network(chain, KEYS[POOL], P)
    registry = Registry(chain, contracts.NodeRegistry)
    escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
    gateway = Signer(KEYS[GATEWAY])
    model_id = "0x" + "07" * 32
    registry.register(
        KEYS[GATEWAY], Role.GATEWAY, "http://g", gateway.address, [], P.min_stake_gateway_wei
    )
    registry.register(
        KEYS[MINER], Role.MINER, "http://m", ADDRS[MINER], [ModelOffer("m", model_id, 1, 1)],
        10 * WEI_PER_BTT,
    )  # fmt: skip
    for index in (V1, V2):
        registry.register(
            KEYS[index], Role.VERIFIER, "http://v", ADDRS[index], [], P.min_stake_verifier_wei
        )
    escrow.deposit(KEYS[PAYER], 5 * WEI_PER_BTT)
    escrow.authorize_signer(KEYS[PAYER], gateway.address)
    receipt = Receipt(
        b"\x01" * 32, ADDRS[PAYER], ADDRS[MINER], gateway.address, model_id, 1, 1, VALUE,
        chain.timestamp(), b"\x02" * 32,
    )  # fmt: skip
    voucher = Voucher(
        ADDRS[PAYER], ADDRS[MINER], gateway.address, VALUE, receipt.timestamp,
        merkle_root([receipt.struct_hash()]),
    )  # fmt: skip
    collection = escrow.collect(
        KEYS[MINER], voucher, sign_message(escrow.domain(), voucher, gateway)
    )
    return contracts, collection.verifier_fee_wei


@pytest.fixture
def devnet(chain_url: str, tmp_path: Path) -> Iterator[tuple[Path, NetworkContracts, int]]:
    """A state dir whose devnet.json describes the network, its gateway (the stand-in) and
    its two verifiers."""
    contracts, fee = _network(Chain.connect(chain_url))
    with ScriptedVerifierCounts(COUNTS).running() as gateway:
        state_dir = tmp_path / ".infergrid"
        state_dir.mkdir()
        description = {
            "chain_rpc": chain_url,
            "contracts": contracts.as_dict(),
            "base_url": gateway.base_url,
            "api_key": API_KEY,
            "verifiers": [
                {"name": f"verifier-{i}", "address": ADDRS[index], "key": KEYS[index]}
                for i, index in ((1, V1), (2, V2))
            ],
        }
        (state_dir / "devnet.json").write_text(json.dumps(description))
        yield state_dir, contracts, fee


def invoke(*args: str, key: str = "") -> Any:
    return CliRunner().invoke(
        app, ["verifier", *args], env={"INFERGRID_PRIVATE_KEY": key, "COLUMNS": "200"}
    )


def one_error_line(result: Any) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_pay_and_claim_on_a_devnet(
    devnet: tuple[Path, NetworkContracts, int], chain_url: str
) -> None:
    state_dir, contracts, fee = devnet
    expected = verifier_shares(
        [VerifierWork(ADDRS[V1], audits=3), VerifierWork(ADDRS[V2], audits=1)], fee
    )
    sd = ("--state-dir", str(state_dir))
    dry = invoke("pay", "--dry-run", *sd)
    assert dry.exit_code == 0, dry.stderr
    assert "dry run: nothing sent" in dry.stdout
    assert ADDRS[V1] in dry.stdout and ADDRS[V2] in dry.stdout
    assert not (state_dir / "verifier-pay.json").exists()
    as_json = invoke("pay", "--dry-run", "--json", *sd)
    assert as_json.exit_code == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {a: int(w) for a, w in data["shares"].items()} == expected
    assert data["pool_wei"] == str(fee) and data["epoch"] is None

    paid = invoke("pay", *sd)
    assert paid.exit_code == 0, paid.stderr
    assert "proposed epoch 1" in paid.stdout
    chain = Chain.connect(chain_url)
    rewards = RewardDistributor(chain, contracts.RewardDistributor)
    assert rewards.epoch(1).status == "proposed" and rewards.epoch(1).total_wei == fee

    early = invoke("claim", "--verifier", "verifier-1", *sd)
    assert early.exit_code == 0, early.stderr
    assert ": not final yet (its challenge window ends at block time " in early.stdout
    chain.increase_time(rewards.challenge_window())
    for name, index in (("verifier-1", V1), ("verifier-2", V2)):
        claimed = invoke("claim", "--verifier", name, "--json", *sd)
        assert claimed.exit_code == 0, claimed.stderr
        (entry,) = json.loads(claimed.stdout)
        assert entry["status"] == "claimed" and int(entry["amount_wei"]) == expected[ADDRS[index]]
        assert rewards.is_claimed(1, ADDRS[index])
    again = invoke("claim", *sd, key=KEYS[V1])  # by its own key this time
    assert again.exit_code == 0 and again.stdout.strip().endswith("already claimed")


def test_errors_are_one_line(devnet: tuple[Path, NetworkContracts, int], tmp_path: Path) -> None:
    state_dir = devnet[0]
    sd = ("--state-dir", str(state_dir))
    assert one_error_line(invoke("claim", "--verifier", "nope", *sd)) == (
        "error: the devnet has no verifier 'nope' (it has verifier-1, verifier-2)"
    )
    assert one_error_line(invoke("claim", "--verifier", "verifier-1", *sd)) == (
        f"error: no verifier pay yet: {state_dir / 'verifier-pay.json'} does not exist (the"
        " pool's holder writes it with `infergrid verifier pay`)"
    )
    assert one_error_line(invoke("pay", "--dry-run", *sd, key=KEYS[V1])) == (
        f"error: {ADDRS[V1]} is not the escrow's verifier pool ({ADDRS[POOL]}): only its"
        " holder pays"
    )
    refused = invoke("pay", "--dry-run", "--api-key", "ig-wrong", *sd)
    assert one_error_line(refused) == "error: the gateway answered: Incorrect API key provided."
    nowhere = tmp_path / "nowhere"
    assert one_error_line(invoke("pay", "--state-dir", str(nowhere))) == (
        f"error: no running network described at {nowhere / 'devnet.json'}: start one with"
        " `infergrid up`"
    )
    assert one_error_line(invoke("claim", "--state-dir", str(nowhere))) == (
        f"error: no running network described at {nowhere / 'devnet.json'}: start one with"
        " `infergrid up`"
    )
