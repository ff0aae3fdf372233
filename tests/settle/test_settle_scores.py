"""ScoreBoard on the embedded EVM: verifiers commit to their miner scores after an epoch, reveal
them in the next window, and the revealed vectors (with the stake each weighs) feed
protocol.consensus. Every refusal has its reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_abi import encode
from eth_utils import to_checksum_address

from infergrid.protocol.consensus import COMMIT_TAG, commitment
from infergrid.protocol.hashing import keccak256
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractRevert
from infergrid.settle.registry import Registry
from infergrid.settle.scores import (
    ScoreBoard,
    deploy_scoreboard,
    epoch_consensus,
    new_salt,
)

EPOCH_S, COMMIT_S, REVEAL_S = 600, 120, 120
VERIFIER_STAKE = 2 * WEI_PER_BTT  # per unit of a verifier's index: 1x, 2x, 3x
VERIFIERS = (1, 2, 3)  # key indexes
NOT_A_VERIFIER = 4
MINERS = tuple(to_checksum_address("0x" + fill * 20) for fill in ("a1", "a2", "a3"))


@pytest.fixture
def board(
    chain: Chain, keys: list[str], addrs: list[str], registry: Registry
) -> Iterator[ScoreBoard]:
    stake = VERIFIER_STAKE
    for i in VERIFIERS:
        registry.register(keys[i], Role.VERIFIER, "http://127.0.0.1:1", addrs[i], [], stake * i)
    registry.register(
        keys[NOT_A_VERIFIER],
        Role.MINER,
        "http://127.0.0.1:2",
        addrs[NOT_A_VERIFIER],
        [ModelOffer("m", "0x" + "11" * 32, 1, 2)],
        10**18,
    )
    address = deploy_scoreboard(
        chain,
        keys[0],
        registry=registry.address,
        epoch_length_s=EPOCH_S,
        commit_window_s=COMMIT_S,
        reveal_window_s=REVEAL_S,
    )
    yield ScoreBoard(chain, address)


def travel_to(chain: Chain, timestamp: int) -> None:
    """Make the next block's time at least `timestamp`."""
    now = chain.timestamp()
    if timestamp > now:
        chain.increase_time(timestamp - now)


def reason(exc: pytest.ExceptionInfo[ContractRevert]) -> str:
    return exc.value.reason


def test_the_schedule_is_public_and_epochs_count_from_deployment(
    board: ScoreBoard, chain: Chain
) -> None:
    schedule = board.schedule()
    assert (schedule.epoch_length_s, schedule.commit_window_s, schedule.reveal_window_s) == (
        EPOCH_S,
        COMMIT_S,
        REVEAL_S,
    )
    assert board.current_epoch() == schedule.epoch_at(chain.timestamp()) == 1
    assert schedule.epoch_end(1) == schedule.genesis + EPOCH_S
    assert schedule.reveal_closes(2) == schedule.genesis + 2 * EPOCH_S + COMMIT_S + REVEAL_S
    with pytest.raises(ValueError, match="epoch"):
        schedule.epoch_end(0)
    with pytest.raises(ValueError, match="before"):
        schedule.epoch_at(schedule.genesis - 1)


def test_commit_then_reveal_logs_the_scores_with_the_stake_they_weigh(
    board: ScoreBoard, chain: Chain, keys: list[str], addrs: list[str], registry: Registry
) -> None:
    schedule = board.schedule()
    scores = {MINERS[2]: 300_000, MINERS[0]: 500_000}  # any order: the rule sorts them
    salt = new_salt()
    travel_to(chain, schedule.epoch_end(1))
    receipt = board.commit(keys[1], 1, scores, salt)
    assert [e.name for e in board.events(receipt)] == ["ScoresCommitted"]
    assert board.commitment_of(1, addrs[1]) == commitment(1, addrs[1], scores, salt)
    # Stake added after the epoch ended weighs nothing.
    registry.stake(keys[1], 5 * 10**18)
    travel_to(chain, schedule.reveal_opens(1))
    board.reveal(keys[1], 1, scores, salt)
    assert board.has_revealed(1, addrs[1])
    (revealed,) = board.revealed(1)
    # The contract keeps the epoch's reveal blocks, so readers scan those blocks only.
    assert board.reveal_blocks(1) == (revealed.block_number, revealed.block_number)
    assert board.reveal_count(1) == 1 and board.reveal_blocks(2) == (0, 0)
    assert revealed.verifier == addrs[1]
    assert revealed.stake_wei == VERIFIER_STAKE * 1
    assert revealed.scores == {MINERS[0]: 500_000, MINERS[2]: 300_000}
    assert revealed.report().commitment() == board.commitment_of(1, addrs[1])
    assert board.revealed(2) == []


