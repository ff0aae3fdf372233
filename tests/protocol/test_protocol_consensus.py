"""protocol.consensus: a reveal is accepted only for its epoch, against its own commitment, once,
with scores in range; the consensus share of a miner is the stake-weighted median of the
revealed shares, so a coalition holding less than half the revealing stake cannot lift its
miner above what the honest verifiers reported (nor push others below it), while one holding
more than half can; verifiers are paid by how well they agree with the consensus."""

from __future__ import annotations

from fractions import Fraction

import pytest
from eth_abi import encode
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.protocol.consensus import (
    COMMIT_TAG,
    ScoreReport,
    check_reveal,
    commitment,
    consensus,
    miner_rewards,
    new_salt,
    stake_weighted_median,
    verifier_rewards,
)
from infergrid.protocol.hashing import keccak256
from infergrid.protocol.pricing import PPM


def addr(i: int) -> str:
    return to_checksum_address("0x" + f"{i:040x}")


MINERS = [addr(0x100 + i) for i in range(5)]
CARTEL_MINER = MINERS[0]
HONEST = {MINERS[0]: 100_000, MINERS[1]: 300_000, MINERS[2]: 250_000, MINERS[3]: 200_000,
          MINERS[4]: 150_000}  # fmt: skip
SALT = bytes(range(32))


def report(verifier: int, scores: dict[str, int], epoch: int = 7) -> ScoreReport:
    return ScoreReport(epoch, addr(verifier), scores, SALT)


# -- commit–reveal ---------------------------------------------------------------------------


def test_the_commitment_is_keccak_of_the_documented_abi_encoding() -> None:
    scores = {MINERS[1]: 300_000, MINERS[0]: 100_000}  # any order: miners are sorted
    expected = keccak256(
        encode(
            ["bytes32", "uint256", "address", "address[]", "uint256[]", "bytes32"],
            [COMMIT_TAG, 7, addr(1), [MINERS[0], MINERS[1]], [100_000, 300_000], SALT],
        )
    )
    assert commitment(7, addr(1), scores, SALT) == expected
    assert report(1, scores).commitment() == expected
    assert keccak256(b"InferGrid score commitment v1") == COMMIT_TAG


def test_a_reveal_matching_its_commitment_is_accepted() -> None:
    salt = new_salt()
    revealed = ScoreReport(7, addr(1), HONEST, salt)
    committed = {addr(1): commitment(7, addr(1), HONEST, salt)}
    assert check_reveal(revealed, epoch=7, commitments=committed) is None


@pytest.mark.parametrize(
    ("changed", "code"),
    [
        (ScoreReport(7, addr(1), {**HONEST, MINERS[0]: 99_999}, SALT), "mismatch"),
        (ScoreReport(7, addr(1), HONEST, bytes(32)), "mismatch"),
        (ScoreReport(8, addr(1), HONEST, SALT), "wrong_epoch"),
        (ScoreReport(7, addr(2), HONEST, SALT), "no_commitment"),
    ],
)
def test_a_reveal_that_is_not_what_was_committed_is_rejected(
    changed: ScoreReport, code: str
) -> None:
    committed = {addr(1): commitment(7, addr(1), HONEST, SALT)}
    rejection = check_reveal(changed, epoch=7, commitments=committed)
    assert rejection is not None and rejection.code == code and rejection.detail


def test_a_verifier_cannot_reveal_twice() -> None:
    committed = {addr(1): commitment(7, addr(1), HONEST, SALT)}
    rejection = check_reveal(
        report(1, HONEST), epoch=7, commitments=committed, revealed={addr(1).lower()}
    )
    assert rejection is not None and rejection.code == "duplicate"


def test_another_verifiers_commitment_does_not_open_a_copied_vector() -> None:
    """Copying a revealed vector is useless: the copier's own commitment, made before the
    reveal, binds its own address and salt."""
    honest = ScoreReport(7, addr(1), HONEST, new_salt())
    copied = ScoreReport(7, addr(2), HONEST, honest.salt)
    committed = {addr(1): honest.commitment(), addr(2): commitment(7, addr(2), {}, new_salt())}
    rejection = check_reveal(copied, epoch=7, commitments=committed)
    assert rejection is not None and rejection.code == "mismatch"


@pytest.mark.parametrize(
    ("scores", "why"),
    [
        ({MINERS[0]: PPM + 1}, "outside"),
        ({MINERS[0]: -1}, "outside"),
        ({MINERS[0]: 600_000, MINERS[1]: 500_000}, "sum"),
        ({MINERS[0]: 0.5}, "not an integer"),
        ({"0xnot": 1}, "not an address"),
        ({"0x" + "00" * 20: 1}, "zero address"),
        ({"0x" + "ab" * 20: 1, "0x" + "AB" * 20: 1}, "twice"),
    ],
)
def test_scores_out_of_range_are_rejected(scores: dict[str, int], why: str) -> None:
    bad = ScoreReport(7, addr(1), scores, SALT)
    rejection = check_reveal(bad, epoch=7, commitments={addr(1): b"\x00" * 32})
    assert rejection is not None and rejection.code == "out_of_range" and why in rejection.detail
    with pytest.raises(ValueError, match=why):
        bad.commitment()


