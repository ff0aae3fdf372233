"""RewardDistributor on the embedded EVM: reward trees, proposals, challenges, claims, anchors,
and the audit's attacks (issue 8): self-challenges, arbiter shortcuts, epochs out of order,
sudden arbiter changes, a zero window, one-step admin transfers."""

from __future__ import annotations

from typing import Any

import pytest
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.protocol.merkle import merkle_proof, merkle_root, reward_leaf, verify_proof
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractRevert
from infergrid.settle.rewards import (
    MAX_ANCHOR_COUNT,
    MAX_ARBITER_DELAY_S,
    MAX_CHALLENGE_WINDOW_S,
    AnchorRecord,
    EpochRecord,
    RewardDistributor,
    RewardTree,
    deploy_rewards,
    forfeited_split,
    reward_tree,
)

BOND = WEI_PER_BTT + 1  # odd, so the split of a forfeited bond has to round
WINDOW = 3600
DELAY = 2 * WINDOW  # the arbiter timelock
# The treasury funds the pool and receives half of each forfeited bond.
ADMIN, ARBITER, TREASURY = 0, 9, 8  # indexes into the dev keys
ZERO_ADDRESS = "0x" + "00" * 20
ZERO32 = b"\x00" * 32
# A forfeited bond: the winner's half (which gets the odd wei) and the treasury's.
WINNER_HALF, TREASURY_HALF = forfeited_split(BOND)


# --- helpers and fixtures -------------------------------------------------------------------


def deploy(
    chain: Chain, keys: list[str], addrs: list[str], window: int = WINDOW, delay: int = DELAY
) -> RewardDistributor:
    address = deploy_rewards(
        chain,
        keys[ADMIN],
        arbiter=addrs[ARBITER],
        treasury=addrs[TREASURY],
        proposer_bond_wei=BOND,
        challenge_window_s=window,
        arbiter_delay_s=delay,
    )
    return RewardDistributor(chain, address)


@pytest.fixture
def rewards(chain: Chain, keys: list[str], addrs: list[str]) -> RewardDistributor:
    return deploy(chain, keys, addrs)


@pytest.fixture(scope="module")
def shared_rewards(chain: Chain, keys: list[str], addrs: list[str]) -> RewardDistributor:
    """One deployment for tests that only read (the property test runs many examples)."""
    return deploy(chain, keys, addrs)


def fee(receipt: Any) -> int:
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def block_time(chain: Chain, receipt: Any) -> int:
    return int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def next_block_at(chain: Chain, timestamp: int) -> None:
    """Make the next transaction's block carry `timestamp`: the embedded EVM mines each
    transaction in the pending block, whose time a time travel sets."""
    pending = pending_time(chain)
    assert timestamp >= pending, "cannot go back in time"
    if timestamp > pending:
        chain.increase_time(timestamp - pending)


def event_names(rewards: RewardDistributor, receipt: Any) -> list[str]:
    return [e.name for e in rewards.events(receipt)]


def pending_time(chain: Chain) -> int:
    """The timestamp the next transaction's block will carry."""
    assert chain.evm is not None
    return int(chain.evm.tester.get_block_by_number("pending")["timestamp"])


def check_books(rewards: RewardDistributor, chain: Chain) -> None:
    """The contract's accounting invariant: every wei it holds is a bond, owed to an epoch's
    claimants, or free for new proposals."""
    outstanding = rewards.allocated_wei() - rewards.total_claimed_wei()
    assert outstanding >= 0
    assert chain.balance(rewards.address) == (
        rewards.bonds_held_wei() + outstanding + rewards.unallocated_wei()
    )


def finalized_epoch(
    rewards: RewardDistributor,
    chain: Chain,
    keys: list[str],
    epoch: int,
    tree: RewardTree,
    proposer: int = 6,
) -> None:
    rewards.propose_tree(keys[proposer], epoch, tree)
    chain.increase_time(WINDOW)
    rewards.finalize(keys[proposer], epoch)


# --- deployment -----------------------------------------------------------------------------


def test_deploy_sets_parameters(rewards: RewardDistributor, chain: Chain, addrs: list[str]) -> None:
    assert rewards.proposer_bond() == BOND
    assert rewards.challenge_window() == WINDOW
    assert rewards.arbiter_delay() == DELAY
    assert rewards.treasury() == addrs[TREASURY]
    assert rewards.admin() == addrs[ADMIN]
    assert rewards.pending_admin() == ZERO_ADDRESS
    assert rewards.arbiter() == addrs[ARBITER]
    assert rewards.pending_arbiter() == ZERO_ADDRESS
    assert rewards.arbiter_ready_at() == 0
    assert rewards.next_epoch() == 1
    assert rewards.total_funded_wei() == 0
    assert rewards.allocated_wei() == rewards.total_claimed_wei() == 0
    assert rewards.bonds_held_wei() == rewards.unallocated_wei() == 0
    assert rewards.epoch(0) == EpochRecord(0, "none", ZERO32, 0, 0, ZERO_ADDRESS, ZERO_ADDRESS, 0)
    assert rewards.anchor_count(addrs[1]) == 0
    assert chain.balance(rewards.address) == 0


ONE, TWO = "0x" + "11" * 20, "0x" + "22" * 20


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((ZERO_ADDRESS, TWO, BOND, WINDOW, DELAY), "zero arbiter"),
        ((ONE, ZERO_ADDRESS, BOND, WINDOW, DELAY), "zero treasury"),
        ((ONE, TWO, 0, WINDOW, DELAY), "bond must be positive"),
        ((ONE, TWO, BOND, 0, DELAY), "zero challenge window"),
        ((ONE, TWO, BOND, 30 * 86400 + 1, 31 * 86400), "challenge window too long"),
        ((ONE, TWO, BOND, WINDOW, WINDOW), "arbiter delay must outlast the challenge window"),
        ((ONE, TWO, BOND, WINDOW, 1), "arbiter delay must outlast the challenge window"),
        ((ONE, TWO, BOND, WINDOW, 365 * 86400 + 1), "timelock: delay too long"),
    ],
)
def test_constructor_rejects_bad_parameters(
    chain: Chain, keys: list[str], args: tuple[Any, ...], reason: str
) -> None:
    artifact = load_artifact("RewardDistributor")
    with pytest.raises(ContractRevert) as exc:
        chain.deploy(keys[0], artifact.abi, artifact.bytecode, *args)
    assert exc.value.reason == reason


