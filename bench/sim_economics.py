"""Economics simulator: does an epoch pay what the incentives promise? Pure logic, simulated time.

Every number goes through the protocol's own rules: protocol.scoring (scores, shares,
allocations), protocol.consensus (commit-reveal, stake-weighted median, verifier agreement),
protocol.audits (the audit probabilities) and the settlement parameters of settle.profiles
(minimum stake, slash fraction). Four runs:

(a) reward per unit of compute for small and large miners of different reliability and stake;
(b) one miner split into k = 1, 2, 4, 8, 16 identities, its tokens and stake split (equally
    and at random): what the identities earn together against what the miner earned alone;
(c) a colluding verifier minority (10, 25, 40 % of the revealing stake, and 49 / 51 % to show
    where the honest-majority assumption ends) inflating its own miner: what it gains;
(d) cheating miners at the verification issue's audit rates (p = 0.25 for the first 500
    requests, 0.05 after, 1.0 on probation) and the detection rates docs/verification.md
    measured: expected profit of cheating, analytic and Monte Carlo;
(e) demand-driven emission (protocol.supply): three models whose miners start far from their
    demand; each epoch the emission is split by `emission_weights_ppm`, and the few miners
    earning least per unit of capacity move to the model paying most per unit: how fast the
    shed requests vanish, with the shortage boost (default parameters) and without it
    (max_boost 1: emission by tokens served alone). `--supply-only` runs (e) alone.

`python bench/sim_economics.py` prints the tables; `--json` prints them as JSON; `--seed`
fixes the randomness. bench/simulate.py delegates `simulate.py economics ...` to `main`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from eth_utils import to_checksum_address

from infergrid.protocol.audits import FIRST_REQUESTS, P_AFTER, P_FIRST, P_PROBATION
from infergrid.protocol.consensus import ScoreReport, check_reveal, consensus, miner_rewards
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.protocol.pricing import PPM
from infergrid.protocol.scoring import (
    DEFAULT_WEIGHTS,
    MinerObservation,
    quality,
    score,
    score_shares_ppm,
)
from infergrid.protocol.supply import (
    DEFAULT_SUPPLY,
    ModelDemand,
    SupplyParams,
    emission_weights_ppm,
)
from infergrid.settle.profiles import DEVNET_PARAMS, MAINNET_PARAMS

C = DEFAULT_WEIGHTS.stake_per_token_wei
MIN_STAKE = MAINNET_PARAMS.min_stake_miner_wei
SLASH_PPM = MAINNET_PARAMS.max_slash_ppm
TOKENS_PER_UNIT = 10_000_000  # verified tokens an epoch per unit of compute (~116 tokens/s a day)
TOKENS_PER_REQUEST = 250
HEALTH_CHECKS = 288  # one every five minutes of a day-long epoch
MINER_POOL_WEI = 1_000_000 * WEI_PER_BTT

# Detection rates measured in docs/verification.md (issue 10): the attack, where, detected of
# altered answers. 1000/1000 is taken at its 95 % lower bound, 0.997.
DETECTION: tuple[tuple[str, float], ...] = (
    ("substitution (tiny, fp32)", 0.997),
    ("prefill (tiny, fp32)", 0.997),
    ("prefill (llama.cpp GGUF, 29/30)", 29 / 30),
    ("replay (llama.cpp GGUF, 15/16)", 15 / 16),
    ("wrong temperature (llama.cpp GGUF, 25/29)", 25 / 29),
    ("fabricated logprobs (llama.cpp GGUF, 23/30)", 23 / 30),
    ("wrong temperature (bf16 claim, 348/494)", 348 / 494),
)


def addr(kind: int, i: int) -> str:
    return to_checksum_address("0x" + f"{kind:08x}{i:032x}")


# -- miners and their observations -----------------------------------------------------------


@dataclass(frozen=True)
class MinerClass:
    name: str
    count: int
    units: int  # compute, in units of TOKENS_PER_UNIT tokens an epoch at full uptime
    uptime: float
    error_rate: float
    slowness: float  # latency against the model's median
    stake_wei: int


CLASSES = (
    MinerClass("small reliable", 40, 1, 0.999, 0.002, 1.0, MIN_STAKE),
    MinerClass("small unreliable", 40, 1, 0.90, 0.05, 1.5, MIN_STAKE),
    MinerClass("large reliable", 8, 50, 0.999, 0.002, 1.0, 25_000 * WEI_PER_BTT),
    MinerClass("large unreliable", 8, 50, 0.90, 0.05, 1.5, 25_000 * WEI_PER_BTT),
    MinerClass("large reliable, minimum stake", 4, 50, 0.999, 0.002, 1.0, MIN_STAKE),
)


@dataclass(frozen=True)
class Miner:
    address: str
    cls: MinerClass
    tokens: int
    ttft_s: float
    tpot_s: float
    health_ok: int
    requests: int
    errors: int
    audits: int


def make_miners(rng: random.Random) -> list[Miner]:
    miners = []
    for c_index, cls in enumerate(CLASSES):
        for i in range(cls.count):
            up = sum(rng.random() < cls.uptime for _ in range(HEALTH_CHECKS))
            offered = int(cls.units * TOKENS_PER_UNIT * up / HEALTH_CHECKS)
            requests = max(1, offered // TOKENS_PER_REQUEST)
            errors = round(requests * cls.error_rate * rng.uniform(0.8, 1.2))
            tokens = (requests - errors) * TOKENS_PER_REQUEST
            miners.append(
                Miner(
                    address=addr(0x10 + c_index, i),
                    cls=cls,
                    tokens=tokens,
                    ttft_s=0.4 * cls.slowness * rng.lognormvariate(0, 0.05),
                    tpot_s=0.03 * cls.slowness * rng.lognormvariate(0, 0.05),
                    health_ok=up,
                    requests=requests,
                    errors=errors,
                    audits=round(requests * P_AFTER),
                )
            )
    return miners


def observe(miner: Miner, rng: random.Random, noise: float) -> MinerObservation:
    """What one verifier measures of `miner`: tokens and latency with relative noise `noise`."""

    def jitter() -> float:
        return 1.0 + rng.uniform(-noise, noise) if noise else 1.0

    return MinerObservation(
        miner=miner.address,
        verified_tokens=int(miner.tokens * jitter()),
        ttft_s=miner.ttft_s * jitter(),
        tpot_s=miner.tpot_s * jitter(),
        model_ttft_s=0.4,
        model_tpot_s=0.03,
        health_checks=HEALTH_CHECKS,
        health_ok=miner.health_ok,
        requests=miner.requests,
        errors=miner.errors,
        audits_passed=miner.audits,
        audits_failed=0,
        stake_wei=miner.cls.stake_wei,
    )


def honest_shares(
    miners: Sequence[Miner], rng: random.Random, *, verifiers: int = 5, noise: float = 0.0
) -> list[dict[str, int]]:
    """What `verifiers` honest verifiers report: each scores every miner from its own view
    (relative noise `noise` on tokens and latency) and reports the ppm shares."""
    return [
        score_shares_ppm({m.address: score(observe(m, rng, noise)) for m in miners})
        for _ in range(verifiers)
    ]


def settle_epoch(
    honest: Sequence[dict[str, int]],
    rng: random.Random,
    cartel: tuple[Fraction, dict[str, int]] | None = None,
) -> tuple[dict[str, int], Any]:
    """One epoch through commit-reveal and consensus: the honest reports, each verifier of
    equal stake, and `cartel` = (its fraction of the revealing stake, the shares it reveals).
    Returns the miners' rewards and the consensus."""
    reports, stakes, commitments = [], {}, {}
    honest_stake = 10**24
    for v, shares in enumerate(honest):
        reports.append(ScoreReport(1, addr(0xF0, v), shares, rng.randbytes(32)))
        stakes[addr(0xF0, v)] = honest_stake // len(honest)
    if cartel is not None:
        fraction, shares = cartel
        reports.append(ScoreReport(1, addr(0xFC, 0), shares, rng.randbytes(32)))
        stakes[addr(0xFC, 0)] = int(honest_stake * fraction / (1 - fraction))
    for r in reports:
        commitments[r.verifier] = r.commitment()
    revealed: set[str] = set()
    for r in reports:
        rejection = check_reveal(r, epoch=1, commitments=commitments, revealed=revealed)
        assert rejection is None, rejection
        revealed.add(r.verifier)
    result = consensus(reports, stakes)
    return miner_rewards(result, MINER_POOL_WEI), result


