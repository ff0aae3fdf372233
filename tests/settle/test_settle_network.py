"""Every settlement contract deployed together by `deploy_network` and used as a network uses
them: on the embedded EVM, and on anvil as BTTC (`--hardfork berlin --chain-id 199`, a separate
process reached over JSON-RPC).

The honest paths end to end: a payer pays a miner through the escrow, an equivocating miner is
slashed, a dispute upheld by a real quorum refunds the payer and pays every party its share,
epoch rewards are proposed, finalized and claimed. The helpers below (a network deployed with
DEVNET_PARAMS, `serve` for one attested, receipted and paid request, `money` for what an
address holds with its gas added back) are shared with test_settle_attacks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
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
from infergrid.protocol.pricing import PPM, request_value, split_payment
from infergrid.settle.chain import (
    Chain,
    ContractRevert,
    EmbeddedEVM,
    PrivateKey,
    as_account,
    dev_private_keys,
)
from infergrid.settle.deploy import NetworkContracts, deploy_network
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.profiles import DEVNET_PARAMS, SettlementParams
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor, reward_tree

P = DEVNET_PARAMS
N_KEYS = 10  # tests/settle/conftest.py's anvil_url funds as many
KEYS = dev_private_keys(N_KEYS)
ADDRS = [as_account(key).address for key in KEYS]
# Indexes into the dev keys. The deployer is admin of every contract and the reward arbiter;
# the treasury (also the verifier pool) is an account of its own, so its credits show.
DEPLOYER, GATEWAY, MINER, PAYER, V1, V2, CHALLENGER, TREASURY, OTHER, SPARE = range(N_KEYS)
# The payer's gateway signs receipts and vouchers with its dev key (it also sends anchors).
GATEWAY_SIGNER = Signer(KEYS[GATEWAY])
# The miner's registered signer: a key apart from its owner key, as operators run it.
MINER_SIGNER = Signer("0x" + "42" * 32)

OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "ab" * 32, 10**15, 2 * 10**15)
TOKENS_IN, TOKENS_OUT = 100, 200
VALUE = request_value(TOKENS_IN, TOKENS_OUT, OFFER)  # 0.5 BTT: visible next to the stakes
MINER_STAKE = 100 * WEI_PER_BTT
# Together above the quorum (10 BTT); V1 alone outweighs V2.
VERIFIER_STAKES = {V1: 20 * WEI_PER_BTT, V2: 10 * WEI_PER_BTT}
PAYER_DEPOSIT = 10 * WEI_PER_BTT
TARGET = MINER_STAKE * P.max_slash_ppm // PPM  # what an upheld dispute slashes: 50 BTT

CHAINS = ["embedded", pytest.param("anvil-bttc", marks=pytest.mark.anvil)]


# --- the chain: every test on both ----------------------------------------------------------


class MeteredChain(Chain):
    """A Chain that remembers the gas each sender paid, so a test counts an address's money
    with gas left out. Only transactions that were mined count; the reverts the tests expect
    fail at gas estimation and are never sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gas_paid: dict[str, int] = {}

    def transact(
        self,
        key: PrivateKey,
        to: str | None,
        data: bytes | str = b"",
        value: int = 0,
        gas: int | None = None,
    ) -> TxReceipt:
        receipt = super().transact(key, to, data, value, gas)
        sender = as_account(key).address
        cost = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
        self.gas_paid[sender] = self.gas_paid.get(sender, 0) + cost
        return receipt


def chain_for(request: pytest.FixtureRequest) -> MeteredChain:
    """The chain a test parametrized over CHAINS runs on: a fresh embedded EVM, or the
    module's anvil with BTTC's rules (one node per module, a fresh network deployed on it by
    each test)."""
    if request.param == "embedded":
        return MeteredChain.embedded(EmbeddedEVM(accounts=N_KEYS))
    metered = MeteredChain.connect(request.getfixturevalue("anvil_url"))
    assert metered.chain_id == 199 and metered.poa  # BTTC's rules over JSON-RPC
    return metered


