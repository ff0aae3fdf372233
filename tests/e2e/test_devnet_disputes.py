"""End to end: on a running devnet, the honest paths of settlement after issue 8's hardening.

A developer's request is served and paid; a challenger disputes it with the evidence the
gateway serves (GET /v1/receipts/{id}), two verifiers registered long enough before uphold
it, and every party is paid exactly what the DisputeManager promises: the payer its refund
(bounded by the receipt and by what the escrow collected), the challenger its share and its
deposit, and miner and verifiers are unfrozen. Then an epoch of rewards is funded, proposed,
finalized and claimed; and the gateway, having seen the dispute upheld, stops routing to the
slashed miner. Everything talks to the devnet as a user
would: the openai client, the `infergrid` CLI, and the chain's JSON-RPC."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator

import openai
import pytest
from eth_utils import keccak
from web3.types import TxReceipt

from infergrid.compute.model_store import served_model_name
from infergrid.devnet import DEPLOYER_INDEX, DEVELOPER_KEY_INDEX, FIRST_MINER_KEY_INDEX
from infergrid.protocol.nodes import WEI_PER_BTT, Role
from infergrid.receipt_proof import fetch_receipt
from infergrid.settle.chain import Chain, ContractRevert, as_account, dev_private_keys
from infergrid.settle.disputes import PPM, DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.evidence import DisputeEvidence
from infergrid.settle.registry import Registry
from infergrid.settle.rewards import RewardDistributor, reward_tree

from .devnet_process import DevnetProcess

pytestmark = pytest.mark.slow

MODEL = served_model_name("tiny")
QUESTION = [{"role": "user", "content": "Hello"}]
# The devnet's keys (devnet.py), then spare dev keys no devnet node uses: two verifiers and a
# challenger, funded by the deployer.
_KEYS = dev_private_keys(DEVELOPER_KEY_INDEX + 4)
DEPLOYER_KEY = _KEYS[DEPLOYER_INDEX]  # also the treasury, and here the reward proposer
MINER_KEY = _KEYS[FIRST_MINER_KEY_INDEX]
VERIFIER_KEYS = _KEYS[DEVELOPER_KEY_INDEX + 1 : DEVELOPER_KEY_INDEX + 3]
CHALLENGER_KEY = _KEYS[DEVELOPER_KEY_INDEX + 3]
MINER, DEPLOYER, CHALLENGER = (
    as_account(k).address for k in (MINER_KEY, DEPLOYER_KEY, CHALLENGER_KEY)
)
VERIFIERS = [as_account(k).address for k in VERIFIER_KEYS]
SPARE_FUNDS_WEI = 100 * WEI_PER_BTT
VERIFIER_ENDPOINT = "http://127.0.0.1:9/verifier"  # nothing calls it in this test
# Propagation through the gateway's registry reads (every 2 s on a devnet) and a health check.
GATEWAY_CATCH_UP_S = 60


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevnetProcess]:
    # One miner, so the dispute's freeze is visible at the gateway; collection only when told.
    net = DevnetProcess(
        tmp_path_factory.mktemp("devnet"),
        "--miners", "1", "--model", "tiny", "--collect-interval", "0", "--verifiers", "0",
    )  # fmt: skip
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


@pytest.fixture(scope="module")
def chain(devnet: DevnetProcess) -> Chain:
    return Chain.connect(devnet.info["chain_rpc"])


@pytest.fixture(scope="module")
def registry(devnet: DevnetProcess, chain: Chain) -> Registry:
    return Registry(chain, devnet.info["contracts"]["NodeRegistry"])


@pytest.fixture(scope="module")
def funded(chain: Chain) -> None:
    """The verifiers and the challenger get gas and stake money from the deployer."""
    for address in (*VERIFIERS, CHALLENGER):
        chain.transfer(DEPLOYER_KEY, address, SPARE_FUNDS_WEI)


def received(chain: Chain, address: str, send: Callable[[], TxReceipt]) -> int:
    """What `address` received from the transaction `send` makes, its own gas added back
    (zero gas when someone else sent it)."""
    before = chain.balance(address)
    receipt = send()
    sender = receipt["from"]
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"] if sender == address else 0
    return chain.balance(address) - before + fee


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for the gateway to catch up with the chain (it reads the registry periodically)."""
    deadline = time.monotonic() + GATEWAY_CATCH_UP_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {GATEWAY_CATCH_UP_S} s")
        time.sleep(0.2)


