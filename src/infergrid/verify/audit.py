"""The audit's checks (pure: no model, no I/O), and the report a verifier signs a verdict on.

verify.recompute runs the reference model once over prompt + output and hands these functions
what they judge; every check is also callable on its own, on crafted inputs. Checks, cheapest
first, each named as in `AuditReport.failed_checks`:

- **malformed**: the job cannot describe a generation at all (no output, logprobs of another
  length than the output, ids outside the model's vocabulary, more tokens than its context).
  Nothing else runs.
- **identity**: the attestation vouches for this job: its request hash is
  keccak(request id ‖ 0x0a ‖ body) (messages.request_hash), its response hash is the hash of
  the output ids, tokensIn/tokensOut are the lengths, it names the job's miner.
- **prompt**: the prompt ids are the body's prompt under the model's tokenizer and template.
- **consistency**: replaying the protocol's text rule over the output ids (decode, cut before
  the first stop sequence, end on EOS, a stop sequence or the token budget of
  protocol.generation) gives the text, the finish reason and the length the job reports, and
  the usage counts are the lengths. This catches truncation and tokens after the end.
- **sampler**: each emitted token's margin, in logits: greedy steps `x[e] − max_{o≠e} x[o]`;
  sampled steps `T·(z[e] − max_{o≠e} z[o])` with z = protocol.sampling.perturbed_scores (the
  scaled logits plus the step's replayed Gumbel noise, tokens outside top-k/top-p at −inf).
  Multiplying by T puts every margin in logits, so one tolerance serves every temperature: a
  logit error of δ moves a margin by at most 2δ at any T. An honest token wins its step
  (margin >= 0) up to numerical noise; a token from another model, another temperature or
  another seed loses some step by far. A step whose emitted token falls just outside the
  verifier's top-k/top-p set, or loses only to a token at that set's edge, is judged against
  sets widened and narrowed by the tolerance (`robust_margin`), so honest boundary flips pass.
  The last step's margin is the EOS plausibility check: an EOS the sampler would not have
  emitted loses there like any other token.
- **logprobs**: |reported − log_softmax(raw logits)[emitted]| at every step.

**Thresholds** (`AuditThresholds`: `margin_tolerance` in logits, `logprob_tolerance` in
nats) depend on the precision the reference runs at, since an audit recomputes in one pass
what the miner computed token by token with a KV cache: the two agree to ~1e-4 in float32 and
only to ~0.5 in bfloat16. They come from bench/detection.py (docs/verification.md has the
table), with headroom over the worst honest error of its honest matrix (4,000 tiny answers,
48 SmolLM2 answers; 1 and 2 threads, a miner serving 4 concurrent requests, bf16 miner and
verifier) and below the weakest signal of the attacks:

- float32 (`DEFAULT_THRESHOLDS`): margin 0.01, logprob 0.01. Honest: every emitted token won
  its step, worst logprob error 1.75e-4 (57x headroom). Weakest attack signal (10th
  percentile): 0.029 (bf16 served for fp32 on SmolLM2), 0.064 (1 % weight noise), 0.1-0.4
  (int8); substitution, prefill, random tokens lose steps by 7-17 logits.
- bfloat16 (`BF16_THRESHOLDS`): margin 1.0, logprob 1.5. Honest: worst margin deficit 0.125
  (8x headroom), worst logprob error 0.552 (2.7x). Substitution, prefill and random tokens are
  still caught every time (signals 10-20); a wrong temperature (70 %) and fabricated logprobs
  (83 %) partly hide in bf16's noise, a documented limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from infergrid.protocol import sampling
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.messages import Attestation, request_hash, response_hash

CHECKS = ("identity", "prompt", "consistency", "sampler", "logprobs", "malformed")
# Margins and errors in reports and verdicts are finite: an emitted token the sampler could
# not emit at all (outside the kept set) reads as losing by MARGIN_CLAMP logits.
MARGIN_CLAMP = 1e9


@dataclass(frozen=True, slots=True)
class AuditThresholds:
    """How far an honest recomputation may differ: margins in logits, logprobs in nats."""

    margin_tolerance: float
    logprob_tolerance: float

    def __post_init__(self) -> None:
        for name in ("margin_tolerance", "logprob_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


DEFAULT_THRESHOLDS = AuditThresholds(margin_tolerance=0.01, logprob_tolerance=0.01)
BF16_THRESHOLDS = AuditThresholds(margin_tolerance=1.0, logprob_tolerance=1.5)
# GGUF models on llama.cpp ("gguf-q4_1", ...), audited by llama.cpp's teacher forcing
# (compute.llamacpp_engine). SmolLM2 Q4_1, 144 honest answers served at batch 1 (56), 4 (24)
# and 16 (64), prompts of mixed lengths, greedy and sampled, 16 tokens: the engine's batched
# logits equal its teacher-forced ones bit for bit (worst margin deficit 0, worst logprob
# error 4.2e-14). Another kernel path (llama.cpp's default F16 cache, as llama-server runs
# it; likely also another CPU's SIMD, not measured) moves logits: 52 answers
# from an F16-cache llama.cpp at batch 1 and 4 had margin deficits up to 0.33 and logprob
# errors up to 0.51 (bench/detection.py's llama.cpp configurations). These thresholds are
# three times that; substituted and prefilled answers lose by 11-15 logits (tests/verify).
GGUF_THRESHOLDS = AuditThresholds(margin_tolerance=1.0, logprob_tolerance=1.5)
_BY_PRECISION = {"float32": DEFAULT_THRESHOLDS, "bfloat16": BF16_THRESHOLDS}


def thresholds_for(precision: str) -> AuditThresholds:
    """The benchmark's thresholds for a reference model at `precision` (float32 by default;
    float16 is treated as bfloat16, the looser of the two; every GGUF quantization on
    llama.cpp, "gguf-…", shares GGUF_THRESHOLDS)."""
    if precision == "float16":
        return BF16_THRESHOLDS
    if precision.startswith("gguf-"):
        return GGUF_THRESHOLDS
    return _BY_PRECISION.get(precision, DEFAULT_THRESHOLDS)


@dataclass(frozen=True, slots=True)
class Finding:
    """One failed check: which, and one readable line saying where and why."""

    check: str
    reason: str

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}")


@dataclass(frozen=True)
class AuditReport:
    """The outcome of one audit. `reason` is the first finding's ("" when it passed);
    `worst_margin` the smallest emitted-token margin (<= 0 when a token lost; 0.0 when the
    sampler replay did not run); `worst_logprob_error` the largest logprob error (0.0 when not
    run); `steps` the output tokens judged; `seconds` the audit's wall time."""

    passed: bool
    reason: str
    failed_checks: tuple[str, ...]
    worst_margin: float
    worst_logprob_error: float
    steps: int
    seconds: float
    findings: tuple[Finding, ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "failed_checks": list(self.failed_checks),
            "worst_margin": self.worst_margin,
            "worst_logprob_error": self.worst_logprob_error,
            "steps": self.steps,
            "seconds": self.seconds,
            "findings": [{"check": f.check, "reason": f.reason} for f in self.findings],
        }


