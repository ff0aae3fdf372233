"""The verifier-pay split (verify.pay.verifier_shares), pure: score = audits + VOTE_WEIGHT ×
agreeing votes, shares pro rata in integer wei adding up to the pool exactly, the remainder to
the largest score (ties: the lowest address), nothing for a zero score or a losing vote, and
the same split whatever the input order; every bad input refused by name."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.verify.pay import AUDIT_WEIGHT, VOTE_WEIGHT, VerifierWork, verifier_shares

A = "0x" + "0a" * 20
B = "0x" + "0b" * 20
C = "0x" + "0c" * 20
ADDRESSES = ["0x" + f"{i:040x}" for i in range(1, 9)]


def checksum(address: str) -> str:
    return VerifierWork(address).verifier


def test_published_weights() -> None:
    assert AUDIT_WEIGHT == 1
    assert VOTE_WEIGHT == 5


def test_pro_rata_with_the_remainder_to_the_largest_score() -> None:
    work = [VerifierWork(A, audits=2), VerifierWork(B, audits=1, votes_agreeing=1)]
    # Scores 2 and 6 of 8: 1000 * 2 // 8 = 250, 1000 * 6 // 8 = 750.
    assert verifier_shares(work, 1000) == {checksum(A): 250, checksum(B): 750}
    # Scores 1, 1, 1 of 100 wei: 33 each, the 1 left over to the lowest address.
    even = [VerifierWork(x, audits=1) for x in (C, B, A)]
    assert verifier_shares(even, 100) == {checksum(A): 34, checksum(B): 33, checksum(C): 33}


def test_a_wrong_vote_earns_nothing() -> None:
    honest = VerifierWork(A, audits=3, votes_agreeing=1)
    wrong = VerifierWork(B, audits=3, votes_against_upheld=1)
    shares = verifier_shares([honest, wrong], 11 * 10**18)
    assert shares == {checksum(A): 8 * 10**18, checksum(B): 3 * 10**18}
    # Losing votes of either kind change nothing.
    again = VerifierWork(B, audits=3, votes_against_upheld=4, votes_for_rejected=2)
    assert verifier_shares([honest, again], 11 * 10**18) == shares


def test_zero_scores_and_an_empty_pool_pay_nothing() -> None:
    assert verifier_shares([], 10**18) == {}
    assert verifier_shares([VerifierWork(A), VerifierWork(B, votes_against_upheld=2)], 5) == {}
    assert verifier_shares([VerifierWork(A, audits=5)], 0) == {}
    # A zero score is left out even when others are paid.
    assert verifier_shares([VerifierWork(A), VerifierWork(B, audits=1)], 7) == {checksum(B): 7}


def test_a_share_that_rounds_to_zero_is_left_out() -> None:
    work = [VerifierWork(A, audits=1), VerifierWork(B, audits=1000)]
    assert verifier_shares(work, 10) == {checksum(B): 10}


def test_vote_weight_is_a_parameter() -> None:
    work = [VerifierWork(A, audits=1), VerifierWork(B, votes_agreeing=1)]
    assert verifier_shares(work, 4, vote_weight=3) == {checksum(A): 1, checksum(B): 3}
    assert verifier_shares(work, 4, vote_weight=0) == {checksum(A): 4}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"verifier": "0x12"}, "verifier '0x12' is not an address"),
        ({"verifier": A, "audits": -1}, "audits must be a non-negative int, got -1"),
        ({"verifier": A, "audits": 1.5}, "audits must be a non-negative int, got 1.5"),
        ({"verifier": A, "votes_agreeing": True}, "votes_agreeing must be a non-negative int"),
        ({"verifier": A, "votes_against_upheld": -2}, "votes_against_upheld must be a non-neg"),
        ({"verifier": A, "votes_for_rejected": "1"}, "votes_for_rejected must be a non-negat"),
    ],
)
def test_bad_work_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        VerifierWork(**kwargs)  # type: ignore[arg-type]
    assert str(exc.value).startswith(message)


def test_bad_splits_are_refused() -> None:
    one = [VerifierWork(A, audits=1)]
    with pytest.raises(ValueError, match="is listed twice"):
        verifier_shares([VerifierWork(A, audits=1), VerifierWork(A.upper().replace("X", "x"))], 1)
    with pytest.raises(ValueError, match="pool must be a non-negative int, got -1"):
        verifier_shares(one, -1)
    with pytest.raises(ValueError, match=r"pool must be a non-negative int, got 1\.0"):
        verifier_shares(one, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is above a uint256"):
        verifier_shares(one, 2**256)
    with pytest.raises(ValueError, match="vote weight must be a non-negative int, got -1"):
        verifier_shares(one, 1, vote_weight=-1)
    with pytest.raises(ValueError, match="expected a VerifierWork, got dict"):
        verifier_shares([{"verifier": A}], 1)  # type: ignore[list-item]


# -- properties -----------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=50)
works = st.lists(
    st.tuples(counts, counts, counts, counts), min_size=0, max_size=len(ADDRESSES)
).map(
    lambda rows: [
        VerifierWork(ADDRESSES[i], audits=a, votes_agreeing=v, votes_against_upheld=w,
                     votes_for_rejected=r)
        for i, (a, v, w, r) in enumerate(rows)
    ]
)  # fmt: skip
pools = st.integers(min_value=0, max_value=10**24)


@settings(max_examples=300, deadline=None)
@given(works, pools)
def test_shares_add_up_to_the_pool_exactly_and_are_positive(
    work: list[VerifierWork], pool: int
) -> None:
    shares = verifier_shares(work, pool)
    scored = any(w.score() for w in work)
    assert sum(shares.values()) == (pool if scored else 0)
    assert all(wei > 0 for wei in shares.values())
    assert set(shares) <= {w.verifier for w in work if w.score() > 0}


@settings(max_examples=200, deadline=None)
@given(works, pools, st.randoms(use_true_random=False))
def test_the_split_does_not_depend_on_the_order(
    work: list[VerifierWork], pool: int, rng: random.Random
) -> None:
    shuffled = list(work)
    rng.shuffle(shuffled)
    assert verifier_shares(shuffled, pool) == verifier_shares(work, pool)


@settings(max_examples=300, deadline=None)
@given(works.filter(bool), pools, st.data())
def test_more_audits_or_agreeing_votes_never_pay_less(
    work: list[VerifierWork], pool: int, data: st.DataObject
) -> None:
    i = data.draw(st.integers(min_value=0, max_value=len(work) - 1))
    me = work[i]
    before = verifier_shares(work, pool).get(me.verifier, 0)
    for more in (
        VerifierWork(me.verifier, me.audits + 1, me.votes_agreeing),
        VerifierWork(me.verifier, me.audits, me.votes_agreeing + 1),
    ):
        after = verifier_shares([*work[:i], more, *work[i + 1 :]], pool)
        assert after.get(me.verifier, 0) >= before


@settings(max_examples=200, deadline=None)
@given(works.filter(bool), pools, st.data())
def test_a_losing_vote_adds_nothing(
    work: list[VerifierWork], pool: int, data: st.DataObject
) -> None:
    i = data.draw(st.integers(min_value=0, max_value=len(work) - 1))
    me = work[i]
    wrong = VerifierWork(
        me.verifier,
        me.audits,
        me.votes_agreeing,
        me.votes_against_upheld + 1,
        me.votes_for_rejected + 1,
    )
    assert verifier_shares([*work[:i], wrong, *work[i + 1 :]], pool) == verifier_shares(work, pool)