@pytest.fixture(params=CHAINS)
def chain(request: pytest.FixtureRequest) -> MeteredChain:
    return chain_for(request)


def money(chain: MeteredChain, *addresses: str) -> int:
    """What `addresses` hold together, with the gas they paid through `chain` added back."""
    return sum(chain.balance(a) + chain.gas_paid.get(a, 0) for a in addresses)


def received(chain: MeteredChain, address: str, send: Callable[[], object]) -> int:
    """What `address` gains from the transaction(s) `send` makes, gas left out."""
    before = money(chain, address)
    send()
    return money(chain, address) - before


# --- the network ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One request as the contracts see it: the miner's signed attestation and the gateway's
    signed receipt for it."""

    attestation: Attestation
    attestation_signature: bytes
    receipt: Receipt
    receipt_signature: bytes


@dataclass
class Net:
    """The four contracts of one deploy_network, a miner staking MINER_STAKE, and a payer with
    PAYER_DEPOSIT in the escrow that authorized GATEWAY_SIGNER."""

    chain: MeteredChain
    contracts: NetworkContracts
    registry: Registry
    escrow: PaymentEscrow
    disputes: DisputeManager
    rewards: RewardDistributor
    # (payer, gateway, miner) -> the cumulative value its vouchers collected so far.
    billed: dict[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def domain(self) -> Domain:
        return self.escrow.domain()


def deploy(chain: MeteredChain) -> Net:
    contracts = deploy_network(chain, KEYS[DEPLOYER], P, treasury=ADDRS[TREASURY])
    net = Net(
        chain,
        contracts,
        Registry(chain, contracts.NodeRegistry),
        PaymentEscrow(chain, contracts.PaymentEscrow),
        DisputeManager(chain, contracts.DisputeManager),
        RewardDistributor(chain, contracts.RewardDistributor),
    )
    net.registry.register(
        KEYS[MINER], Role.MINER, "http://miner", MINER_SIGNER.address, [OFFER], MINER_STAKE
    )
    net.escrow.deposit(KEYS[PAYER], PAYER_DEPOSIT)
    net.escrow.authorize_signer(KEYS[PAYER], GATEWAY_SIGNER.address)
    return net


def add_verifiers(net: Net, stakes: dict[int, int] = VERIFIER_STAKES) -> None:
    """Register verifiers and let min_verifier_age pass: they vote on what opens from now."""
    for index, stake in stakes.items():
        net.registry.register(KEYS[index], Role.VERIFIER, "http://v", ADDRS[index], [], stake)
    net.chain.increase_time(P.min_verifier_age_s)


def req(n: int) -> bytes:
    return keccak(f"request-{n}".encode())


def evidence_of(served: Served) -> bytes:
    """An audit's evidence hash, one per request."""
    return keccak(b"evidence:" + served.attestation.request_hash)


