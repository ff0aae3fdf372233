"""The protocol sampler as a plugin for engines the operator already runs (vLLM, SGLang).

A proxy miner (compute.proxy_engine) sends every request to the upstream engine at
temperature 0 with the protocol's own sampling arguments attached (`sampling_args`). The
upstream loads one of these plugins as a logits processor; for each row of its batch that
carries the arguments, the plugin computes the protocol token (protocol.sampling.sample_rows:
scale, mask, add the counter-based noise of (seed, step)) and rewrites the row so that the
engine's greedy argmax is exactly that token. Rows without the arguments are left alone, so
the same server can serve other clients.

The rewritten row is -inf everywhere but 0 at the protocol token, rather than the float64
perturbed scores themselves: the engines keep logits in float32 (or less), and rounding two
close scores to float32 can turn a clear winner into a tie or a loss. A one-hot row is exact
for any dtype, and nothing downstream of a greedy request reads the processed row (vLLM's
`--logprobs-mode raw_logprobs` reports log_softmax of the logits before any processor).

`protocol_logits` is the pure logic both plugins call; vllm_sampler and sglang_sampler only
adapt it to each engine's batch bookkeeping (which row is which request, and how many output
tokens it has so far: the step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infergrid.protocol import sampling

# Keys of the per-request arguments (vLLM: `vllm_xargs`, SGLang: `custom_params`).
ARG_SAMPLER = "infergrid_sampler"
ARG_SEED = "infergrid_seed"
ARG_TEMPERATURE = "infergrid_temperature"
ARG_TOP_P = "infergrid_top_p"
ARG_TOP_K = "infergrid_top_k"

_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class RowArgs:
    """One request's protocol sampling, as the plugin received it."""

    seed: int
    temperature: float | None
    top_p: float | None
    top_k: int | None

    def at(self, step: int) -> sampling.RowSampling:
        """How to sample output token `step` (0-based) of this request."""
        return sampling.RowSampling(self.seed, step, self.temperature, self.top_p, self.top_k)


def sampling_args(
    seed: int, temperature: float | None, top_p: float | None, top_k: int | None
) -> dict[str, str | int | float]:
    """The per-request arguments a proxy sends with a request (see parse_args).

    The seed travels as a decimal string of seed mod 2**64 (the protocol reduces it so anyway):
    a JSON number that large is not safe in every parser. Absent entries mean None.
    """
    args: dict[str, str | int | float] = {
        ARG_SAMPLER: sampling.SAMPLER_VERSION,
        ARG_SEED: str(seed % _U64),
    }
    if temperature is not None:
        args[ARG_TEMPERATURE] = float(temperature)
    if top_p is not None:
        args[ARG_TOP_P] = float(top_p)
    if top_k is not None:
        args[ARG_TOP_K] = int(top_k)
    return args


def _number(args: Mapping[str, Any], key: str, kind: type[float] | type[int]) -> Any:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return kind(value)


def parse_args(args: Mapping[str, Any] | None) -> RowArgs | None:
    """A request's protocol sampling from its arguments; None when it brings none (the plugin
    then leaves its row alone). ValueError for arguments of another sampler version or out
    of range, so the upstream refuses the request instead of sampling it some other way."""
    if not args or ARG_SEED not in args:
        return None
    version = args.get(ARG_SAMPLER)
    if version != sampling.SAMPLER_VERSION:
        raise ValueError(
            f"{ARG_SAMPLER} is {version!r}, but this plugin implements "
            f"{sampling.SAMPLER_VERSION!r}: upgrade infergrid on the upstream or the miner"
        )
    raw_seed = args[ARG_SEED]
    if isinstance(raw_seed, bool) or not isinstance(raw_seed, str | int):
        raise ValueError(f"{ARG_SEED} must be a decimal string, got {raw_seed!r}")
    try:
        seed = int(raw_seed)
    except ValueError:
        raise ValueError(f"{ARG_SEED} must be a decimal string, got {raw_seed!r}") from None
    temperature = _number(args, ARG_TEMPERATURE, float)
    top_p = _number(args, ARG_TOP_P, float)
    top_k = _number(args, ARG_TOP_K, int)
    if temperature is not None and temperature < 0:
        raise ValueError(f"{ARG_TEMPERATURE} must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{ARG_TOP_P} must be in (0, 1], got {top_p}")
    return RowArgs(seed % _U64, temperature, top_p, top_k)


def protocol_logits(
    logits: torch.Tensor, rows: Sequence[sampling.RowSampling | None]
) -> torch.Tensor:
    """Rewrite, in place, every row b with rows[b] set so that its argmax is the protocol
    token (protocol.sampling.sample_rows): 0 there, -inf elsewhere. Rows that are None are
    untouched. Returns `logits`, on its device and in its dtype.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"expected [{len(rows)}, vocab] logits, got {tuple(logits.shape)}")
    ours = [b for b, row in enumerate(rows) if row is not None]
    if not ours:
        return logits
    picked = [row for row in rows if row is not None]
    tokens = sampling.sample_rows(logits[ours], picked)
    index = torch.tensor(ours, device=logits.device)
    logits[index] = float("-inf")
    logits[index, torch.tensor(tokens, device=logits.device)] = 0.0
    return logits
