"""End to end: `infergrid up` with real processes on 127.0.0.1, SmolLM2 served by two miners
registered and staked on the embedded EVM, used through the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import urllib3

from infergrid.devnet import DEVELOPER_KEY_INDEX, FIRST_MINER_KEY_INDEX
from infergrid.protocol.models import DEFAULT_MODEL
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.protocol.pricing import split_payment
from infergrid.settle.chain import Chain, as_account, dev_private_keys
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.scores import ScoreBoard
from infergrid.verify.score_duty import score_state_path

from .devnet_process import DevnetProcess, pid_alive

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Miners collect only when told to, so the settlement test sees every collection.
    net = DevnetProcess(
        tmp_path_factory.mktemp("devnet"), "--miners", "2", "--collect-interval", "0"
    )
    try:
        net.wait_up()
        yield net
    finally:
        net.stop()


@pytest.fixture(scope="module")
def client(devnet: DevnetProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=devnet.info["base_url"], api_key=devnet.info["api_key"], max_retries=0
    )


def miner_nodes(devnet: DevnetProcess) -> list[dict[str, Any]]:
    return [node for node in devnet.info["nodes"] if node["name"].startswith("miner")]


def test_devnet_json_describes_the_network(devnet: DevnetProcess) -> None:
    info = devnet.info
    assert info["base_url"].startswith("http://127.0.0.1:") and info["base_url"].endswith("/v1")
    assert info["api_key"].startswith("ig-")
    assert info["chain_rpc"].startswith("http://127.0.0.1:")
    assert isinstance(info["chain_id"], int)
    assert info["contracts"]["NodeRegistry"].startswith("0x")
    names = sorted(node["name"] for node in info["nodes"])
    # The README's network: three verifiers by default, each staked and with canary funds.
    assert names == [
        "chain",
        "gateway",
        "miner-1",
        "miner-2",
        *(f"verifier-{i}" for i in (1, 2, 3)),
    ]
    assert [v["name"] for v in info["verifiers"]] == ["verifier-1", "verifier-2", "verifier-3"]
    assert all(v["canary_api_key"].startswith("ig-") for v in info["verifiers"])


def test_openai_client_gets_a_correct_answer(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=20, temperature=0
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"]
    assert completion.id.endswith(raw.headers["x-request-id"])
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason in {"stop", "length"}
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 10 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The miner's verification extension never reaches a client.
    assert "infergrid" not in raw.http_response.json()


def test_openai_client_streams_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert stream.response.headers["x-request-id"]
    text, content_chunks, usage = "", 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            content_chunks += 1
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
    assert "Paris" in text
    assert content_chunks > 1, "the answer should arrive in pieces, not in one chunk"
    assert usage is not None and usage.completion_tokens >= content_chunks


def test_stream_without_include_usage_ends_with_usage_and_cost(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=5, stream=True
    )
    chunks = list(stream)
    # No usage-only chunk (choices: []) that such a client did not ask for; the finish chunk
    # tells what the response cost.
    assert chunks and all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices[0].finish_reason is not None
    assert usage is not None and usage.completion_tokens > 0
    assert int(usage.model_extra["cost_wei"]) > 0


def test_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_models_come_from_the_registry(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list().data] == [DEFAULT_MODEL]


def test_logprobs_only_when_asked(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4)
    assert plain.choices[0].logprobs is None
    asked = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4, logprobs=True
    )
    content = asked.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == asked.usage.completion_tokens  # type: ignore[union-attr]
    assert all(item.logprob <= 0.0 for item in content)


def test_two_miners_share_a_load_above_one_miners_batch(
    devnet: DevnetProcess, client: openai.OpenAI
) -> None:
    """More requests at once than one miner runs in a batch (its /health says 8), each with a
    prompt of its own: the scheduler weighs load, so both miners serve. (At low load, or for
    one shared prompt prefix, one miner may rightly take everything.)"""

    def one(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": f"Name a colour. ({i})"}],
            max_tokens=8,
        )
        raw.parse()
        return raw.headers["x-infergrid-miner"]

    with ThreadPoolExecutor(16) as pool:
        served_by = Counter(pool.map(one, range(16)))
    assert len(served_by) == 2, f"one miner took everything: {served_by}"


def test_bad_requests_get_openai_errors(devnet: DevnetProcess) -> None:
    http = urllib3.PoolManager()
    url = devnet.info["base_url"] + "/chat/completions"
    auth = {"authorization": f"Bearer {devnet.info['api_key']}"}
    good = {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": 4}
    cases: list[tuple[dict[str, str], bytes, int]] = [
        (auth, b"{not json", 400),
        (auth, json.dumps({**good, "model": "no-such-model"}).encode(), 404),
        ({}, json.dumps(good).encode(), 401),
        ({"authorization": "Bearer ig-wrong"}, json.dumps(good).encode(), 401),
        (auth, json.dumps({**good, "max_tokens": 0}).encode(), 400),
        (auth, json.dumps({**good, "max_tokens": 10**12}).encode(), 400),
        (auth, json.dumps({**good, "messages": []}).encode(), 400),
        (auth, json.dumps({**good, "max_tokens": "4"}).encode(), 400),
    ]
    for headers, body, status in cases:
        response = http.request("POST", url, body=body, headers=headers)
        assert response.status == status, (body, response.data)
        error = response.json()["error"]
        assert error["message"] and error["type"]
        assert response.headers["x-request-id"]


def test_status_shows_registered_nodes_with_stake(devnet: DevnetProcess) -> None:
    result = devnet.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)
    miners = [node for node in nodes if node["role"] == "miner"]
    endpoints = {node["endpoint"] for node in miner_nodes(devnet)}
    assert {node["endpoint"] for node in miners} == endpoints
    for node in miners:
        assert node["stake_btt"] == 100.0
        assert node["health"] == "ok"
        assert [model["name"] for model in node["models"]] == [DEFAULT_MODEL]
    assert [node["role"] for node in nodes].count("gateway") == 1

    table = devnet.cli("status")
    assert table.returncode == 0 and "miner" in table.stdout and "100.00" in table.stdout
    assert "util" in table.stdout and "share" in table.stdout  # each model: demand, supply

    shown = devnet.cli("status", "--models", "--json")
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)
    assert row["model"] == DEFAULT_MODEL and row["miners"] == row["healthy"] == len(miners)
    assert row["capacity"] > 0 and row["shed"] == 0


def test_chat_command(devnet: DevnetProcess) -> None:
    result = devnet.cli(
        "chat", "What is the capital of France? Answer in one word.", "--max-tokens", "20"
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "completion tokens" in result.stderr


def test_keys_created_by_the_cli_work_and_revoked_keys_stop(devnet: DevnetProcess) -> None:
    created = devnet.cli("keys", "create", "e2e", "--payer", devnet.info["developer"], "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    client = openai.OpenAI(base_url=devnet.info["base_url"], api_key=key["key"], max_retries=0)
    assert client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2)
    assert devnet.cli("keys", "revoke", key["id"]).returncode == 0
    deadline = time.monotonic() + 5
    while True:
        try:
            client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2)
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "revoked key still accepted after 5 s"
        time.sleep(0.2)


def _collect_all(devnet: DevnetProcess) -> list[dict[str, Any]]:
    """`infergrid miner collect --json` as each miner's operator; every result row."""
    rows = []
    for index in range(len(miner_nodes(devnet))):
        key = dev_private_keys(FIRST_MINER_KEY_INDEX + index + 1)[-1]
        result = devnet.cli("miner", "collect", "--json", key=key)
        assert result.returncode == 0, result.stdout + result.stderr
        rows += [{**row, "miner": as_account(key).address} for row in json.loads(result.stdout)]
    return rows