def _finite(value: float) -> float:
    if math.isnan(value):
        return MARGIN_CLAMP
    return max(-MARGIN_CLAMP, min(MARGIN_CLAMP, value))


def make_report(
    findings: Sequence[Finding],
    *,
    worst_margin: float = 0.0,
    worst_logprob_error: float = 0.0,
    steps: int = 0,
    seconds: float = 0.0,
) -> AuditReport:
    """The report of an audit with these findings (passed iff there are none)."""
    checks: list[str] = []
    for finding in findings:
        if finding.check not in checks:
            checks.append(finding.check)
    return AuditReport(
        passed=not findings,
        reason=findings[0].reason if findings else "",
        failed_checks=tuple(checks),
        worst_margin=-MARGIN_CLAMP if math.isnan(worst_margin) else _finite(worst_margin),
        worst_logprob_error=_finite(worst_logprob_error),
        steps=steps,
        seconds=seconds,
        findings=tuple(findings),
    )


# -- malformed, identity, prompt ---------------------------------------------------------------


def check_malformed(job: AuditJob, *, vocab_size: int, context_length: int) -> Finding | None:
    """Whether the job describes a generation the model could have produced at all."""

    def bad(reason: str) -> Finding:
        return Finding("malformed", f"malformed job: {reason}")

    prompt, output = job.prompt_token_ids, job.output_token_ids
    if not prompt:
        return bad("no prompt token ids")
    if not output:
        return bad("no output token ids (a generation has at least its ending token)")
    if len(job.output_logprobs) != len(output):
        return bad(f"{len(job.output_logprobs)} output logprobs for {len(output)} output tokens")
    for name, ids in (("prompt_token_ids", prompt), ("output_token_ids", output)):
        for index, token in enumerate(ids):
            if token >= vocab_size:
                return bad(
                    f"{name}[{index}] = {token} is outside the model's vocabulary of {vocab_size}"
                )
    if len(prompt) + len(output) > context_length:
        return bad(
            f"{len(prompt)} prompt + {len(output)} output tokens exceed the model's context of "
            f"{context_length}"
        )
    return None