def epoch(
    miners: Sequence[Miner], rng: random.Random, *, verifiers: int = 5, noise: float = 0.0
) -> tuple[dict[str, int], Any]:
    return settle_epoch(honest_shares(miners, rng, verifiers=verifiers, noise=noise), rng)


# -- (a) reward per unit of compute ----------------------------------------------------------


def run_compute(rng: random.Random) -> list[dict[str, Any]]:
    miners = make_miners(rng)
    rewards, _ = epoch(miners, rng, noise=0.01)
    total_units = sum(m.cls.units for m in miners)
    per_unit_network = MINER_POOL_WEI / total_units
    per_token_network = MINER_POOL_WEI / sum(m.tokens for m in miners)
    rows = []
    for cls in CLASSES:
        mine = [m for m in miners if m.cls is cls]
        paid = sum(rewards[m.address] for m in mine)
        units = sum(m.cls.units for m in mine)
        tokens = sum(m.tokens for m in mine)
        qualities = [quality(observe(m, rng, 0.0)) for m in mine]
        rows.append(
            {
                "class": cls.name,
                "miners": cls.count,
                "units_each": cls.units,
                "stake_btt_each": cls.stake_wei // WEI_PER_BTT,
                "quality": sum(qualities) / len(qualities),
                "compute_share": units / total_units,
                "reward_share": paid / MINER_POOL_WEI,
                "reward_per_unit": paid / units / per_unit_network,
                "reward_per_token": paid / tokens / per_token_network,
            }
        )
    return rows


