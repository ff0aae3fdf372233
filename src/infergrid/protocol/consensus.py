"""Verifier score reports, their commit–reveal, and the stake-weighted consensus on them.

**Reports.** Each epoch every verifier scores the miners it observed (protocol.scoring) and
reports each miner's share of the epoch in ppm (`scoring.score_shares_ppm`): integers in
[0, 1,000,000] summing to at most 1,000,000. A miner a report leaves out has share 0.

**Commit–reveal** stops weight copying: a verifier first publishes only a commitment, and
reveals the scores and salt once the commit phase has closed, when copying a revealed vector
can no longer be committed to. The commitment is

    keccak256(abi.encode(bytes32 COMMIT_TAG, uint256 epoch, address verifier,
                         address[] miners, uint256[] scores_ppm, bytes32 salt))

with COMMIT_TAG = keccak256("InferGrid score commitment v1") (so no other message of the
protocol hashes to a commitment), `miners` in ascending order of their 20-byte value with no
repeats, `scores_ppm[i]` the share of `miners[i]`, and `salt` 32 bytes the verifier drew at
random (without it a commitment to a likely vector could be confirmed by guessing). A contract
computes the same with `keccak256(abi_encode(...))`. `check_reveal` refuses, with a reason, a
reveal for another epoch, one with no commitment, a second reveal by the same verifier,
malformed or out-of-range scores, and one that does not match its commitment.

**Consensus** (as in Bittensor's Yuma consensus), over the verifiers that revealed, weighted by
their stake S_v (total S):

- per miner m, the consensus share C_m is the stake-weighted median at κ = 1/2: the largest
  reported share x such that verifiers holding *more than* κ·S of the stake reported at least
  x. So a coalition holding at most half the revealing stake cannot lift C_m above the highest
  share an honest verifier reported for m (the stake reporting any higher value is the
  coalition's alone, ≤ κ·S), nor push it below the lowest honest share (the honest stake,
  > κ·S, reported at least that much). When the honest verifiers agree, C_m is exactly what
  they reported, whatever the coalition does. A coalition with more than half the stake can
  set C_m to anything: that is the honest-majority assumption, stated, not hidden.
- each verifier's report is clipped to the consensus: w̄_vm = min(w_vm, C_m);
- miners are paid in proportion to C_m itself (scoring.allocate), not to the stake-weighted
  mean of the clipped reports that Yuma pays: that mean lets a minority that reports every
  other miner at 0 deflate them and so, once shares are normalized, raise its own miner's
  share; the median cannot be moved by a minority in either direction;
- each verifier's agreement is the overlap of its report with the consensus,
  A_v = Σ_m w̄_vm / max(Σ_m w_vm, Σ_m C_m), in [0, 1], 1 exactly when it reported the
  consensus: over-reporting a miner is clipped away, under-reporting is missed, and reporting
  more than the consensus in total is divided out. Its bond for the epoch is S_v × A_v, and the
  verifier pool is shared in proportion to bonds (scoring.allocate: integer wei, summing
  exactly to the pool). A verifier that did not reveal has no bond.

All arithmetic is on integers and Fractions: every role computes the same consensus bit for bit.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from eth_abi import encode
from eth_utils import is_address, to_bytes, to_checksum_address

from infergrid.protocol.addresses import checked_address as _address
from infergrid.protocol.hashing import keccak256
from infergrid.protocol.pricing import PPM
from infergrid.protocol.scoring import allocate

__all__ = [
    "COMMIT_TAG",
    "KAPPA",
    "MAX_MINERS_PER_REPORT",
    "Consensus",
    "Rejection",
    "ScoreReport",
    "check_reveal",
    "commitment",
    "consensus",
    "miner_rewards",
    "new_salt",
    "stake_weighted_median",
    "verifier_rewards",
]

COMMIT_TAG = keccak256(b"InferGrid score commitment v1")
KAPPA = Fraction(1, 2)
ZERO_ADDRESS = "0x" + "00" * 20
# A bound on one report, so that a reveal cannot exhaust whoever checks it.
MAX_MINERS_PER_REPORT = 100_000


def _key(address: str) -> bytes:
    return to_bytes(hexstr=address)


def new_salt() -> bytes:
    """32 random bytes for a commitment."""
    return secrets.token_bytes(32)


def _uint(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**256:
        raise ValueError(f"{name} must be a uint256, got {value!r}")
    return value


def _scores_problem(scores: Mapping[str, int]) -> str | None:
    """Why a score vector is malformed or out of range, or None."""
    if len(scores) > MAX_MINERS_PER_REPORT:
        return f"more than {MAX_MINERS_PER_REPORT} miners"
    seen: set[str] = set()
    total = 0
    for miner, value in scores.items():
        if not isinstance(miner, str) or not is_address(miner):
            return f"{miner!r} is not an address"
        checksummed = to_checksum_address(miner)
        if checksummed == ZERO_ADDRESS:
            return "the zero address is not a miner"
        if checksummed in seen:
            return f"{checksummed} appears twice"
        seen.add(checksummed)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"the score of {checksummed} is not an integer: {value!r}"
        if not 0 <= value <= PPM:
            return f"the score of {checksummed} is {value}, outside [0, {PPM}] ppm"
        total += value
    if total > PPM:
        return f"the scores sum to {total} ppm, above {PPM}"
    return None


def _canonical(scores: Mapping[str, int]) -> list[tuple[str, int]]:
    """(checksummed miner, ppm) pairs in ascending order of the miners' 20-byte values."""
    return sorted(
        ((to_checksum_address(m), v) for m, v in scores.items()), key=lambda i: _key(i[0])
    )


