"""The audit's model side: one teacher-forced pass of the reference model, then the checks.

`audit_job(engine, job)` recomputes a miner's response with the verifier's own copy of the
model (any compute.engine.Engine with `teacher_forced_logits`, `vocab_size` and
`precision`: the transformers engine, the llama.cpp engine) and judges it
with the pure checks of verify.audit, cheapest first: malformed, identity, prompt,
consistency, then — after ONE forward pass over prompt + output (`teacher_forced_logits`) —
sampler replay and logprobs. The sampling it replays is protocol.generation's plan of the
job's own request body, exactly as the miner computed it.

`CannotAudit` means this verifier cannot judge the job, which is nobody's fault it can prove:
it does not hold the attested model, or the body does not parse as a request under its rules
(a version skew must never fail a miner). Everything the miner could have got wrong is a
failed report instead, never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from infergrid.compute.engine import Engine, SamplingParams, decode_loop
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import hex32
from infergrid.protocol.generation import chat_messages, plan_generation
from infergrid.protocol.json_body import decode_request_json
from infergrid.protocol.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS
from infergrid.verify.audit import (
    AuditReport,
    AuditThresholds,
    Finding,
    SamplerPlan,
    TextReplay,
    check_consistency,
    check_identity,
    check_logprobs,
    check_malformed,
    check_prompt,
    check_sampler,
    logprob_errors,
    make_report,
    parse_attestation,
    sampler_margins,
    thresholds_for,
)


class CannotAudit(ValueError):
    """This verifier cannot judge the job (it does not hold the model, or cannot read the
    request); the job must go to another verifier, and the miner is not at fault."""


def vocab_size(engine: Engine) -> int:
    """The size of the engine's vocabulary (its logits' last dimension)."""
    size = getattr(engine, "vocab_size", None)
    if isinstance(size, int):
        return size
    # An engine from before the Engine protocol's vocab_size: a transformers model.
    return int(engine.model.config.vocab_size)  # type: ignore[attr-defined]


def teacher_forced_logits(
    engine: Engine, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """The raw logits the model gives before each output token: [len(output), vocab], float64
    on the CPU, from ONE forward pass over prompt + output[:-1] (the engine's own
    `teacher_forced_logits`: a transformers model, llama.cpp, ...)."""
    if not prompt_ids or not output_ids:
        raise ValueError("teacher forcing needs a prompt and at least one output token")
    forward = getattr(engine, "teacher_forced_logits", None)
    if forward is None:
        raise CannotAudit(f"engine {engine.name} cannot recompute logits (no teacher forcing)")
    logits = forward(prompt_ids, output_ids)
    return logits.detach().to(device="cpu", dtype=torch.float64)


class _OutOfTokens(Exception):
    pass


def replay_text(
    output_ids: Sequence[int],
    *,
    max_tokens: int,
    stop: Sequence[str],
    eos_token_ids: frozenset[int],
    decode: Callable[[Sequence[int]], str],
) -> TextReplay:
    """What the protocol's decode loop (compute.engine.decode_loop, the miner's own) releases
    for these output ids: it is driven greedily with one-hot logits that make each id the
    step's argmax, so text, stop-sequence cuts and finish reasons follow the one rule."""
    ids = list(output_ids)
    size = max(ids) + 1

    def one_hot(token: int) -> torch.Tensor:
        x = torch.zeros(size, dtype=torch.float64)
        x[token] = 1.0
        return x

    consumed = 0

    def advance(_: int) -> torch.Tensor:
        if consumed >= len(ids):
            raise _OutOfTokens
        return one_hot(ids[consumed])

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop))
    parts: list[str] = []
    try:
        for token in decode_loop(
            one_hot(ids[0]), advance, params, eos_token_ids=eos_token_ids, decode=decode
        ):
            consumed += 1
            parts.append(token.text)
            if token.finish_reason is not None:
                return TextReplay("".join(parts), token.finish_reason, consumed)
    except _OutOfTokens:
        pass
    return TextReplay("".join(parts), None, None)


