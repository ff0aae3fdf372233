"""A verifier's scoring duty on real contracts (verify.score_duty on the embedded EVM, every
contract of settle.deploy with DEVNET_PARAMS): after an epoch it scores the miners from what
the gateway observed, commits, reveals in the next window, and the treasury pays the miners by
those scores. The gateway's rows are given as `GET /v1/miners/epoch` answers them (its HTTP
client, fetch_miner_epoch, is tested against a real gateway in
tests/app/test_gateway_miner_epochs.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from verify_helpers import ADDRS, KEYS, P

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.settle.deploy import deploy_network
from infergrid.settle.registry import Registry
from infergrid.settle.scores import ScoreBoard
from infergrid.verify.miner_pay import pay_miners
from infergrid.verify.pay_epoch import PayContracts
from infergrid.verify.score_duty import ScoreDuty, observations, score_state_path

TREASURY, MINER_A, MINER_B, VERIFIER, STRANGER = range(5)


def row(miner: str, *, tokens: int, errors: int = 0, failed: int = 0) -> dict[str, Any]:
    """A /v1/miners/epoch row: a miner at the model's typical pace, always up."""
    return {
        "miner": miner,
        "requests": 10,
        "errors": errors,
        "verified_tokens": tokens,
        "ttft_ratio": 1.0,
        "tpot_ratio": 1.0,
        "health_checks": 30,
        "health_ok": 30,
        "audits": {"passed": 10 - failed, "failed": failed},
        "models": {},
    }


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=10))


@pytest.fixture
def contracts(chain: Chain) -> Any:
    contracts = deploy_network(chain, KEYS[TREASURY], P)
    registry = Registry(chain, contracts.NodeRegistry)
    offer = ModelOffer("m", "0x" + "07" * 32, 1, 1)
    for miner in (MINER_A, MINER_B):
        registry.register(
            KEYS[miner], Role.MINER, "http://m", ADDRS[miner], [offer], 1_000 * WEI_PER_BTT
        )
    registry.register(
        KEYS[VERIFIER], Role.VERIFIER, "http://v", ADDRS[VERIFIER], [], 20 * WEI_PER_BTT
    )
    return contracts


def travel_to(chain: Chain, timestamp: int) -> None:
    if timestamp > chain.timestamp():
        chain.increase_time(timestamp - chain.timestamp())


def test_observations_keep_staked_miners_and_refuse_malformed_rows() -> None:
    rows = [row(ADDRS[MINER_A], tokens=100), row(ADDRS[STRANGER], tokens=100)]
    found = observations(rows, lambda m: 10 if m == ADDRS[MINER_A] else 0)
    assert [o.miner for o in found] == [ADDRS[MINER_A]]
    assert found[0].verified_tokens == 100 and found[0].model_ttft_s == 1.0
    with pytest.raises(RuntimeError, match="malformed"):
        observations([{"miner": ADDRS[MINER_A]}], lambda m: 10)


def test_an_epoch_is_scored_committed_revealed_and_paid(
    chain: Chain, contracts: Any, tmp_path: Path
) -> None:
    registry = Registry(chain, contracts.NodeRegistry)
    board = ScoreBoard(chain, contracts.ScoreBoard)
    windows: list[tuple[float, float]] = []
    clock = iter(range(1000, 100_000, 1000))

    def miner_epoch(since: float, until: float) -> list[dict[str, Any]]:
        windows.append((since, until))
        # B served as much but failed one audit in ten; a stranger is no miner.
        return [
            row(ADDRS[MINER_A], tokens=3000),
            row(ADDRS[MINER_B], tokens=3000, failed=1),
            row(ADDRS[STRANGER], tokens=9000),
        ]

    lines: list[str] = []
    state = score_state_path(tmp_path, ADDRS[VERIFIER])
    duty = ScoreDuty(
        board=board, registry=registry, private_key=KEYS[VERIFIER], miner_epoch=miner_epoch,
        state_path=state, log=lines.append, wall_clock=lambda: float(next(clock)),
    )  # fmt: skip
    schedule = board.schedule()
    epoch = board.current_epoch()
    duty.tick()  # the epoch is still running: nothing to do
    assert windows == [] and board.commitment_of(epoch, ADDRS[VERIFIER]) is None

    travel_to(chain, schedule.epoch_end(epoch))
    duty.tick()
    shares = duty.shares(epoch)
    assert shares is not None and set(shares) == {ADDRS[MINER_A], ADDRS[MINER_B]}
    assert shares[ADDRS[MINER_A]] > 1.5 * shares[ADDRS[MINER_B]] > 0  # its failed audit costs B
    assert sum(shares.values()) <= 1_000_000
    assert board.commitment_of(epoch, ADDRS[VERIFIER]) is not None
    assert windows == [(0.0, 1000.0)]
    duty.tick()  # committed once
    assert len(windows) == 1

    # Restarted before its reveal: the salt is on disk, and it still reveals.
    again = ScoreDuty(
        board=board, registry=registry, private_key=KEYS[VERIFIER], miner_epoch=miner_epoch,
        state_path=state, log=lines.append, wall_clock=lambda: float(next(clock)),
    )  # fmt: skip
    travel_to(chain, schedule.reveal_opens(epoch))
    again.tick()
    assert board.has_revealed(epoch, ADDRS[VERIFIER])
    (revealed,) = board.revealed(epoch)
    assert revealed.scores == shares
    assert "scores: revealed epoch" in " ".join(lines)

    # The next epoch's window starts where the last one ended, on the gateway's clock.
    travel_to(chain, schedule.epoch_end(epoch + 1))
    again.tick()
    assert windows[-1][0] == 1000.0

    travel_to(chain, schedule.reveal_closes(epoch))
    net = PayContracts.connect(
        chain, registry=contracts.NodeRegistry, escrow=contracts.PaymentEscrow,
        rewards=contracts.RewardDistributor,
    )  # fmt: skip
    paid = pay_miners(
        net, board, registry, KEYS[TREASURY], tmp_path / "m.json",
        emission_wei=P.miner_emission_per_epoch_wei,
    )  # fmt: skip
    assert paid.scored_epoch == epoch and paid.shares == shares
    assert paid.allocations[ADDRS[MINER_A]] > paid.allocations[ADDRS[MINER_B]] > 0