def test_payer_pays_exactly_the_usage_and_miners_get_it_less_fees(
    devnet: DevnetProcess, client: openai.OpenAI
) -> None:
    info = devnet.info
    chain = Chain.connect(info["chain_rpc"])
    escrow = PaymentEscrow(chain, info["contracts"]["PaymentEscrow"])
    payer, gateway = info["developer"], info["gateway_signer"]
    miners = [as_account(k).address for k in dev_private_keys(FIRST_MINER_KEY_INDEX + 2)[2:]]
    _collect_all(devnet)  # settle whatever earlier tests left owed
    balance_before = escrow.account(payer).balance_wei
    collected_before = sum(escrow.collected(payer, gateway, m) for m in miners)
    miner_balances = {m: chain.balance(m) for m in miners}

    charged = 0
    for stream in (False, True, False, True, False):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=QUESTION, max_tokens=6, stream=True
                )
            )
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(
                model=DEFAULT_MODEL, messages=QUESTION, max_tokens=6
            ).usage
        assert usage is not None
        charged += int(usage.model_extra["cost_wei"])
    assert charged > 0

    rows = [row for row in _collect_all(devnet) if row["status"] == "collected"]
    # Each voucher's value agreed with the miner's own receipt log.
    assert rows and all(row["discrepancy"] == "match" for row in rows), rows
    # The developer's deposit went down by exactly what the responses' usage said ...
    assert balance_before - escrow.account(payer).balance_wei == charged
    assert sum(escrow.collected(payer, gateway, m) for m in miners) - collected_before == charged
    assert sum(row["paid_wei"] for row in rows) == charged
    # ... and each miner's balance went up by that less fees (and less its gas).
    for row in rows:
        split = split_payment(
            row["paid_wei"], DEVNET_PARAMS.protocol_fee_ppm, DEVNET_PARAMS.verifier_pool_ppm
        )
        assert row["miner_wei"] == split.miner
    for miner in miners:
        own = [row for row in rows if row["miner"] == miner]
        gas_cost = sum(
            int(r["gasUsed"]) * int(r["effectiveGasPrice"])
            for r in (chain.w3.eth.get_transaction_receipt(row["tx_hash"]) for row in own)
        )
        earned = sum(row["miner_wei"] for row in own)
        assert chain.balance(miner) - miner_balances[miner] == earned - gas_cost

    # The receipt of a request is provable: signatures, and (once anchored) its Merkle proof.
    raw = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=3
    )
    traced = devnet.cli("trace", raw.headers["x-request-id"], "--json")
    assert traced.returncode == 0, traced.stdout + traced.stderr
    checks = json.loads(traced.stdout)["checks"]
    assert checks and all(check["ok"] for check in checks)


