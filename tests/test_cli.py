"""The CLI tells the truth: it refuses what would silently do nothing useful, never cuts what
a user must copy, and fails with one readable line (in bounded time) when the chain does not
answer or says no."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_utils import to_checksum_address
from typer.testing import CliRunner

from infergrid.app.keys import KeyStore
from infergrid.cli import app
from infergrid.settle.binding import ChainBinding, bind_file
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.deploy import NetworkContracts, deploy_network
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.rpc_server import EmbeddedChainServer

KEYS = dev_private_keys(10)
PAYER = as_account(KEYS[4]).address
ESCROW = "0x" + "e5" * 20
NO_KEY_ENV = {"INFERGRID_PRIVATE_KEY": "", "COLUMNS": "60"}


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run the CLI in this process, as a user in a narrow (60-column) terminal would."""
    return CliRunner().invoke(app, list(args), env={**NO_KEY_ENV, **(env or {})})


def one_error_line(result: Any) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def gateway_db(path: Path, *, escrow: str | None) -> Path:
    """A database as a gateway leaves it after its first start (keys, chain binding)."""
    KeyStore(path).close()
    contracts = {"NodeRegistry": "0x" + "01" * 20, "PaymentEscrow": escrow}
    bind_file(path, ChainBinding.make(1337, "0x" + "ab" * 32, contracts), what="gateway db")
    return path


# -- keys: no key where no gateway will read it ------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("keys", "create", "demo"), ("keys", "list"), ("keys", "revoke", "key_0123456789abcdef")],
)
def test_keys_without_a_gateway_database_are_refused_and_create_nothing(
    in_empty_dir: Path, args: tuple[str, ...]
) -> None:
    line = one_error_line(invoke(*args))
    assert "no gateway database at .infergrid/gateway.db" in line
    assert "--init" in line and "infergrid up" in line
    assert list(in_empty_dir.iterdir()) == []  # no directory, no database


def test_keys_with_db_under_a_missing_directory_is_refused(in_empty_dir: Path) -> None:
    line = one_error_line(invoke("keys", "create", "demo", "--db", "nowhere/gateway.db"))
    assert "no gateway database at nowhere/gateway.db" in line
    assert not (in_empty_dir / "nowhere").exists()


def test_keys_refuse_a_file_that_is_not_a_gateway_database(tmp_path: Path) -> None:
    other = tmp_path / "miner.receipts.db"
    other.write_bytes(b"")  # an empty SQLite file: no keys table
    line = one_error_line(invoke("keys", "list", "--db", str(other)))
    assert "is not a gateway database" in line
    with pytest.raises(FileNotFoundError):
        KeyStore(other, create=False)


def test_keys_create_init_makes_the_database_a_gateway_then_uses(tmp_path: Path) -> None:
    db = tmp_path / "new" / "gateway.db"
    created = invoke("keys", "create", "first", "--db", str(db), "--init", "--payer", PAYER)
    assert created.exit_code == 0, created.stderr
    assert db.is_file()
    listed = invoke("keys", "list", "--db", str(db), "--json")
    assert [row["name"] for row in json.loads(listed.stdout)] == ["first"]
    # The gateway opening it later finds the key.
    secret = created.stdout.strip().splitlines()[-1]
    assert KeyStore(db).verify(secret) is not None


def test_keys_list_never_cuts_the_id_or_the_payer(tmp_path: Path) -> None:
    db = gateway_db(tmp_path / "gateway.db", escrow=ESCROW)
    store = KeyStore(db)
    key_id, _ = store.create("a rather long name for a key", payer=PAYER)
    listed = invoke("keys", "list", "--db", str(db))  # a 60-column terminal
    assert listed.exit_code == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if key_id in line)
    assert PAYER in row and "a rather long name for a key" in row
    # What the list printed is what revoke takes.
    copied = row.split()[0]
    revoked = invoke("keys", "revoke", copied, "--db", str(db))
    assert revoked.exit_code == 0, revoked.stderr
    assert store.get(key_id) is not None and store.get(key_id).revoked_at is not None  # type: ignore[union-attr]


def test_keys_create_without_payer_warns_for_a_metering_gateway(tmp_path: Path) -> None:
    db = gateway_db(tmp_path / "gateway.db", escrow=ESCROW)
    result = invoke("keys", "create", "unpaid", "--db", str(db))
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "402" in result.stderr
    assert to_checksum_address(ESCROW) in result.stderr  # which escrow it bills through
    paid = invoke("keys", "create", "paid", "--db", str(db), "--payer", PAYER)
    assert paid.exit_code == 0 and "warning" not in paid.stderr


def test_keys_create_without_payer_is_quiet_for_a_gateway_that_does_not_bill(
    tmp_path: Path,
) -> None:
    db = gateway_db(tmp_path / "gateway.db", escrow=None)
    result = invoke("keys", "create", "free", "--db", str(db))
    assert result.exit_code == 0 and "warning" not in result.stderr


# -- a chain that hangs, a chain that says no ----------------------------------------------------


@pytest.fixture(scope="module")
def hanging_chain() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for conn in held:
            conn.close()


ADDRESS = "0x" + "22" * 20


