"""Miners' epoch rewards from the command line, on a devnet's contracts served over HTTP: two
verifiers reveal scores for an epoch, the treasury runs `infergrid rewards pay-miners`, a miner
sees its share and early multiplier with `infergrid miner rewards` and claims with `infergrid
miner claim`; paid by demand (`--gateway`, `--by-demand`), the emission is split by model from
a scripted gateway's GET /v1/network served on 127.0.0.1; every refusal is one readable line."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.supply import demand_from_network, emission_weights_ppm
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account
from infergrid.settle.deploy import NetworkContracts, deploy_network
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor
from infergrid.settle.rpc_server import EmbeddedChainServer
from infergrid.settle.scores import ScoreBoard, new_salt
from test_cli import KEYS, invoke, one_error_line

MINERS = (2, 3)  # key indexes: miner-1, miner-2
VERIFIERS = (6, 7)


def address(index: int) -> str:
    return as_account(KEYS[index]).address


@pytest.fixture(scope="module")
def scored() -> Iterator[tuple[Chain, NetworkContracts]]:
    """A devnet's contracts (deployed by key 0, the devnet's treasury), two miners and two
    verifiers registered, and one epoch scored: miner-1 70 %, miner-2 30 %."""
    with EmbeddedChainServer(EmbeddedEVM(accounts=10)) as server:
        chain = Chain.connect(server.url)
        contracts = deploy_network(chain, KEYS[0], DEVNET_PARAMS)
        registry = Registry(chain, contracts.NodeRegistry)
        offer = ModelOffer("m", "0x" + "07" * 32, 1, 1)
        for i in MINERS:
            registry.register(
                KEYS[i], Role.MINER, "http://m", address(i), [offer], 10 * WEI_PER_BTT
            )
        for i in VERIFIERS:
            registry.register(KEYS[i], Role.VERIFIER, "http://v", address(i), [], 10 * WEI_PER_BTT)
        assert contracts.ScoreBoard is not None
        board = ScoreBoard(chain, contracts.ScoreBoard)
        schedule = board.schedule()
        epoch = board.current_epoch()
        scores = {address(MINERS[0]): 700_000, address(MINERS[1]): 300_000}
        salts = {i: new_salt() for i in VERIFIERS}
        chain.increase_time(schedule.epoch_end(epoch) - chain.timestamp())
        for i in VERIFIERS:
            board.commit(KEYS[i], epoch, scores, salts[i])
        chain.increase_time(schedule.reveal_opens(epoch) - chain.timestamp())
        for i in VERIFIERS:
            board.reveal(KEYS[i], epoch, scores, salts[i])
        chain.increase_time(schedule.reveal_closes(epoch) - chain.timestamp())
        yield chain, contracts


def write_devnet(state_dir: Path, chain: Chain, contracts: NetworkContracts) -> None:
    miners = [
        {"name": f"miner-{n + 1}", "address": address(i), "key": KEYS[i]}
        for n, i in enumerate(MINERS)
    ]
    description: dict[str, Any] = {
        "chain_rpc": chain.url,
        "contracts": contracts.as_dict(),
        "miners": miners,
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "devnet.json").write_text(json.dumps(description))


def test_the_treasury_pays_and_a_miner_sees_and_claims(
    scored: tuple[Chain, NetworkContracts], tmp_path: Path
) -> None:
    chain, contracts = scored
    write_devnet(tmp_path, chain, contracts)
    where = ("--state-dir", str(tmp_path))

    dry = invoke("rewards", "pay-miners", "--dry-run", "--json", *where)
    assert dry.exit_code == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["epoch"] is None and planned["note"] == "dry run: nothing sent"
    assert planned["shares_ppm"] == {address(MINERS[0]): 700_000, address(MINERS[1]): 300_000}
    # Both miners registered at once, early: equal multipliers, so the emission splits 70/30.
    emission = DEVNET_PARAMS.miner_emission_per_epoch_wei
    assert planned["allocations"] == {
        address(MINERS[0]): str(emission * 7 // 10),
        address(MINERS[1]): str(emission * 3 // 10),
    }

    paid = invoke("rewards", "pay-miners", *where)
    assert paid.exit_code == 0, paid.stderr
    assert "proposed reward epoch 1" in paid.stdout and "70.00 %" in paid.stdout
    assert "2.0000x" in paid.stdout  # the devnet's early multiplier, visible

    shown = invoke("miner", "rewards", "--miner", "miner-1", "--json", *where)
    assert shown.exit_code == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["miner"] == address(MINERS[0]) and view["early_multiplier_ppm"] == 2_000_000
    (row,) = view["epochs"]
    assert row["share_ppm"] == 700_000 and row["amount_wei"] == str(emission * 7 // 10)
    assert row["status"] == "in its challenge window"
    early = invoke("miner", "claim", "--miner", "miner-1", *where)
    assert early.exit_code == 0 and "not final yet" in early.stdout

    window = RewardDistributor(chain, contracts.RewardDistributor).challenge_window()
    chain.increase_time(window + 1)
    assert (
        json.loads(invoke("miner", "rewards", "--miner", "miner-1", "--json", *where).stdout)[
            "epochs"
        ][0]["status"]
        == "claimable"
    )
    before = chain.balance(address(MINERS[0]))
    claimed = invoke("miner", "claim", "--miner", "miner-1", *where)
    assert claimed.exit_code == 0, claimed.stderr
    assert "claimed" in claimed.stdout and chain.balance(address(MINERS[0])) > before
    again = invoke("miner", "claim", "--miner", "miner-1", *where)
    assert "already claimed" in again.stdout
    text = invoke("miner", "rewards", "--miner", "miner-1", *where)
    assert "early multiplier now 2.0000x" in text.stdout and "claimed" in text.stdout


def test_refusals_are_one_line(scored: tuple[Chain, NetworkContracts], tmp_path: Path) -> None:
    chain, contracts = scored
    write_devnet(tmp_path, chain, contracts)
    where = ("--state-dir", str(tmp_path))
    line = one_error_line(invoke("miner", "claim", "--miner", "miner-9", *where))
    assert "no miner 'miner-9'" in line and "miner-1, miner-2" in line
    line = one_error_line(invoke("miner", "claim", "--miner", "miner-1", *where))
    assert "no miner rewards yet" in line and "pay-miners" in line
    not_treasury = invoke("rewards", "pay-miners", *where, env={"INFERGRID_PRIVATE_KEY": KEYS[5]})
    assert "not the reward distributor's treasury" in one_error_line(not_treasury)
    outside = invoke(
        "rewards", "pay-miners", "--chain-rpc", chain.url or "", "--registry",
        contracts.NodeRegistry, "--escrow", contracts.PaymentEscrow, "--rewards",
        contracts.RewardDistributor, "--scoreboard", contracts.ScoreBoard or "",
        "--state-dir", str(tmp_path / "none"), env={"INFERGRID_PRIVATE_KEY": KEYS[0]},
    )  # fmt: skip
    assert "--emission is required" in one_error_line(outside)
    bad = invoke("miner", "rewards", "--address", "0x12", *where)
    assert "--address" in one_error_line(bad)


# -- paying by demand (the gateway's GET /v1/network) ---------------------------------------

API_KEY = "ig-network-key"


def network_row(model: str, served: int, busy: float, shed: int = 0) -> dict[str, Any]:
    """A /v1/network models[] row, every field the gateway publishes."""
    return {
        "model": model, "model_id": "0x" + "07" * 32, "miners": 2, "healthy": 2,
        "capacity": 16, "in_flight": 0, "requests": 100, "shed": shed,
        "tokens_requested": 2 * served, "tokens_served": served, "busy_slot_s": busy,
        "capacity_slot_s": 100.0, "utilization": busy / 100.0,
        "price_wei": {"prompt": 1, "completion": 1}, "reward_share_ppm": 0,
    }  # fmt: skip


NETWORK = {
    "object": "network",
    "since": 0.0,
    "until": 1.0,
    # "m" is what both miners offer; "unserved-here" nobody registered offers.
    "models": [network_row("m", 3000, 50.0, shed=10), network_row("unserved-here", 1000, 5.0)],
}


class ScriptedNetwork:
    """A scripted stand-in for a gateway's GET /v1/network: `body` for any window to the
    bearer of API_KEY (the queries it got are kept in `queries`), 401 to anyone else."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.queries: list[dict[str, list[str]]] = []
        queries = self.queries

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if self.headers.get("authorization") != f"Bearer {API_KEY}":
                    status, reply = 401, {"error": {"message": "Incorrect API key provided."}}
                elif url.path != "/v1/network":
                    status, reply = 404, {"error": {"message": f"no route {url.path}"}}
                else:
                    queries.append(urllib.parse.parse_qs(url.query))
                    status, reply = 200, body
                raw = json.dumps(reply).encode()
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
    def running(self) -> Iterator[ScriptedNetwork]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