def test_a_payer_out_of_headroom_gets_402(devnet: DevnetProcess) -> None:
    key = dev_private_keys(DEVELOPER_KEY_INDEX + 2)[-1]
    payer = as_account(key).address
    chain = Chain.connect(devnet.info["chain_rpc"])
    chain.transfer(dev_private_keys(1)[0], payer, WEI_PER_BTT)
    # Enough for a few requests: each reserves its body bytes + 256 template tokens at the
    # miner's prompt price plus max_tokens at its completion price, about 0.0004 BTT here.
    assert devnet.cli("account", "deposit", "0.001", key=key).returncode == 0
    authorized = devnet.cli("account", "authorize", devnet.info["gateway_signer"], key=key)
    assert authorized.returncode == 0, authorized.stderr
    created = json.loads(devnet.cli("keys", "create", "small", "--payer", payer, "--json").stdout)
    client = openai.OpenAI(base_url=devnet.info["base_url"], api_key=created["key"], max_retries=0)
    spent, served = 0, 0
    for _ in range(30):
        try:
            usage = client.chat.completions.create(
                model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4
            ).usage
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            assert exc.response.headers["x-should-retry"] == "false"
            assert exc.response.json()["error"]["type"] == "insufficient_quota"
            break
        assert usage is not None
        spent += int(usage.model_extra["cost_wei"])
        served += 1
    else:
        pytest.fail("30 requests served from a 0.001 BTT deposit")
    assert served > 0 and spent <= 10**15
    # Withdrawing before the thaw matures is the contract's "no": one readable line, exit 1.
    assert devnet.cli("account", "thaw", "0.0001", key=key).returncode == 0
    early = devnet.cli("account", "withdraw", key=key)
    assert early.returncode == 1
    assert early.stderr.strip().splitlines() == ["error: contract reverted: thaw not matured"]


