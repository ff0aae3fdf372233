"""Gas per settlement operation, and gas per request amortized over a collection.

Deploys the four contracts with `deploy_network(DEVNET_PARAMS)` on the embedded EVM (py-evm,
london rules), runs every operation once as a network would, and prints the gas each used:

- registry: a miner registers, adds stake and rotates its signing key; another node requests
  unbonding and deregisters;
- escrow: a payer deposits and authorizes a gateway; the gateway serves requests, signing an
  attestation-backed receipt for each and a cumulative voucher over their Merkle root, which
  the miner collects three times; the payer thaws and withdraws; the treasury claims its fees;
  the admin schedules a fee change that anyone applies once the timelock has run;
- disputes: a second miner signs two responses to one request with its new key and is
  slashed; a challenger disputes one collected receipt (three verifiers vote, upheld: slash,
  refund, challenger share) and another (nobody votes: no quorum); both votes of the upheld
  dispute are settled, the winning side's and the losing side's (slashed);
- rewards: the gateway anchors its receipts; epoch 1 is proposed, finalized and claimed from;
  epoch 2 is proposed, challenged and ruled valid; the arbiter changes through its timelock;
- every contract's admin is handed over in two steps.

Every hash and every time the gateway signs is fixed (the gateway's clock, not the chain's,
which starts at the wall clock), so the calldata, signatures included, and with it the gas are
the same on every run; a changed byte would move a figure by at most 12 gas (a zero calldata
byte costs 4, any other 16).

A collection pays for any number of requests with one `collect` (the voucher is cumulative,
so its cost does not grow with the receipts it covers); a gateway's epoch anchor likewise
commits any number of receipts with one transaction. The amortized figure per request is
(collect gas + anchor gas) / requests, compared with the 21,000 gas of one plain transfer
(DESIGN §8: under 1 %).

    .venv/bin/python bench/settlement_gas.py [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from eth_utils import keccak
from web3.types import TxReceipt

from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import (
    Attestation,
    Receipt,
    Voucher,
    response_hash,
    sign_message,
)
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.pricing import request_value
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.deploy import deploy_network
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor, reward_tree

PLAIN_TX_GAS = 21_000
AMORTIZE_OVER = (1, 100, 10_000)
# Indexes into the dev keys. MINER2_KEY is the signing key MINER2 rotates to; NEW_ARBITER and
# NEW_ADMIN only ever receive a role.
(
    DEPLOYER,
    GATEWAY,
    MINER,
    MINER2,
    MINER2_KEY,
    LEAVER,
    PAYER,
    VERIFIER,
    VERIFIER2,
    VERIFIER3,
    CHALLENGER,
    NEW_ARBITER,
    NEW_ADMIN,
) = range(13)
ACCOUNTS = 13

OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "ab" * 32, 10**12, 2 * 10**12)
TOKENS_IN, TOKENS_OUT = 100, 200
STAKE = 100 * WEI_PER_BTT
# The gateway's clock when it signs receipts and vouchers: fixed, so their signatures are too.
GATEWAY_TIME = 1_700_000_000


def _gas(receipt: TxReceipt) -> int:
    return int(receipt["gasUsed"])


def _fixed(label: str) -> bytes:
    """A 32-byte value that is the same on every run (request ids, evidence, roots)."""
    return keccak(text=f"settlement-gas/{label}")


@dataclass(frozen=True)
class Served:
    """One response as a dispute needs it: the miner's signed attestation and the gateway's
    signed receipt for it."""

    attestation: Attestation
    attestation_signature: bytes
    receipt: Receipt
    receipt_signature: bytes


@dataclass
class Gateway:
    """What a gateway does for one (payer, miner) pair: it accepts a miner's signed
    attestation, signs a receipt for it, and signs a cumulative voucher whose root covers
    every receipt so far (as app/receipts.py does)."""

    domain: Domain
    signer: Signer
    payer: str
    miner: str
    leaves: list[bytes] = field(default_factory=list)
    value: int = 0

    def serve(self, label: str, miner_signer: Signer, timestamp: int) -> Served:
        attestation = Attestation(
            request_hash=_fixed(f"request/{label}"),
            response_hash=response_hash([1, 2, 3]),
            model_id=OFFER.model_id,
            miner=self.miner,
            tokens_in=TOKENS_IN,
            tokens_out=TOKENS_OUT,
        )
        receipt = Receipt(
            request_hash=attestation.request_hash,
            payer=self.payer,
            miner=self.miner,
            gateway=self.signer.address,
            model_id=attestation.model_id,
            tokens_in=TOKENS_IN,
            tokens_out=TOKENS_OUT,
            value=request_value(TOKENS_IN, TOKENS_OUT, OFFER),
            timestamp=timestamp,
            attestation_hash=attestation.struct_hash(),
        )
        self.leaves.append(receipt.struct_hash())
        self.value += receipt.value
        return Served(
            attestation,
            sign_message(self.domain, attestation, miner_signer),
            receipt,
            sign_message(self.domain, receipt, self.signer),
        )

    def voucher(self, timestamp: int) -> tuple[Voucher, bytes]:
        voucher = Voucher(
            payer=self.payer,
            miner=self.miner,
            gateway=self.signer.address,
            value_aggregate=self.value,
            timestamp=timestamp,
            receipts_root=merkle_root(self.leaves),
        )
        return voucher, sign_message(self.domain, voucher, self.signer)


def measure() -> dict[str, Any]:
    chain = Chain.embedded(EmbeddedEVM(accounts=ACCOUNTS))
    keys = dev_private_keys(ACCOUNTS)
    addr = [as_account(k).address for k in keys]
    p = DEVNET_PARAMS
    contracts = deploy_network(chain, keys[DEPLOYER], p)
    registry = Registry(chain, contracts.NodeRegistry)
    escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
    disputes = DisputeManager(chain, contracts.DisputeManager)
    rewards = RewardDistributor(chain, contracts.RewardDistributor)
    domain = escrow.domain()
    gas: dict[str, int] = {}

    # --- registry: nodes join, a key is rotated, a node leaves ---
    gas["registry.register (miner, 1 model)"] = _gas(
        registry.register(
            keys[MINER], Role.MINER, "http://127.0.0.1:8100", addr[MINER], [OFFER], STAKE
        )
    )
    gas["registry.stake"] = _gas(registry.stake(keys[MINER], WEI_PER_BTT))
    registry.register(
        keys[MINER2], Role.MINER, "http://127.0.0.1:8101", addr[MINER2], [OFFER], STAKE
    )
    gas["registry.update (new signer)"] = _gas(
        registry.update(keys[MINER2], "http://127.0.0.1:8101", addr[MINER2_KEY], [OFFER])
    )
    for verifier in (VERIFIER, VERIFIER2, VERIFIER3):
        registry.register(keys[verifier], Role.VERIFIER, "http://v", addr[verifier], [], STAKE)
    verifiers_joined = chain.timestamp()
    registry.register(
        keys[LEAVER], Role.MINER, "http://127.0.0.1:8102", addr[LEAVER], [OFFER], STAKE
    )
    gas["registry.request_unbonding"] = _gas(registry.request_unbonding(keys[LEAVER], WEI_PER_BTT))
    gas["registry.deregister"] = _gas(registry.deregister(keys[LEAVER]))

    # --- escrow: a payer funds a gateway's requests, the miner collects ---
    gas["escrow.deposit"] = _gas(escrow.deposit(keys[PAYER], 50 * WEI_PER_BTT))
    gas["escrow.authorize_signer"] = _gas(escrow.authorize_signer(keys[PAYER], addr[GATEWAY]))
    gateway = Gateway(domain, Signer(keys[GATEWAY]), addr[PAYER], addr[MINER])
    miner_signer = Signer(keys[MINER])
    served: list[Served] = []
    collects = []
    for round_ in range(3):
        now = GATEWAY_TIME + 60 * round_
        served.append(gateway.serve(f"miner/{round_}", miner_signer, now))
        voucher, signature = gateway.voucher(now + 30)
        collects.append(escrow.collect(keys[MINER], voucher, signature))
    gas["escrow.collect (first for a payer-miner pair)"] = collects[0].gas_used
    gas["escrow.collect (later)"] = collects[-1].gas_used
    gas["escrow.thaw"] = _gas(escrow.thaw(keys[PAYER], WEI_PER_BTT))
    chain.increase_time(p.thaw_period_s)
    gas["escrow.withdraw"] = _gas(escrow.withdraw(keys[PAYER]))
    gas["escrow.claim_fees"] = _gas(escrow.claim_fees(keys[DEPLOYER]))
    gas["escrow.schedule_fees"] = _gas(escrow.schedule_fees(keys[DEPLOYER], 10_000, 30_000))
    chain.increase_time(p.fee_delay_s)
    gas["escrow.apply_fees"] = _gas(escrow.apply_fees(keys[PAYER]))

    anchor = rewards.anchor(keys[GATEWAY], merkle_root(gateway.leaves), len(gateway.leaves))
    gas["rewards.anchor (any number of receipts)"] = _gas(
        chain.w3.eth.get_transaction_receipt(anchor.tx_hash)
    )

    # --- disputes: an equivocation, an upheld dispute, a dispute without quorum ---
    # Verifiers vote only on disputes opened min_verifier_age after they joined; the thaw and
    # the fee delay have usually covered that already.
    wait = verifiers_joined + p.min_verifier_age_s - chain.timestamp()
    if wait > 0:
        chain.increase_time(wait)
    (a, sig_a), (b, sig_b) = (
        _conflicting(domain, addr[MINER2], Signer(keys[MINER2_KEY]), tokens)
        for tokens in ([1, 2, 3], [1, 2, 4])
    )
    disputes.slash_equivocation(keys[VERIFIER], a, sig_a, b, sig_b)
    gas["disputes.slash_equivocation"] = _last_tx_gas(chain)
    upheld = _open(disputes, keys[CHALLENGER], served[0], "upheld")
    gas["disputes.open_dispute (gateway-signed receipt, collected)"] = _last_tx_gas(chain)
    no_quorum = _open(disputes, keys[CHALLENGER], served[1], "no-quorum")
    disputes.vote(keys[VERIFIER], upheld, True)
    gas["disputes.vote"] = _last_tx_gas(chain)
    disputes.vote(keys[VERIFIER2], upheld, True)
    disputes.vote(keys[VERIFIER3], upheld, False)
    chain.increase_time(p.voting_period_s)
    record = disputes.resolve(keys[DEPLOYER], upheld)
    gas["disputes.resolve (upheld: slash, refund, challenger share)"] = _last_tx_gas(chain)
    _expect(record.status == "upheld", f"dispute {upheld} was {record.status}, not upheld")
    record = disputes.resolve(keys[DEPLOYER], no_quorum)
    gas["disputes.resolve (no quorum)"] = _last_tx_gas(chain)
    _expect(record.status == "no_quorum", f"dispute {no_quorum} was {record.status}")
    slashed = disputes.settle_vote(keys[DEPLOYER], upheld, addr[VERIFIER])
    gas["disputes.settle_vote (winning side)"] = _last_tx_gas(chain)
    _expect(slashed == 0, "a winning vote was slashed")
    slashed = disputes.settle_vote(keys[DEPLOYER], upheld, addr[VERIFIER3])
    gas["disputes.settle_vote (losing side, slashed)"] = _last_tx_gas(chain)
    _expect(slashed > 0, "a losing vote was not slashed")

    # --- rewards: epoch 1 finalized and claimed from; epoch 2 challenged and ruled valid ---
    rewards.fund(keys[DEPLOYER], 10 * WEI_PER_BTT)
    tree = reward_tree({addr[MINER]: WEI_PER_BTT, addr[MINER2]: WEI_PER_BTT, addr[VERIFIER]: 1})
    gas["rewards.propose"] = _gas(rewards.propose(keys[DEPLOYER], 1, tree.root, tree.total))
    chain.increase_time(p.challenge_window_s)
    gas["rewards.finalize"] = _gas(rewards.finalize(keys[DEPLOYER], 1))
    gas["rewards.claim (3-leaf tree)"] = _gas(
        rewards.claim(keys[MINER], 1, addr[MINER], WEI_PER_BTT, tree.proof_for(addr[MINER]))
    )
    # Epochs are proposed in order: 2 follows 1. Ruled valid, the root is proposed again.
    rewards.propose(keys[DEPLOYER], 2, tree.root, tree.total)
    gas["rewards.challenge"] = _gas(rewards.challenge(keys[CHALLENGER], 2))
    gas["rewards.resolve_challenge (root valid)"] = _gas(
        rewards.resolve_challenge(keys[DEPLOYER], 2, True)
    )
    _expect(rewards.epoch(2).status == "proposed", "a root ruled valid is not proposed again")
    gas["rewards.schedule_arbiter"] = _gas(
        rewards.schedule_arbiter(keys[DEPLOYER], addr[NEW_ARBITER])
    )
    chain.increase_time(p.arbiter_delay_s)
    gas["rewards.apply_arbiter"] = _gas(rewards.apply_arbiter(keys[PAYER]))

    # --- two-step admin: lib/two_step_admin.vy in the three contracts that have an admin ---
    admins: list[Registry | PaymentEscrow | RewardDistributor] = [registry, escrow, rewards]
    transfers = [_gas(c.transfer_admin(keys[DEPLOYER], addr[NEW_ADMIN])) for c in admins]
    accepts = [_gas(c.accept_admin(keys[NEW_ADMIN])) for c in admins]
    # One module, one cost: the three measure the same today; the row is the most of them.
    gas["transfer_admin (registry, escrow, rewards)"] = max(transfers)
    gas["accept_admin (registry, escrow, rewards)"] = max(accepts)

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


def _conflicting(
    domain: Domain, miner: str, signer: Signer, tokens: list[int]
) -> tuple[Attestation, bytes]:
    """An attestation of `miner` to one fixed request, signed by `signer`; two with different
    `tokens` are an equivocation."""
    attestation = Attestation(
        request_hash=_fixed("request/equivocated"),
        response_hash=response_hash(tokens),
        model_id=OFFER.model_id,
        miner=miner,
        tokens_in=TOKENS_IN,
        tokens_out=len(tokens),
    )
    return attestation, sign_message(domain, attestation, signer)


def _open(disputes: DisputeManager, key: str, served: Served, label: str) -> int:
    """Dispute `served` with the minimum deposit and evidence named `label`."""
    return disputes.open_dispute(
        key,
        served.attestation,
        served.attestation_signature,
        served.receipt,
        served.receipt_signature,
        _fixed(f"evidence/{label}"),
    )


def _expect(condition: bool, message: str) -> None:
    # A figure measured on the wrong path (a dispute that went another way) is worse than
    # none: stop instead of printing it.
    if not condition:
        raise RuntimeError(f"the benchmark's scenario went wrong: {message}")


def _last_tx_gas(chain: Chain) -> int:
    """Gas of the latest transaction: for the wrappers that return a result, not the receipt
    (the embedded EVM mines each transaction in a block of its own)."""
    block = chain.w3.eth.get_block("latest", full_transactions=False)
    return _gas(chain.w3.eth.get_transaction_receipt(block["transactions"][-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    result = measure()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    width = max(len(name) for name in result["gas"])
    print(f"{'operation':<{width}} {'gas':>9}")
    for name, used in result["gas"].items():
        print(f"{name:<{width}} {used:>9,}")
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