def parse_body(job: AuditJob) -> ChatCompletionRequest | CompletionRequest:
    """The job's request, parsed by the rules miners and gateways apply; CannotAudit if not."""
    try:
        body = decode_request_json(job.body)
        return parse_request(ChatCompletionRequest if job.chat else CompletionRequest, body)
    except (APIError, ValueError) as exc:
        message = exc.message if isinstance(exc, APIError) else str(exc)
        raise CannotAudit(f"the job's request body does not parse: {message}") from None


def prompt_ids_of(engine: Engine, req: ChatCompletionRequest | CompletionRequest) -> list[int]:
    """The prompt the miner had to build: the chat template over the messages, or the
    encoded legacy prompt; CannotAudit if the tokenizer refuses it (the miner would have)."""
    try:
        if isinstance(req, ChatCompletionRequest):
            return engine.chat_prompt_ids(chat_messages(req))
        return engine.encode(req.prompt_text())
    except Exception as exc:  # a chat template rejecting the conversation, say
        raise CannotAudit(f"the model cannot build this request's prompt: {exc}") from None


def audit_job(
    engine: Engine,
    job: AuditJob,
    *,
    thresholds: AuditThresholds | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> AuditReport:
    """Audit one job against the reference `engine` (see the module docstring).

    `thresholds` default to verify.audit.thresholds_for(the engine's precision). Raises only
    CannotAudit; every fault of the miner's is a failed report.
    """
    started = time.perf_counter()
    precision = str(getattr(engine, "precision", "float32"))
    limits = thresholds if thresholds is not None else thresholds_for(precision)

    def done(
        findings: list[Finding],
        worst_margin: float = 0.0,
        worst_logprob_error: float = 0.0,
        steps: int = 0,
    ) -> AuditReport:
        return make_report(
            findings,
            worst_margin=worst_margin,
            worst_logprob_error=worst_logprob_error,
            steps=steps,
            seconds=time.perf_counter() - started,
        )

    attestation = parse_attestation(job)
    if isinstance(attestation, Finding):
        return done([attestation])
    if hex32(attestation.model_id).lower() != engine.model_id.lower():
        raise CannotAudit(
            f"this verifier does not hold model {hex32(attestation.model_id)}; it audits "
            f"{engine.model_id} ({engine.name})"
        )
    malformed = check_malformed(
        job, vocab_size=vocab_size(engine), context_length=engine.context_length
    )
    if malformed is not None:
        return done([malformed])
    findings: list[Finding] = []
    identity = check_identity(job, attestation)
    if identity is not None:
        findings.append(identity)
    req = parse_body(job)
    prompt = check_prompt(job.prompt_token_ids, prompt_ids_of(engine, req))
    if prompt is not None:
        findings.append(prompt)
    try:
        plan = plan_generation(
            req,
            job.prompt_token_ids,
            request_hash=attestation.request_hash,
            context_length=engine.context_length,
            default_max_tokens=default_max_tokens,
        )
    except APIError as exc:
        findings.append(
            Finding(
                "malformed",
                f"malformed job: the miner served a request it had to refuse: {exc.message}",
            )
        )
        return done(findings)
    replay = replay_text(
        job.output_token_ids,
        max_tokens=plan.max_tokens,
        stop=plan.stop,
        eos_token_ids=engine.eos_token_ids,
        decode=engine.decode,
    )
    consistency = check_consistency(job, replay, max_tokens=plan.max_tokens)
    if consistency is not None:
        findings.append(consistency)

    logits = teacher_forced_logits(engine, job.prompt_token_ids, job.output_token_ids)
    margins = sampler_margins(
        logits, job.output_token_ids, SamplerPlan.of(plan), limits.margin_tolerance
    )
    worst_margin, sampler = check_sampler(margins, limits.margin_tolerance)
    if sampler is not None:
        findings.append(sampler)
    errors = logprob_errors(logits, job.output_token_ids, job.output_logprobs)
    worst_error, logprobs = check_logprobs(errors, limits.logprob_tolerance)
    if logprobs is not None:
        findings.append(logprobs)
    return done(
        findings,
        worst_margin,
        worst_error,
        len(job.output_token_ids),
    )