def parse_attestation(job: AuditJob) -> Attestation | Finding:
    """The job's attestation, or a malformed finding."""
    try:
        return Attestation.from_json(job.attestation)
    except (TypeError, ValueError) as exc:
        return Finding("malformed", f"malformed job: attestation: {exc}")


def check_identity(job: AuditJob, attestation: Attestation) -> Finding | None:
    """Whether the attestation vouches for exactly this request, output and counts.
    (The attestation's signature is the caller's to check: it needs the domain.)"""

    def bad(reason: str) -> Finding:
        return Finding("identity", f"identity: {reason}")

    expected = request_hash(job.request_id, job.body)
    if attestation.request_hash != expected:
        return bad(
            f"the attestation's request hash 0x{attestation.request_hash.hex()} is not "
            f"keccak(request id, body) = 0x{expected.hex()}"
        )
    if attestation.response_hash != response_hash(job.output_token_ids):
        return bad("the attestation's response hash is not the hash of the output token ids")
    if attestation.tokens_in != len(job.prompt_token_ids):
        return bad(
            f"the attestation counts {attestation.tokens_in} prompt tokens, the job has "
            f"{len(job.prompt_token_ids)}"
        )
    if attestation.tokens_out != len(job.output_token_ids):
        return bad(
            f"the attestation counts {attestation.tokens_out} output tokens, the job has "
            f"{len(job.output_token_ids)}"
        )
    if attestation.miner.lower() != job.miner.lower():
        return bad(f"the attestation names miner {attestation.miner}, the job {job.miner}")
    return None


def check_prompt(reported: Sequence[int], expected: Sequence[int]) -> Finding | None:
    """Whether the reported prompt ids are the body's prompt re-tokenized (`expected`)."""
    if list(reported) == list(expected):
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(reported, expected, strict=False)) if a != b),
        min(len(reported), len(expected)),
    )
    return Finding(
        "prompt",
        f"prompt: the reported prompt ids ({len(reported)}) differ from the body's prompt "
        f"under the model's tokenizer ({len(expected)}) at position {first}",
    )


# -- consistency -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextReplay:
    """What the protocol's decode loop makes of a list of output ids: the text it releases,
    the finish reason, and how many ids it consumed before finishing (None: it had not
    finished when the ids ran out)."""

    text: str
    finish_reason: str | None
    consumed: int | None


def check_consistency(job: AuditJob, replay: TextReplay, *, max_tokens: int) -> Finding | None:
    """Whether text, finish reason, length and usage agree with the replayed decode loop."""

    def bad(reason: str) -> Finding:
        return Finding("consistency", f"consistency: {reason}")

    n = len(job.output_token_ids)
    if job.usage.get("prompt_tokens") != len(job.prompt_token_ids):
        return bad(
            f"usage.prompt_tokens is {job.usage.get('prompt_tokens')}, the prompt has "
            f"{len(job.prompt_token_ids)} tokens"
        )
    if job.usage.get("completion_tokens") != n:
        return bad(
            f"usage.completion_tokens is {job.usage.get('completion_tokens')}, the output has "
            f"{n} tokens"
        )
    if replay.consumed is None:
        return bad(
            f"the generation does not end after its {n} tokens (no EOS, no stop sequence, "
            f"and fewer than the {max_tokens}-token budget): finish_reason "
            f"{job.finish_reason!r} is not what the output ids give; truncated?"
        )
    if replay.consumed < n:
        return bad(
            f"the generation ended at step {replay.consumed - 1} "
            f"({replay.finish_reason}) but {n - replay.consumed} more tokens follow"
        )
    if replay.finish_reason != job.finish_reason:
        return bad(
            f"finish_reason is {job.finish_reason!r}, the output ids end with "
            f"{replay.finish_reason!r}"
        )
    if replay.text != job.text:
        first = next(
            (i for i, (a, b) in enumerate(zip(replay.text, job.text, strict=False)) if a != b),
            min(len(replay.text), len(job.text)),
        )
        return bad(
            f"the text ({len(job.text)} characters) is not what the output ids decode to "
            f"({len(replay.text)} characters); they differ at character {first}"
        )
    return None


