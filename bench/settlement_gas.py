"""Gas per settlement operation, and gas per request amortized over a collection.

Deploys the four contracts on the embedded EVM (py-evm, london rules; gas is deterministic,
so one run is the figure), runs every operation once as a network would, and prints the gas
each used. A collection pays for any number of requests with one `collect` (the voucher is
cumulative, so its cost does not grow with the receipts it covers); a gateway's epoch anchor
likewise commits any number of receipts with one transaction. The amortized figure per
request is (collect gas + anchor gas) / requests, compared with the 21,000 gas of one plain
transfer (DESIGN §8: under 1 %).

    .venv/bin/python bench/settlement_gas.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from infergrid.protocol.eip712 import Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import Attestation, Voucher, response_hash, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.deploy import deploy_network
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor, reward_tree

PLAIN_TX_GAS = 21_000
AMORTIZE_OVER = (1, 100, 10_000)
DEPLOYER, GATEWAY, MINER, MINER2, PAYER, VERIFIER, VERIFIER2 = range(7)


def _gas(receipt: Any) -> int:
    return int(receipt["gasUsed"])


def measure() -> dict[str, Any]:
    chain = Chain.embedded(EmbeddedEVM(accounts=10))
    keys = dev_private_keys(10)
    addr = [as_account(k).address for k in keys]
    contracts = deploy_network(chain, keys[DEPLOYER], DEVNET_PARAMS)
    registry = Registry(chain, contracts.NodeRegistry)
    escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
    disputes = DisputeManager(chain, contracts.DisputeManager)
    rewards = RewardDistributor(chain, contracts.RewardDistributor)
    domain = escrow.domain()
    gas: dict[str, int] = {}

    offer = ModelOffer("SmolLM2-135M-Instruct", "0x" + "ab" * 32, 10**12, 2 * 10**12)
    stake = 100 * WEI_PER_BTT
    gas["registry.register (miner, 1 model)"] = _gas(
        registry.register(
            keys[MINER], Role.MINER, "http://127.0.0.1:8100", addr[MINER], [offer], stake
        )
    )
    registry.register(
        keys[MINER2], Role.MINER, "http://127.0.0.1:8101", addr[MINER2], [offer], stake
    )
    gas["registry.stake"] = _gas(registry.stake(keys[MINER], WEI_PER_BTT))
    for verifier in (VERIFIER, VERIFIER2):
        registry.register(keys[verifier], Role.VERIFIER, "http://v", addr[verifier], [], stake)

    gas["escrow.deposit"] = _gas(escrow.deposit(keys[PAYER], 50 * WEI_PER_BTT))
    gas["escrow.authorize_signer"] = _gas(escrow.authorize_signer(keys[PAYER], addr[GATEWAY]))

    gateway = Signer(keys[GATEWAY])
    value = 0
    collects = []
    for round_ in range(3):
        value += 10**15
        voucher = Voucher(
            addr[PAYER], addr[MINER], addr[GATEWAY], value, 1_700_000_000 + round_, os.urandom(32)
        )
        collects.append(
            escrow.collect(keys[MINER], voucher, sign_message(domain, voucher, gateway))
        )
    gas["escrow.collect (first for a payer-miner pair)"] = collects[0].gas_used
    gas["escrow.collect (later)"] = collects[-1].gas_used
    gas["escrow.thaw"] = _gas(escrow.thaw(keys[PAYER], WEI_PER_BTT))
    chain.increase_time(DEVNET_PARAMS.thaw_period_s + 1)
    gas["escrow.withdraw"] = _gas(escrow.withdraw(keys[PAYER]))
    gas["escrow.claim_fees"] = _gas(escrow.claim_fees(keys[DEPLOYER]))

    receipts_root = merkle_root([os.urandom(32) for _ in range(1000)])
    anchor = rewards.anchor(keys[GATEWAY], receipts_root, 1000)
    gas["rewards.anchor (any number of receipts)"] = _gas(
        chain.w3.eth.get_transaction_receipt(anchor.tx_hash)
    )

    miner_signer = Signer(keys[MINER])
    request = os.urandom(32)
    signed = []
    for tokens in ([1, 2, 3], [1, 2, 4]):
        attestation = Attestation(request, response_hash(tokens), offer.model_id, addr[MINER], 5, 3)
        signed.append((attestation, sign_message(domain, attestation, miner_signer)))
    (a, sig_a), (b, sig_b) = signed
    gas["disputes.slash_equivocation"] = _measure_tx(
        chain, lambda: disputes.slash_equivocation(keys[VERIFIER], a, sig_a, b, sig_b)
    )
    dispute_id = disputes.open_dispute(
        keys[PAYER], addr[MINER2], os.urandom(32), addr[PAYER], 10**15
    )
    gas["disputes.open_dispute"] = _last_tx_gas(chain)
    disputes.vote(keys[VERIFIER], dispute_id, True)
    gas["disputes.vote"] = _last_tx_gas(chain)
    disputes.vote(keys[VERIFIER2], dispute_id, True)
    chain.increase_time(DEVNET_PARAMS.voting_period_s + 1)
    disputes.resolve(keys[DEPLOYER], dispute_id)
    gas["disputes.resolve (upheld, slash + refund)"] = _last_tx_gas(chain)

    rewards.fund(keys[DEPLOYER], 10 * WEI_PER_BTT)
    tree = reward_tree({addr[MINER]: WEI_PER_BTT, addr[MINER2]: WEI_PER_BTT, addr[VERIFIER]: 1})
    rewards.propose(keys[DEPLOYER], 1, tree.root, tree.total)
    gas["rewards.propose"] = _last_tx_gas(chain)
    chain.increase_time(DEVNET_PARAMS.challenge_window_s + 1)
    rewards.finalize(keys[DEPLOYER], 1)
    gas["rewards.finalize"] = _last_tx_gas(chain)
    gas["rewards.claim (3-leaf tree)"] = _gas(
        rewards.claim(keys[MINER], 1, addr[MINER], WEI_PER_BTT, tree.proof_for(addr[MINER]))
    )

    per_collection = gas["escrow.collect (later)"]
    anchor_gas = gas["rewards.anchor (any number of receipts)"]
    amortized = [
        {
            "requests_per_collection": n,
            "collect_gas_per_request": per_collection / n,
            "with_anchor_gas_per_request": (per_collection + anchor_gas) / n,
            "percent_of_plain_tx": 100 * (per_collection + anchor_gas) / n / PLAIN_TX_GAS,
        }
        for n in AMORTIZE_OVER
    ]
    return {"gas": gas, "amortized": amortized, "plain_tx_gas": PLAIN_TX_GAS}


def _last_tx_gas(chain: Chain) -> int:
    block = chain.w3.eth.get_block("latest", full_transactions=False)
    return _gas(chain.w3.eth.get_transaction_receipt(block["transactions"][-1]))


def _measure_tx(chain: Chain, send: Any) -> int:
    send()
    return _last_tx_gas(chain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    result = measure()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'operation':<48} {'gas':>9}")
    for name, used in result["gas"].items():
        print(f"{name:<48} {used:>9,}")
    print()
    print(
        f"{'requests per collection':>24} {'gas/request':>12} {'+anchor':>10} {'% of 21k tx':>12}"
    )
    for row in result["amortized"]:
        print(
            f"{row['requests_per_collection']:>24,} {row['collect_gas_per_request']:>12,.1f}"
            f" {row['with_anchor_gas_per_request']:>10,.1f} {row['percent_of_plain_tx']:>11.3f}%"
        )


if __name__ == "__main__":
    main()