@pytest.mark.parametrize(
    "args",
    [
        ("account", "balance", ADDRESS, "--escrow", ADDRESS),
        ("status", "--registry", ADDRESS),
        ("miner", "collect", "--registry", ADDRESS, "--escrow", ADDRESS),
    ],
    ids=["account-balance", "status", "miner-collect"],
)
def test_a_hanging_chain_fails_the_command_after_the_timeout(
    hanging_chain: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    env = {**os.environ, "INFERGRID_CHAIN_TIMEOUT": "1", "INFERGRID_PRIVATE_KEY": KEYS[3]}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "infergrid.cli", *args, "--chain-rpc", hanging_chain],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "did not answer in time" in lines[0] and hanging_chain in lines[0]
    # One timed-out request, not five retries of it (plus interpreter start-up).
    assert elapsed < 20, elapsed


def test_a_bad_chain_timeout_setting_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    result = invoke(
        "account",
        "balance",
        ADDRESS,
        "--escrow",
        ADDRESS,
        "--chain-rpc",
        f"http://127.0.0.1:{port}",
        env={"INFERGRID_CHAIN_TIMEOUT": "soon"},
    )
    assert "INFERGRID_CHAIN_TIMEOUT" in one_error_line(result)


@pytest.fixture(scope="module")
def network() -> Iterator[tuple[str, NetworkContracts]]:
    with EmbeddedChainServer(EmbeddedEVM(accounts=10)) as server:
        chain = Chain.connect(server.url)
        yield server.url, deploy_network(chain, KEYS[0], DEVNET_PARAMS)


def test_deposit_beyond_the_wallet_balance_is_one_readable_line(
    network: tuple[str, NetworkContracts],
) -> None:
    url, contracts = network
    args = ("account", "deposit", "20000", "--chain-rpc", url, "--escrow", contracts.PaymentEscrow)
    line = one_error_line(invoke(*args, env={"INFERGRID_PRIVATE_KEY": KEYS[5]}))
    assert "cannot deposit 20000 BTT" in line and "holds 10000 BTT" in line
    assert "{" not in line and "-32000" not in line


def test_a_node_refusing_a_transaction_is_its_message_not_an_rpc_dict(
    network: tuple[str, NetworkContracts],
) -> None:
    from infergrid.settle.chain import ChainError

    url, _ = network
    chain = Chain.connect(url)
    with pytest.raises(ChainError) as info:  # more than the account holds, gas given
        chain.transact(KEYS[6], ADDRESS, value=20_000 * 10**18, gas=21_000)
    assert "enough balance" in str(info.value) and "{" not in str(info.value)


# -- miner collect on a devnet -------------------------------------------------------------------


def write_devnet(state_dir: Path, url: str, contracts: NetworkContracts) -> list[dict[str, Any]]:
    miners = [
        {
            "name": f"miner-{i + 1}",
            "address": as_account(KEYS[2 + i]).address,
            "key": KEYS[2 + i],
            "receipt_log": str(state_dir / f"m{i}.receipts.db"),
        }
        for i in range(2)
    ]
    state_dir.mkdir(parents=True, exist_ok=True)
    description = {"chain_rpc": url, "contracts": contracts.as_dict(), "miners": miners}
    (state_dir / "devnet.json").write_text(json.dumps(description))
    return miners


def test_miner_collect_on_a_devnet_needs_no_key(
    network: tuple[str, NetworkContracts], tmp_path: Path
) -> None:
    url, contracts = network
    miners = write_devnet(tmp_path, url, contracts)
    every = invoke("miner", "collect", "--state-dir", str(tmp_path))
    assert every.exit_code == 0, every.stderr
    assert every.stdout.count("no gateway has receipts") == 2
    assert "miner-1:" in every.stdout and "miner-2:" in every.stdout
    one = invoke("miner", "collect", "--miner", "miner-2", "--state-dir", str(tmp_path), "--json")
    assert one.exit_code == 0, one.stderr
    assert json.loads(one.stdout) == []
    picked = invoke("miner", "collect", "--miner", "miner-2", "--state-dir", str(tmp_path))
    assert picked.stdout.strip() == "miner-2: no gateway has receipts for this miner"
    assert miners[1]["address"] == as_account(KEYS[3]).address


def test_miner_collect_names_the_devnet_miners_when_asked_for_another(
    network: tuple[str, NetworkContracts], tmp_path: Path
) -> None:
    url, contracts = network
    write_devnet(tmp_path, url, contracts)
    line = one_error_line(
        invoke("miner", "collect", "--miner", "miner-9", "--state-dir", str(tmp_path))
    )
    assert "no miner 'miner-9'" in line and "miner-1, miner-2" in line


def test_chat_cost_text_reads_the_gateways_cost() -> None:
    from openai.types import CompletionUsage

    from infergrid.chat_client import cost_text

    metered = CompletionUsage.model_validate(
        {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost_wei": "7000"}
    )
    assert cost_text(metered) == " · cost 0.000000000000007 BTT (7000 wei)"
    free = CompletionUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert cost_text(free) == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine", "openai"), "--engine openai needs --upstream URL"),
        (("--engine", "llamacpp", "--upstream", "http://127.0.0.1:1"), "are for --engine openai"),
        (("--upstream-flavor", "vllm"), "are for --engine openai"),
        (("--upstream-model", "smollm2-q4_1"), "are for --engine openai"),
        (("--engine", "tgi"), "unknown engine 'tgi'"),
    ],
)
def test_miner_engine_options_are_checked_before_anything_loads(
    args: tuple[str, ...], message: str
) -> None:
    result = invoke(
        "miner", "--chain-rpc", "http://127.0.0.1:1", "--registry", "0x" + "11" * 20, *args
    )
    assert result.exit_code != 0
    assert message in one_error_line(result)