def served_models(client: openai.OpenAI) -> list[str]:
    return [model.id for model in client.models.list().data]


def test_a_served_request_is_disputed_by_a_quorum_and_everyone_is_paid_exactly(
    devnet: DevnetProcess, client: openai.OpenAI, chain: Chain, registry: Registry, funded: None
) -> None:
    info = devnet.info
    payer, gateway = info["developer"], info["gateway_signer"]
    escrow = PaymentEscrow(chain, info["contracts"]["PaymentEscrow"])
    dm = DisputeManager(chain, info["contracts"]["DisputeManager"])

    # A developer's request, served and paid: the miner collects its voucher (CLI).
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=4
    )
    usage = raw.parse().usage
    assert usage is not None
    cost = int(usage.model_extra["cost_wei"])
    request_id = raw.headers["x-request-id"]
    collected = devnet.cli("miner", "collect", "--json", key=MINER_KEY)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    paid = escrow.collected(payer, gateway, MINER)
    assert paid >= cost > 0

    # The evidence, as the gateway serves it to the key that made the request, checks out
    # off-chain exactly as the contract will check it.
    answer = fetch_receipt(info["base_url"], info["api_key"], request_id)
    evidence = DisputeEvidence.from_receipt_json(answer)
    assert evidence.check(dm.domain(), was_signer=registry.was_signer) == registry.signer_of(MINER)
    receipt = evidence.receipt
    assert (receipt.payer, receipt.gateway, receipt.miner, receipt.value) == (
        payer,
        gateway,
        MINER,
        cost,
    )

    # Two verifiers join over JSON-RPC, each its own signer, and age past min_verifier_age.
    verifier_stake = registry.min_stake(Role.VERIFIER)
    assert 2 * verifier_stake >= dm.min_quorum_stake()
    for key, address in zip(VERIFIER_KEYS, VERIFIERS, strict=True):
        registry.register(key, Role.VERIFIER, VERIFIER_ENDPOINT, address, [], verifier_stake)
    chain.increase_time(dm.min_verifier_age())

    # The dispute freezes the miner, and the gateway stops routing to it.
    deposit = dm.dispute_deposit()
    dispute_id = dm.open_dispute(
        CHALLENGER_KEY,
        evidence.attestation,
        evidence.attestation_signature,
        evidence.receipt,
        evidence.receipt_signature,
        keccak(b"audit of " + request_id.encode()),
    )
    assert registry.is_frozen(MINER)
    wait_until(lambda: served_models(client) == [], "the gateway still routes to a frozen miner")

    for key in VERIFIER_KEYS:
        dm.vote(key, dispute_id, True)
    assert all(registry.is_frozen(v) for v in VERIFIERS)
    with pytest.raises(ContractRevert, match="voting not over"):
        dm.resolve(CHALLENGER_KEY, dispute_id)
    chain.increase_time(dm.voting_period())

    stake_before = registry.total_stake_of(MINER)
    credits_before = {a: registry.credits(a) for a in (payer, CHALLENGER, DEPLOYER)}
    record = dm.resolve(CHALLENGER_KEY, dispute_id)
    assert record.status == "upheld"
    assert (record.votes_for_wei, record.votes_against_wei) == (2 * verifier_stake, 0)
    for voter in VERIFIERS:
        assert dm.settle_vote(CHALLENGER_KEY, dispute_id, voter) == 0  # on the winning side

    # Exactly the contract's split of max_slash_ppm of the miner's stake.
    target = stake_before * dm.max_slash_ppm() // PPM
    refund = min(receipt.value, paid)
    to_challenger = (target - refund) * dm.challenger_share_ppm() // PPM
    credited = {a: registry.credits(a) - credits_before[a] for a in credits_before}
    assert credited == {
        payer: refund,
        CHALLENGER: to_challenger,
        DEPLOYER: target - refund - to_challenger,  # the treasury
    }
    assert registry.total_stake_of(MINER) == stake_before - target
    assert dm.refunded(payer, gateway, MINER) == refund
    assert not registry.is_frozen(MINER)
    assert not any(registry.is_frozen(v) for v in VERIFIERS)
    assert dm.open_on_miner(MINER) == dm.open_by_challenger(CHALLENGER) == 0

    # Each claims what it was credited.
    developer_key = info["developer_key"]
    assert received(chain, payer, lambda: registry.claim(developer_key)) == refund
    assert received(chain, CHALLENGER, lambda: registry.claim(CHALLENGER_KEY)) == to_challenger
    assert received(chain, CHALLENGER, lambda: dm.claim(CHALLENGER_KEY)) == deposit
    assert registry.credits(payer) == registry.credits(CHALLENGER) == dm.credits(CHALLENGER) == 0
    # The same request cannot be disputed again, whatever the outcome.
    with pytest.raises(ContractRevert, match="evidence already disputed"):
        dm.open_dispute(
            CHALLENGER_KEY,
            evidence.attestation,
            evidence.attestation_signature,
            evidence.receipt,
            evidence.receipt_signature,
            keccak(b"audit of " + request_id.encode()),
        )