@dataclass(frozen=True)
class ScoreReport:
    """One verifier's revealed scores for one epoch: `scores` maps miner address → share in
    ppm; `salt` is the 32 bytes committed with them. Construction checks only the types that
    hashing needs; `check_reveal` judges the content."""

    epoch: int
    verifier: str
    scores: Mapping[str, int]
    salt: bytes

    def __post_init__(self) -> None:
        _uint(self.epoch, "epoch")
        object.__setattr__(self, "verifier", _address(self.verifier, "verifier"))
        if not isinstance(self.salt, bytes) or len(self.salt) != 32:
            raise ValueError("salt must be 32 bytes")
        if not isinstance(self.scores, Mapping):
            raise ValueError("scores must be a mapping of miner address to ppm")
        if _scores_problem(self.scores) is None:
            # Well-formed scores are kept checksummed, in the commitment's order.
            object.__setattr__(self, "scores", dict(_canonical(self.scores)))

    @property
    def problem(self) -> str | None:
        """Why the scores are malformed or out of range, or None."""
        return _scores_problem(self.scores)

    def commitment(self) -> bytes:
        """keccak256 of the canonical encoding (module docstring). ValueError if the scores
        are malformed (they have no canonical encoding)."""
        problem = self.problem
        if problem is not None:
            raise ValueError(f"score report: {problem}")
        return commitment(self.epoch, self.verifier, self.scores, self.salt)


def commitment(epoch: int, verifier: str, scores: Mapping[str, int], salt: bytes) -> bytes:
    """The commitment to (epoch, verifier, scores, salt); see the module docstring."""
    _uint(epoch, "epoch")
    verifier = _address(verifier, "verifier")
    if not isinstance(salt, bytes) or len(salt) != 32:
        raise ValueError("salt must be 32 bytes")
    problem = _scores_problem(scores)
    if problem is not None:
        raise ValueError(f"score report: {problem}")
    items = _canonical(scores)
    encoded = encode(
        ["bytes32", "uint256", "address", "address[]", "uint256[]", "bytes32"],
        [COMMIT_TAG, epoch, verifier, [m for m, _ in items], [v for _, v in items], salt],
    )
    return keccak256(encoded)


@dataclass(frozen=True)
class Rejection:
    """Why a reveal was refused: `code` is one of wrong_epoch, no_commitment, duplicate,
    out_of_range, mismatch; `detail` says it for people."""

    code: str
    detail: str


def check_reveal(
    report: ScoreReport,
    *,
    epoch: int,
    commitments: Mapping[str, bytes],
    revealed: Collection[str] = (),
) -> Rejection | None:
    """None when `report` is a valid reveal for `epoch`, else the reason it is not, checked in
    this order: another epoch; no commitment from its verifier (`commitments`: verifier address
    → commitment, this epoch's); its verifier already revealed (`revealed`: addresses); scores
    malformed or out of range; not the committed vector and salt."""
    if report.epoch != epoch:
        return Rejection("wrong_epoch", f"reveal for epoch {report.epoch}, expected {epoch}")
    committed = {to_checksum_address(v): c for v, c in commitments.items()}
    if report.verifier not in committed:
        return Rejection("no_commitment", f"{report.verifier} committed nothing for {epoch}")
    if report.verifier in {to_checksum_address(v) for v in revealed}:
        return Rejection("duplicate", f"{report.verifier} already revealed for epoch {epoch}")
    problem = report.problem
    if problem is not None:
        return Rejection("out_of_range", problem)
    if report.commitment() != committed[report.verifier]:
        return Rejection(
            "mismatch", f"the scores and salt of {report.verifier} do not match its commitment"
        )
    return None