def test_a_report_needs_a_32_byte_salt_an_address_and_an_epoch() -> None:
    with pytest.raises(ValueError, match="salt"):
        ScoreReport(7, addr(1), HONEST, b"short")
    with pytest.raises(ValueError, match="verifier"):
        ScoreReport(7, "nobody", HONEST, SALT)
    with pytest.raises(ValueError, match="epoch"):
        ScoreReport(-1, addr(1), HONEST, SALT)


@settings(max_examples=100, deadline=None)
@given(
    epoch=st.integers(0, 2**64),
    values=st.lists(st.integers(0, 10_000), min_size=0, max_size=20),
    salt=st.binary(min_size=32, max_size=32),
)
def test_commit_reveal_roundtrips(epoch: int, values: list[int], salt: bytes) -> None:
    scores = {addr(0x200 + i): v for i, v in enumerate(values)}
    revealed = ScoreReport(epoch, addr(1), scores, salt)
    committed = {addr(1): commitment(epoch, addr(1), scores, salt)}
    assert check_reveal(revealed, epoch=epoch, commitments=committed) is None


# -- the median ------------------------------------------------------------------------------


def test_the_weighted_median_needs_more_than_half_the_stake_at_or_above_it() -> None:
    assert stake_weighted_median([(10, 1), (20, 1), (30, 1)], 3) == 20
    assert stake_weighted_median([(10, 1), (20, 1)], 2) == 10  # a tie goes to the lower
    assert stake_weighted_median([(10, 3), (90, 1)], 4) == 10
    assert stake_weighted_median([(90, 3)], 4) == 90
    assert stake_weighted_median([(90, 2)], 4) == 0  # only half the stake named it


# -- a colluding minority --------------------------------------------------------------------


def cartel_run(
    cartel_fraction: Fraction, *, noise: bool = False
) -> tuple[dict[str, int], dict[str, int]]:
    """Ten honest verifiers and a cartel holding `cartel_fraction` of the revealing stake; the
    cartel reports all of the epoch for its miner and nothing for the others. Returns the
    consensus shares and the miners' rewards from a pool of 10^21 wei."""
    honest_stake = 1_000_000
    cartel_stake = int(honest_stake * cartel_fraction / (1 - cartel_fraction))
    reports = []
    stakes = {}
    for i in range(10):
        scores = dict(HONEST)
        if noise:  # honest verifiers measure slightly differently
            signs = (1, -1, 1, -1, 0)  # shares still sum to a million
            scores = {
                m: v + s * (i - 5) * 1000 for (m, v), s in zip(HONEST.items(), signs, strict=True)
            }
        reports.append(report(i + 1, scores))
        stakes[addr(i + 1)] = honest_stake // 10
    reports.append(report(99, {CARTEL_MINER: PPM}))
    stakes[addr(99)] = cartel_stake
    result = consensus(reports, stakes)
    return result.miner_shares, miner_rewards(result, 10**21)


def honest_rewards() -> dict[str, int]:
    return miner_rewards(consensus([report(1, HONEST)], {addr(1): 1}), 10**21)


@pytest.mark.parametrize("percent", [10, 25, 40, 49])
def test_a_colluding_minority_cannot_lift_its_miner(percent: int) -> None:
    shares, rewards = cartel_run(Fraction(percent, 100))
    assert shares == HONEST
    assert rewards == honest_rewards()


@pytest.mark.parametrize("percent", [10, 25, 40, 49])
def test_with_noisy_honest_reports_a_minority_stays_within_the_honest_range(percent: int) -> None:
    shares, _ = cartel_run(Fraction(percent, 100), noise=True)
    for miner, value in HONEST.items():
        assert value - 5000 <= shares[miner] <= value + 5000  # the honest reports' range


def test_exactly_half_the_stake_cannot_lift_its_miner_either() -> None:
    shares, _ = cartel_run(Fraction(1, 2))
    assert shares[CARTEL_MINER] == HONEST[CARTEL_MINER]


@pytest.mark.parametrize("percent", [51, 60])
def test_a_majority_of_the_stake_decides_which_is_the_honest_majority_assumption(
    percent: int,
) -> None:
    shares, rewards = cartel_run(Fraction(percent, 100))
    assert shares[CARTEL_MINER] == PPM
    assert rewards[CARTEL_MINER] == 10**21