def test_window_and_delay_bounds_are_allowed(
    chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    longest = deploy(chain, keys, addrs, MAX_CHALLENGE_WINDOW_S, MAX_CHALLENGE_WINDOW_S + 1)
    assert longest.challenge_window() == 30 * 86400
    assert longest.arbiter_delay() == 30 * 86400 + 1
    shortest = deploy(chain, keys, addrs, 1, 2)
    assert (shortest.challenge_window(), shortest.arbiter_delay()) == (1, 2)
    assert deploy(chain, keys, addrs, WINDOW, MAX_ARBITER_DELAY_S).arbiter_delay() == 365 * 86400


def test_zero_challenge_window_is_refused(chain: Chain, keys: list[str], addrs: list[str]) -> None:
    """Attack: with a zero window no one can ever challenge, so any root, however bad, is
    final at once. The constructor (and deploy_rewards) refuse it."""
    artifact = load_artifact("RewardDistributor")
    with pytest.raises(ContractRevert) as exc:
        chain.deploy(
            keys[ADMIN],
            artifact.abi,
            artifact.bytecode,
            addrs[ARBITER],
            addrs[TREASURY],
            BOND,
            0,
            1,
        )
    assert exc.value.reason == "zero challenge window"
    with pytest.raises(ValueError, match="challenge window must be a positive int"):
        deploy(chain, keys, addrs, window=0, delay=1)


def test_deploy_rewards_validates_in_python(
    chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    def attempt(**overrides: Any) -> None:
        kwargs: dict[str, Any] = dict(
            arbiter=addrs[9],
            treasury=addrs[8],
            proposer_bond_wei=BOND,
            challenge_window_s=WINDOW,
            arbiter_delay_s=DELAY,
        )
        kwargs.update(overrides)
        deploy_rewards(chain, keys[0], **kwargs)

    with pytest.raises(ValueError, match="arbiter"):
        attempt(arbiter="0x1234")
    with pytest.raises(ValueError, match="arbiter must not be the zero address"):
        attempt(arbiter=ZERO_ADDRESS)
    with pytest.raises(ValueError, match="treasury"):
        attempt(treasury="0x1234")
    with pytest.raises(ValueError, match="treasury must not be the zero address"):
        attempt(treasury=ZERO_ADDRESS)
    with pytest.raises(ValueError, match="positive"):
        attempt(proposer_bond_wei=0)
    with pytest.raises(ValueError, match="out of range"):
        attempt(proposer_bond_wei=-1)
    with pytest.raises(ValueError, match="positive int"):
        attempt(challenge_window_s=-1)
    with pytest.raises(ValueError, match="positive int"):
        attempt(challenge_window_s=True)
    with pytest.raises(ValueError, match="challenge window"):
        attempt(challenge_window_s=MAX_CHALLENGE_WINDOW_S + 1, arbiter_delay_s=DELAY * 1000)
    with pytest.raises(ValueError, match="int of seconds"):
        attempt(arbiter_delay_s=7200.0)
    with pytest.raises(ValueError, match="must outlast the challenge window"):
        attempt(arbiter_delay_s=WINDOW)
    with pytest.raises(ValueError, match="arbiter delay is over"):
        attempt(arbiter_delay_s=MAX_ARBITER_DELAY_S + 1)
    with pytest.raises(ValueError, match="address"):
        RewardDistributor(chain, "0xnope")


# --- the reward tree (pure) -----------------------------------------------------------------


def test_reward_tree_is_deterministic_and_matches_protocol_merkle(addrs: list[str]) -> None:
    allocations = {addrs[3]: 30, addrs[1]: 10, addrs[2]: 20}
    tree = reward_tree(allocations)
    # Insertion order and address case do not matter.
    shuffled = {addrs[2].lower(): 20, addrs[3].upper().replace("0X", "0x"): 30, addrs[1]: 10}
    assert reward_tree(shuffled) == tree
    ordered = sorted(allocations, key=lambda a: int(a, 16))
    assert tree.accounts == ordered
    assert tree.allocations == tuple((a, allocations[a]) for a in ordered)
    assert tree.leaves == tuple(reward_leaf(a, allocations[a]) for a in ordered)
    assert tree.root == merkle_root(list(tree.leaves))
    assert tree.total == 60
    for account, amount in allocations.items():
        assert tree.amount_of(account.lower()) == amount
        assert verify_proof(reward_leaf(account, amount), tree.proof_for(account), tree.root)
        assert not verify_proof(
            reward_leaf(account, amount + 1), tree.proof_for(account), tree.root
        )


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 257])
def test_reward_tree_proofs_match_protocol_merkle(n: int) -> None:
    tree = reward_tree({f"0x{i + 1:040x}": i + 1 for i in range(n)})
    for i, account in enumerate(tree.accounts):
        proof = tree.proof_for(account)
        assert proof == merkle_proof(list(tree.leaves), i)
        assert verify_proof(tree.leaves[i], proof, tree.root)


def test_reward_tree_of_one_account_is_its_leaf(addrs: list[str]) -> None:
    tree = reward_tree({addrs[1]: 5})
    assert (
        tree.root
        == reward_leaf(addrs[1], 5)
        == keccak(keccak(bytes(12) + bytes.fromhex(addrs[1][2:]) + (5).to_bytes(32, "big")))
    )
    assert tree.proof_for(addrs[1]) == []


