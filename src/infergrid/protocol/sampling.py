"""The protocol-defined sampler: Gumbel-max with noise a verifier can replay.

A miner must pick every output token with `sample_token`, so that a verifier holding the
request seed can recompute the exact noise of each step and score how far the emitted token
was from losing (its margin). The definition, precisely:

1. Step seed. `step_seed(seed, step)` is the first 8 bytes, read big-endian as an unsigned
   integer, of SHA-256(seed_bytes ‖ step_bytes), where seed_bytes is the request seed reduced
   modulo 2**64 as 8 bytes big-endian (so negative and huge seeds are well defined) and
   step_bytes is the 0-based index of the output token as 8 bytes big-endian.
2. Noise. `gumbel_noise(seed, step, vocab_size)`: a fresh CPU `torch.Generator` (Mersenne
   Twister) seeded with the step seed draws `u = torch.rand(vocab_size, dtype=float64)` and the
   noise is `g = -log(-log(u))`. It is always drawn on the CPU in float64, whatever device the
   model runs on, so CPU and GPU miners and the verifier see bit-identical noise. (u == 0 gives
   g == -inf: that token cannot win this step, a 2**-53 event.)
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

import torch

_U64 = 1 << 64
_CPU = torch.device("cpu")
# Top-p needs the most likely tokens in order; a full sort of a 150k vocabulary costs
# milliseconds a step, so look at the top candidates first and widen only if needed.
_TOP_P_FIRST_CANDIDATES = 64


def step_seed(seed: int, step: int) -> int:
    """The 64-bit generator seed for output token `step` of a request seeded with `seed`."""
    if step < 0:
        raise ValueError("step must be >= 0")
    payload = (seed % _U64).to_bytes(8, "big") + step.to_bytes(8, "big")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big")


def gumbel_noise(seed: int, step: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise for one step: float64, on the CPU, one value per vocabulary entry."""
    generator = torch.Generator(device=_CPU)
    generator.manual_seed(step_seed(seed, step))
    u = torch.rand(vocab_size, generator=generator, dtype=torch.float64, device=_CPU)
    return u.log_().neg_().log_().neg_()


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
    perturbed = scores.add_(gumbel_noise(seed, step, scores.numel()))
    if mask is not None:
        perturbed.masked_fill_(~mask, float("-inf"))
    return perturbed


def sample_token(
    logits: torch.Tensor,
    seed: int,
    step: int,
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> int:
    """The token the protocol sampler emits at output position `step` (see module docstring)."""
    if is_greedy(temperature):
        return int(torch.argmax(_as_cpu_f64(logits)))
    return int(torch.argmax(perturbed_scores(logits, seed, step, temperature, top_p, top_k)))