def test_an_epoch_of_miner_rewards_is_scored_paid_and_claimed(devnet: DevnetProcess) -> None:
    """Issue 11 on the local network, after the traffic above: the ScoreBoard epoch is made to
    end (the chain's clock travels), the devnet's verifiers commit and then reveal their scores
    of the miners on their own, the treasury pays the epoch with `infergrid rewards
    pay-miners`, and a miner sees its share and early multiplier and claims its reward."""
    chain = Chain.connect(devnet.info["chain_rpc"])
    board = ScoreBoard(chain, devnet.info["contracts"]["ScoreBoard"])
    schedule = board.schedule()
    verifiers = [v["address"] for v in devnet.info["verifiers"]]
    miners = {m["address"]: m["name"] for m in devnet.info["miners"]}
    epoch = board.current_epoch()

    def travel_to(timestamp: int) -> None:
        if timestamp > chain.timestamp():
            chain.increase_time(timestamp - chain.timestamp())

    def wait_for(condition: Any, what: str, timeout_s: float = 45) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout_s} s")
            time.sleep(0.5)

    travel_to(schedule.epoch_end(epoch))
    wait_for(lambda: all(board.commitment_of(epoch, v) for v in verifiers), "verifiers commit")
    # Their scores and salts are kept with the network, not in whatever directory it ran from.
    kept = Path(devnet.info["state_dir"]).glob("verifier-scores-*.json")
    expected = [score_state_path(Path(), v).name for v in verifiers]
    assert sorted(path.name for path in kept) == sorted(expected)
    travel_to(schedule.reveal_opens(epoch))
    wait_for(lambda: all(board.has_revealed(epoch, v) for v in verifiers), "verifiers reveal")
    travel_to(schedule.reveal_closes(epoch))

    paid = devnet.cli("rewards", "pay-miners", "--json")
    assert paid.returncode == 0, paid.stderr
    result = json.loads(paid.stdout)
    assert result["scored_epoch"] == epoch and result["epoch"] is not None, result
    allocations = {a: int(w) for a, w in result["allocations"].items()}
    # Both miners served, so both are paid; the emission is split exactly.
    assert set(allocations) == set(miners) and all(w > 0 for w in allocations.values())
    assert sum(allocations.values()) == DEVNET_PARAMS.miner_emission_per_epoch_wei
    assert set(result["multipliers_ppm"].values()) == {2_000_000}  # every devnet miner is early

    address, name = next(iter(miners.items()))
    shown = devnet.cli("miner", "rewards", "--miner", name, "--json")
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)["epochs"]
    assert row["amount_wei"] == str(allocations[address]) and row["multiplier_ppm"] == 2_000_000
    chain.increase_time(DEVNET_PARAMS.challenge_window_s + 1)
    before = chain.balance(address)
    claimed = devnet.cli("miner", "claim", "--miner", name)
    assert claimed.returncode == 0 and "claimed" in claimed.stdout, claimed.stderr
    assert chain.balance(address) > before


def test_a_killed_miner_does_not_stop_service(devnet: DevnetProcess, client: openai.OpenAI) -> None:
    # Runs last in this module: it leaves the devnet with one miner.
    victim = miner_nodes(devnet)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(victim["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    served_by = Counter()
    for _ in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4
        )
        assert raw.parse().choices[0].message.content is not None
        served_by[raw.headers["x-infergrid-miner"]] += 1
    assert len(served_by) == 1


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    net = DevnetProcess(tmp_path / "net", "--miners", "1", "--model", "tiny", "--verifiers", "0")
    net.wait_up()
    pids = net.node_pids()
    assert len(pids) == 3 and all(pid_alive(pid) for pid in pids)
    assert net.stop() == 0
    assert not [pid for pid in pids if pid_alive(pid)]
    assert not (tmp_path / "net" / "devnet.json").exists()
