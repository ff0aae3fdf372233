"""The protocol-defined sampler: Gumbel-max with noise a verifier can replay.

A miner must pick every output token with `sample_token`, so that a verifier holding the
request seed can recompute the exact noise of each step and score how far the emitted token
was from losing (its margin). The definition, precisely:

1. Step seed. `step_seed(seed, step)` is the first 8 bytes, read big-endian as an unsigned
   integer, of SHA-256(seed_bytes ‖ step_bytes), where seed_bytes is the request seed reduced
   modulo 2**64 as 8 bytes big-endian (so negative and huge seeds are well defined) and
   step_bytes is the 0-based index of the output token as 8 bytes big-endian.
2. Noise. `gumbel_noise(seed, step, vocab_size)` is counter-based: with key = step_seed(seed,
   step), the noise of token index i (0-based) is computed from i alone, all integer
   arithmetic modulo 2**64:
       z = key + (i + 1) * 0x9E3779B97F4A7C15
       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z ^ (z >> 27)) * 0x94D049BB133111EB
       z = z ^ (z >> 31)                                  (the splitmix64 finalizer)
       u = ((z >> 11) + 0.5) * 2**-53                     (float64, exactly, in (0, 1))
       g = -log(-log(u))                                  (float64)
   No generator state: any device computes any row, token or batch independently, so a GPU
   batch makes its noise on the GPU and a batch's rows never depend on each other. The
   integer stage and u are bit-identical everywhere; the two logarithms are float64 library
   calls, equal across CPU, CUDA and numpy to within an ulp or two (about 1e-15), far below the
   audit's margin tolerance. docs/protocol.md lists test vectors. The version of this sampler
   is SAMPLER_VERSION, which a miner names in its wire extension.
3. Scores. All arithmetic is float64 on the CPU. With `x` the raw logits of the step:
   - temperature 0 means greedy: the token is argmax(x), lowest index on ties, no noise;
     temperature None means the OpenAI default, 1.0;
   - otherwise `s = x / temperature`;
   - top-k (k >= 1; None, 0 or -1 disable it) keeps tokens with s >= the k-th largest s;
   - top-p (< 1; None or 1 disable it) then keeps token i iff the probability mass, under
     softmax of s over the tokens top-k kept, of tokens *strictly* more likely than i is
     < top_p. This is order-free (equal tokens are kept or dropped together) and always
     keeps the most likely token;
   - the token is argmax(s + g) over kept tokens (lowest index on ties).
   Gumbel-max makes this an exact sample from softmax(s) restricted to the kept set.

`token_logprobs(logits)` is the natural distribution (log_softmax of raw logits, before
temperature), which is what the wire format reports and what the verifier recomputes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SAMPLER_VERSION = "gumbel-splitmix64-v1"

_U64 = 1 << 64
_CPU = torch.device("cpu")
# Top-p needs the most likely tokens in order; a full sort of a 150k vocabulary costs
# milliseconds a step, so look at the top candidates first and widen only if needed.
_TOP_P_FIRST_CANDIDATES = 64

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TWO_POW_MINUS_53 = 2.0**-53
_CPU_BLOCK = 65536


def step_seed(seed: int, step: int) -> int:
    """The 64-bit noise key for output token `step` of a request seeded with `seed`."""
    if step < 0:
        raise ValueError("step must be >= 0")
    payload = (seed % _U64).to_bytes(8, "big") + step.to_bytes(8, "big")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big")


def _signed(value: int) -> int:
    """A u64 as the int64 with the same bits (torch has no full uint64 arithmetic)."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