# -- sampler replay ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SamplerPlan:
    """The sampling a response must have used (protocol.generation's plan, as the audit
    needs it)."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int

    @classmethod
    def of(cls, plan: Any) -> SamplerPlan:
        return cls(plan.temperature, plan.top_p, plan.top_k, plan.seed)


@dataclass(frozen=True, slots=True)
class StepMargin:
    margin: float  # in logits; -inf when the token was outside even the widened kept set
    outside: bool  # the emitted token is outside the (widened) top-k/top-p set


def greedy_margins(logits: torch.Tensor, output_ids: Sequence[int]) -> torch.Tensor:
    """x[e] − max_{o≠e} x[o] per step (float64): >= 0 iff the emitted token was an argmax."""
    x = logits.to(torch.float64)
    index = torch.tensor(list(output_ids), dtype=torch.long).unsqueeze(1)
    emitted = x.gather(1, index).squeeze(1)
    others = x.scatter(1, index, float("-inf"))
    return emitted - others.max(dim=1).values


def _scaled(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    return logits.to(torch.float64) / (1.0 if temperature is None else temperature)


def robust_kept(
    scores: torch.Tensor, top_p: float | None, top_k: int | None, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(widened, narrowed) top-k/top-p sets of scaled scores, for scores known to `tolerance`.

    A token whose every score within ±tolerance could be kept by the protocol's rule is in
    both; one that some perturbation keeps is in the widened set. Top-k: kept iff
    s >= s_(k) ∓ tolerance. Top-p: kept iff the mass (under softmax of the top-k set) of
    tokens more likely than it by more than ±tolerance, scaled by e^(∓2·tolerance), is below
    top_p; the widened set normalizes over the widened top-k set, the narrowed over the
    narrowed one.
    """
    n = scores.numel()
    widened = torch.ones(n, dtype=torch.bool)
    narrowed = torch.ones(n, dtype=torch.bool)
    if top_k is not None and 0 < top_k < n:
        kth = torch.topk(scores, top_k, sorted=True).values[-1]
        widened = scores >= kth - tolerance
        narrowed = scores >= kth + tolerance
    if top_p is None or top_p >= 1.0:
        return widened, narrowed
    top = float(scores.max())
    weights = torch.exp(scores - top)

    def mass_above(within: torch.Tensor, offset: float) -> torch.Tensor:
        """Per token i: sum of weights of tokens in `within` with s_j > s_i + offset."""
        values = scores[within]
        order = torch.argsort(values)
        ascending = values[order]
        cumulative = torch.cumsum(weights[within][order].flip(0), 0).flip(0)  # suffix sums
        start = torch.searchsorted(ascending, scores + offset, right=True)
        padded = torch.cat([cumulative, torch.zeros(1, dtype=cumulative.dtype)])
        return padded[start]

    z_wide = float(weights[widened].sum())
    z_narrow = float(weights[narrowed].sum())
    wide_mass = mass_above(widened, tolerance) / z_wide * math.exp(-2 * tolerance)
    # Tokens within tolerance of i may be above it on the miner's side: count them (not i).
    narrow_mass = (mass_above(widened, -tolerance) - weights) / z_narrow * math.exp(2 * tolerance)
    return widened & (wide_mass < top_p), narrowed & (narrow_mass < top_p)


