"""Demand-driven emission: how an epoch's miner emission is split between the models.

The gateway publishes, per model over a window, what was asked of the network and what the
network had (`GET /v1/network`, one `ModelDemand` per row). The treasury splits the epoch's
miner emission between the models by the rule below (`emission_weights_ppm`), then each
model's part between the miners offering it by their consensus shares (`allocate_by_model`).
Everyone who reads the same rows computes the same weights, bit for bit: the arithmetic is
on integers and exact Fractions (a float from the JSON is taken at its exact binary value).

**The rule.** For model m with tokens served S_m, requests n_m, of which h_m were shed, busy
slot-seconds B_m and capacity slot-seconds C_m:

    utilization  u_m = B_m / C_m                          (0 when C_m = 0)
    pressure     x_m = u_m / u* + σ × h_m / n_m            (h_m / n_m = 0 when n_m = 0)
    boost        b_m = 1 + (G − 1) × x_m / (1 + x_m)        in [1, G)
    weight       w_m = S_m × b_m

with u* = `target_utilization`, σ = `shed_weight`, G = `max_boost` (`SupplyParams`). The
emission less the floor part F (`floor_total_ppm`, 0 by default) is shared in proportion to
w_m; F is shared equally between the models with capacity (C_m > 0). Both parts are exact
largest-remainder splits (protocol.scoring.allocate, ties to the model name first in sorted
order), so the weights sum to exactly 1,000,000 ppm whenever some model has w_m > 0; when
none has (nothing was served anywhere) every weight is 0 and nothing is paid by demand.

What follows from it:

- a model nobody asked for and nobody serves gets 0; one that served nothing gets only its
  part of the floor: emission pays for work done, and the pressure of a model that served
  nothing (all shed, no capacity) is published for operators to act on, not paid to nobody;
- for equal tokens served (S > 0) and G > 1, higher utilization or a larger fraction of shed
  requests gives a strictly larger exact weight (b is strictly increasing in x), and the ppm
  a model gets are non-decreasing in its pressure (largest remainder keeps the order of the
  exact shares);
- **bounded gain**: b_m < G, so a model's demand share is below G × S_m / Σ S_j: a token
  served for a starved model earns at most G times a token served for an idle one, however
  the pressure was obtained. Pressure moves emission towards models short of capacity
  without letting any model take more than its served demand justifies;
- splitting a model's traffic between two names with the same utilization and shed fraction
  leaves the weights as they were (w is additive in S at fixed pressure), up to one ppm of
  rounding.

**Why it is costly to game.** The base is tokens *served*, which developers pay for at the
model's price: a miner feeding its own model pays the protocol fee and the verifier pool on
every token it invents, and gains at most G × that in emission weight, shared with every
other miner of the model. Shed requests count only when the gateway itself refused them with
429 network_saturated, i.e. when every slot of the model's healthy miners was already taken
by running attempts, which are real (paid) work; a flood of requests that would be shed
costs the flooder nothing, but also serves nothing, so it multiplies only the demand already
served, by less than G. Withholding capacity (declaring fewer slots to raise utilization) is
bounded the same way and loses the withholder the tokens it would have served; it is
exactly the signal the rule wants: a model short of capacity pays more, so others enter.
A floor part would be paid to a model whatever it serves, so a miner that offers a model no
one else offers would collect that model's floor alone; that is why the floor is 0 by
default and, when set, a fixed total shared between all models with capacity (more models
dilute it, they do not multiply it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from eth_utils import to_checksum_address

from infergrid.protocol.addresses import checked_address
from infergrid.protocol.pricing import PPM
from infergrid.protocol.scoring import allocate

__all__ = [
    "DEFAULT_SUPPLY",
    "ModelAllocation",
    "ModelDemand",
    "SupplyParams",
    "allocate_by_model",
    "demand_from_network",
    "emission_weights_ppm",
    "model_weight",
]


def _count(row: Mapping[str, Any], name: str) -> int:
    if name not in row:
        raise ValueError(f"network row: {name} is missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"network row: {name} must be a non-negative integer, got {value!r}")
    return value


def _seconds(row: Mapping[str, Any], name: str) -> float:
    if name not in row:
        raise ValueError(f"network row: {name} is missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"network row: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"network row: {name} must be finite and >= 0, got {value!r}")
    return float(value)


def utilization(busy_slot_s: float, capacity_slot_s: float) -> float:
    """A model's utilization over a window: the slot time its attempts held over the slot time
    its miners offered; 0 when nothing was offered (the gateway publishes it this way too)."""
    return busy_slot_s / capacity_slot_s if capacity_slot_s > 0 else 0.0


@dataclass(frozen=True)
class ModelDemand:
    """What one model was asked for and had over a window (a row of the gateway's
    `GET /v1/network`): `requests` received, `shed` of them refused 429 network_saturated,
    `tokens_requested` (prompt estimate + max_tokens of every request), `tokens_served`
    (prompt + completion of the answered ones), `busy_slot_s` (attempts' durations summed) and
    `capacity_slot_s` (the healthy miners' slots integrated over the window). ValueError
    naming the field for a negative, non-integer count, bool, non-finite number, or more shed
    than requests."""

    model: str
    requests: int = 0
    shed: int = 0
    tokens_requested: int = 0
    tokens_served: int = 0
    busy_slot_s: float = 0.0
    capacity_slot_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"network row: model must be a non-empty string, got {self.model!r}")
        values = {f: getattr(self, f) for f in ("requests", "shed", "tokens_requested")}
        values["tokens_served"] = self.tokens_served
        for name, value in values.items():
            _count({name: value}, name)
        for name in ("busy_slot_s", "capacity_slot_s"):
            object.__setattr__(self, name, _seconds({name: getattr(self, name)}, name))
        if self.shed > self.requests:
            raise ValueError(
                f"network row: shed ({self.shed}) exceeds requests ({self.requests})"
                f" for {self.model}"
            )

    @property
    def utilization(self) -> float:
        return utilization(self.busy_slot_s, self.capacity_slot_s)

    @property
    def shed_fraction(self) -> float:
        return self.shed / self.requests if self.requests else 0.0

    @classmethod
    def from_json(cls, row: object) -> ModelDemand:
        """One `models[]` row of `GET /v1/network`, read strictly: the fields above must be
        there with the right types (other fields are the gateway's and are not read)."""
        if not isinstance(row, Mapping):
            raise ValueError(f"network row: expected an object, got {type(row).__name__}")
        if "model" not in row:
            raise ValueError("network row: model is missing")
        return cls(
            model=row["model"],
            requests=_count(row, "requests"),
            shed=_count(row, "shed"),
            tokens_requested=_count(row, "tokens_requested"),
            tokens_served=_count(row, "tokens_served"),
            busy_slot_s=_seconds(row, "busy_slot_s"),
            capacity_slot_s=_seconds(row, "capacity_slot_s"),
        )


def demand_from_network(body: object) -> dict[str, ModelDemand]:
    """Model name → ModelDemand from a whole `GET /v1/network` answer. ValueError for an
    answer that is not a network object, a bad row (naming its field), or a model twice."""
    if not isinstance(body, Mapping) or body.get("object") != "network":
        raise ValueError("the gateway's /v1/network answer is not a network object")
    rows = body.get("models")
    if not isinstance(rows, list):
        raise ValueError("the gateway's /v1/network answer has no models list")
    return _by_model(ModelDemand.from_json(row) for row in rows)


def _number(value: float, name: str, low: float, high: float, *, open_low: bool) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise ValueError(f"supply: {name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"supply: {name} must be finite, got {value!r}")
    exact = Fraction(value)
    if exact < low or (open_low and exact == low) or exact > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"supply: {name} must be in {bracket}{low}, {high}], got {value!r}")
    return exact


@dataclass(frozen=True)
class SupplyParams:
    """The published parameters of the rule (module docstring), with their defaults:

    - `target_utilization` u* = 0.5, in (0, 1]: the gateway counts two slots per declared
      concurrent request (running and queued), so 0.5 is every running slot busy on average,
      the point from which requests start to wait; a model there has pressure 1 and a boost of
      (1 + G) / 2;
    - `shed_weight` σ = 4, in [0, 100]: shedding a quarter of a model's requests weighs as much
      as running at the target;
    - `max_boost` G = 4, in [1, 100]: a token served for the most starved model weighs less
      than G tokens of an idle one; G = 1 shares by tokens served alone;
    - `floor_total_ppm` = 0, in [0, 1,000,000): the part shared equally between models with
      capacity whatever they served (see the module docstring for why it defaults to 0).

    ValueError naming the parameter when out of range."""

    target_utilization: float = 0.5
    shed_weight: float = 4.0
    max_boost: float = 4.0
    floor_total_ppm: int = 0
    _exact: tuple[Fraction, Fraction, Fraction] = field(
        init=False, repr=False, compare=False, default=(Fraction(0),) * 3
    )

    def __post_init__(self) -> None:
        target = _number(self.target_utilization, "target_utilization", 0, 1, open_low=True)
        shed = _number(self.shed_weight, "shed_weight", 0, 100, open_low=False)
        boost = _number(self.max_boost, "max_boost", 1, 100, open_low=False)
        floor = self.floor_total_ppm
        if isinstance(floor, bool) or not isinstance(floor, int) or not 0 <= floor < PPM:
            raise ValueError(f"supply: floor_total_ppm must be an int in [0, {PPM}), got {floor!r}")
        object.__setattr__(self, "_exact", (target, shed, boost))


DEFAULT_SUPPLY = SupplyParams()


def model_weight(demand: ModelDemand, params: SupplyParams = DEFAULT_SUPPLY) -> Fraction:
    """w_m = S_m × b_m exactly (module docstring): tokens served times the shortage boost."""
    target, shed_weight, max_boost = params._exact
    utilization = (
        Fraction(demand.busy_slot_s) / Fraction(demand.capacity_slot_s)
        if demand.capacity_slot_s
        else Fraction(0)
    )
    shed = Fraction(demand.shed, demand.requests) if demand.requests else Fraction(0)
    pressure = utilization / target + shed_weight * shed
    boost = 1 + (max_boost - 1) * pressure / (1 + pressure)
    return demand.tokens_served * boost


def _slot(index: int) -> str:
    # allocate() keys its accounts by address and breaks ties by the lower one: model i of the
    # sorted names becomes address i + 1, so ties go to the name first in sorted order.
    return to_checksum_address(f"0x{index + 1:040x}")


def _split(total: int, weights: Mapping[str, Fraction | int]) -> dict[str, int]:
    """protocol.scoring.allocate over names instead of addresses."""
    names = sorted(weights)
    parts = allocate(total, {_slot(i): weights[name] for i, name in enumerate(names)})
    return {name: parts[_slot(i)] for i, name in enumerate(names)}


def _by_model(demands: Iterable[ModelDemand]) -> dict[str, ModelDemand]:
    found: dict[str, ModelDemand] = {}
    for demand in demands:
        if not isinstance(demand, ModelDemand):
            raise ValueError(f"supply: expected ModelDemand rows, got {type(demand).__name__}")
        if demand.model in found:
            raise ValueError(f"supply: model {demand.model!r} appears twice")
        found[demand.model] = demand
    return found


def emission_weights_ppm(
    demands: Iterable[ModelDemand] | Mapping[str, ModelDemand],
    params: SupplyParams = DEFAULT_SUPPLY,
) -> dict[str, int]:
    """Each model's share of the epoch's miner emission in ppm (module docstring): every model
    given is present; the shares sum to exactly 1,000,000 when some model served tokens, and
    are all 0 otherwise. ValueError for a model given twice."""
    rows = _by_model(demands.values() if isinstance(demands, Mapping) else demands)
    weights = {name: model_weight(row, params) for name, row in rows.items()}
    if not any(weights.values()):
        return dict.fromkeys(rows, 0)
    with_capacity = {name: 1 for name, row in rows.items() if row.capacity_slot_s > 0}
    floor_total = params.floor_total_ppm if with_capacity else 0
    shares = _split(PPM - floor_total, weights)
    if floor_total:
        for name, part in _split(floor_total, with_capacity).items():
            shares[name] += part
    return shares


@dataclass(frozen=True)
class ModelAllocation:
    """One epoch's emission split by model: `pools` the wei of each model's part,
    `allocations` each miner's wei summed over the models it offers (miners with nothing
    absent), `unpaid` the wei of each model whose pool went to nobody because no miner
    offering it had a positive share (not paid out: the treasury keeps it). The allocations
    and the unpaid wei add up to the emission exactly (when some weight is positive)."""

    pools: dict[str, int]
    allocations: dict[str, int]
    unpaid: dict[str, int]

    @property
    def unpaid_wei(self) -> int:
        return sum(self.unpaid.values())


def allocate_by_model(
    emission_wei: int,
    shares_ppm: Mapping[str, int],
    miner_models: Mapping[str, Sequence[str]],
    weights_ppm: Mapping[str, int],
    multipliers_ppm: Mapping[str, int] | None = None,
) -> ModelAllocation:
    """Split `emission_wei` between the models in proportion to `weights_ppm` (exact largest
    remainder), then each model's pool between the miners offering it (`miner_models`: miner
    → offer names) in proportion to consensus share (`shares_ppm`) × early multiplier (ppm,
    1x where none is given, as protocol.consensus.miner_rewards) / k, k the number of
    distinct models the miner offers: a miner's share counts 1/k in each of its models, so
    offering more models spreads it, it does not multiply it. Integer wei; never more than
    the emission in total. ValueError for a negative emission or weight, a bad address, or a
    multiplier below 1x."""
    if isinstance(emission_wei, bool) or not isinstance(emission_wei, int) or emission_wei < 0:
        raise ValueError(f"supply: the emission must be a non-negative int, got {emission_wei!r}")
    for name, weight in weights_ppm.items():
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"supply: the weight of {name!r} must be an int >= 0: {weight!r}")
    multipliers = {
        checked_address(m, "supply: miner"): x for m, x in (multipliers_ppm or {}).items()
    }
    for miner, value in multipliers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < PPM:
            raise ValueError(
                f"supply: the multiplier of {miner} must be an int >= {PPM}: {value!r}"
            )
    shares = {checked_address(m, "supply: miner"): s for m, s in shares_ppm.items()}
    offered = {
        checked_address(m, "supply: miner"): sorted(set(models))
        for m, models in miner_models.items()
    }
    pools = _split(emission_wei, weights_ppm) if any(weights_ppm.values()) else {}
    allocations: dict[str, int] = {}
    unpaid: dict[str, int] = {}
    for model, pool in pools.items():
        claims = {
            miner: Fraction(shares.get(miner, 0) * multipliers.get(miner, PPM), len(models))
            for miner, models in offered.items()
            if model in models
        }
        if pool == 0:
            continue
        if not any(claims.values()):
            unpaid[model] = pool
            continue
        for miner, amount in allocate(pool, claims).items():
            if amount:
                allocations[miner] = allocations.get(miner, 0) + amount
    return ModelAllocation(pools, allocations, unpaid)