# -- (b) splitting ---------------------------------------------------------------------------


def run_split(rng: random.Random, random_splits: int) -> list[dict[str, Any]]:
    """A large reliable miner (50 units, 16 x 25,000 BTT) splits into k identities; every
    identity keeps the registry's minimum stake, the rest is split too."""
    base = make_miners(random.Random(rng.random()))
    big_cls = MinerClass("target", 1, 50, 0.999, 0.002, 1.0, 16 * 25_000 * WEI_PER_BTT)
    big = Miner(addr(0xB0, 0), big_cls, 50 * TOKENS_PER_UNIT * 998 // 1000, 0.4, 0.03,
                HEALTH_CHECKS, 50 * TOKENS_PER_UNIT // TOKENS_PER_REQUEST, 0, 100_000)  # fmt: skip
    alone, _ = epoch([*base, big], rng)
    alone_wei = alone[big.address]
    alone_score = score(observe(big, rng, 0.0))
    rows = []
    for k in (1, 2, 4, 8, 16):
        ratios, score_ratios = [], []
        for trial in range(1 + random_splits):
            if trial == 0:  # equal split
                token_w = [1.0] * k
                stake_w = [1.0] * k
            else:
                token_w = [rng.expovariate(1) for _ in range(k)]
                stake_w = [rng.expovariate(1) for _ in range(k)]
            spare = big_cls.stake_wei - k * MIN_STAKE
            identities = []
            for i in range(k):
                part = Fraction(token_w[i]) / Fraction(sum(token_w))
                stake = MIN_STAKE + int(spare * Fraction(stake_w[i]) / Fraction(sum(stake_w)))
                cls = MinerClass("identity", 1, 0, 0.999, 0.002, 1.0, stake)
                identities.append(
                    Miner(addr(0xB1, i), cls, int(big.tokens * part), 0.4, 0.03, HEALTH_CHECKS,
                          max(1, int(big.requests * part)), 0, max(1, int(100_000 * part)))
                )  # fmt: skip
            paid, _ = epoch([*base, *identities], rng)
            ratios.append(sum(paid[m.address] for m in identities) / alone_wei)
            score_ratios.append(sum(score(observe(m, rng, 0.0)) for m in identities) / alone_score)
        rows.append(
            {
                "k": k,
                "equal_split": ratios[0],
                "random_mean": sum(ratios[1:]) / max(1, len(ratios) - 1),
                "random_max": max(ratios[1:]) if random_splits else ratios[0],
                "score_max": max(score_ratios),
                "min_stake_needed_btt": k * MIN_STAKE // WEI_PER_BTT,
            }
        )
    return rows


# -- (c) colluding verifiers -----------------------------------------------------------------


def run_collusion(rng: random.Random) -> list[dict[str, Any]]:
    """Ten honest verifiers (equal stake) and a cartel holding a share of the revealing stake
    that reports for a small reliable miner it runs; honest views exact or with 1 % noise."""
    miners = make_miners(rng)
    own = miners[0].address
    cartel = addr(0xFC, 0)
    rows = []
    for noise in (0.0, 0.01):
        views = honest_shares(miners, rng, verifiers=10, noise=noise)
        honest, honest_result = settle_epoch(views, rng)
        reported = [v[own] for v in views]
        strategies: dict[str, dict[str, int]] = {
            "all of the epoch to its miner": {own: PPM},
            "its miner x10, the rest scaled down": _inflate(honest_result.miner_shares, own, 10),
        }
        for percent in (10, 25, 40, 49, 51):
            for name, shares in strategies.items():
                paid, result = settle_epoch(views, rng, cartel=(Fraction(percent, 100), shares))
                bonds = result.bonds
                rows.append(
                    {
                        "honest_noise": noise,
                        "cartel_stake_pct": percent,
                        "strategy": name,
                        "honest_reports_ppm": f"{min(reported)}-{max(reported)}",
                        "consensus_ppm": f"{honest_result.miner_shares[own]} -> "
                        f"{result.miner_shares[own]}",
                        "miner_gain_pct": 100 * (paid[own] / honest[own] - 1),
                        "cartel_agreement": float(result.agreement[cartel]),
                        "cartel_verifier_pay_share": float(bonds[cartel] / sum(bonds.values())),
                    }
                )
    return rows


def _inflate(shares: dict[str, int], own: str, factor: int) -> dict[str, int]:
    lifted = min(PPM, shares[own] * factor)
    rest = PPM - lifted
    others = {m: v for m, v in shares.items() if m != own}
    total = sum(others.values())
    out = {m: v * rest // total for m, v in others.items()}
    out[own] = lifted
    return out


# -- (d) cheating ----------------------------------------------------------------------------


def run_cheating(
    rng: random.Random, trials: int, requests: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Analytic: for one cheated request of reward R (its fee, all of which cheating could save
    at most), expected profit R - p*d*(R + S) with S the slash (max_slash_ppm of the minimum
    stake). Monte Carlo: a miner with the minimum stake cheats on each of `requests` requests
    with probability f, audited at p = audit_probability (0.25 for its first 500, 0.05 after,
    1.0 once caught, when it goes on probation); each caught cheat voids its reward and
    slashes max_slash_ppm of the remaining stake."""
    request_wei = 1000 * 10**12  # a 1,000-token request at the default price
    slash = MIN_STAKE * SLASH_PPM // PPM
    analytic = []
    for attack, d in DETECTION:
        for label, p in (("first 500", P_FIRST), ("after", P_AFTER), ("probation", P_PROBATION)):
            ratio = 1 / (p * d) - 1
            analytic.append(
                {
                    "attack": attack,
                    "d": d,
                    "phase": label,
                    "p": p,
                    "break_even_S_over_R": ratio,
                    "S_over_R": slash / request_wei,
                    "profit_per_cheat_R": 1 - p * d * (1 + slash / request_wei),
                    "max_R_deterred_btt": slash / ratio / WEI_PER_BTT,
                    "devnet_max_R_deterred_btt": (
                        DEVNET_PARAMS.min_stake_miner_wei * DEVNET_PARAMS.max_slash_ppm // PPM
                    )
                    / ratio
                    / WEI_PER_BTT,
                }
            )
    np_rng = np.random.default_rng(rng.getrandbits(63))
    index = np.arange(requests)
    p_normal = np.where(index < FIRST_REQUESTS, P_FIRST, P_AFTER)
    monte = []
    for attack, d in DETECTION:
        for f in (0.01, 0.1, 1.0):
            cheat = np_rng.random((trials, requests)) < f
            draw = np_rng.random((trials, requests))
            caught_normal = cheat & (draw < p_normal * d)
            caught_any = caught_normal.any(axis=1)
            first = np.where(caught_any, caught_normal.argmax(axis=1), requests)
            on_probation = index[None, :] > first[:, None]
            caught = np.where(on_probation, cheat & (draw < P_PROBATION * d), caught_normal)
            n_cheat = cheat.sum(axis=1)
            n_caught = caught.sum(axis=1)
            # Each catch slashes half of what is left: stake * (1 - (1 - 1/2)^n).
            keep = (1 - SLASH_PPM / PPM) ** n_caught
            slashed = MIN_STAKE * (1 - keep)
            profit = n_cheat * request_wei - n_caught * request_wei - slashed
            monte.append(
                {
                    "attack": attack,
                    "d": d,
                    "cheat_fraction": f,
                    "requests": requests,
                    "p_caught": float(caught_any.mean()),
                    "mean_cheats": float(n_cheat.mean()),
                    "mean_profit_btt": float(profit.mean() / WEI_PER_BTT),
                    "best_trial_profit_btt": float(profit.max() / WEI_PER_BTT),
                }
            )
    return analytic, monte


def run_accuracy(fractions: Sequence[float] = (0.01, 0.05, 0.2, 0.5)) -> list[dict[str, Any]]:
    """The epoch score of a miner that cheats on a fraction f of its requests at zero cost,
    so that it serves 1/(1-f) times the tokens, against an honest one (audits: 5 % of 40,000
    requests, failed at d*f)."""
    rows = []
    honest = MinerObservation(addr(1, 0), 10**7, 0.4, 0.03, 0.4, 0.03, HEALTH_CHECKS,
                              HEALTH_CHECKS, 40_000, 0, 2000, 0, MIN_STAKE)  # fmt: skip
    for attack, d in DETECTION:
        row: dict[str, Any] = {"attack": attack, "d": d}
        for f in fractions:
            failed = round(2000 * d * f)
            cheat = MinerObservation(addr(1, 0), int(10**7 / (1 - f)), 0.4, 0.03, 0.4, 0.03,
                                     HEALTH_CHECKS, HEALTH_CHECKS, 40_000, 0, 2000 - failed,
                                     failed, MIN_STAKE)  # fmt: skip
            row[f"f={f}"] = score(cheat) / score(honest)
        rows.append(row)
    return rows


# -- output ----------------------------------------------------------------------------------


# (e): busy slot-units each model is asked for (a slot-unit: one miner's slots for an epoch),
# and where the 100 miners start.
SUPPLY_DEMAND = {"big": 60.0, "mid": 25.0, "niche": 5.0}
SUPPLY_START = {"big": 20, "mid": 40, "niche": 40}
EPOCH_S = 86400.0
REQUESTS_PER_UNIT = 1000
TOKENS_PER_SLOT_UNIT = 1_000_000


def supply_epoch(
    miners_on: dict[str, int], params: SupplyParams
) -> tuple[dict[str, ModelDemand], dict[str, int]]:
    """One epoch: each model serves what its miners' slots can take (all of them busy at
    most), sheds the rest, and the emission is split by protocol.supply."""
    rows: dict[str, ModelDemand] = {}
    for model, asked in SUPPLY_DEMAND.items():
        capacity = float(miners_on[model])
        busy = min(asked, capacity)
        requests = int(asked * REQUESTS_PER_UNIT)
        shed = round(requests * (asked - busy) / asked)
        rows[model] = ModelDemand(
            model, requests, shed, int(asked * TOKENS_PER_SLOT_UNIT),
            int(busy * TOKENS_PER_SLOT_UNIT), busy * EPOCH_S, capacity * EPOCH_S,
        )  # fmt: skip
    return rows, emission_weights_ppm(rows.values(), params)


def run_supply(epochs: int = 30, response: float = 0.1) -> list[dict[str, Any]]:
    """(e): each epoch, of the miners of the model paying least per miner, a part grows with
    the pay gap (`response` × (richest / poorest − 1) of them, at most half, at least one
    when the gap is 5 % or more) moves to the model paying most; rows at a few epochs."""
    rows: list[dict[str, Any]] = []
    for rule, params in (
        ("boost (default)", DEFAULT_SUPPLY),
        ("tokens only", SupplyParams(max_boost=1)),
    ):
        miners_on = dict(SUPPLY_START)
        for epoch in range(epochs + 1):
            demand, weights = supply_epoch(miners_on, params)
            per_miner = {m: weights[m] / max(miners_on[m], 1) for m in miners_on}
            if epoch in (0, 2, 5, 10, 15, 20, epochs):
                shed = sum(d.shed for d in demand.values())
                asked = sum(d.requests for d in demand.values())
                row: dict[str, Any] = {"rule": rule, "epoch": epoch}
                for m, d in demand.items():
                    row[f"{m} miners"] = miners_on[m]
                    row[f"{m} util"] = round(d.utilization, 3)
                    row[f"{m} share_ppm"] = weights[m]
                row["shed_%"] = round(100 * shed / asked, 2)
                rows.append(row)
            poorest = min((m for m in miners_on if miners_on[m] > 0), key=per_miner.__getitem__)
            richest = max(miners_on, key=per_miner.__getitem__)
            gap = per_miner[richest] / per_miner[poorest] if per_miner[poorest] else 10.0
            if gap >= 1.05:
                part = min(0.5, response * (gap - 1))
                moved = max(1, int(part * miners_on[poorest]))
                miners_on[poorest] -= moved
                miners_on[richest] += moved
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or (1e-3 <= abs(value) < 1e6):
            return f"{value:.6g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from machine_info import cpu_model

        return cpu_model()
    except ImportError:  # pragma: no cover
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sim_economics.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=11, help="randomness (default 11)")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON")
    parser.add_argument(
        "--random-splits", type=int, default=8, help="random splits per k in (b) (default 8)"
    )
    parser.add_argument(
        "--trials", type=int, default=400, help="Monte Carlo trials per case in (d)"
    )
    parser.add_argument(
        "--requests", type=int, default=5000, help="requests per cheating miner in (d)"
    )
    parser.add_argument("--supply-only", action="store_true", help="run (e) alone")
    args = parser.parse_args(argv)
    if args.supply_only:
        started = time.process_time()
        supply = run_supply()
        if args.json:
            print(json.dumps({"supply": supply, "cpu_s": time.process_time() - started}))
            return
        print(f"(e) demand-driven emission ({time.process_time() - started:.1f} s CPU)\n")
        print(table(supply))
        return
    if args.trials < 1 or args.requests < 1 or args.random_splits < 0:
        parser.error("--trials and --requests must be positive, --random-splits >= 0")
    started = time.process_time()
    rng = random.Random(args.seed)
    out: dict[str, Any] = {
        "seed": args.seed,
        "weights": DEFAULT_WEIGHTS.as_dict(),
        "min_stake_btt": MIN_STAKE // WEI_PER_BTT,
        "slash_ppm": SLASH_PPM,
        "compute": run_compute(rng),
        "split": run_split(rng, args.random_splits),
        "collusion": run_collusion(rng),
    }
    analytic, monte = run_cheating(rng, args.trials, args.requests)
    out["cheating_analytic"] = analytic
    out["cheating_monte_carlo"] = monte
    out["cheating_epoch_score"] = run_accuracy()
    out["supply"] = run_supply()
    out["cpu_s"] = time.process_time() - started
    out["machine"] = machine()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    titles = {
        "compute": "(a) reward per unit of compute (1.0 = the network's average)",
        "split": "(b) one miner split into k identities with its stake: reward / reward alone",
        "collusion": "(c) a colluding verifier minority inflating its own miner",
        "cheating_analytic": "(d) one cheated request: expected profit in units of its reward R",
        "cheating_monte_carlo": "(d) a cheating miner with the minimum stake, Monte Carlo",
        "cheating_epoch_score": "(d) epoch score of a cheater that serves 1/(1-f) more tokens",
        "supply": "(e) demand-driven emission: miners move to the model paying most per miner",
    }
    print(f"seed {args.seed}; weights {out['weights']}; miner stake {out['min_stake_btt']} BTT;")
    print(f"slash {SLASH_PPM} ppm; {out['machine']}; {out['cpu_s']:.1f} s CPU\n")
    for key, title in titles.items():
        print(f"{title}\n\n{table(out[key])}\n")
    if not all(r["profit_per_cheat_R"] < 0 for r in analytic) or not all(
        r["mean_profit_btt"] < 0 for r in monte
    ):
        print("WARNING: cheating had a non-negative expected profit somewhere", file=sys.stderr)


if __name__ == "__main__":
    main()