def test_commits_and_reveals_only_in_their_windows(
    board: ScoreBoard, chain: Chain, keys: list[str]
) -> None:
    schedule = board.schedule()
    scores, salt = {MINERS[0]: 1}, new_salt()
    with pytest.raises(ContractRevert) as exc:
        board.commit(keys[1], 1, scores, salt)
    assert reason(exc) == "scores: epoch not over"
    travel_to(chain, schedule.epoch_end(1))
    board.commit(keys[1], 1, scores, salt)
    with pytest.raises(ContractRevert) as exc:
        board.chain.send(keys[1], board.contract, "reveal", 1, [MINERS[0]], [1], salt)
    assert reason(exc) == "scores: reveal window not open"
    travel_to(chain, schedule.reveal_opens(1))
    with pytest.raises(ContractRevert) as exc:
        board.commit(keys[2], 1, scores, salt)
    assert reason(exc) == "scores: commit window closed"
    travel_to(chain, schedule.reveal_closes(1))
    with pytest.raises(ContractRevert) as exc:
        board.reveal(keys[1], 1, scores, salt)
    assert reason(exc) == "scores: reveal window closed"


def test_only_active_verifiers_commit(board: ScoreBoard, chain: Chain, keys: list[str]) -> None:
    travel_to(chain, board.schedule().epoch_end(1))
    with pytest.raises(ContractRevert) as exc:
        board.commit(keys[NOT_A_VERIFIER], 1, {MINERS[0]: 1}, new_salt())
    assert reason(exc) == "scores: not a verifier"
    with pytest.raises(ContractRevert) as exc:
        board.commit(keys[7], 1, {MINERS[0]: 1}, new_salt())  # never registered
    assert reason(exc) == "scores: not a verifier"
    with pytest.raises(ContractRevert) as exc:
        board.chain.send(keys[1], board.contract, "commit", 1, bytes(32))
    assert reason(exc) == "scores: empty commitment"


