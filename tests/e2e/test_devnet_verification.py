"""End to end: on the network `infergrid up` starts (three verifiers by default), a cheating
miner that joins by hand with `infergrid miner --devnet` is audited, disputed and slashed
on-chain, and the developer whose request it served sees `failed` and a refund on that
request — all with real processes: the embedded chain, the gateway, an honest miner, the
cheater and three verifiers, driven as a user would (the openai client, the `infergrid` CLI,
the chain's JSON-RPC).

The cheater is the red-team mode of the miner: `--attack substitute=tiny:1` serves another
tiny model's tokens under tiny's model id, after `--attack-after 10` honest answers (enough to
pass its qualification canaries, as a careful cheater would). Chain time is moved forward
twice (the chain's dev RPC, as on any devnet): past the verifiers' minimum age, so their votes
count, and past the voting period, so the dispute can be resolved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from infergrid.compute.model_store import served_model_name
from infergrid.protocol.nodes import Role
from infergrid.settle.chain import Chain
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.registry import Registry

from .devnet_process import DevnetProcess

pytestmark = pytest.mark.slow

MODEL = served_model_name("tiny")
HONEST_FIRST = 10  # qualification needs 3 passed audits; canaries race, so leave room
# Generous: every step waits on real processes sharing two cores.
STEP_TIMEOUT_S = 240.0
MAX_DEVELOPER_REQUESTS = 80


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = STEP_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevnetProcess]:
    net = DevnetProcess(
        tmp_path_factory.mktemp("devnet"),
        "--miners", "1", "--model", "tiny", "--collect-interval", "0",
    )  # fmt: skip
    try:
        net.wait_up()
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="module")
def chain(devnet: DevnetProcess) -> Chain:
    return Chain.connect(devnet.info["chain_rpc"])


@pytest.fixture(scope="module")
def cheater(devnet: DevnetProcess) -> Iterator[subprocess.Popen[bytes]]:
    """`infergrid miner --devnet --attack substitute=tiny:1`, as an operator would run it."""
    env = {k: v for k, v in os.environ.items() if k != "INFERGRID_PRIVATE_KEY"}
    log = (devnet.state_dir / "cheater.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "infergrid.cli", "miner", "--devnet",
            "--state-dir", str(devnet.state_dir),
            "--model", "tiny", "--attack", "substitute=tiny:1",
            "--attack-after", str(HONEST_FIRST),
            "--collect-interval", "0", "--threads", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def gateway_get(devnet: DevnetProcess, path: str) -> dict[str, Any]:
    request = urllib.request.Request(
        devnet.info["base_url"] + path,
        headers={"authorization": f"Bearer {devnet.info['api_key']}"},
    )
    with urllib.request.urlopen(request, timeout=10.0) as response:
        return json.loads(response.read())


def miner_states(devnet: DevnetProcess) -> dict[str, str]:
    return {entry["address"]: entry["state"] for entry in gateway_get(devnet, "/miners")["data"]}


def test_devnet_runs_three_staked_verifiers_shown_by_status(
    devnet: DevnetProcess, chain: Chain
) -> None:
    info = devnet.info
    registry = Registry(chain, info["contracts"]["NodeRegistry"])
    verifiers = [entry["address"] for entry in info["verifiers"]]
    assert len(verifiers) == 3
    for address in verifiers:
        node = registry.node(address)
        assert node is not None and node.role == Role.VERIFIER
        assert node.stake_wei >= registry.min_stake(Role.VERIFIER)
    shown = devnet.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {row["owner"]: row for row in json.loads(shown.stdout)}
    assert all(rows[v]["role"] == "verifier" and rows[v]["health"] == "ok" for v in verifiers)
    # The devnet reported ready only once its miner qualified on the verifiers' canaries.
    miner = info["miners"][0]["address"]
    assert rows[miner]["state"] == "active"
    assert rows[miner]["audits"]["passed"] >= 3


def test_a_cheating_miner_is_audited_disputed_slashed_and_its_payer_refunded(
    devnet: DevnetProcess, chain: Chain, cheater: subprocess.Popen[bytes]
) -> None:
    info = devnet.info
    registry = Registry(chain, info["contracts"]["NodeRegistry"])
    disputes = DisputeManager(chain, info["contracts"]["DisputeManager"])
    honest = info["miners"][0]["address"]
    # Verifiers registered at start; their votes count on disputes opened min_verifier_age on.
    chain.increase_time(disputes.min_verifier_age() + 1)

    def cheater_address() -> str | None:
        if cheater.poll() is not None:
            pytest.fail(
                f"the cheating miner exited: {(devnet.state_dir / 'cheater.log').read_text()}"
            )
        return next((a for a in miner_states(devnet) if a != honest), None)

    address = wait_for(cheater_address, "the cheater registered and seen by the gateway")
    stake_before = registry.total_stake_of(address)
    honest_stake = registry.total_stake_of(honest)
    wait_for(lambda: miner_states(devnet).get(address) == "active", "the cheater qualified")

    # The developer's traffic: some of it lands on the cheater, and one of those answers is
    # picked for audit by the gateway's secret draw (p = 0.25 for a new miner).
    client = openai.OpenAI(base_url=info["base_url"], api_key=info["api_key"], max_retries=0)
    failed: tuple[str, dict[str, Any]] | None = None
    for index in range(MAX_DEVELOPER_REQUESTS):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me about the number {index}."}],
            max_tokens=24,
            temperature=0.8,
        )
        assert raw.headers["x-infergrid-request"].endswith(
            "/v1/requests/" + raw.headers["x-request-id"]
        )
        if raw.headers["x-infergrid-miner"] != address:
            continue
        request_id = raw.headers["x-request-id"]
        status = wait_for(
            lambda rid=request_id: (
                (s := gateway_get(devnet, f"/requests/{rid}"))["audit"]["state"] != "pending" and s
            ),
            "a verdict on the cheater's answer",
        )
        if status["audit"]["state"] in ("failed", "disputed", "slashed"):
            failed = (request_id, status)
            break
        # Not picked, or one of its first honest answers (it cheats after HONEST_FIRST).
        assert status["audit"]["state"] in ("not_selected", "passed"), status["audit"]
    assert failed is not None, "no audited request reached the cheater"
    request_id, status = failed

    # Failed: the verifier's signed verdict says why, and the unpaid receipt is voided.
    verdict = status["audit"]["verdicts"][0]
    assert verdict["passed"] is False and verdict["miner"] == address
    assert verdict["verifier"] in {v["address"] for v in info["verifiers"]}
    assert int(status["audit"]["refund_wei"]) == int(status["receipt"]["value"]) > 0
    assert status["audit"]["refund"] == "voided_receipt"
    assert miner_states(devnet)[address] in ("probation", "frozen")

    # The verifier that failed it confirms and disputes it on-chain; the others re-audit the
    # evidence it serves and vote. After the voting period, the dispute is resolved.
    disputed = wait_for(
        lambda: gateway_get(devnet, f"/requests/{request_id}")["audit"]["dispute"],
        "the dispute opened on-chain",
    )
    assert disputed["tx"].startswith("0x")
    # The other verifiers fetch the evidence, re-audit and vote; only then is the clock moved
    # past the voting period (a devnet's 300 s are plenty in real time).
    dispute_id = int(disputed["id"])
    wait_for(
        lambda: disputes.dispute(dispute_id).votes_for_wei >= disputes.min_quorum_stake(),
        "a quorum of verifiers voted to uphold",
    )
    chain.increase_time(disputes.voting_period() + 1)
    slashed = wait_for(
        lambda: (
            (s := gateway_get(devnet, f"/requests/{request_id}"))["audit"]["state"] == "slashed"
            and s
        ),
        "the dispute resolved as upheld",
    )
    record = disputes.dispute(int(slashed["audit"]["dispute"]["id"]))
    assert record.status == "upheld"
    # Slashed on-chain (each upheld dispute takes its capped cut); the honest miner keeps all.
    assert registry.total_stake_of(address) < stake_before
    assert registry.total_stake_of(honest) == honest_stake
    wait_for(lambda: miner_states(devnet)[address] == "slashed", "the gateway shows it slashed")

    # The developer sees it all in `infergrid trace`.
    traced = devnet.cli("trace", request_id)
    assert traced.returncode == 0, traced.stderr
    assert "slashed" in traced.stdout