def serve(
    net: Net,
    request_hash: bytes,
    *,
    payer: int = PAYER,
    gateway: Signer = GATEWAY_SIGNER,
    value: int = VALUE,
    paid: int | None = None,
    signer: Signer = MINER_SIGNER,
    tokens: tuple[int, ...] = (1, 2, 3),
) -> Served:
    """The miner answers `request_hash` with `tokens` and signs an Attestation with `signer`;
    the gateway signs a Receipt of `value` for it, for `payer`; a Voucher over the receipt
    collects `paid` more (default: `value`; 0 collects nothing) from the payer in the escrow.
    """
    miner = ADDRS[MINER]
    attestation = Attestation(
        request_hash=request_hash,
        response_hash=response_hash(tokens),
        model_id=OFFER.model_id,
        miner=miner,
        tokens_in=TOKENS_IN,
        tokens_out=TOKENS_OUT,
    )
    receipt = Receipt(
        request_hash=request_hash,
        payer=ADDRS[payer],
        miner=miner,
        gateway=gateway.address,
        model_id=attestation.model_id,
        tokens_in=TOKENS_IN,
        tokens_out=TOKENS_OUT,
        value=value,
        timestamp=net.chain.timestamp(),
        attestation_hash=attestation.struct_hash(),
    )
    paid = value if paid is None else paid
    if paid:
        triple = (receipt.payer, gateway.address, miner)
        net.billed[triple] = net.billed.get(triple, 0) + paid
        voucher = Voucher(
            receipt.payer,
            miner,
            gateway.address,
            net.billed[triple],
            receipt.timestamp,
            merkle_root([receipt.struct_hash()]),
        )
        net.escrow.collect(KEYS[MINER], voucher, sign_message(net.domain, voucher, gateway))
    return Served(
        attestation,
        sign_message(net.domain, attestation, signer),
        receipt,
        sign_message(net.domain, receipt, gateway),
    )


def open_dispute(
    net: Net, served: Served, *, challenger: int = CHALLENGER, evidence: bytes | None = None
) -> int:
    """`challenger` disputes `served` with the minimum deposit; returns the dispute id."""
    return net.disputes.open_dispute(
        KEYS[challenger],
        served.attestation,
        served.attestation_signature,
        served.receipt,
        served.receipt_signature,
        evidence_of(served) if evidence is None else evidence,
    )


# --- the honest paths -----------------------------------------------------------------------


def test_a_payer_pays_a_miner_through_the_escrow_and_withdraws_the_rest(
    chain: MeteredChain,
) -> None:
    """deploy_network wires the four contracts (the dispute manager is the registry's slasher,
    every message is signed in the escrow's domain); a voucher pays the miner once, less the
    fees; a replayed or forged one pays nothing; the payer withdraws what is left after the
    thaw period."""
    net = deploy(chain)
    assert net.registry.slasher() == net.contracts.DisputeManager
    assert net.domain == Domain(chain.chain_id, net.contracts.PaymentEscrow)
    assert net.disputes.domain_separator() == net.domain.separator

    miner_before = money(chain, ADDRS[MINER])
    serve(net, req(1))
    split = split_payment(VALUE, P.protocol_fee_ppm, P.verifier_pool_ppm)
    assert money(chain, ADDRS[MINER]) - miner_before == split.miner
    assert net.escrow.collected(ADDRS[PAYER], GATEWAY_SIGNER.address, ADDRS[MINER]) == VALUE
    assert net.escrow.account(ADDRS[PAYER]).balance_wei == PAYER_DEPOSIT - VALUE
    assert net.escrow.fees_owed(ADDRS[TREASURY]) == split.protocol + split.verifier_pool

    # A replayed voucher and a forged, richer one pay nothing.
    voucher = Voucher(
        ADDRS[PAYER], ADDRS[MINER], GATEWAY_SIGNER.address, VALUE, 1, merkle_root([req(1)])
    )
    with pytest.raises(ContractRevert, match="nothing to collect"):
        net.escrow.collect(KEYS[MINER], voucher, sign_message(net.domain, voucher, GATEWAY_SIGNER))
    richer = replace(voucher, value_aggregate=2 * VALUE)
    with pytest.raises(ContractRevert, match="signer is not the gateway"):
        net.escrow.collect(
            KEYS[MINER], richer, sign_message(net.domain, richer, Signer(KEYS[OTHER]))
        )
    assert net.escrow.account(ADDRS[PAYER]).balance_wei == PAYER_DEPOSIT - VALUE
    assert received(chain, ADDRS[TREASURY], lambda: net.escrow.claim_fees(KEYS[TREASURY])) == (
        split.protocol + split.verifier_pool
    )

    left = PAYER_DEPOSIT - VALUE
    net.escrow.thaw(KEYS[PAYER], left)
    with pytest.raises(ContractRevert, match="thaw not matured"):
        net.escrow.withdraw(KEYS[PAYER])
    chain.increase_time(P.thaw_period_s)
    assert received(chain, ADDRS[PAYER], lambda: net.escrow.withdraw(KEYS[PAYER])) == left
    assert net.escrow.account(ADDRS[PAYER]).balance_wei == 0