def test_a_reveal_must_match_its_commitment_once(
    board: ScoreBoard, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    schedule = board.schedule()
    scores, salt = {MINERS[0]: 600_000, MINERS[1]: 400_000}, new_salt()
    travel_to(chain, schedule.epoch_end(1))
    board.commit(keys[1], 1, scores, salt)
    # A second commit in the window replaces the first.
    board.commit(keys[1], 1, scores | {MINERS[1]: 300_000}, salt)
    travel_to(chain, schedule.reveal_opens(1))
    send = board.chain.send
    miners = [MINERS[0], MINERS[1]]
    # The client refuses before any gas; the contract refuses on its own too.
    with pytest.raises(ValueError, match="do not match"):
        board.reveal(keys[1], 1, scores, salt)
    with pytest.raises(ContractRevert) as exc:
        send(keys[1], board.contract, "reveal", 1, miners, [600_000, 400_000], salt)
    assert reason(exc) == "scores: reveal does not match the commitment"
    with pytest.raises(ValueError, match="committed no scores"):
        board.reveal(keys[2], 1, scores, salt)
    with pytest.raises(ContractRevert) as exc:
        send(keys[2], board.contract, "reveal", 1, miners, [600_000, 400_000], salt)
    assert reason(exc) == "scores: nothing committed"
    board.reveal(keys[1], 1, scores | {MINERS[1]: 300_000}, salt)
    with pytest.raises(ContractRevert) as exc:
        send(keys[1], board.contract, "reveal", 1, miners, [600_000, 300_000], salt)
    assert reason(exc) == "scores: already revealed"


def _raw_commitment(
    epoch: int, verifier: str, miners: list[str], scores: list[int], salt: bytes
) -> bytes:
    """The commitment of a vector protocol.consensus would refuse to encode: what a verifier
    writing its own client could still commit to."""
    return keccak256(
        encode(
            ["bytes32", "uint256", "address", "address[]", "uint256[]", "bytes32"],
            [COMMIT_TAG, epoch, verifier, miners, scores, salt],
        )
    )


@pytest.mark.parametrize(
    ("miners", "scores", "why"),
    [
        ([MINERS[1], MINERS[0]], [1, 1], "scores: miners not strictly ascending"),
        ([MINERS[0], MINERS[0]], [1, 1], "scores: miners not strictly ascending"),
        ([MINERS[0]], [1_000_001], "scores: score above 1_000_000"),
        ([MINERS[0], MINERS[1]], [600_000, 400_001], "scores: shares sum above 1_000_000"),
        ([MINERS[0]], [1, 2], "scores: length mismatch"),
    ],
)
def test_the_contract_refuses_malformed_vectors_even_when_committed(
    board: ScoreBoard,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    miners: list[str],
    scores: list[int],
    why: str,
) -> None:
    schedule = board.schedule()
    salt = new_salt()
    travel_to(chain, schedule.epoch_end(1))
    board.chain.send(
        keys[1], board.contract, "commit", 1, _raw_commitment(1, addrs[1], miners, scores, salt)
    )
    travel_to(chain, schedule.reveal_opens(1))
    with pytest.raises(ContractRevert) as exc:
        board.chain.send(keys[1], board.contract, "reveal", 1, miners, scores, salt)
    assert reason(exc) == why


def test_the_client_refuses_bad_input_before_sending(board: ScoreBoard, keys: list[str]) -> None:
    with pytest.raises(ValueError, match="epoch"):
        board.commit(keys[1], 0, {MINERS[0]: 1}, new_salt())
    with pytest.raises(ValueError, match="sum"):
        board.commit(keys[1], 1, {MINERS[0]: 700_000, MINERS[1]: 700_000}, new_salt())
    with pytest.raises(ValueError, match="not an address"):
        board.commit(keys[1], 1, {"0x12": 1}, new_salt())
    with pytest.raises(ValueError, match="salt"):
        board.commit(keys[1], 1, {MINERS[0]: 1}, b"short")


def test_deploy_checks_its_parameters(chain: Chain, keys: list[str], registry: Registry) -> None:
    with pytest.raises(ValueError, match="zero"):
        deploy_scoreboard(
            chain,
            keys[0],
            registry="0x" + "00" * 20,
            epoch_length_s=1,
            commit_window_s=1,
            reveal_window_s=1,
        )
    with pytest.raises(ValueError, match="epoch length"):
        deploy_scoreboard(
            chain,
            keys[0],
            registry=registry.address,
            epoch_length_s=0,
            commit_window_s=1,
            reveal_window_s=1,
        )
    artifact = load_artifact("ScoreBoard")
    for args, why in [
        ((registry.address, 0, 1, 1), "scores: bad epoch length"),
        ((registry.address, 1, 0, 1), "scores: bad commit window"),
        ((registry.address, 1, 1, 366 * 86400), "scores: bad reveal window"),
        (("0x" + "00" * 20, 1, 1, 1), "scores: zero registry"),
    ]:
        with pytest.raises(ContractRevert) as exc:
            chain.deploy(keys[0], artifact.abi, artifact.bytecode, *args)
        assert reason(exc) == why


def test_the_revealed_vectors_make_the_epochs_consensus(
    board: ScoreBoard, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Verifiers 2 and 3 (stakes 2x and 3x) agree; verifier 1 (1x) inflates miner 0: the
    median is the honest majority's report, and the liar's agreement is below 1."""
    schedule = board.schedule()
    honest = {MINERS[0]: 200_000, MINERS[1]: 500_000}
    liar = {MINERS[0]: 900_000, MINERS[1]: 100_000}
    salts = {i: new_salt() for i in VERIFIERS}
    travel_to(chain, schedule.epoch_end(1))
    for i in VERIFIERS:
        board.commit(keys[i], 1, liar if i == 1 else honest, salts[i])
    travel_to(chain, schedule.reveal_opens(1))
    for i in VERIFIERS:
        board.reveal(keys[i], 1, liar if i == 1 else honest, salts[i])
    first, last = board.reveal_blocks(1)
    assert first < last and [r.block_number for r in board.revealed(1)][::2] == [first, last]
    result = epoch_consensus(board, 1)
    assert result.miner_shares == {m: s for m, s in honest.items()}
    assert result.agreement[addrs[2]] == result.agreement[addrs[3]] == 1
    assert result.agreement[addrs[1]] < 1
    assert result.stakes == {addrs[i]: VERIFIER_STAKE * i for i in VERIFIERS}
    with pytest.raises(ValueError, match="no verifier"):
        epoch_consensus(board, 2)
