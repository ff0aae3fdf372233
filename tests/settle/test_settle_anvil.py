"""The registry on anvil as a separate node with BTTC's rules: Berlin, chain id 199."""

from __future__ import annotations

import pytest

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.anvil import AnvilNode, find_anvil
from infergrid.settle.chain import (
    BTTC_MAINNET_CHAIN_ID,
    POA_MIDDLEWARE,
    Chain,
    ContractRevert,
    dev_accounts,
    dev_private_keys,
)
from infergrid.settle.registry import Registry, deploy_registry

pytestmark = pytest.mark.anvil

MIN = {Role.MINER: WEI_PER_BTT, Role.VERIFIER: 2 * WEI_PER_BTT, Role.GATEWAY: WEI_PER_BTT}
DELAY = 600
OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "ab" * 32, 3, 9)


@pytest.fixture(scope="module")
def anvil_chain(anvil_url: str) -> Chain:
    return Chain.connect(anvil_url)


def test_anvil_looks_like_bttc(anvil_chain: Chain) -> None:
    assert anvil_chain.chain_id == BTTC_MAINNET_CHAIN_ID
    # chain id 199 is BTTC's, so the client reads blocks with the POA middleware.
    assert anvil_chain.poa
    assert POA_MIDDLEWARE in [name for _, name in anvil_chain.w3.middleware_onion.middleware]
    assert anvil_chain.balance(dev_accounts(1)[0]) > 0
    # Berlin: no base fee in blocks.
    assert "baseFeePerGas" not in anvil_chain.w3.eth.get_block("latest")


def test_registry_lifecycle_on_anvil(anvil_chain: Chain) -> None:
    keys, addrs = dev_private_keys(4), dev_accounts(4)
    # Deploying at all proves the bytecode has no post-Berlin opcodes (PUSH0, BASEFEE).
    registry = Registry(anvil_chain, deploy_registry(anvil_chain, keys[0], MIN, DELAY))
    registry.set_slasher(keys[0], addrs[3])

    with pytest.raises(ContractRevert) as exc:
        registry.register(keys[1], Role.MINER, "http://m", addrs[1], [OFFER], WEI_PER_BTT - 1)
    assert exc.value.reason == "stake below minimum"

    receipt = registry.register(keys[1], Role.MINER, "http://m", addrs[1], [OFFER], 2 * WEI_PER_BTT)
    tx = anvil_chain.w3.eth.get_transaction(receipt["transactionHash"])
    assert tx["type"] == 0 and tx["chainId"] == BTTC_MAINNET_CHAIN_ID
    assert [e.name for e in registry.events(receipt)] == ["NodeRegistered"]
    registry.ensure_registered(keys[2], Role.VERIFIER, "http://v", addrs[2], [], 2 * WEI_PER_BTT)
    registry.ensure_registered(keys[2], Role.VERIFIER, "http://v", addrs[2], [], 2 * WEI_PER_BTT)
    assert [(n.owner, n.role) for n in registry.nodes()] == [
        (addrs[1], Role.MINER),
        (addrs[2], Role.VERIFIER),
    ]

    registry.request_unbonding(keys[1], WEI_PER_BTT)
    with pytest.raises(ContractRevert, match="unbonding not matured"):
        registry.withdraw(keys[1])
    with pytest.raises(ContractRevert, match="nothing to withdraw"):
        registry.withdraw(keys[2])
    # Mined and failed: the reason comes back from the replay.
    with pytest.raises(ContractRevert) as exc:
        anvil_chain.send(keys[1], registry.contract, "withdraw", gas=200_000)
    assert exc.value.reason == "unbonding not matured"

    anvil_chain.increase_time(DELAY + 1)
    before = anvil_chain.balance(addrs[1])
    receipt = registry.withdraw(keys[1])
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert anvil_chain.balance(addrs[1]) == before + WEI_PER_BTT - fee

    with pytest.raises(ContractRevert, match="only slasher"):
        registry.slash(keys[0], addrs[2], 1, addrs[0])
    registry.slash(keys[3], addrs[2], 10 * WEI_PER_BTT, addrs[0])
    assert registry.node(addrs[2]) is None
    assert registry.credits(addrs[0]) == 2 * WEI_PER_BTT
    registry.claim(keys[0])
    assert registry.credits(addrs[0]) == 0
    assert [n.owner for n in registry.nodes()] == [addrs[1]]


def test_anvil_node_stops_and_refuses_a_second_start() -> None:
    if find_anvil() is None:
        pytest.skip("anvil binary not found (set INFERGRID_ANVIL or run ./dev to install it)")
    node = AnvilNode(chain_id=31337, hardfork="berlin")
    node.start()
    try:
        assert Chain.connect(node.url).chain_id == 31337
        with pytest.raises(RuntimeError):
            node.start()
        process = node.process
    finally:
        node.stop()
    assert process is not None and process.poll() is not None
    node.stop()  # twice is fine


def test_anvil_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERGRID_ANVIL", "/nonexistent/anvil")
    assert find_anvil() is None
    with pytest.raises(FileNotFoundError, match="INFERGRID_ANVIL"):
        AnvilNode()