def test_an_equivocating_miner_is_slashed_at_once(chain: MeteredChain) -> None:
    """Two attestations of one request with different responses, both by the miner's key:
    equivocation_slash_ppm of its stake is taken without a vote, the reporter is credited its
    share and the treasury the rest, each claimed from the registry."""
    net = deploy(chain)
    a = serve(net, req(1), paid=0, tokens=(1, 2, 3))
    b = serve(net, req(1), paid=0, tokens=(1, 2, 4))
    slashed = net.disputes.slash_equivocation(
        KEYS[OTHER], a.attestation, a.attestation_signature, b.attestation, b.attestation_signature
    )
    assert slashed == MINER_STAKE * P.equivocation_slash_ppm // PPM
    to_reporter = slashed * P.challenger_share_ppm // PPM
    assert net.registry.total_stake_of(ADDRS[MINER]) == MINER_STAKE - slashed
    assert received(chain, ADDRS[OTHER], lambda: net.registry.claim(KEYS[OTHER])) == to_reporter
    assert received(chain, ADDRS[TREASURY], lambda: net.registry.claim(KEYS[TREASURY])) == (
        slashed - to_reporter
    )
    with pytest.raises(ContractRevert, match="already slashed"):
        net.disputes.slash_equivocation(
            KEYS[OTHER],
            a.attestation,
            a.attestation_signature,
            b.attestation,
            b.attestation_signature,
        )


def test_a_dispute_upheld_by_a_real_quorum_settles_every_wei(chain: MeteredChain) -> None:
    """A miner served a bad response the payer paid for. A challenger disputes it with the
    miner's attestation and the gateway's receipt; two verifiers registered min_verifier_age
    before the dispute uphold it. The miner loses max_slash_ppm of its stake: the payer gets
    back exactly min(receipt value, what the escrow collected), the challenger
    challenger_share_ppm of the rest and its deposit, the treasury the remainder. Both votes
    are settled (no slash: they won), voters and miner are unfrozen, and every credit is
    claimed: nothing stays behind in the dispute manager, and the registry keeps exactly the
    stakes."""
    net = deploy(chain)
    add_verifiers(net)
    registry, disputes = net.registry, net.disputes
    serve(net, req(0))  # an earlier, honest request: paid too
    bad = serve(net, req(1))
    collected = net.escrow.collected(ADDRS[PAYER], GATEWAY_SIGNER.address, ADDRS[MINER])
    assert collected == 2 * VALUE
    stakes_held = chain.balance(registry.address)

    dispute_id = open_dispute(net, bad)
    assert registry.is_frozen(ADDRS[MINER])
    for verifier in VERIFIER_STAKES:
        disputes.vote(KEYS[verifier], dispute_id, True)
    with pytest.raises(ContractRevert, match="voting not over"):
        disputes.resolve(KEYS[OTHER], dispute_id)
    chain.increase_time(P.voting_period_s)
    record = disputes.resolve(KEYS[OTHER], dispute_id)
    assert (record.status, record.votes_for_wei, record.votes_against_wei) == (
        "upheld",
        sum(VERIFIER_STAKES.values()),
        0,
    )

    refund = min(bad.receipt.value, collected)
    assert refund == VALUE
    to_challenger = (TARGET - refund) * P.challenger_share_ppm // PPM
    to_treasury = TARGET - refund - to_challenger
    assert registry.total_stake_of(ADDRS[MINER]) == MINER_STAKE - TARGET
    assert not registry.is_frozen(ADDRS[MINER])
    assert disputes.refunded(ADDRS[PAYER], GATEWAY_SIGNER.address, ADDRS[MINER]) == refund
    for verifier, stake in VERIFIER_STAKES.items():
        assert registry.is_frozen(ADDRS[verifier])  # until its vote is settled
        assert disputes.settle_vote(KEYS[OTHER], dispute_id, ADDRS[verifier]) == 0
        assert not registry.is_frozen(ADDRS[verifier])
        assert registry.total_stake_of(ADDRS[verifier]) == stake

    def claim(who: int, contract: Registry | DisputeManager) -> int:
        return received(chain, ADDRS[who], lambda: contract.claim(KEYS[who]))

    assert claim(PAYER, registry) == refund
    assert claim(CHALLENGER, registry) == to_challenger
    assert claim(TREASURY, registry) == to_treasury
    assert claim(CHALLENGER, disputes) == P.dispute_deposit_wei
    assert chain.balance(disputes.address) == 0
    assert chain.balance(registry.address) == stakes_held - TARGET
    for who, contract in ((PAYER, registry), (CHALLENGER, disputes), (TREASURY, registry)):
        with pytest.raises(ContractRevert, match="nothing to claim"):
            contract.claim(KEYS[who])
    # Free again: the miner may leave.
    registry.deregister(KEYS[MINER])


