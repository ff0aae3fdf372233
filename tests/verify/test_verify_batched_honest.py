"""The honest matrix over batch sizes: answers served concurrently by the continuously batched
transformers engine pass their audit, at batch sizes 1, 4 and 16.

Sixteen requests (greedy and sampled, top-p, top-k, stop sequences, budgets, chat and
completions) are served at once, each in its own thread as the miner's workers do, by an
engine over the reference's own weights that decodes up to `batch` of them per forward pass;
the reference engine (tiny_ref, which audits with one teacher-forced pass) passes every one.
A batched row's logits differ from a single row's only by floating-point reassociation
(tests/compute/test_compute_batching.py), far inside the float32 tolerances.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from audit_helpers import Serve

from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.verify.audit import DEFAULT_THRESHOLDS
from infergrid.verify.recompute import audit_job

CONCURRENT = 16

# (chat, params) of each request; every request also has its own request id, hence its own
# protocol seed where it sets none.
REQUESTS: list[tuple[bool, dict[str, Any]]] = [
    (True, {"temperature": 0.0}),
    (True, {}),
    (True, {"temperature": 0.7, "top_p": 0.9}),
    (True, {"temperature": 1.3, "top_k": 5}),
    (True, {"temperature": 0.9, "top_p": 0.5, "top_k": 20, "seed": -12345}),
    (True, {"temperature": 1.0, "max_tokens": 3}),
    (True, {"temperature": 0.5, "max_completion_tokens": 9}),
    (True, {"temperature": 0.8, "stop": ["N", "zz"]}),
    (False, {"temperature": 0.0, "max_tokens": 24}),
    (False, {"temperature": 1.0, "seed": 7}),
    (False, {"temperature": 0.7, "top_p": 0.9, "max_tokens": 20}),
    (False, {"temperature": 1.3, "top_k": 5}),
    (False, {"temperature": 0.0, "stop": ["q"]}),
    (False, {"temperature": 1.1, "top_p": 0.95, "top_k": 50, "max_tokens": 32}),
    (False, {"temperature": 0.9, "max_tokens": 1}),
    (False, {}),
]


def batched_copy(reference: TransformersEngine, batch: int) -> TransformersEngine:
    """A miner's engine over the reference's weights (the same model id), batching `batch`."""
    return TransformersEngine(
        reference.model,
        reference.tokenizer,
        name=reference.name,
        weights_digest=reference.weights_digest,
        revision=reference.revision,
        context_length=reference.context_length,
        max_batch=batch,
    )


def serve_concurrently(engine: TransformersEngine, serve: Serve) -> list[AuditJob]:
    """REQUESTS served at once, one thread each, released together."""
    assert len(REQUESTS) == CONCURRENT
    start = threading.Barrier(CONCURRENT)
    jobs: dict[int, AuditJob] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        chat, params = REQUESTS[i]
        try:
            start.wait(timeout=30)
            content = f"Request {i}: tell me about dragons é ✓ " + "and more " * i
            jobs[i] = serve(content, engine=engine, chat=chat, request_id=f"batched-{i}", **params)
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return [jobs[i] for i in range(CONCURRENT)]


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_concurrent_batched_answers_pass_their_audit(
    tiny_ref: TransformersEngine, serve: Serve, batch: int
) -> None:
    engine = batched_copy(tiny_ref, batch)
    try:
        jobs = serve_concurrently(engine, serve)
        stats = engine.batch_stats
    finally:
        engine.close()
    assert stats.rows_served == CONCURRENT
    assert 1 <= stats.max_rows_seen <= batch
    if batch > 1:  # sixteen requests released together do share steps
        assert stats.max_rows_seen > 1
    assert {job.finish_reason for job in jobs} == {"stop", "length"}
    for job in jobs:
        report = audit_job(tiny_ref, job)
        assert report.passed, (job.request_id, report.reason)
        assert report.worst_margin >= -DEFAULT_THRESHOLDS.margin_tolerance
        assert report.worst_logprob_error <= DEFAULT_THRESHOLDS.logprob_tolerance