@pytest.mark.parametrize(
    ("allocations", "message"),
    [
        ({}, "no allocations"),
        ({"0x1234": 1}, "not an address"),
        ({ZERO_ADDRESS: 1}, "zero address"),
        ({"0x" + "11" * 20: 0}, "not a positive"),
        ({"0x" + "11" * 20: -5}, "not a positive"),
        ({"0x" + "11" * 20: 2**256}, "not a positive"),
        ({"0x" + "11" * 20: True}, "int amount"),
        ({"0x" + "11" * 20: 1.5}, "int amount"),
        ({"0x" + "ab" * 20: 1, "0x" + "AB" * 20: 2}, "listed twice"),
        ({"0x" + "11" * 20: 2**255, "0x" + "22" * 20: 2**255}, "more than a uint256"),
    ],
)
def test_reward_tree_rejects_bad_allocations(allocations: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reward_tree(allocations)


def test_proof_for_an_unknown_account(addrs: list[str]) -> None:
    tree = reward_tree({addrs[1]: 5})
    with pytest.raises(KeyError):
        tree.proof_for(addrs[2])
    with pytest.raises(ValueError):
        tree.proof_for("nope")


# --- funding --------------------------------------------------------------------------------


def test_fund_adds_to_the_pool(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    receipt = rewards.fund(keys[TREASURY], 3 * WEI_PER_BTT)
    (event,) = rewards.events(receipt)
    assert (event.name, event.args) == (
        "Funded",
        {"funder": addrs[TREASURY], "amount": 3 * WEI_PER_BTT},
    )
    rewards.fund(keys[1], 5)  # anyone may fund
    assert rewards.total_funded_wei() == 3 * WEI_PER_BTT + 5
    assert rewards.unallocated_wei() == 3 * WEI_PER_BTT + 5
    assert chain.balance(rewards.address) == 3 * WEI_PER_BTT + 5
    with pytest.raises(ContractRevert, match="zero amount"):
        rewards.fund(keys[1], 0)
    # Plain transfers are refused: funds come in through fund(), where they are counted.
    with pytest.raises(ContractRevert):
        chain.transact(keys[1], rewards.address, b"", value=1)
    check_books(rewards, chain)


# --- the happy path -------------------------------------------------------------------------


def test_fund_propose_finalize_and_every_account_claims_exactly(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 10 * WEI_PER_BTT)
    allocations = {addrs[i]: i * WEI_PER_BTT // 7 + i for i in range(1, 6)}
    tree = reward_tree(allocations)
    proposer = 6

    receipt = rewards.propose_tree(keys[proposer], 1, tree)
    proposed_at = block_time(chain, receipt)
    (event,) = rewards.events(receipt)
    assert (event.name, event.args) == (
        "RootProposed",
        {"epoch": 1, "proposer": addrs[proposer], "root": tree.root, "total": tree.total},
    )
    assert rewards.epoch(1) == EpochRecord(
        1, "proposed", tree.root, tree.total, 0, addrs[proposer], ZERO_ADDRESS, proposed_at
    )
    # The total is reserved at once and the bond is held apart from reward funds.
    assert rewards.unallocated_wei() == 10 * WEI_PER_BTT - tree.total
    assert rewards.bonds_held_wei() == BOND
    check_books(rewards, chain)

    with pytest.raises(ContractRevert, match="epoch not finalized"):
        rewards.claim_from_tree(keys[1], 1, tree)
    chain.increase_time(WINDOW)
    receipt = rewards.finalize(keys[7], 1)  # anyone may finalize
    assert event_names(rewards, receipt) == ["RootFinalized", "Credited"]
    assert rewards.events(receipt)[1].args == {
        "recipient": addrs[proposer],
        "epoch": 1,
        "amount": BOND,
    }
    assert rewards.epoch(1).status == "finalized"
    assert rewards.credits(addrs[proposer]) == BOND

    # Accounts 1-4 claim for themselves and pay the gas; a relayer claims for account 5.
    for i in range(1, 6):
        account = addrs[i]
        amount = allocations[account]
        assert not rewards.is_claimed(1, account)
        assert rewards.verify(tree.root, account, amount, tree.proof_for(account))
        before, relayer_before = chain.balance(account), chain.balance(addrs[8])
        sender = 8 if i == 5 else i
        receipt = rewards.claim(keys[sender], 1, account, amount, tree.proof_for(account))
        (event,) = rewards.events(receipt)
        assert (event.name, event.args) == (
            "RewardClaimed",
            {"epoch": 1, "account": account, "amount": amount},
        )
        if sender == i:
            assert chain.balance(account) == before + amount - fee(receipt)
        else:
            assert chain.balance(account) == before + amount
            assert chain.balance(addrs[8]) == relayer_before - fee(receipt)
        assert rewards.is_claimed(1, account)
        check_books(rewards, chain)

    record = rewards.epoch(1)
    assert record.claimed_wei == record.total_wei == tree.total
    assert rewards.total_claimed_wei() == tree.total
    assert chain.balance(rewards.address) == 10 * WEI_PER_BTT - tree.total + BOND

    # The proposer pulls its bond back; nothing is left but unallocated funds.
    before = chain.balance(addrs[proposer])
    receipt = rewards.withdraw_credit(keys[proposer])
    assert rewards.events(receipt)[0].args == {"recipient": addrs[proposer], "amount": BOND}
    assert chain.balance(addrs[proposer]) == before + BOND - fee(receipt)
    assert rewards.credits(addrs[proposer]) == 0
    assert rewards.bonds_held_wei() == 0
    assert (
        chain.balance(rewards.address) == rewards.unallocated_wei() == 10 * WEI_PER_BTT - tree.total
    )
    with pytest.raises(ContractRevert, match="nothing to withdraw"):
        rewards.withdraw_credit(keys[proposer])
    check_books(rewards, chain)


def test_claim_refusals(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], WEI_PER_BTT)
    tree = reward_tree({addrs[1]: 100, addrs[2]: 200, addrs[3]: 300})
    other = reward_tree({addrs[1]: 111, addrs[4]: 400})
    finalized_epoch(rewards, chain, keys, 1, tree)
    finalized_epoch(rewards, chain, keys, 2, other)
    proof = tree.proof_for(addrs[1])

    def refused(epoch: int, account: str, amount: int, nodes: list[bytes], reason: str) -> None:
        with pytest.raises(ContractRevert) as exc:
            rewards.claim(keys[5], epoch, account, amount, nodes)
        assert exc.value.reason == reason

    refused(1, addrs[1], 101, proof, "bad proof")  # wrong amount
    refused(1, addrs[1], 100, tree.proof_for(addrs[2]), "bad proof")  # someone else's proof
    refused(1, addrs[1], 100, proof[:-1], "bad proof")  # truncated
    refused(1, addrs[1], 100, [*proof, proof[0]], "bad proof")  # padded
    refused(1, addrs[4], 100, proof, "bad proof")  # someone else's leaf
    refused(2, addrs[1], 100, proof, "bad proof")  # another epoch's root
    refused(3, addrs[1], 100, proof, "epoch not finalized")  # an epoch never proposed
    refused(1, addrs[1], 0, proof, "zero amount")
    refused(1, ZERO_ADDRESS, 100, proof, "zero account")

    rewards.claim(keys[5], 1, addrs[1], 100, proof)
    refused(1, addrs[1], 100, proof, "already claimed")
    # The same account's reward in the other epoch is its own claim.
    rewards.claim_from_tree(keys[1], 2, other)
    assert rewards.is_claimed(2, addrs[1]) and not rewards.is_claimed(2, addrs[4])
    with pytest.raises(ValueError, match="longer than 32"):
        rewards.claim(keys[5], 1, addrs[2], 200, [ZERO32] * 33)
    check_books(rewards, chain)


def test_a_root_promising_more_than_its_total_never_pays_the_surplus(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 1000)
    tree = reward_tree({addrs[1]: 60, addrs[2]: 50})
    rewards.propose(keys[6], 1, tree.root, 100)  # the leaves add up to 110
    chain.increase_time(WINDOW)
    rewards.finalize(keys[6], 1)
    rewards.claim_from_tree(keys[1], 1, tree)
    with pytest.raises(ContractRevert, match="exceeds epoch total"):
        rewards.claim_from_tree(keys[2], 1, tree)
    assert not rewards.is_claimed(1, addrs[2])
    assert rewards.epoch(1).claimed_wei == 60
    assert rewards.unallocated_wei() == 900
    check_books(rewards, chain)


# --- proposals ------------------------------------------------------------------------------


def test_propose_refusals_and_reservations(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    root = reward_tree({addrs[1]: 1}).root
    with pytest.raises(ContractRevert, match="insufficient funds"):
        rewards.propose(keys[6], 1, root, 1)  # nothing funded yet
    rewards.fund(keys[TREASURY], 1000)

    for bond in (0, BOND - 1, BOND + 1):
        with pytest.raises(ContractRevert) as exc:
            chain.send(keys[6], rewards.contract, "propose", 1, root, 10, value=bond)
        assert exc.value.reason == "wrong bond"
    with pytest.raises(ContractRevert, match="zero root"):
        rewards.propose(keys[6], 1, ZERO32, 10)
    with pytest.raises(ContractRevert, match="zero total"):
        rewards.propose(keys[6], 1, root, 0)
    # Bonds held by the contract never count as reward funds.
    with pytest.raises(ContractRevert, match="insufficient funds"):
        rewards.propose(keys[6], 1, root, 1001)

    rewards.propose(keys[6], 1, root, 600)
    assert rewards.unallocated_wei() == 400
    with pytest.raises(ContractRevert, match="epoch already proposed"):
        rewards.propose(keys[7], 1, root, 1)
    # Reserved funds cannot back a second epoch: only the 400 left can.
    with pytest.raises(ContractRevert, match="insufficient funds"):
        rewards.propose(keys[7], 2, root, 401)
    rewards.propose(keys[7], 2, root, 400)
    assert rewards.unallocated_wei() == 0
    assert rewards.allocated_wei() == 1000
    assert rewards.bonds_held_wei() == 2 * BOND

    chain.increase_time(WINDOW)
    rewards.finalize(keys[6], 1)
    with pytest.raises(ContractRevert, match="epoch already proposed"):
        rewards.propose(keys[7], 1, root, 1)  # finalized epochs stay final
    check_books(rewards, chain)


def test_epochs_out_of_order_are_refused(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack: a root proposed for an epoch far ahead (or past a gap, or for epoch 0) reserves
    funds for an epoch no one watches, so its window can pass unchallenged. Now epochs are
    proposed in order from 1: next_epoch, or an earlier epoch whose proposal was erased."""
    rewards.fund(keys[TREASURY], 1000)
    root = reward_tree({addrs[1]: 10}).root

    def refused(epoch: int, reason: str) -> None:
        with pytest.raises(ContractRevert) as exc:
            chain.send(keys[6], rewards.contract, "propose", epoch, root, 10, value=BOND)
        assert exc.value.reason == reason

    assert rewards.next_epoch() == 1
    refused(0, "epoch out of order")
    refused(2, "epoch out of order")
    refused(2**256 - 1, "epoch out of order")
    rewards.propose(keys[6], 1, root, 10)
    assert rewards.next_epoch() == 2
    refused(1, "epoch already proposed")
    refused(3, "epoch out of order")
    rewards.propose(keys[6], 2, root, 10)
    assert rewards.next_epoch() == 3

    # Epoch 1 ruled invalid is erased: it may be proposed again, and next_epoch stays.
    rewards.challenge(keys[7], 1)
    rewards.resolve_challenge(keys[ARBITER], 1, False)
    assert rewards.epoch(1).status == "none"
    assert rewards.next_epoch() == 3
    refused(4, "epoch out of order")
    rewards.propose(keys[5], 1, root, 10)
    assert rewards.epoch(1).proposer == addrs[5]
    assert rewards.next_epoch() == 3
    refused(1, "epoch already proposed")
    assert rewards.allocated_wei() == 20
    check_books(rewards, chain)


def test_python_client_validates_inputs(
    rewards: RewardDistributor, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ValueError, match="numbered from 1"):
        rewards.propose(keys[6], 0, b"\x01" * 32, 10)
    for write in (rewards.challenge, rewards.finalize):
        with pytest.raises(ValueError, match="numbered from 1"):
            write(keys[6], 0)
    with pytest.raises(ValueError, match="numbered from 1"):
        rewards.resolve_challenge(keys[ARBITER], 0, True)
    with pytest.raises(ValueError, match="numbered from 1"):
        rewards.claim(keys[6], 0, addrs[1], 1, [])
    with pytest.raises(ValueError, match="bool"):
        rewards.resolve_challenge(keys[ARBITER], 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="arbiter must not be the zero address"):
        rewards.schedule_arbiter(keys[ADMIN], ZERO_ADDRESS)
    with pytest.raises(ValueError, match="not an address"):
        rewards.schedule_arbiter(keys[ADMIN], "0x1234")
    with pytest.raises(ValueError, match="not an address"):
        rewards.transfer_admin(keys[ADMIN], "admin")
    with pytest.raises(ValueError, match="32 bytes"):
        rewards.propose(keys[6], 1, b"\x01" * 31, 10)
    with pytest.raises(ValueError, match="not bytes or hex"):
        rewards.propose(keys[6], 1, "0xzz", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        rewards.propose(keys[6], -1, b"\x01" * 32, 10)
    with pytest.raises(ValueError, match="int"):
        rewards.fund(keys[6], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        rewards.anchor(keys[6], b"\x01" * 32, -1)


# --- challenges -----------------------------------------------------------------------------


def test_challenge_and_finalize_window_edges(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 1000)
    root = reward_tree({addrs[1]: 10}).root
    # Epoch 1: challenged in the window's last second.
    proposed_at = block_time(chain, rewards.propose(keys[6], 1, root, 10))
    next_block_at(chain, proposed_at + WINDOW - 1)
    with pytest.raises(ContractRevert, match="challenge window open"):
        rewards.finalize(keys[6], 1)
    next_block_at(chain, proposed_at + WINDOW - 1)  # the refused estimate mined nothing
    receipt = rewards.challenge(keys[7], 1)
    assert block_time(chain, receipt) == proposed_at + WINDOW - 1
    assert event_names(rewards, receipt) == ["RootChallenged"]
    assert rewards.epoch(1).status == "challenged"
    assert rewards.epoch(1).challenger == addrs[7]

    # Epoch 2: the window closes at proposed_at + WINDOW, when finalizing opens.
    proposed_at = block_time(chain, rewards.propose(keys[6], 2, root, 10))
    next_block_at(chain, proposed_at + WINDOW)
    with pytest.raises(ContractRevert, match="challenge window closed"):
        rewards.challenge(keys[7], 2)
    receipt = rewards.finalize(keys[7], 2)
    assert block_time(chain, receipt) == proposed_at + WINDOW
    assert rewards.epoch(2).status == "finalized"
    check_books(rewards, chain)


def test_challenge_refusals(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 1000)
    root = reward_tree({addrs[1]: 10}).root
    with pytest.raises(ContractRevert, match="not challengeable"):
        rewards.challenge(keys[7], 1)  # nothing proposed
    rewards.propose(keys[6], 1, root, 10)
    for bond in (0, BOND - 1, BOND + 1):
        with pytest.raises(ContractRevert) as exc:
            chain.send(keys[7], rewards.contract, "challenge", 1, value=bond)
        assert exc.value.reason == "wrong bond"
    with pytest.raises(ContractRevert, match="proposer cannot challenge"):
        rewards.challenge(keys[6], 1)
    rewards.challenge(keys[7], 1)
    with pytest.raises(ContractRevert, match="not challengeable"):
        rewards.challenge(keys[8], 1)  # once
    assert rewards.bonds_held_wei() == 2 * BOND

    rewards.propose(keys[6], 2, root, 10)
    chain.increase_time(WINDOW)
    rewards.finalize(keys[6], 2)
    with pytest.raises(ContractRevert, match="not challengeable"):
        rewards.challenge(keys[7], 2)  # final
    check_books(rewards, chain)


def test_finalize_refusals(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 1000)
    root = reward_tree({addrs[1]: 10}).root
    with pytest.raises(ContractRevert, match="not proposed"):
        rewards.finalize(keys[6], 1)
    rewards.propose(keys[6], 1, root, 10)
    with pytest.raises(ContractRevert, match="challenge window open"):
        rewards.finalize(keys[6], 1)
    rewards.challenge(keys[7], 1)
    chain.increase_time(WINDOW)
    # A challenged root waits for the arbiter, however long the window is past.
    with pytest.raises(ContractRevert, match="challenged"):
        rewards.finalize(keys[6], 1)
    # Upheld after its window closed: no one may challenge it again, and anyone finalizes it.
    receipt = rewards.resolve_challenge(keys[ARBITER], 1, True)
    assert "RootFinalized" not in event_names(rewards, receipt)
    with pytest.raises(ContractRevert, match="challenge window closed"):
        rewards.challenge(keys[5], 1)
    receipt = rewards.finalize(keys[5], 1)
    assert event_names(rewards, receipt) == ["RootFinalized", "Credited"]
    with pytest.raises(ContractRevert, match="already finalized"):
        rewards.finalize(keys[6], 1)
    check_books(rewards, chain)


def test_arbiter_upholds_the_root(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 1000)
    tree = reward_tree({addrs[1]: 10, addrs[2]: 20})
    proposed_at = block_time(chain, rewards.propose_tree(keys[6], 1, tree))
    rewards.challenge(keys[7], 1)
    with pytest.raises(ContractRevert, match="only arbiter"):
        rewards.resolve_challenge(keys[ADMIN], 1, True)
    with pytest.raises(ContractRevert, match="only arbiter"):
        rewards.resolve_challenge(keys[6], 1, True)
    with pytest.raises(ContractRevert, match="not challenged"):
        rewards.resolve_challenge(keys[ARBITER], 2, True)

    # The challenger forfeits its bond: half to the proposer at once, half to the treasury.
    # The proposer's own bond stays held until finalize(), as for an unchallenged root.
    receipt = rewards.resolve_challenge(keys[ARBITER], 1, True)
    events = rewards.events(receipt)
    assert [(e.name, e.args) for e in events] == [
        ("ChallengeResolved", {"epoch": 1, "winner": addrs[6], "root_valid": True}),
        ("Credited", {"recipient": addrs[6], "epoch": 1, "amount": WINNER_HALF}),
        ("Credited", {"recipient": addrs[TREASURY], "epoch": 1, "amount": TREASURY_HALF}),
    ]
    assert WINNER_HALF + TREASURY_HALF == BOND
    assert rewards.credits(addrs[6]) == WINNER_HALF
    assert rewards.credits(addrs[7]) == 0
    assert rewards.credits(addrs[TREASURY]) == TREASURY_HALF
    assert rewards.bonds_held_wei() == 2 * BOND
    assert rewards.epoch(1) == EpochRecord(
        1, "proposed", tree.root, tree.total, 0, addrs[6], ZERO_ADDRESS, proposed_at
    )
    with pytest.raises(ContractRevert, match="not challenged"):
        rewards.resolve_challenge(keys[ARBITER], 1, False)
    check_books(rewards, chain)

    chain.increase_time(WINDOW)
    receipt = rewards.finalize(keys[5], 1)
    assert [(e.name, e.args) for e in rewards.events(receipt)] == [
        ("RootFinalized", {"epoch": 1, "root": tree.root, "total": tree.total}),
        ("Credited", {"recipient": addrs[6], "epoch": 1, "amount": BOND}),
    ]
    rewards.claim_from_tree(keys[1], 1, tree)
    rewards.claim_from_tree(keys[2], 1, tree)
    before = chain.balance(addrs[6])
    receipt = rewards.withdraw_credit(keys[6])
    assert chain.balance(addrs[6]) == before + BOND + WINNER_HALF - fee(receipt)
    with pytest.raises(ContractRevert, match="nothing to withdraw"):
        rewards.withdraw_credit(keys[7])
    before = chain.balance(addrs[TREASURY])
    receipt = rewards.withdraw_credit(keys[TREASURY])
    assert chain.balance(addrs[TREASURY]) == before + TREASURY_HALF - fee(receipt)
    assert rewards.bonds_held_wei() == 0
    assert chain.balance(rewards.address) == rewards.unallocated_wei() == 970
    check_books(rewards, chain)


def test_arbiter_rejects_the_root(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    rewards.fund(keys[TREASURY], 1000)
    bad = reward_tree({addrs[6]: 900})
    good = reward_tree({addrs[1]: 10, addrs[2]: 20})
    rewards.propose_tree(keys[6], 1, bad)
    rewards.challenge(keys[7], 1)
    assert rewards.unallocated_wei() == 100
    check_books(rewards, chain)

    # The proposer forfeits its bond: half to the challenger (with its own), half to the
    # treasury.
    receipt = rewards.resolve_challenge(keys[ARBITER], 1, False)
    events = rewards.events(receipt)
    assert [(e.name, e.args) for e in events] == [
        ("ChallengeResolved", {"epoch": 1, "winner": addrs[7], "root_valid": False}),
        ("Credited", {"recipient": addrs[7], "epoch": 1, "amount": BOND + WINNER_HALF}),
        ("Credited", {"recipient": addrs[TREASURY], "epoch": 1, "amount": TREASURY_HALF}),
    ]
    assert rewards.credits(addrs[7]) == BOND + WINNER_HALF
    assert rewards.credits(addrs[TREASURY]) == TREASURY_HALF
    assert rewards.credits(addrs[6]) == 0
    # The proposal is gone and its reservation released.
    assert rewards.epoch(1) == EpochRecord(1, "none", ZERO32, 0, 0, ZERO_ADDRESS, ZERO_ADDRESS, 0)
    assert rewards.unallocated_wei() == 1000
    assert rewards.allocated_wei() == 0
    with pytest.raises(ContractRevert, match="epoch not finalized"):
        rewards.claim_from_tree(keys[6], 1, bad)
    check_books(rewards, chain)

    # The epoch can be proposed again, by anyone, and runs its course.
    rewards.propose_tree(keys[5], 1, good)
    assert rewards.epoch(1).proposer == addrs[5]
    assert rewards.epoch(1).challenger == ZERO_ADDRESS
    chain.increase_time(WINDOW)
    rewards.finalize(keys[5], 1)
    with pytest.raises(ContractRevert, match="bad proof"):
        rewards.claim_from_tree(keys[6], 1, bad)
    rewards.claim_from_tree(keys[2], 1, good)

    before = chain.balance(addrs[7])
    receipt = rewards.withdraw_credit(keys[7])
    assert chain.balance(addrs[7]) == before + BOND + WINNER_HALF - fee(receipt)
    before = chain.balance(addrs[5])
    receipt = rewards.withdraw_credit(keys[5])
    assert chain.balance(addrs[5]) == before + BOND - fee(receipt)
    rewards.withdraw_credit(keys[TREASURY])
    assert rewards.bonds_held_wei() == 0
    assert chain.balance(rewards.address) == 1000 - 20
    check_books(rewards, chain)


def test_a_self_challenge_of_a_bad_root_costs_the_proposer_half_a_bond(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack: a proposer posts a bad root and challenges it itself from a second address. The
    challenge locks the epoch, and when the root is ruled invalid both bonds used to go back to
    the proposer's second address: a free way to block an epoch. Now half of the losing bond
    goes to the treasury, so the two addresses together end exactly half a bond poorer."""
    rewards.fund(keys[TREASURY], 1000)
    bad = reward_tree({addrs[6]: 1000})
    proposer, second = 6, 7  # one party, two addresses
    before = chain.balance(addrs[proposer]) + chain.balance(addrs[second])
    fees = fee(rewards.propose_tree(keys[proposer], 1, bad))
    fees += fee(rewards.challenge(keys[second], 1))
    rewards.resolve_challenge(keys[ARBITER], 1, False)
    assert rewards.credits(addrs[proposer]) == 0
    assert rewards.credits(addrs[second]) == BOND + WINNER_HALF
    fees += fee(rewards.withdraw_credit(keys[second]))
    after = chain.balance(addrs[proposer]) + chain.balance(addrs[second])
    assert after == before - fees - TREASURY_HALF

    # The forfeited half is the treasury's, paid like any credit; the pool is untouched.
    before = chain.balance(addrs[TREASURY])
    receipt = rewards.withdraw_credit(keys[TREASURY])
    assert chain.balance(addrs[TREASURY]) == before + TREASURY_HALF - fee(receipt)
    assert rewards.bonds_held_wei() == 0
    assert chain.balance(rewards.address) == rewards.unallocated_wei() == 1000
    assert rewards.epoch(1).status == "none"
    check_books(rewards, chain)


def test_a_root_ruled_valid_still_waits_out_its_window(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack: a proposer and a colluding arbiter skip the challenge window. The proposer
    challenges its own bad root from a second address and the arbiter at once rules it valid,
    which used to finalize it on the spot, before anyone else could dispute it. Now a root
    ruled valid is proposed again: it is not final before proposed_at + window, and inside
    the window someone else may challenge it."""
    rewards.fund(keys[TREASURY], 1000)
    bad = reward_tree({addrs[6]: 1000})
    proposed_at = block_time(chain, rewards.propose_tree(keys[6], 1, bad))
    rewards.challenge(keys[7], 1)
    receipt = rewards.resolve_challenge(keys[ARBITER], 1, True)
    assert event_names(rewards, receipt) == ["ChallengeResolved", "Credited", "Credited"]
    assert rewards.epoch(1) == EpochRecord(
        1, "proposed", bad.root, 1000, 0, addrs[6], ZERO_ADDRESS, proposed_at
    )
    with pytest.raises(ContractRevert, match="challenge window open"):
        rewards.finalize(keys[6], 1)
    with pytest.raises(ContractRevert, match="epoch not finalized"):
        rewards.claim_from_tree(keys[6], 1, bad)

    # An honest account disputes it inside the window; the proposer still may not.
    with pytest.raises(ContractRevert, match="proposer cannot challenge"):
        rewards.challenge(keys[6], 1)
    next_block_at(chain, proposed_at + WINDOW - 1)
    rewards.challenge(keys[5], 1)
    assert (rewards.epoch(1).status, rewards.epoch(1).challenger) == ("challenged", addrs[5])
    chain.increase_time(WINDOW)
    with pytest.raises(ContractRevert, match="challenged"):
        rewards.finalize(keys[6], 1)
    rewards.resolve_challenge(keys[ARBITER], 1, False)
    assert rewards.epoch(1).status == "none"
    assert rewards.credits(addrs[5]) == BOND + WINNER_HALF
    assert rewards.credits(addrs[6]) == WINNER_HALF  # from the first, self-made challenge
    assert rewards.credits(addrs[7]) == 0
    assert rewards.credits(addrs[TREASURY]) == 2 * TREASURY_HALF
    assert rewards.unallocated_wei() == 1000
    check_books(rewards, chain)


# --- payouts to contracts -------------------------------------------------------------------

RECEIVER_SOURCE = """
# pragma version ~=0.4.3
# pragma evm-version london

interface Distributor:
    def claim(
        epoch: uint256, account: address, amount: uint256, proof: DynArray[bytes32, 32]
    ): nonpayable

mode: public(uint256)  # 0 accept ether, 1 refuse it, 2 re-enter claim() for `account`
target: address
epoch: uint256
account: address
amount: uint256
proof: DynArray[bytes32, 32]

@external
def set_mode(
    mode: uint256,
    target: address,
    epoch: uint256,
    account: address,
    amount: uint256,
    proof: DynArray[bytes32, 32],
):
    self.mode = mode
    self.target = target
    self.epoch = epoch
    self.account = account
    self.amount = amount
    self.proof = proof

@external
@payable
def __default__():
    if self.mode == 1:
        raise "refused"
    if self.mode == 2:
        extcall Distributor(self.target).claim(self.epoch, self.account, self.amount, self.proof)
"""


@pytest.fixture(scope="module")
def receiver_artifact() -> tuple[list[dict[str, Any]], str]:
    import vyper
    from vyper.compiler.settings import Settings

    out = vyper.compile_code(
        RECEIVER_SOURCE,
        output_formats=["abi", "bytecode"],
        settings=Settings(evm_version="london"),
    )
    return out["abi"], out["bytecode"]


def test_claims_to_contracts_are_atomic_and_cannot_reenter(
    rewards: RewardDistributor,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    receiver_artifact: tuple[list[dict[str, Any]], str],
) -> None:
    abi, bytecode = receiver_artifact
    receiver = chain.contract(chain.deploy(keys[0], abi, bytecode), abi)
    rewards.fund(keys[TREASURY], 1000)
    tree = reward_tree({receiver.address: 100, addrs[2]: 200})
    finalized_epoch(rewards, chain, keys, 1, tree)
    own = (1, receiver.address, 100, tree.proof_for(receiver.address))
    other = (1, addrs[2], 200, tree.proof_for(addrs[2]))

    # A recipient that refuses the payment keeps its claim open.
    chain.send(keys[0], receiver, "set_mode", 1, rewards.address, *other)
    with pytest.raises(ContractRevert, match="transfer failed"):
        rewards.claim(keys[5], *own)
    assert not rewards.is_claimed(1, receiver.address)

    # Re-entering claim() from the payment is refused by the lock, so the whole claim fails.
    chain.send(keys[0], receiver, "set_mode", 2, rewards.address, *other)
    with pytest.raises(ContractRevert, match="transfer failed"):
        rewards.claim(keys[5], *own)
    assert not rewards.is_claimed(1, receiver.address)
    assert not rewards.is_claimed(1, addrs[2])

    chain.send(keys[0], receiver, "set_mode", 0, rewards.address, *other)
    rewards.claim(keys[5], *own)
    assert chain.balance(receiver.address) == 100
    rewards.claim(keys[5], *other)
    assert rewards.epoch(1).claimed_wei == 300
    check_books(rewards, chain)


# --- administration -------------------------------------------------------------------------


def test_arbiter_change_before_the_delay_reverts(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack: the admin swaps in an arbiter of its choosing, effective at once, to rule on a
    root already under challenge. Now a new arbiter is announced and applies only after the
    delay ("timelock: not ready" before), which outlasts the challenge window: a root proposed
    before the announcement has all of its window under the arbiter known at its proposal."""
    rewards.fund(keys[TREASURY], 1000)
    proposed_at = block_time(chain, rewards.propose(keys[6], 1, b"\x01" * 32, 10))
    receipt = rewards.schedule_arbiter(keys[ADMIN], addrs[5])
    ready_at = block_time(chain, receipt) + DELAY
    assert [(e.name, e.args) for e in rewards.events(receipt)][1:] == [
        ("ArbiterScheduled", {"arbiter": addrs[5], "ready_at": ready_at})
    ]
    assert event_names(rewards, receipt) == ["ChangeScheduled", "ArbiterScheduled"]
    assert rewards.pending_arbiter() == addrs[5]
    assert rewards.arbiter_ready_at() == ready_at
    assert rewards.arbiter() == addrs[ARBITER]
    assert ready_at > proposed_at + WINDOW

    with pytest.raises(ContractRevert) as exc:
        rewards.apply_arbiter(keys[1])
    assert exc.value.reason == "timelock: not ready"
    rewards.challenge(keys[7], 1)
    with pytest.raises(ContractRevert, match="only arbiter"):
        rewards.resolve_challenge(keys[5], 1, True)  # not the arbiter yet
    next_block_at(chain, ready_at - 1)
    with pytest.raises(ContractRevert) as exc:
        rewards.apply_arbiter(keys[1])
    assert exc.value.reason == "timelock: not ready"

    next_block_at(chain, ready_at)
    receipt = rewards.apply_arbiter(keys[1])  # anyone may, once it is due
    assert [(e.name, e.args) for e in rewards.events(receipt)][1:] == [
        ("ArbiterSet", {"arbiter": addrs[5]})
    ]
    assert rewards.arbiter() == addrs[5]
    assert rewards.pending_arbiter() == ZERO_ADDRESS
    assert rewards.arbiter_ready_at() == 0
    with pytest.raises(ContractRevert, match="only arbiter"):
        rewards.resolve_challenge(keys[ARBITER], 1, True)  # the old arbiter
    rewards.resolve_challenge(keys[5], 1, True)
    with pytest.raises(ContractRevert, match="timelock: nothing pending"):
        rewards.apply_arbiter(keys[1])


def test_arbiter_schedule_refusals_replacement_and_cancel(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        rewards.schedule_arbiter(keys[1], addrs[1])
    assert exc.value.reason == "admin: only admin"
    with pytest.raises(ContractRevert, match="zero arbiter"):
        chain.send(keys[ADMIN], rewards.contract, "schedule_arbiter", ZERO_ADDRESS)
    with pytest.raises(ContractRevert, match="timelock: nothing pending"):
        rewards.cancel_arbiter(keys[ADMIN])
    with pytest.raises(ContractRevert, match="timelock: nothing pending"):
        rewards.apply_arbiter(keys[1])

    # A second announcement replaces the first and restarts the clock.
    first_ready = block_time(chain, rewards.schedule_arbiter(keys[ADMIN], addrs[5])) + DELAY
    chain.increase_time(60)
    second_ready = block_time(chain, rewards.schedule_arbiter(keys[ADMIN], addrs[4])) + DELAY
    assert second_ready > first_ready
    assert rewards.pending_arbiter() == addrs[4]
    assert rewards.arbiter_ready_at() == second_ready
    next_block_at(chain, first_ready)
    with pytest.raises(ContractRevert, match="timelock: not ready"):
        rewards.apply_arbiter(keys[1])

    with pytest.raises(ContractRevert, match="admin: only admin"):
        rewards.cancel_arbiter(keys[1])
    receipt = rewards.cancel_arbiter(keys[ADMIN])
    assert event_names(rewards, receipt) == ["ChangeCancelled", "ArbiterCancelled"]
    assert rewards.events(receipt)[1].args == {"arbiter": addrs[4]}
    assert rewards.pending_arbiter() == ZERO_ADDRESS
    assert rewards.arbiter_ready_at() == 0
    chain.increase_time(DELAY)
    with pytest.raises(ContractRevert, match="timelock: nothing pending"):
        rewards.apply_arbiter(keys[1])
    assert rewards.arbiter() == addrs[ARBITER]


def test_admin_is_handed_over_in_two_steps(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack (or accident): transfer_admin() to a mistyped or unreachable address used to
    hand the contract over at once and for good. Now the named address must accept, and until
    then the old admin stays in charge."""
    with pytest.raises(ContractRevert) as exc:
        rewards.transfer_admin(keys[1], addrs[1])
    assert exc.value.reason == "admin: only admin"
    receipt = rewards.transfer_admin(keys[ADMIN], addrs[1])
    assert [(e.name, e.args) for e in rewards.events(receipt)] == [
        ("AdminTransferStarted", {"admin": addrs[ADMIN], "pending_admin": addrs[1]})
    ]
    assert rewards.admin() == addrs[ADMIN]
    assert rewards.pending_admin() == addrs[1]
    rewards.schedule_arbiter(keys[ADMIN], addrs[5])  # still the admin
    with pytest.raises(ContractRevert, match="admin: only admin"):
        rewards.cancel_arbiter(keys[1])
    with pytest.raises(ContractRevert, match="admin: only pending admin"):
        rewards.accept_admin(keys[2])

    receipt = rewards.accept_admin(keys[1])
    assert [(e.name, e.args) for e in rewards.events(receipt)] == [
        ("AdminTransferred", {"admin": addrs[1]})
    ]
    assert rewards.admin() == addrs[1]
    assert rewards.pending_admin() == ZERO_ADDRESS
    with pytest.raises(ContractRevert, match="admin: only admin"):
        rewards.cancel_arbiter(keys[ADMIN])
    rewards.cancel_arbiter(keys[1])

    # A nomination is withdrawn by naming the zero address.
    rewards.transfer_admin(keys[1], addrs[2])
    rewards.transfer_admin(keys[1], ZERO_ADDRESS)
    with pytest.raises(ContractRevert, match="admin: no pending admin"):
        rewards.accept_admin(keys[2])
    assert rewards.admin() == addrs[1]


# --- receipt anchors ------------------------------------------------------------------------


def test_anchors_are_kept_per_gateway_in_order(
    rewards: RewardDistributor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    written: dict[str, list[AnchorRecord]] = {addrs[3]: [], addrs[4]: []}
    for n in range(5):
        gateway = 3 if n % 2 == 0 else 4  # interleaved: three by one, two by the other
        root = keccak(f"receipts {n}".encode())
        record = rewards.anchor(keys[gateway], root, 10 + n)
        receipt = chain.w3.eth.get_transaction_receipt(record.tx_hash)
        block = chain.w3.eth.get_block(receipt["blockNumber"])
        assert record == AnchorRecord(
            gateway=addrs[gateway],
            index=len(written[addrs[gateway]]),
            root=root,
            count=10 + n,
            timestamp=int(block["timestamp"]),
            block_number=int(receipt["blockNumber"]),
            tx_hash=record.tx_hash,
        )
        (event,) = rewards.events(receipt)
        assert (event.name, event.args) == (
            "ReceiptsAnchored",
            {"gateway": addrs[gateway], "index": record.index, "root": root, "count": 10 + n},
        )
        written[addrs[gateway]].append(record)

    assert [r.index for r in written[addrs[3]]] == [0, 1, 2]
    assert [r.index for r in written[addrs[4]]] == [0, 1]
    for gateway, records in written.items():
        assert rewards.anchor_count(gateway) == len(records)
        for record in records:
            stored = rewards.get_anchor(gateway, record.index)
            assert stored.tx_hash is None
            assert stored == AnchorRecord(**{**record.__dict__, "tx_hash": None})
        with pytest.raises(ContractRevert, match="index out of range"):
            rewards.get_anchor(gateway, len(records))
    assert rewards.anchor_count(addrs[5]) == 0
    with pytest.raises(ContractRevert, match="index out of range"):
        rewards.get_anchor(addrs[5], 0)

    with pytest.raises(ContractRevert, match="zero root"):
        rewards.anchor(keys[3], ZERO32, 1)
    with pytest.raises(ContractRevert, match="zero count"):
        rewards.anchor(keys[3], b"\x01" * 32, 0)
    with pytest.raises(ContractRevert, match="count too large"):
        chain.send(keys[3], rewards.contract, "anchor", b"\x01" * 32, MAX_ANCHOR_COUNT + 1)
    with pytest.raises(ValueError, match="over"):
        rewards.anchor(keys[3], b"\x01" * 32, MAX_ANCHOR_COUNT + 1)
    assert rewards.anchor_count(addrs[3]) == 3
    # The packed fields do not bleed into each other at their largest.
    record = rewards.anchor(keys[3], b"\xff" * 32, MAX_ANCHOR_COUNT)
    assert (record.index, record.root, record.count) == (3, b"\xff" * 32, MAX_ANCHOR_COUNT)
    assert record.block_number == chain.block_number()
    assert record.timestamp == chain.timestamp()
    # Anchors hold no funds.
    assert chain.balance(rewards.address) == 0


# --- property: every proof reward_tree makes verifies on-chain ------------------------------


allocations_strategy = st.dictionaries(
    keys=st.binary(min_size=20, max_size=20)
    .filter(lambda raw: any(raw))
    .map(lambda raw: "0x" + raw.hex()),
    values=st.integers(min_value=1, max_value=2**128),
    min_size=1,
    max_size=20,
)


@settings(
    max_examples=25,
    deadline=None,
)
@given(allocations=allocations_strategy)
def test_reward_tree_proofs_verify_on_chain(
    shared_rewards: RewardDistributor, allocations: dict[str, int]
) -> None:
    tree = reward_tree(allocations)
    assert tree.total == sum(allocations.values())
    for account, amount in allocations.items():
        proof = tree.proof_for(account)
        assert proof == merkle_proof(list(tree.leaves), tree.index_of(account))
        assert len(proof) <= len(allocations).bit_length()
        assert shared_rewards.verify(tree.root, account, amount, proof)
        assert not shared_rewards.verify(tree.root, account, amount + 1, proof)
