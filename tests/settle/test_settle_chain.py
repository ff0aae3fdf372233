"""The chain client on the embedded EVM: accounts, transactions, reverts, time."""

from __future__ import annotations

import pytest
from eth_account import Account

from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.settle.anvil import free_port
from infergrid.settle.chain import (
    DEV_BALANCE_WEI,
    EMBEDDED_CHAIN_ID,
    Chain,
    ChainError,
    ContractRevert,
    EmbeddedEVM,
    decode_revert_data,
    dev_accounts,
    dev_private_keys,
    encode_revert_reason,
)
from infergrid.settle.registry import Registry

# The well-known first accounts of the "test ... junk" mnemonic, as anvil prints them.
ANVIL_ACCOUNT_0 = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
ANVIL_KEY_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
ANVIL_ACCOUNT_1 = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def test_dev_keys_are_anvils() -> None:
    assert dev_private_keys(1) == [ANVIL_KEY_0]
    assert dev_accounts(2) == [ANVIL_ACCOUNT_0, ANVIL_ACCOUNT_1]
    assert len(set(dev_private_keys(20))) == 20
    assert dev_private_keys(0) == []
    with pytest.raises(ValueError):
        dev_private_keys(-1)


def test_embedded_chain_funds_the_dev_accounts(chain: Chain) -> None:
    assert chain.chain_id == EMBEDDED_CHAIN_ID
    assert int(chain.w3.eth.chain_id) == EMBEDDED_CHAIN_ID
    fresh = Chain.embedded(EmbeddedEVM(accounts=3))
    assert [fresh.balance(a) for a in dev_accounts(3)] == [DEV_BALANCE_WEI] * 3
    assert fresh.balance(dev_accounts(4)[3]) == 0
    with pytest.raises(ValueError):
        EmbeddedEVM(accounts=0)


def test_custom_chain_id_signs_and_validates() -> None:
    chain = Chain.embedded(EmbeddedEVM(accounts=1, chain_id=4242, balance_wei=WEI_PER_BTT))
    assert chain.chain_id == 4242
    receipt = chain.transfer(dev_private_keys(1)[0], ANVIL_ACCOUNT_1, 5)
    tx = chain.w3.eth.get_transaction(receipt["transactionHash"])
    assert tx["type"] == 0
    assert tx["v"] in (4242 * 2 + 35, 4242 * 2 + 36)  # EIP-155 signature for this chain
    assert chain.balance(ANVIL_ACCOUNT_1) == 5


def test_transfers_are_legacy_with_explicit_gas_price(chain: Chain, keys: list[str]) -> None:
    target = Account.create().address
    receipt = chain.transfer(keys[4], target, 123)
    assert receipt["status"] == 1
    tx = chain.w3.eth.get_transaction(receipt["transactionHash"])
    assert tx["type"] == 0
    assert tx["gasPrice"] == chain.gas_price()
    assert "maxFeePerGas" not in tx
    assert chain.balance(target) == 123


def test_fixed_gas_price() -> None:
    chain = Chain.embedded(EmbeddedEVM(accounts=1), gas_price_wei=3 * 10**9)
    receipt = chain.transfer(dev_private_keys(1)[0], ANVIL_ACCOUNT_1, 1)
    assert receipt["effectiveGasPrice"] == 3 * 10**9


def test_bad_transfers(chain: Chain, keys: list[str]) -> None:
    with pytest.raises(ValueError):
        chain.transfer(keys[4], ANVIL_ACCOUNT_1, -1)
    pauper = Account.create()
    with pytest.raises(ChainError):
        chain.transfer(pauper.key, ANVIL_ACCOUNT_1, 1)
    with pytest.raises(ValueError):
        chain.transfer("0x1234", ANVIL_ACCOUNT_1, 1)


def test_revert_in_a_mined_transaction_carries_the_reason(
    registry: Registry, chain: Chain, keys: list[str]
) -> None:
    # An explicit gas limit skips the estimate, so the revert happens on-chain (status 0)
    # and the reason comes from replaying the call.
    with pytest.raises(ContractRevert) as exc:
        chain.send(keys[1], registry.contract, "withdraw", gas=200_000)
    assert exc.value.reason == "nothing to withdraw"
    assert exc.value.tx_hash is not None
    receipt = chain.w3.eth.get_transaction_receipt(exc.value.tx_hash)
    assert receipt["status"] == 0


def test_out_of_gas_is_reported(registry: Registry, chain: Chain, keys: list[str]) -> None:
    with pytest.raises(ContractRevert, match=r"out of gas|reverted") as exc:
        chain.send(keys[1], registry.contract, "deregister", gas=21_500)
    assert exc.value.tx_hash is not None


def test_view_revert_raises_contract_revert(registry: Registry, chain: Chain) -> None:
    with pytest.raises(ContractRevert) as exc:
        chain.call(registry.contract.functions.node_owner(0))
    assert exc.value.reason == "index out of range"
    assert "index out of range" in str(exc.value)


def test_deploy_checks_constructor_arguments(chain: Chain, keys: list[str]) -> None:
    from infergrid.settle.build import load_artifact

    artifact = load_artifact("NodeRegistry")
    with pytest.raises(ValueError, match="7 arguments"):
        chain.deploy(keys[0], artifact.abi, artifact.bytecode, 1, 2)


def test_time_travel(chain: Chain) -> None:
    start = chain.timestamp()
    block = chain.block_number()
    assert chain.increase_time(1000) >= start + 1000
    assert chain.block_number() > block
    chain.mine(3)
    assert chain.block_number() >= block + 4
    with pytest.raises(ValueError):
        chain.increase_time(-1)


def test_revert_data_round_trip() -> None:
    data = encode_revert_reason("stake below minimum")
    assert data[:4].hex() == "08c379a0"
    assert decode_revert_data(data) == "stake below minimum"
    assert decode_revert_data("0x" + data.hex()) == "stake below minimum"
    assert decode_revert_data(b"") is None
    assert decode_revert_data(None) is None
    assert decode_revert_data(bytes.fromhex("08c379a0") + b"\x01") is None
    assert decode_revert_data(bytes.fromhex("4e487b71") + b"\x00" * 32) is None


def test_connect_refuses_bad_urls() -> None:
    with pytest.raises(ValueError, match="unsupported chain URL"):
        Chain.connect("ws://127.0.0.1:8545")
    with pytest.raises(ValueError):
        Chain.connect("127.0.0.1:8545")
    with pytest.raises(ChainError, match="cannot reach"):
        Chain.connect(f"http://127.0.0.1:{free_port()}", request_timeout_s=2)