@lru_cache(maxsize=16)
def _counters(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(i + 1) * GOLDEN mod 2**64 for every token index, as int64 bits (the same every step)."""
    index = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device)
    return index.mul_(_signed(_GOLDEN))


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer, in place on int64 bits, then u in (0, 1) and g = -log(-log u)."""
    z ^= _shr(z, 30)
    z *= _signed(_MIX1)
    z ^= _shr(z, 27)
    z *= _signed(_MIX2)
    z ^= _shr(z, 31)
    u = _shr(z, 11).to(torch.float64).add_(0.5).mul_(_TWO_POW_MINUS_53)
    return u.log_().neg_().log_().neg_()


def gumbel_noise_rows(
    keys: Sequence[int], vocab_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Noise for several rows at once: [len(keys), vocab_size] float64, row b keyed keys[b]."""
    dev = _CPU if device is None else torch.device(device)
    counters = _counters(vocab_size, dev)
    if dev.type != "cpu":
        column = torch.tensor([_signed(k) for k in keys], dtype=torch.int64, device=dev)
        return _mix(counters.unsqueeze(0) + column.unsqueeze(1))
    # On a CPU, blocks that stay in cache are several times faster than whole rows: every
    # step of the mix makes a temporary as large as its input.
    out = torch.empty((len(keys), vocab_size), dtype=torch.float64)
    for b, key in enumerate(keys):
        signed_key = _signed(key)
        for start in range(0, vocab_size, _CPU_BLOCK):
            block = counters[start : start + _CPU_BLOCK]
            out[b, start : start + block.numel()] = _mix(block + signed_key)
    return out


def gumbel_noise_at(key: int, indices: torch.Tensor) -> torch.Tensor:
    """The noise of the given token indices only (int64, any device): float64, same shape.

    Counter-based noise makes a restricted step (top-k, top-p) cost what its kept set costs,
    not what the vocabulary costs.
    """
    z = (indices.to(torch.int64) + 1).mul_(_signed(_GOLDEN)).add_(_signed(key))
    return _mix(z)


def gumbel_noise(
    seed: int, step: int, vocab_size: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard Gumbel noise for one step: float64 [vocab_size] on `device` (default CPU)."""
    return gumbel_noise_rows([step_seed(seed, step)], vocab_size, device)[0]


def gumbel_noise_numpy(seed: int, step: int, vocab_size: int) -> np.ndarray:
    """The same noise with numpy alone (no torch): float64 [vocab_size]."""
    key = np.uint64(step_seed(seed, step))
    with np.errstate(over="ignore"):
        z = np.arange(1, vocab_size + 1, dtype=np.uint64) * np.uint64(_GOLDEN) + key
        z ^= z >> np.uint64(30)
        z *= np.uint64(_MIX1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(_MIX2)
        z ^= z >> np.uint64(31)
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * _TWO_POW_MINUS_53
    return -np.log(-np.log(u))


@dataclass(frozen=True, slots=True)
class RowSampling:
    """How one row of a batch is sampled at its current step (see the module docstring)."""

    seed: int
    step: int  # 0-based index of the output token being sampled
    temperature: float | None
    top_p: float | None = None
    top_k: int | None = None


def is_greedy(temperature: float | None) -> bool:
    return temperature is not None and temperature == 0.0


def _as_cpu_f64(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 1:
        raise ValueError(f"expected 1-D logits, got shape {tuple(logits.shape)}")
    return logits.detach().to(device=_CPU, dtype=torch.float64)


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of the raw logits (no temperature), float64 on the CPU."""
    return torch.log_softmax(_as_cpu_f64(logits), dim=-1)


def _top_k_mask(scores: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    if top_k is None or top_k <= 0 or top_k >= scores.numel():
        return None
    kth = torch.topk(scores, top_k, sorted=True).values[-1]
    return scores >= kth


def _top_p_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens whose strictly-more-likely mass is < top_p; `scores` are -inf where excluded."""
    probs = torch.softmax(scores, dim=-1)
    n = probs.numel()
    k = min(_TOP_P_FIRST_CANDIDATES, n)
    while True:
        top = torch.topk(probs, k, sorted=True).values
        # A sequential prefix sum over the same sorted values gives the same numbers however
        # many candidates were taken, so widening never changes the answer.
        exclusive = torch.cumsum(top, dim=0) - top
        kept = int((exclusive < top_p).sum())
        if kept < k or k == n:
            break
        k = min(k * 8, n)
    threshold = top[max(kept, 1) - 1]
    return probs >= threshold


def allowed_mask(
    logits: torch.Tensor,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
) -> torch.Tensor | None:
    """The tokens top-k and top-p allow at this step (bool, CPU), or None when all are allowed."""
    scores = _as_cpu_f64(logits) / (1.0 if temperature is None else temperature)
    return _mask_scaled(scores, top_p, top_k)


def _mask_scaled(
    scores: torch.Tensor, top_p: float | None, top_k: int | None
) -> torch.Tensor | None:
    mask = _top_k_mask(scores, top_k)
    if top_p is None or top_p >= 1.0:
        return mask
    if top_p <= 0.0:
        raise ValueError("top_p must be > 0")
    restricted = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    p_mask = _top_p_mask(restricted, top_p)
    return p_mask if mask is None else p_mask & mask


def perturbed_scores(
    logits: torch.Tensor,
    seed: int,
    step: int,
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """s + g with disallowed tokens at -inf: the emitted token is its argmax.

    A verifier uses this to measure margins: the winner's score minus the runner-up's.
    Not defined for greedy decoding (there is no noise); use the raw logits there.
    """
    if is_greedy(temperature):
        raise ValueError("greedy decoding has no noise; compare raw logits instead")
    if temperature is not None and temperature < 0:
        raise ValueError("temperature must be >= 0")
    scores = _as_cpu_f64(logits) / (1.0 if temperature is None else temperature)
    mask = _mask_scaled(scores, top_p, top_k)
    if mask is None:
        return scores.add_(gumbel_noise(seed, step, scores.numel()))
    _perturb_kept(scores, mask, step_seed(seed, step))
    return scores


def perturbed_rows(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Every row's perturbed scores in one go: float64 [B, V] on the logits' device.

    Row b is the raw logits where rows[b] is greedy, else perturbed_scores of that row (s + g,
    -inf outside the top-k/top-p set). The protocol token of row b is the argmax of row b,
    lowest index on ties, so an engine whose own sampler is greedy emits exactly the protocol
    token from these scores (this is what a vLLM or SGLang logits processor outputs). The
    noise of all sampled rows is made in one batched call on the logits' device.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"expected [{len(rows)}, vocab] logits, got {tuple(logits.shape)}")
    out = logits.detach().to(dtype=torch.float64).clone()
    sampled = [b for b, row in enumerate(rows) if not is_greedy(row.temperature)]
    if not sampled:
        return out
    for b in sampled:
        temperature = rows[b].temperature
        if temperature is not None and temperature < 0:
            raise ValueError("temperature must be >= 0")
        if temperature is not None and temperature != 1.0:
            out[b].div_(temperature)
    full: list[int] = []
    for b in sampled:
        row = rows[b]
        mask = _mask_scaled(out[b], row.top_p, row.top_k)
        if mask is None:
            full.append(b)
        else:
            _perturb_kept(out[b], mask, step_seed(row.seed, row.step))
    if full:
        keys = [step_seed(rows[b].seed, rows[b].step) for b in full]
        noise = gumbel_noise_rows(keys, out.shape[1], out.device)
        if len(full) == out.shape[0]:
            out.add_(noise)
        else:
            out[full] += noise
    return out


def _perturb_kept(scores: torch.Tensor, mask: torch.Tensor, key: int) -> None:
    """scores + g on the kept tokens, -inf elsewhere, in place; noise only where kept."""
    kept = mask.nonzero().squeeze(1)
    perturbed = scores[kept] + gumbel_noise_at(key, kept)
    scores.fill_(float("-inf"))
    scores[kept] = perturbed


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """The protocol token of every row of a batch: the argmax of perturbed_rows.

    On an accelerator that is one batched computation and one sync. On a CPU each row is
    taken alone, which keeps it in cache, and a top-k row works on its k candidates only
    (one pass over the vocabulary for topk, none for the noise): the same tokens, fewer
    passes.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"expected [{len(rows)}, vocab] logits, got {tuple(logits.shape)}")
    if logits.device.type != "cpu":
        return [int(t) for t in torch.argmax(perturbed_rows(logits, rows), dim=-1).tolist()]
    x = logits.detach()
    return [_sample_one(x[b], row) for b, row in enumerate(rows)]


# A top-k this small is sampled from its candidates alone (see _sample_one).
_FAST_TOP_K_MAX = 1024


def _sample_one(x: torch.Tensor, row: RowSampling) -> int:
    """sample_token of one CPU row of raw logits (any float dtype)."""
    if is_greedy(row.temperature):
        return int(torch.argmax(x))  # float32 -> float64 is exact and monotone: same argmax
    temperature = 1.0 if row.temperature is None else row.temperature
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    k = row.top_k
    if k is not None and 0 < k <= _FAST_TOP_K_MAX and k < x.numel():
        values, indices = torch.topk(x, k, sorted=True)
        # With no tie at the k-th value the kept set is exactly these k tokens; on a tie the
        # general path below keeps every tied token, as the definition says.
        if int((x >= values[-1]).sum()) == k:
            scores = values.to(torch.float64) / temperature
            if row.top_p is not None and row.top_p < 1.0:
                if row.top_p <= 0.0:
                    raise ValueError("top_p must be > 0")
                keep = _top_p_mask(scores, row.top_p)
                scores, indices = scores[keep], indices[keep]
            perturbed = scores + gumbel_noise_at(step_seed(row.seed, row.step), indices)
            return int(indices[perturbed == perturbed.max()].min())  # lowest index on ties
    return int(
        torch.argmax(perturbed_scores(x, row.seed, row.step, row.temperature, row.top_p, row.top_k))
    )


def sample_token(
    logits: torch.Tensor,
    seed: int,
    step: int,
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> int:
    """The token the protocol sampler emits at output position `step` (see module docstring)."""
    if logits.dim() != 1:
        raise ValueError(f"expected 1-D logits, got shape {tuple(logits.shape)}")
    x = logits.detach().to(device=_CPU)
    return _sample_one(x, RowSampling(seed, step, temperature, top_p, top_k))