def test_epoch_rewards_are_proposed_finalized_and_claimed(chain: MeteredChain) -> None:
    """The treasury funds the pool; epoch 1's root is proposed with a bond, finalized once
    its challenge window has passed, and each account claims its leaf once (a relayer may
    pay the gas); the proposer's bond comes back. A gateway anchors its receipts' root."""
    net = deploy(chain)
    rewards = net.rewards
    rewards.fund(KEYS[TREASURY], 5 * WEI_PER_BTT)
    tree = reward_tree({ADDRS[MINER]: 2 * WEI_PER_BTT, ADDRS[V1]: WEI_PER_BTT})
    rewards.propose_tree(KEYS[DEPLOYER], 1, tree)
    assert rewards.next_epoch() == 2
    with pytest.raises(ContractRevert, match="challenge window open"):
        rewards.finalize(KEYS[OTHER], 1)
    chain.increase_time(P.challenge_window_s)
    rewards.finalize(KEYS[OTHER], 1)
    assert rewards.epoch(1).status == "finalized"

    paid = received(
        chain, ADDRS[V1], lambda: rewards.claim_from_tree(KEYS[OTHER], 1, tree, ADDRS[V1])
    )
    assert paid == WEI_PER_BTT
    assert received(chain, ADDRS[MINER], lambda: rewards.claim_from_tree(KEYS[MINER], 1, tree)) == (
        2 * WEI_PER_BTT
    )
    assert rewards.is_claimed(1, ADDRS[V1]) and rewards.is_claimed(1, ADDRS[MINER])
    with pytest.raises(ContractRevert, match="already claimed"):
        rewards.claim_from_tree(KEYS[OTHER], 1, tree, ADDRS[V1])
    bond = P.proposer_bond_wei
    assert received(chain, ADDRS[DEPLOYER], lambda: rewards.withdraw_credit(KEYS[DEPLOYER])) == bond
    assert rewards.unallocated_wei() == 5 * WEI_PER_BTT - tree.total

    root = merkle_root([req(n) for n in range(5)])
    anchor = rewards.anchor(KEYS[GATEWAY], root, 5)
    assert rewards.get_anchor(ADDRS[GATEWAY], anchor.index).root == root


def test_deploy_refuses_unbonding_shorter_than_what_it_must_cover() -> None:
    params: SettlementParams = replace(DEVNET_PARAMS, unbonding_delay_s=DEVNET_PARAMS.epoch_s)
    chain = Chain.embedded(EmbeddedEVM(accounts=2))
    with pytest.raises(ValueError, match="unbonding delay"):
        deploy_network(chain, dev_private_keys(1)[0], params)