def test_a_gateway_that_fails_is_logged_once_and_tried_again(
    chain: Chain, contracts: Any, tmp_path: Path
) -> None:
    registry = Registry(chain, contracts.NodeRegistry)
    board = ScoreBoard(chain, contracts.ScoreBoard)
    answers: list[Any] = [ConnectionError("gateway down"), ConnectionError("gateway down")]

    def miner_epoch(since: float, until: float) -> list[dict[str, Any]]:
        if answers:
            raise answers.pop()
        return [row(ADDRS[MINER_A], tokens=10)]

    lines: list[str] = []
    duty = ScoreDuty(
        board=board, registry=registry, private_key=KEYS[VERIFIER], miner_epoch=miner_epoch,
        state_path=score_state_path(tmp_path, ADDRS[VERIFIER]), log=lines.append,
    )  # fmt: skip
    epoch = board.current_epoch()
    travel_to(chain, board.schedule().epoch_end(epoch))
    duty.tick()
    duty.tick()
    assert sum("gateway down" in line for line in lines) == 1
    duty.tick()
    assert duty.shares(epoch) == {ADDRS[MINER_A]: 1_000_000}


def test_nothing_to_report_commits_nothing(chain: Chain, contracts: Any, tmp_path: Path) -> None:
    registry = Registry(chain, contracts.NodeRegistry)
    board = ScoreBoard(chain, contracts.ScoreBoard)
    lines: list[str] = []
    duty = ScoreDuty(
        board=board, registry=registry, private_key=KEYS[VERIFIER],
        miner_epoch=lambda since, until: [row(ADDRS[MINER_A], tokens=0)],
        state_path=score_state_path(tmp_path, ADDRS[VERIFIER]), log=lines.append,
    )  # fmt: skip
    epoch = board.current_epoch()
    travel_to(chain, board.schedule().epoch_end(epoch))
    duty.tick()
    assert board.commitment_of(epoch, ADDRS[VERIFIER]) is None
    assert any("nothing to report" in line for line in lines)


def test_a_verifier_scores_only_with_a_gateway_to_observe(tmp_path: Path) -> None:
    from infergrid.verify.node import VerifierSettings

    settings = VerifierSettings(
        chain_rpc="http://127.0.0.1:1", registry=ADDRS[0], escrow=ADDRS[1],
        private_key=KEYS[VERIFIER], models=("smollm2",), scoreboard=ADDRS[2],
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs a gateway"):
        settings.check()


def test_a_state_file_of_another_score_board_is_set_aside(
    chain: Chain, contracts: Any, tmp_path: Path
) -> None:
    """A devnet restarted on a fresh chain deploys its ScoreBoard at the same address: the
    genesis tells the boards apart. Trusted, the old file's 'committed' would keep this
    verifier from ever committing its epoch on the new board."""
    registry = Registry(chain, contracts.NodeRegistry)
    board = ScoreBoard(chain, contracts.ScoreBoard)
    epoch = board.current_epoch()
    state = score_state_path(tmp_path, ADDRS[VERIFIER])
    old_chain = {
        "version": 2,
        "verifier": ADDRS[VERIFIER],
        "board": board.address,
        "genesis": board.schedule().genesis - 3600,
        "epochs": [
            {"epoch": epoch, "since": 0.0, "until": 5.0, "shares": {ADDRS[MINER_A]: 1_000_000},
             "salt": "00" * 32, "committed": True, "revealed": True},
        ],
    }  # fmt: skip
    state.write_text(json.dumps(old_chain))
    lines: list[str] = []
    duty = ScoreDuty(
        board=board, registry=registry, private_key=KEYS[VERIFIER],
        miner_epoch=lambda since, until: [row(ADDRS[MINER_A], tokens=10)],
        state_path=state, log=lines.append,
    )  # fmt: skip
    assert any("about another ScoreBoard" in line for line in lines)
    assert json.loads(state.with_name(state.name + ".other-board").read_text()) == old_chain
    travel_to(chain, board.schedule().epoch_end(epoch))
    duty.tick()
    assert board.commitment_of(epoch, ADDRS[VERIFIER]) is not None
    saved = json.loads(state.read_text())
    assert saved["board"] == board.address and saved["genesis"] == board.schedule().genesis


def test_an_unreadable_state_file_is_refused_by_name(
    chain: Chain, contracts: Any, tmp_path: Path
) -> None:
    state = score_state_path(tmp_path, ADDRS[VERIFIER])
    state.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"score state file .* is unreadable"):
        ScoreDuty(
            board=ScoreBoard(chain, contracts.ScoreBoard),
            registry=Registry(chain, contracts.NodeRegistry), private_key=KEYS[VERIFIER],
            miner_epoch=lambda since, until: [], state_path=state,
        )  # fmt: skip