def stake_weighted_median(
    values: Iterable[tuple[int, int]], total_stake: int, kappa: Fraction = KAPPA
) -> int:
    """The largest value x such that the (value, stake) pairs with value >= x hold more than
    kappa × total_stake; 0 if none do. `total_stake` counts every revealing verifier, those
    that reported nothing for this miner (value 0) included."""
    ordered = sorted(values, key=lambda item: -item[0])
    held = 0
    for value, stake in ordered:
        held += stake
        if held * kappa.denominator > kappa.numerator * total_stake:
            return value
    return 0


@dataclass(frozen=True)
class Consensus:
    """One epoch's consensus (module docstring).

    - `miner_shares`: miner → consensus share C_m in ppm (every miner any reveal named);
    - `clipped`: verifier → miner → min(report, C_m);
    - `agreement`: verifier → A_v in [0, 1];
    - `bonds`: verifier → S_v × A_v;
    - `stakes`: verifier → S_v, the revealing verifiers' stake.
    """

    epoch: int
    miner_shares: dict[str, int]
    clipped: dict[str, dict[str, int]]
    agreement: dict[str, Fraction]
    bonds: dict[str, Fraction]
    stakes: dict[str, int]

    @property
    def total_stake(self) -> int:
        return sum(self.stakes.values())


def consensus(
    reports: Sequence[ScoreReport],
    stakes: Mapping[str, int],
    *,
    kappa: Fraction = KAPPA,
) -> Consensus:
    """The consensus of `reports` (accepted reveals of one epoch, one per verifier), weighted
    by `stakes` (verifier address → stake in wei, e.g. the registry's stake_at the epoch's
    start). ValueError for reports of different epochs, two from one verifier, a malformed
    report, a revealing verifier without positive stake, or kappa outside [1/2, 1) (below 1/2
    a minority could decide)."""
    if not isinstance(kappa, Fraction) or not Fraction(1, 2) <= kappa < 1:
        raise ValueError(f"kappa must be a Fraction in [1/2, 1), got {kappa!r}")
    if not reports:
        raise ValueError("consensus needs at least one revealed report")
    epoch = reports[0].epoch
    stake_of = {_address(v, "verifier"): s for v, s in stakes.items()}
    by_verifier: dict[str, ScoreReport] = {}
    for report in reports:
        if report.epoch != epoch:
            raise ValueError(f"reports of epochs {epoch} and {report.epoch} mixed")
        if report.verifier in by_verifier:
            raise ValueError(f"two reports from {report.verifier}")
        if report.problem is not None:
            raise ValueError(f"report of {report.verifier}: {report.problem}")
        stake = stake_of.get(report.verifier, 0)
        if isinstance(stake, bool) or not isinstance(stake, int) or stake <= 0:
            raise ValueError(f"verifier {report.verifier} has no positive stake: {stake!r}")
        by_verifier[report.verifier] = report
    revealing = {v: stake_of[v] for v in by_verifier}
    total = sum(revealing.values())
    miners = sorted({m for r in by_verifier.values() for m in r.scores}, key=_key)
    shares = {
        m: stake_weighted_median(
            ((r.scores.get(m, 0), revealing[v]) for v, r in by_verifier.items()), total, kappa
        )
        for m in miners
    }
    consensus_total = sum(shares.values())
    clipped: dict[str, dict[str, int]] = {}
    agreement: dict[str, Fraction] = {}
    bonds: dict[str, Fraction] = {}
    for verifier, report in by_verifier.items():
        mine = {m: min(v, shares[m]) for m, v in report.scores.items()}
        clipped[verifier] = mine
        denominator = max(sum(report.scores.values()), consensus_total)
        agree = Fraction(sum(mine.values()), denominator) if denominator else Fraction(1)
        agreement[verifier] = agree
        bonds[verifier] = revealing[verifier] * agree
    return Consensus(epoch, shares, clipped, agreement, bonds, revealing)


def verifier_rewards(result: Consensus, pool_wei: int) -> dict[str, int]:
    """The verifier pool in integer wei, in proportion to bonds, summing exactly to the pool
    (unless every bond is 0: then nothing is paid)."""
    return allocate(pool_wei, result.bonds)


def miner_rewards(
    result: Consensus, pool_wei: int, multipliers_ppm: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The miners' pool in integer wei, in proportion to C_m × the miner's early multiplier
    (ppm; 1x where `multipliers_ppm` names no multiplier), summing exactly to the pool. The
    multiplier weighs a miner's claim within the epoch's pool: an early miner's bonus is paid
    by the others' shares, so the emission per epoch stays what the treasury set."""
    multipliers = {to_checksum_address(m): x for m, x in (multipliers_ppm or {}).items()}
    for miner, value in multipliers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < PPM:
            raise ValueError(f"the multiplier of {miner} must be an integer >= {PPM}: {value!r}")
    weights = {m: c * multipliers.get(m, PPM) for m, c in result.miner_shares.items()}
    return allocate(pool_wei, weights)