def robust_margin(
    logits: torch.Tensor, token: int, plan: SamplerPlan, step: int, tolerance: float
) -> StepMargin:
    """The margin of `token` at a sampled step when the kept set's edge is uncertain: the token
    must be in the widened set, and its rivals are the tokens of the narrowed set."""
    temperature = 1.0 if plan.temperature is None else plan.temperature
    scores = _scaled(logits, plan.temperature)
    widened, narrowed = robust_kept(scores, plan.top_p, plan.top_k, tolerance / temperature)
    perturbed = scores + sampling.gumbel_noise(plan.seed, step, scores.numel())
    rivals = perturbed.masked_fill(~narrowed, float("-inf"))
    rivals[token] = float("-inf")
    best = float(rivals.max())
    if not bool(widened[token]):
        return StepMargin(float("-inf"), True)
    return StepMargin(temperature * (float(perturbed[token]) - best), False)


def sampled_margin(
    logits: torch.Tensor, token: int, plan: SamplerPlan, step: int, tolerance: float
) -> StepMargin:
    """T·(z[e] − max_{o≠e} z[o]) with z = sampling.perturbed_scores, falling back to
    `robust_margin` when the token is outside the kept set or loses by more than the
    tolerance (it may have lost only to a token at the set's edge)."""
    temperature = 1.0 if plan.temperature is None else plan.temperature
    z = sampling.perturbed_scores(logits, plan.seed, step, plan.temperature, plan.top_p, plan.top_k)
    emitted = float(z[token])
    z[token] = float("-inf")
    margin = temperature * (emitted - float(z.max()))
    if emitted != float("-inf") and margin >= -tolerance:
        return StepMargin(margin, False)
    if plan.top_p is None and plan.top_k is None:
        return StepMargin(margin, False)
    robust = robust_margin(logits, token, plan, step, tolerance)
    if emitted == float("-inf"):
        return robust
    # Inside the verifier's own set: whichever view of the edge is kinder to it.
    return StepMargin(max(margin, robust.margin), False)


def sampler_margins(
    logits: torch.Tensor, output_ids: Sequence[int], plan: SamplerPlan, tolerance: float
) -> list[StepMargin]:
    """Each step's margin (see the module docstring); logits are [steps, vocab] raw logits."""
    if sampling.is_greedy(plan.temperature):
        return [StepMargin(float(m), False) for m in greedy_margins(logits, output_ids)]
    x = logits.to(torch.float64)
    return [
        sampled_margin(x[step], token, plan, step, tolerance)
        for step, token in enumerate(output_ids)
    ]


def check_sampler(margins: Sequence[StepMargin], tolerance: float) -> tuple[float, Finding | None]:
    """(worst margin, the first step whose token could not have been sampled, if any)."""
    worst = min((m.margin for m in margins), default=0.0)
    for step, m in enumerate(margins):
        if m.outside:
            return worst, Finding(
                "sampler",
                f"sampler: step {step}: the emitted token is outside the request's top-k/top-p set",
            )
        if m.margin < -tolerance:
            return worst, Finding(
                "sampler",
                f"sampler: step {step}: the emitted token loses its step by {-m.margin:.6g} "
                f"logits (tolerance {tolerance:g})",
            )
    return worst, None


# -- logprobs ----------------------------------------------------------------------------------


def logprob_errors(
    logits: torch.Tensor, output_ids: Sequence[int], reported: Sequence[float]
) -> torch.Tensor:
    """|reported − log_softmax(raw logits)[emitted]| per step (float64; two -inf agree)."""
    logprobs = torch.log_softmax(logits.to(torch.float64), dim=-1)
    index = torch.tensor(list(output_ids), dtype=torch.long).unsqueeze(1)
    recomputed = logprobs.gather(1, index).squeeze(1)
    given = torch.tensor(list(reported), dtype=torch.float64)
    errors = (given - recomputed).abs()
    agree = (given == recomputed) | (torch.isinf(given) & torch.isinf(recomputed))
    return torch.where(
        agree, torch.zeros_like(errors), errors.nan_to_num(nan=math.inf, posinf=math.inf)
    )


def check_logprobs(errors: torch.Tensor, tolerance: float) -> tuple[float, Finding | None]:
    """(worst error, the first step whose reported logprob is off by more than tolerance)."""
    if errors.numel() == 0:
        return 0.0, None
    worst = float(errors.max())
    over = torch.nonzero(errors > tolerance)
    if over.numel() == 0:
        return worst, None
    step = int(over[0, 0])
    return worst, Finding(
        "logprobs",
        f"logprobs: step {step}: the reported logprob is off by {float(errors[step]):.6g} "
        f"(tolerance {tolerance:g})",
    )
