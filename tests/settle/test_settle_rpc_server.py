"""The embedded EVM served over HTTP JSON-RPC, used as other processes would use it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractLogicError

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.anvil import free_port
from infergrid.settle.chain import (
    EMBEDDED_CHAIN_ID,
    Chain,
    ContractRevert,
    EmbeddedEVM,
    dev_accounts,
    dev_private_keys,
)
from infergrid.settle.registry import Registry, deploy_registry
from infergrid.settle.rpc_server import (
    EmbeddedChainServer,
    JsonRpcDispatcher,
    normalize_result,
    to_rpc,
)

MIN = {Role.MINER: WEI_PER_BTT, Role.VERIFIER: WEI_PER_BTT, Role.GATEWAY: WEI_PER_BTT}
OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "11" * 32, 1, 2)


def post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read()
        return reply.status, json.loads(text) if text else None


def rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    _, reply = post(url, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    return reply


@pytest.fixture(scope="module")
def http_chain(rpc_url: str) -> Chain:
    return Chain.connect(rpc_url)


@pytest.fixture(scope="module")
def http_registry(http_chain: Chain) -> Registry:
    keys = dev_private_keys(3)
    return Registry(http_chain, deploy_registry(http_chain, keys[0], MIN, 60))


def test_chain_id_and_accounts_over_http(rpc_url: str, http_chain: Chain) -> None:
    assert http_chain.chain_id == EMBEDDED_CHAIN_ID
    assert rpc(rpc_url, "eth_chainId")["result"] == hex(EMBEDDED_CHAIN_ID)
    assert rpc(rpc_url, "net_version")["result"] == str(EMBEDDED_CHAIN_ID)
    assert http_chain.balance(dev_accounts(1)[0]) > 0
    with urllib.request.urlopen(rpc_url + "/health", timeout=5) as reply:
        assert json.loads(reply.read()) == {"chain_id": EMBEDDED_CHAIN_ID}


def test_deploy_and_register_over_http(http_registry: Registry) -> None:
    keys, addrs = dev_private_keys(3), dev_accounts(3)
    receipt = http_registry.register(
        keys[1], Role.MINER, "http://m:1", addrs[1], [OFFER], MIN[Role.MINER]
    )
    assert [e.name for e in http_registry.events(receipt)] == ["NodeRegistered"]
    (node,) = http_registry.nodes()
    assert (node.owner, node.endpoint, node.models) == (addrs[1], "http://m:1", (OFFER,))
    record = http_registry.ensure_registered(
        keys[1], Role.MINER, "http://m:2", addrs[1], [OFFER], MIN[Role.MINER]
    )
    assert record.endpoint == "http://m:2"


def test_revert_reasons_over_http(http_registry: Registry, http_chain: Chain, rpc_url: str) -> None:
    keys, addrs = dev_private_keys(3), dev_accounts(3)
    # Through our client: the estimate fails with the contract's reason.
    with pytest.raises(ContractRevert) as exc:
        http_registry.register(keys[2], Role.MINER, "http://m", addrs[2], [], 1)
    assert exc.value.reason == "stake below minimum"
    # Mined and failed: the reason comes from the replay, over HTTP too.
    with pytest.raises(ContractRevert) as exc:
        http_chain.send(keys[2], http_registry.contract, "withdraw", gas=200_000)
    assert exc.value.reason == "nothing to withdraw"
    # A plain web3 client sees the reason as ContractLogicError, as with geth.
    w3 = Web3(Web3.HTTPProvider(rpc_url))
    contract = w3.eth.contract(address=http_registry.address, abi=http_registry.contract.abi)
    with pytest.raises(ContractLogicError, match="nothing to withdraw"):
        contract.functions.withdraw().call({"from": addrs[2]})
    with pytest.raises(ContractLogicError, match="index out of range"):
        contract.functions.node_owner(99).call()
    # And the raw JSON-RPC error is geth's shape: code 3, message, ABI-encoded data.
    data = contract.encode_abi("withdraw", args=[])
    reply = rpc(
        rpc_url,
        "eth_call",
        [{"from": addrs[2], "to": http_registry.address, "data": data}, "latest"],
    )
    error = reply["error"]
    assert error["code"] == 3
    assert error["message"] == "execution reverted: nothing to withdraw"
    assert error["data"].startswith("0x08c379a0")


def test_time_travel_over_http(http_chain: Chain, rpc_url: str) -> None:
    before = http_chain.timestamp()
    assert http_chain.increase_time(7200) >= before + 7200
    assert rpc(rpc_url, "evm_increaseTime", ["0x10"])["result"] == "0x10"
    assert "error" in rpc(rpc_url, "evm_increaseTime", [-5])
    later = http_chain.timestamp() + 1000
    rpc(rpc_url, "evm_setNextBlockTimestamp", [hex(later)])
    assert "result" in rpc(rpc_url, "evm_mine")
    assert http_chain.timestamp() == later


def test_blocks_receipts_and_transactions_have_json_rpc_shape(
    http_registry: Registry, http_chain: Chain, rpc_url: str
) -> None:
    keys, addrs = dev_private_keys(3), dev_accounts(3)
    receipt = http_chain.send(keys[1], http_registry.contract, "stake", value=5)
    tx_hash = receipt["transactionHash"].to_0x_hex()
    raw = rpc(rpc_url, "eth_getTransactionReceipt", [tx_hash])["result"]
    assert raw["status"] == "0x1"
    assert raw["logsBloom"].startswith("0x") and len(raw["logsBloom"]) == 2 + 512
    assert int(raw["logsBloom"], 16) != 0  # the Staked log is in it
    assert raw["logs"][0]["logIndex"] == "0x0"
    assert "state_root" not in raw

    block = rpc(rpc_url, "eth_getBlockByNumber", [raw["blockNumber"], True])["result"]
    (tx,) = block["transactions"]
    assert tx["hash"] == tx_hash
    assert {"blockHash", "blockNumber", "gasPrice", "input", "transactionIndex"} <= set(tx)
    assert "block_hash" not in tx and "gas_price" not in tx
    assert tx["chainId"] == hex(EMBEDDED_CHAIN_ID)
    assert len(block["logsBloom"]) == 2 + 512
    assert block["number"] == raw["blockNumber"]
    assert rpc(rpc_url, "eth_getTransactionByHash", [tx_hash])["result"]["from"] == addrs[1]
    assert rpc(rpc_url, "eth_getTransactionReceipt", ["0x" + "00" * 32])["result"] is None
    assert rpc(rpc_url, "eth_getBlockByNumber", ["0xffffff", False])["result"] is None


def test_json_rpc_protocol_edges(rpc_url: str) -> None:
    # Batches, answered in order, errors alongside results.
    status, replies = post(
        rpc_url,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
            {"jsonrpc": "2.0", "id": "two", "method": "no_suchMethod", "params": []},
            {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # notification
            42,
        ],
    )
    assert status == 200
    assert [r["id"] for r in replies] == [1, "two", None]
    assert replies[0]["result"] == hex(EMBEDDED_CHAIN_ID)
    assert replies[1]["error"]["code"] == -32601
    assert replies[2]["error"]["code"] == -32600
    # Malformed input.
    assert post(rpc_url, None, raw=b"{not json")[1]["error"]["code"] == -32700
    assert post(rpc_url, None, raw=b"\xff\xfe")[1]["error"]["code"] == -32700
    assert post(rpc_url, [])[1]["error"]["code"] == -32600
    assert post(rpc_url, {"id": 1, "method": "eth_chainId"})[1]["error"]["code"] == -32600
    assert post(rpc_url, {"jsonrpc": "2.0", "id": 1})[1]["error"]["code"] == -32600
    assert (
        post(rpc_url, {"jsonrpc": "2.0", "id": [1], "method": "eth_chainId"})[1]["error"]["code"]
        == -32600
    )
    reply = post(rpc_url, {"jsonrpc": "2.0", "id": 5, "method": "eth_chainId", "params": {"a": 1}})[
        1
    ]
    assert (reply["id"], reply["error"]["code"]) == (5, -32602)
    # Bad parameters get an error, not a dead server.
    assert "error" in rpc(rpc_url, "eth_getBalance", [])
    assert "error" in rpc(rpc_url, "eth_getBalance", ["0xnot-an-address", "latest"])
    assert "error" in rpc(rpc_url, "eth_sendRawTransaction", ["0xdeadbeef"])
    # A lone notification gets no body.
    assert post(rpc_url, {"jsonrpc": "2.0", "method": "eth_chainId", "params": []}) == (204, None)
    assert rpc(rpc_url, "eth_chainId")["result"] == hex(EMBEDDED_CHAIN_ID)


def test_rejected_transactions_get_server_errors(rpc_url: str, http_chain: Chain) -> None:
    pauper = Account.create()
    tx = {
        "to": dev_accounts(1)[0],
        "value": 1,
        "gas": 21000,
        "gasPrice": 10**9,
        "nonce": 0,
        "chainId": EMBEDDED_CHAIN_ID,
    }
    raw = pauper.sign_transaction(tx).raw_transaction.to_0x_hex()
    error = rpc(rpc_url, "eth_sendRawTransaction", [raw])["error"]
    assert error["code"] == -32000 and "afford" in error["message"]


def test_concurrent_clients(rpc_url: str) -> None:
    keys = dev_private_keys(9)[4:9]
    sinks = [Account.create().address for _ in keys]
    errors: list[BaseException] = []
    shared = Chain.connect(rpc_url)

    def work(key: str, sink: str, chain: Chain) -> None:
        try:
            for _ in range(4):
                chain.transfer(key, sink, 1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    # Four clients, each with its own key...
    threads = [
        threading.Thread(target=work, args=(k, s, Chain.connect(rpc_url)))
        for k, s in zip(keys[:4], sinks[:4], strict=True)
    ]
    # ...and three threads on one client with one key: the client serialises their nonces.
    threads += [threading.Thread(target=work, args=(keys[4], sinks[4], shared)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    check = Chain.connect(rpc_url)
    assert [check.balance(s) for s in sinks] == [4, 4, 4, 4, 12]


def test_one_evm_in_process_and_over_http() -> None:
    evm = EmbeddedEVM(accounts=2)
    local = Chain.embedded(evm)
    with EmbeddedChainServer(evm) as server:
        remote = Chain.connect(server.url)
        key = dev_private_keys(1)[0]
        registry = Registry(local, deploy_registry(local, key, MIN, 60))
        registry.register(key, Role.GATEWAY, "http://gw", dev_accounts(1)[0], [], WEI_PER_BTT)
        seen = Registry(remote, registry.address).nodes()
        assert [n.endpoint for n in seen] == ["http://gw"]
        remote.increase_time(100)
        assert local.timestamp() == remote.timestamp()


def test_server_start_stop_and_port_in_use() -> None:
    server = EmbeddedChainServer(EmbeddedEVM(accounts=1))
    url = server.start()
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError):
        server.start()
    with pytest.raises(OSError):
        EmbeddedChainServer(EmbeddedEVM(accounts=1), port=port).start()
    server.stop()
    server.stop()  # twice is fine
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)
    # The port is free again.
    with EmbeddedChainServer(EmbeddedEVM(accounts=1), port=port) as again:
        assert again.url == url


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_embedded_chain_stops_cleanly_on_signals(sig: signal.Signals) -> None:
    port = free_port()
    code = (
        "from infergrid.settle.rpc_server import serve_embedded_chain\n"
        f"serve_embedded_chain('127.0.0.1', {port}, lambda url: print('ready', url, flush=True))\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"ready http://127.0.0.1:{port}", (
            proc.stderr.read() if proc.stderr else ""
        )
        chain = Chain.connect(f"http://127.0.0.1:{port}")
        assert chain.chain_id == EMBEDDED_CHAIN_ID
        chain.transfer(dev_private_keys(1)[0], dev_accounts(2)[1], 1)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert out.strip() == "stopped"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the dispatcher and encoders, without HTTP ---------------------------------------------


def test_to_rpc_encoding() -> None:
    assert to_rpc(0) == "0x0"
    assert to_rpc(255) == "0xff"
    assert to_rpc(True) is True
    assert to_rpc(None) is None
    assert to_rpc(b"\x01\x02") == "0x0102"
    assert to_rpc("0xab") == "0xab"
    assert to_rpc([1, {"a": (2, b"")}]) == ["0x1", {"a": ["0x2", "0x"]}]
    assert to_rpc(0.5) == 0.5
    with pytest.raises(TypeError):
        to_rpc(object())


def test_normalize_result_fills_receipt_bloom() -> None:
    receipt = {"status": 1, "logs": [], "state_root": b"\x01"}
    out = normalize_result("eth_getTransactionReceipt", receipt)
    assert out == {"status": "0x1", "logs": [], "logsBloom": "0x" + "00" * 256}
    assert normalize_result("eth_getBlockByNumber", None) is None


def test_dispatcher_directly() -> None:
    dispatcher = JsonRpcDispatcher(EmbeddedEVM(accounts=1))
    assert dispatcher.handle({"jsonrpc": "2.0", "id": 3, "method": "eth_blockNumber"}) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": "0x0",
    }
    assert dispatcher.handle([{"jsonrpc": "2.0", "method": "eth_blockNumber"}]) is None
    assert (
        dispatcher.handle({"jsonrpc": "2.0", "id": True, "method": "x"})["error"]["code"] == -32600
    )
    assert dispatcher.handle("nope")["error"]["code"] == -32600


def test_the_block_ticker_keeps_an_idle_chain_producing_blocks() -> None:
    """An embedded EVM mines only on a transaction; with a block time its clock moves while
    nobody transacts, as a real chain's does (what the devnet's epochs count on)."""
    from infergrid.settle.chain import EmbeddedEVM
    from infergrid.settle.rpc_server import BlockTicker

    evm = EmbeddedEVM(accounts=1)
    chain = Chain.embedded(evm)
    first = chain.block_number()
    ticker = BlockTicker(evm, 0.05).start()
    try:
        for _ in range(400):  # bounded: at most 20 s on a loaded machine
            if chain.block_number() >= first + 3:
                break
            time.sleep(0.05)
    finally:
        ticker.stop()
    assert chain.block_number() >= first + 3
    stopped = chain.block_number()
    time.sleep(0.2)
    assert chain.block_number() == stopped  # stop() stops it
    with pytest.raises(ValueError, match="block time"):
        BlockTicker(evm, 0)