def test_pay_miners_by_demand_splits_the_emission_by_model(
    scored: tuple[Chain, NetworkContracts], tmp_path: Path
) -> None:
    chain, contracts = scored
    write_devnet(tmp_path, chain, contracts)
    where = ("--state-dir", str(tmp_path))
    emission = DEVNET_PARAMS.miner_emission_per_epoch_wei
    weights = emission_weights_ppm(demand_from_network(NETWORK).values())
    with ScriptedNetwork(NETWORK).running() as gateway:
        dry = invoke(
            "rewards", "pay-miners", "--dry-run", "--json", "--gateway", gateway.base_url,
            "--api-key", API_KEY, *where,
        )  # fmt: skip
        assert dry.exit_code == 0, dry.stderr
        (query,) = gateway.queries
    planned = json.loads(dry.stdout)
    assert planned["model_weights_ppm"] == weights and weights["m"] > 750_000  # the busy one
    assert planned["model_utilization"] == {"m": 0.5, "unserved-here": 0.05}
    # The first window reaches one ScoreBoard epoch back from now; it is the one asked for.
    since, until = planned["demand_window"]
    length = ScoreBoard(chain, contracts.ScoreBoard or "").schedule().epoch_length_s
    assert until - since == pytest.approx(length)
    assert float(query["since"][0]) == since and float(query["until"][0]) == until
    # "m"'s pool goes 70/30 by the consensus; nobody registered offers the other model.
    pool = emission * weights["m"] // 1_000_000
    assert planned["allocations"] == {
        address(MINERS[0]): str(pool * 7 // 10),
        address(MINERS[1]): str(pool * 3 // 10),
    }
    assert int(planned["unpaid_wei"]) == emission - pool


def test_pay_miners_by_demand_on_a_devnet_reads_its_gateway_and_prints_the_models(
    scored: tuple[Chain, NetworkContracts], tmp_path: Path
) -> None:
    chain, contracts = scored
    with ScriptedNetwork(NETWORK).running() as gateway:
        write_devnet(tmp_path, chain, contracts)
        description = json.loads((tmp_path / "devnet.json").read_text())
        description.update(base_url=gateway.base_url, api_key=API_KEY)
        (tmp_path / "devnet.json").write_text(json.dumps(description))
        shown = invoke(
            "rewards", "pay-miners", "--dry-run", "--by-demand", "--state-dir", str(tmp_path)
        )
        assert shown.exit_code == 0, shown.stderr
        assert len(gateway.queries) == 1
    assert "util." in shown.stdout and "unserved-here" in shown.stdout
    assert "50.0%" in shown.stdout and "5.0%" in shown.stdout  # each model's utilization


def test_pay_miners_by_demand_refuses_in_one_line(
    scored: tuple[Chain, NetworkContracts], tmp_path: Path
) -> None:
    chain, contracts = scored
    write_devnet(tmp_path, chain, contracts)
    where = ("--state-dir", str(tmp_path), "--dry-run", "--api-key", API_KEY)
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    line = one_error_line(invoke("rewards", "pay-miners", "--gateway", closed, *where))
    assert "cannot reach the gateway" in line
    broken = {**NETWORK, "models": [{**network_row("m", 10, 1.0), "shed": -1}]}
    with ScriptedNetwork(broken).running() as gateway:
        line = one_error_line(
            invoke("rewards", "pay-miners", "--gateway", gateway.base_url, *where)
        )
        assert "shed" in line and "/network" in line
        wrong_key = invoke(
            "rewards", "pay-miners", "--gateway", gateway.base_url, "--state-dir", str(tmp_path),
            "--api-key", "ig-nobody",
        )  # fmt: skip
        assert "Incorrect API key" in one_error_line(wrong_key)
