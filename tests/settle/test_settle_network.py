"""Every settlement contract deployed together by `deploy_network` and used as a network uses
them: on the embedded EVM, and on anvil as BTTC (`--hardfork berlin --chain-id 199`, a separate
process reached over JSON-RPC)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest

from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import Attestation, Voucher, response_hash, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.pricing import split_payment
from infergrid.settle.anvil import AnvilNode
from infergrid.settle.chain import Chain, ContractRevert, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.deploy import NetworkContracts, deploy_network
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.profiles import DEVNET_PARAMS, SettlementParams
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor, reward_tree

DEPLOYER, GATEWAY, MINER, PAYER, VERIFIER, OUTSIDER = range(6)
OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "ab" * 32, 10**12, 2 * 10**12)
STAKE = 100 * WEI_PER_BTT


@pytest.fixture(params=["embedded", "anvil-bttc"])
def chain(request: pytest.FixtureRequest) -> Iterator[Chain]:
    if request.param == "embedded":
        yield Chain.embedded(EmbeddedEVM(accounts=10))
        return
    binary = request.getfixturevalue("anvil_binary")
    with AnvilNode(chain_id=199, hardfork="berlin", accounts=10, binary=binary) as node:
        yield Chain.connect(node.url)


def _gas_cost(chain: Chain, tx_hash: str) -> int:
    receipt = chain.w3.eth.get_transaction_receipt(tx_hash)
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def test_a_network_settles_end_to_end(chain: Chain) -> None:
    keys = dev_private_keys(10)
    addr = [as_account(k).address for k in keys]
    contracts = deploy_network(chain, keys[DEPLOYER], DEVNET_PARAMS)
    assert isinstance(contracts, NetworkContracts)
    if chain.url is not None:
        assert chain.chain_id == 199 and chain.poa  # BTTC rules over JSON-RPC
    registry = Registry(chain, contracts.NodeRegistry)
    escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
    disputes = DisputeManager(chain, contracts.DisputeManager)
    rewards = RewardDistributor(chain, contracts.RewardDistributor)
    assert registry.slasher() == contracts.DisputeManager
    domain = escrow.domain()
    assert domain == Domain(chain.chain_id, contracts.PaymentEscrow)

    registry.register(keys[MINER], Role.MINER, "http://127.0.0.1:1", addr[MINER], [OFFER], STAKE)
    registry.register(
        keys[VERIFIER], Role.VERIFIER, "http://127.0.0.1:2", addr[VERIFIER], [], STAKE
    )

    # A developer deposits and authorizes the gateway; the gateway's vouchers pay the miner.
    escrow.deposit(keys[PAYER], 10 * WEI_PER_BTT)
    escrow.authorize_signer(keys[PAYER], addr[GATEWAY])
    gateway = Signer(keys[GATEWAY])
    owed = 3 * 10**15 + 12_345
    voucher = Voucher(
        addr[PAYER], addr[MINER], addr[GATEWAY], owed, 1, merkle_root([os.urandom(32)])
    )
    miner_before = chain.balance(addr[MINER])
    collection = escrow.collect(keys[MINER], voucher, sign_message(domain, voucher, gateway))
    split = split_payment(owed, DEVNET_PARAMS.protocol_fee_ppm, DEVNET_PARAMS.verifier_pool_ppm)
    assert (collection.paid_wei, collection.miner_wei) == (owed, split.miner)
    assert chain.balance(addr[MINER]) == miner_before + split.miner - _gas_cost(
        chain, collection.tx_hash
    )
    assert escrow.account(addr[PAYER]).balance_wei == 10 * WEI_PER_BTT - owed
    assert escrow.fees_owed(addr[DEPLOYER]) == split.protocol + split.verifier_pool

    # A replayed voucher and a forged one pay nothing.
    with pytest.raises(ContractRevert, match="nothing to collect"):
        escrow.collect(keys[MINER], voucher, sign_message(domain, voucher, gateway))
    richer = replace(voucher, value_aggregate=owed * 2)
    with pytest.raises(ContractRevert):
        escrow.collect(keys[MINER], richer, sign_message(domain, richer, Signer(keys[OUTSIDER])))
    assert escrow.account(addr[PAYER]).balance_wei == 10 * WEI_PER_BTT - owed

    # An equivocating miner loses stake at once; the reporter gets its share.
    miner_signer = Signer(keys[MINER])
    request = os.urandom(32)
    signed = []
    for tokens in ([1, 2, 3], [1, 2, 4]):
        att = Attestation(request, response_hash(tokens), OFFER.model_id, addr[MINER], 5, 3)
        signed.append((att, sign_message(domain, att, miner_signer)))
    (a, sig_a), (b, sig_b) = signed
    slashed = disputes.slash_equivocation(keys[VERIFIER], a, sig_a, b, sig_b)
    expected = STAKE * DEVNET_PARAMS.equivocation_slash_ppm // 1_000_000
    assert slashed == expected
    assert registry.total_stake_of(addr[MINER]) == STAKE - expected
    assert registry.credits(addr[VERIFIER]) == expected * DEVNET_PARAMS.challenger_share_ppm // (
        1_000_000
    )

    # Epoch rewards: fund, propose, wait out the challenge window, finalize, claim.
    rewards.fund(keys[DEPLOYER], 5 * WEI_PER_BTT)
    tree = reward_tree({addr[MINER]: 2 * WEI_PER_BTT, addr[VERIFIER]: WEI_PER_BTT})
    rewards.propose(keys[DEPLOYER], 1, tree.root, tree.total)
    chain.increase_time(DEVNET_PARAMS.challenge_window_s + 1)
    rewards.finalize(keys[DEPLOYER], 1)
    before = chain.balance(addr[VERIFIER])
    rewards.claim(keys[MINER], 1, addr[VERIFIER], WEI_PER_BTT, tree.proof_for(addr[VERIFIER]))
    assert chain.balance(addr[VERIFIER]) == before + WEI_PER_BTT  # a relayer paid the gas
    assert rewards.is_claimed(1, addr[VERIFIER])

    # The gateway anchors a root of its receipts; anyone reads it back.
    root = merkle_root([os.urandom(32) for _ in range(5)])
    anchor = rewards.anchor(keys[GATEWAY], root, 5)
    assert rewards.get_anchor(addr[GATEWAY], anchor.index).root == root

    # The payer withdraws what is left after the thaw period.
    left = escrow.account(addr[PAYER]).balance_wei
    escrow.thaw(keys[PAYER], left)
    with pytest.raises(ContractRevert):
        escrow.withdraw(keys[PAYER])
    chain.increase_time(DEVNET_PARAMS.thaw_period_s + 1)
    escrow.withdraw(keys[PAYER])
    assert escrow.account(addr[PAYER]).balance_wei == 0


def test_deploy_refuses_unbonding_shorter_than_what_it_must_cover() -> None:
    params: SettlementParams = replace(DEVNET_PARAMS, unbonding_delay_s=DEVNET_PARAMS.epoch_s)
    chain = Chain.embedded(EmbeddedEVM(accounts=2))
    with pytest.raises(ValueError, match="unbonding delay"):
        deploy_network(chain, dev_private_keys(1)[0], params)
