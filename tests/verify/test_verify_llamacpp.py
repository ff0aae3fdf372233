"""Auditing a llama.cpp miner with llama.cpp: honest answers pass, alone or batched; cheats
fail.

A llama.cpp miner's model id names the GGUF at its quantization, so its verifier runs
llama.cpp too and recomputes each answer with one teacher-forced llama_decode
(LlamaCppEngine.teacher_forced_logits) under verify.audit.thresholds_for("gguf-q4_1").
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from audit_helpers import request_body

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (./dev installs it)"
)

from infergrid.compute import attacks  # noqa: E402
from infergrid.compute.attestation import Attestor  # noqa: E402
from infergrid.compute.engine import Engine  # noqa: E402
from infergrid.compute.llamacpp_engine import LlamaCppEngine  # noqa: E402
from infergrid.compute.transformers_engine import TransformersEngine  # noqa: E402
from infergrid.protocol.audits import AuditJob  # noqa: E402
from infergrid.verify.audit import DEFAULT_THRESHOLDS, thresholds_for  # noqa: E402
from infergrid.verify.recompute import CannotAudit, audit_job  # noqa: E402

pytestmark = pytest.mark.slow

SAMPLING: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 0.7},
    {"temperature": 1.0, "top_p": 0.9},
    {"temperature": 0.8, "top_k": 20, "seed": 7},
]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three facts about the number seven, then explain why seven is considered lucky "
    "in many cultures, with examples from at least two of them.",
    "Hi",
]


@pytest.fixture(scope="module")
def miner_engine() -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine.load("smollm2", num_threads=1, max_batch=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def verifier_engine() -> Iterator[LlamaCppEngine]:
    """The verifier's own copy: another process in real life, another context here."""
    engine = LlamaCppEngine.load("smollm2", num_threads=1, max_batch=1)
    yield engine
    engine.close()


def _serve(
    engine: Engine, attestor: Attestor, i: int, *, max_tokens: int = 16, **extra: Any
) -> AuditJob:
    params = {**SAMPLING[i % len(SAMPLING)], "max_tokens": max_tokens, **extra}
    body = request_body(engine.name, PROMPTS[i % len(PROMPTS)], **params)
    return attacks.serve_job(engine, body, chat=True, request_id=f"lcp-{i}", attestor=attestor)


def _serve_together(engine: Engine, attestor: Attestor, count: int) -> list[AuditJob]:
    """`count` requests in flight at once: the engine's batcher decodes them in one batch."""
    jobs: list[AuditJob | None] = [None] * count
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait()
        jobs[i] = _serve(engine, attestor, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(job is not None for job in jobs)
    return [job for job in jobs if job is not None]


def test_gguf_thresholds_are_looser_than_float32s() -> None:
    gguf = thresholds_for("gguf-q4_1")
    assert gguf.margin_tolerance > DEFAULT_THRESHOLDS.margin_tolerance
    assert gguf.logprob_tolerance > DEFAULT_THRESHOLDS.logprob_tolerance
    assert thresholds_for("gguf-q8_0") == gguf


def test_honest_answers_pass_alone(
    miner_engine: LlamaCppEngine, verifier_engine: LlamaCppEngine, attestor: Attestor
) -> None:
    for i in range(len(SAMPLING)):
        job = _serve(miner_engine, attestor, i)
        report = audit_job(verifier_engine, job)
        assert report.passed, report.reason
        assert report.steps == len(job.output_token_ids)


def test_honest_answers_pass_when_batched_by_four(
    miner_engine: LlamaCppEngine, verifier_engine: LlamaCppEngine, attestor: Attestor
) -> None:
    for job in _serve_together(miner_engine, attestor, 4):
        report = audit_job(verifier_engine, job)
        assert report.passed, report.reason


def test_an_answer_cut_by_a_stop_sequence_passes(
    miner_engine: LlamaCppEngine, verifier_engine: LlamaCppEngine, attestor: Attestor
) -> None:
    full = _serve(miner_engine, attestor, 0, max_tokens=32)  # greedy: the body sets no seed
    stop = full.text[len(full.text) // 2 :][:2]
    job = _serve(miner_engine, attestor, 0, max_tokens=32, stop=[stop])
    assert job.finish_reason == "stop"
    assert job.text == full.text[: full.text.index(stop)]
    assert audit_job(verifier_engine, job).passed


def test_a_transformers_verifier_cannot_audit_a_llamacpp_miner(
    miner_engine: LlamaCppEngine, smollm2: TransformersEngine, attestor: Attestor
) -> None:
    """Different model ids: the job goes to a verifier that runs llama.cpp."""
    job = _serve(miner_engine, attestor, 0)
    with pytest.raises(CannotAudit, match="does not hold model"):
        audit_job(smollm2, job)


@pytest.fixture(scope="module")
def smollm2() -> TransformersEngine:
    """The transformers engine on the same GGUF, dequantized (cached after the first run)."""
    return TransformersEngine.load("smollm2", quiet=True, num_threads=1)


@pytest.fixture(scope="module")
def half_smollm2(smollm2: TransformersEngine) -> TransformersEngine:
    """A cheaper model with SmolLM2's vocabulary: its first 15 of 30 layers."""
    return attacks.layer_dropped_copy(smollm2, smollm2.model.config.num_hidden_layers // 2)


def test_a_substituted_answer_fails(
    miner_engine: LlamaCppEngine,
    verifier_engine: LlamaCppEngine,
    half_smollm2: TransformersEngine,
    attestor: Attestor,
) -> None:
    cheat = attacks.SubstitutedEngine(miner_engine, half_smollm2)
    failed = [not audit_job(verifier_engine, _serve(cheat, attestor, i)).passed for i in range(4)]
    assert all(failed)


def test_a_prefilled_answer_fails(
    miner_engine: LlamaCppEngine,
    verifier_engine: LlamaCppEngine,
    half_smollm2: TransformersEngine,
    attestor: Attestor,
) -> None:
    """The cheap model's tokens with llama.cpp's own logprobs of them (what
    attacks.PrefillEngine serves): the logprobs check passes, the sampler replay does not."""
    cheat = attacks.SubstitutedEngine(miner_engine, half_smollm2)
    # Greedy, sampled and top-k requests; their worst tokens lose by 13 logits or more (the
    # top-p request of PROMPTS[2] happens to lose by only 0.66 and passes).
    for i in (0, 1, 3):
        job = _serve(cheat, attestor, i)
        logits = miner_engine.teacher_forced_logits(job.prompt_token_ids, job.output_token_ids)
        real = torch.log_softmax(logits, dim=-1)
        job = dataclasses.replace(
            job,
            output_logprobs=tuple(
                float(real[step, token]) for step, token in enumerate(job.output_token_ids)
            ),
        )
        report = audit_job(verifier_engine, job)
        assert not report.passed
        assert report.failed_checks == ("sampler",), report.reason


def test_fabricated_logprobs_fail(
    miner_engine: LlamaCppEngine, verifier_engine: LlamaCppEngine, attestor: Attestor
) -> None:
    cheat = attacks.FabricatedLogprobsEngine(miner_engine)
    report = audit_job(verifier_engine, _serve(cheat, attestor, 1))
    assert not report.passed
    assert "logprobs" in report.failed_checks