def test_an_epoch_of_rewards_is_funded_proposed_finalized_and_claimed(
    devnet: DevnetProcess, chain: Chain, funded: None
) -> None:
    rewards = RewardDistributor(chain, devnet.info["contracts"]["RewardDistributor"])
    tree = reward_tree({VERIFIERS[0]: 3 * WEI_PER_BTT, VERIFIERS[1]: 2 * WEI_PER_BTT})
    rewards.fund(DEPLOYER_KEY, tree.total)  # the treasury funds the pool
    assert rewards.next_epoch() == 1
    bond = rewards.proposer_bond()
    rewards.propose_tree(DEPLOYER_KEY, 1, tree)
    with pytest.raises(ContractRevert, match="challenge window open"):
        rewards.finalize(CHALLENGER_KEY, 1)
    chain.increase_time(rewards.challenge_window())
    rewards.finalize(CHALLENGER_KEY, 1)  # anyone may
    assert rewards.epoch(1).status == "finalized"

    # Anyone may submit a claim; the reward goes to its account, whole.
    for verifier in VERIFIERS:
        paid = received(
            chain,
            verifier,
            lambda v=verifier: rewards.claim_from_tree(CHALLENGER_KEY, 1, tree, v),
        )
        assert paid == tree.amount_of(verifier)
        assert rewards.is_claimed(1, verifier)
    with pytest.raises(ContractRevert, match="already claimed"):
        rewards.claim_from_tree(CHALLENGER_KEY, 1, tree, VERIFIERS[0])
    # The proposer's bond came back as a credit.
    assert received(chain, DEPLOYER, lambda: rewards.withdraw_credit(DEPLOYER_KEY)) == bond


def test_the_gateway_stops_routing_to_a_miner_slashed_for_its_receipt(
    devnet: DevnetProcess, client: openai.OpenAI, registry: Registry
) -> None:
    """Runs last in this module, after the dispute about one of this gateway's receipts
    slashed and unfroze the devnet's miner. The miner keeps its remaining stake (it may
    withdraw it), but the gateway that saw the dispute upheld shows it `slashed` and sends it
    no more requests: refused with 503 and a readable error, not served by a proven cheat."""
    assert registry.total_stake_of(MINER) >= registry.min_stake(Role.MINER)
    assert not registry.is_frozen(MINER)

    def state() -> str | None:
        request = urllib.request.Request(
            devnet.info["base_url"] + "/miners",
            headers={"authorization": f"Bearer {devnet.info['api_key']}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            listed = json.loads(response.read())["data"]
        return next((m["state"] for m in listed if m["address"] == MINER), None)

    def listed() -> bool:  # the gateway re-read the registry since the miner was unfrozen
        return MODEL in {model.id for model in client.models.list()}

    wait_until(lambda: state() == "slashed", "the gateway does not show the miner slashed")
    wait_until(listed, "the gateway does not route to the unfrozen miner's model again")
    with pytest.raises(openai.InternalServerError, match="No miner serving"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