def test_paying_the_median_not_the_clipped_mean_stops_deflating_the_others() -> None:
    """Under Yuma's clipped stake-weighted mean the cartel's zeros for every other miner would
    cut their ranks by its stake fraction and so lift its own miner's normalized share; the
    median leaves them where the honest verifiers put them."""
    result = consensus(
        [report(1, HONEST), report(2, HONEST), report(3, {CARTEL_MINER: PPM})],
        {addr(1): 30, addr(2): 30, addr(3): 40},
    )
    clipped_mean = {
        m: sum(result.stakes[v] * result.clipped[v].get(m, 0) for v in result.stakes)
        for m in MINERS
    }
    mean_share = Fraction(clipped_mean[CARTEL_MINER], sum(clipped_mean.values()))
    assert mean_share > Fraction(HONEST[CARTEL_MINER], PPM)  # what Yuma's rank would pay
    assert result.miner_shares == HONEST  # what we pay


@settings(max_examples=100, deadline=None)
@given(
    honest=st.lists(st.integers(0, 200_000), min_size=3, max_size=3),
    cartel_scores=st.lists(st.integers(0, 330_000), min_size=3, max_size=3),
    honest_stakes=st.lists(st.integers(1, 10**6), min_size=3, max_size=3),
    cartel_share=st.fractions(Fraction(0), Fraction(49, 100)),
)
def test_no_minority_report_moves_a_miner_outside_the_honest_reports(
    honest: list[int],
    cartel_scores: list[int],
    honest_stakes: list[int],
    cartel_share: Fraction,
) -> None:
    """Three honest verifiers report different shares for one miner; a cartel with under half
    the stake reports anything; the consensus lies between the lowest and highest honest
    report."""
    total_honest = sum(honest_stakes)
    cartel_stake = int(total_honest * cartel_share / (1 - cartel_share))
    miner = MINERS[0]
    reports = [report(i + 1, {miner: v}) for i, v in enumerate(honest)]
    stakes = {addr(i + 1): s for i, s in enumerate(honest_stakes)}
    for j, value in enumerate(cartel_scores):
        reports.append(report(50 + j, {miner: value}))
        stakes[addr(50 + j)] = max(1, cartel_stake // 3)
    if sum(stakes[addr(50 + j)] for j in range(3)) * 2 >= sum(stakes.values()):
        return  # the rounding up to 1 wei made it half or more
    share = consensus(reports, stakes).miner_shares[miner]
    assert min(honest) <= share <= max(honest)


# -- verifier agreement and pay --------------------------------------------------------------


def test_verifiers_that_report_the_consensus_agree_fully_and_the_cartel_less() -> None:
    result = consensus(
        [report(1, HONEST), report(2, HONEST), report(3, {CARTEL_MINER: PPM})],
        {addr(1): 30, addr(2): 30, addr(3): 40},
    )
    assert result.agreement[addr(1)] == result.agreement[addr(2)] == 1
    assert result.agreement[addr(3)] == Fraction(HONEST[CARTEL_MINER], PPM)
    assert result.clipped[addr(3)] == {CARTEL_MINER: HONEST[CARTEL_MINER]}
    pay = verifier_rewards(result, 10**18 + 1)
    assert sum(pay.values()) == 10**18 + 1
    # Bonds 30 : 30 : 40 x 0.1: the cartel's 40 % of the stake earns under 12 % of the pool.
    assert pay[addr(3)] < pay[addr(1)] // 2
    assert pay[addr(1)] + pay[addr(2)] + pay[addr(3)] == 10**18 + 1


def test_over_reporting_in_total_is_divided_out_of_agreement() -> None:
    half = {m: v // 2 for m, v in HONEST.items()}
    result = consensus([report(1, half), report(2, half), report(3, HONEST)],
                       {addr(1): 1, addr(2): 1, addr(3): 1})  # fmt: skip
    assert result.miner_shares == half
    assert result.agreement[addr(3)] == Fraction(1, 2)


def test_the_early_multiplier_weighs_a_miners_claim_within_the_pool() -> None:
    result = consensus([report(1, {MINERS[0]: 500_000, MINERS[1]: 500_000})], {addr(1): 1})
    assert miner_rewards(result, 300, {MINERS[0]: 2 * PPM}) == {MINERS[0]: 200, MINERS[1]: 100}
    with pytest.raises(ValueError, match="multiplier"):
        miner_rewards(result, 300, {MINERS[0]: PPM - 1})


def test_consensus_refuses_mixed_epochs_repeats_and_unstaked_verifiers() -> None:
    with pytest.raises(ValueError, match="epochs"):
        consensus([report(1, HONEST), report(2, HONEST, epoch=8)], {addr(1): 1, addr(2): 1})
    with pytest.raises(ValueError, match="two reports"):
        consensus([report(1, HONEST), report(1, HONEST)], {addr(1): 1})
    with pytest.raises(ValueError, match="stake"):
        consensus([report(1, HONEST)], {addr(1): 0})
    with pytest.raises(ValueError, match="kappa"):
        consensus([report(1, HONEST)], {addr(1): 1}, kappa=Fraction(1, 3))
    with pytest.raises(ValueError, match="at least one"):
        consensus([], {})
