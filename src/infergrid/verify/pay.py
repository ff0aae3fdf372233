"""Verifier pay: how one epoch's verifier-pool money is split among the verifiers (pure).

Every `collect` on the PaymentEscrow credits `verifier_pool_ppm` of the payment to the verifier
pool. Once per epoch the pool's holder pays that money out through the RewardDistributor
(verify.pay_epoch), split by this rule:

- **audits**: each verdict a verifier signed that a gateway recorded for a request of the
  epoch's window counts `AUDIT_WEIGHT` (1) point. Canaries are gateway requests too, so the
  gateway's audit of a canary counts like any other.
- **votes**: each vote on a dispute resolved in the window on the winning side (uphold on an
  upheld dispute, reject on a rejected one) counts `VOTE_WEIGHT` points: re-auditing a disputed
  response is worth more than one routine audit, and agreeing with the stake-weighted quorum is
  what cross-verification pays for. A vote on the losing side (against an upheld quorum, or for
  a rejected dispute) counts nothing here; the DisputeManager already slashes it
  (`wrong_vote_slash_ppm`). Votes on a dispute that ended without quorum count nothing either:
  there was no outcome to agree with.

score = AUDIT_WEIGHT × audits + vote_weight × votes_agreeing. The pool is split pro rata to the
scores in integer wei, each share rounded down; the rounding remainder goes to the verifier with
the largest score (ties: the lowest address), so the shares add up to the pool exactly. A
verifier with score 0 gets nothing; if nobody scored, nothing is paid (the pool stays for a
later epoch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eth_utils import is_address, to_checksum_address

__all__ = ["AUDIT_WEIGHT", "VOTE_WEIGHT", "VerifierWork", "verifier_shares"]

# Points per recorded verdict.
AUDIT_WEIGHT = 1
# Points per vote on the winning side of a resolved dispute.
VOTE_WEIGHT = 5
UINT256_MAX = 2**256 - 1


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True)
class VerifierWork:
    """What one verifier did in an epoch's window.

    `audits`: verdicts it signed that gateways recorded (passed and failed alike);
    `votes_agreeing`: votes on the winning side of disputes resolved in the window;
    `votes_against_upheld` and `votes_for_rejected`: votes on the losing side, shown but worth
    nothing. `verifier` is stored checksummed.
    """

    verifier: str
    audits: int = 0
    votes_agreeing: int = 0
    votes_against_upheld: int = 0
    votes_for_rejected: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.verifier, str) or not is_address(self.verifier):
            raise ValueError(f"verifier {self.verifier!r} is not an address")
        object.__setattr__(self, "verifier", to_checksum_address(self.verifier))
        for name in ("audits", "votes_agreeing", "votes_against_upheld", "votes_for_rejected"):
            _count(getattr(self, name), name)

    def score(self, vote_weight: int = VOTE_WEIGHT) -> int:
        """AUDIT_WEIGHT × audits + vote_weight × votes_agreeing; losing votes add nothing."""
        return AUDIT_WEIGHT * self.audits + _count(vote_weight, "vote weight") * self.votes_agreeing

    def to_json(self, vote_weight: int = VOTE_WEIGHT) -> dict[str, int | str]:
        return {
            "verifier": self.verifier,
            "audits": self.audits,
            "votes_agreeing": self.votes_agreeing,
            "votes_against_upheld": self.votes_against_upheld,
            "votes_for_rejected": self.votes_for_rejected,
            "score": self.score(vote_weight),
        }


def _address_key(address: str) -> bytes:
    return bytes.fromhex(address[2:])


def verifier_shares(
    work: Iterable[VerifierWork], pool_wei: int, *, vote_weight: int = VOTE_WEIGHT
) -> dict[str, int]:
    """Split `pool_wei` among the verifiers of `work` by score (module docstring).

    Returns checksummed address -> wei for every verifier whose share is positive (ready for
    settle.rewards.reward_tree); the values add up to `pool_wei` exactly, or the result is
    empty when no verifier scored or the pool is 0. The same input always gives the same
    split, whatever its order. ValueError: a verifier listed twice, a negative or non-int pool
    or weight, a pool above a uint256.
    """
    pool = _count(pool_wei, "pool")
    if pool > UINT256_MAX:
        raise ValueError(f"pool {pool} is above a uint256")
    weight = _count(vote_weight, "vote weight")
    scores: dict[str, int] = {}
    for entry in work:
        if not isinstance(entry, VerifierWork):
            raise ValueError(f"expected a VerifierWork, got {type(entry).__name__}")
        if entry.verifier in scores:
            raise ValueError(f"verifier {entry.verifier} is listed twice")
        scores[entry.verifier] = entry.score(weight)
    total = sum(scores.values())
    if total == 0 or pool == 0:
        return {}
    shares = {address: pool * score // total for address, score in scores.items() if score}
    # The largest score, ties to the lowest address: one fixed winner whatever the input order.
    top = min(shares, key=lambda address: (-scores[address], _address_key(address)))
    shares[top] += pool - sum(shares.values())
    return {address: wei for address, wei in sorted(shares.items()) if wei > 0}
