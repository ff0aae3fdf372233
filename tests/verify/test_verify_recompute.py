"""verify.recompute: the audit of a job against the reference model, end to end on tiny models.

Honest answers (greedy and sampled, temperature/top-p/top-k, stop sequences, the max_tokens
cut, chat and completions, 1 and 2 torch threads, and the real HTTP miner) pass with margins
that won their steps; a job this verifier cannot judge is CannotAudit; a broken job fails as
"malformed" with a reason. Each attack is caught in tests/compute/test_compute_attacks.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator

import pytest
import torch
from audit_helpers import MINER, Serve, request_body

from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import SamplingParams
from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.transformers_engine import TransformersEngine, set_torch_threads
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.wire import EXTENSION_KEY, REQUEST_ID_HEADER
from infergrid.verify.audit import BF16_THRESHOLDS, DEFAULT_THRESHOLDS, TextReplay
from infergrid.verify.recompute import (
    CannotAudit,
    audit_job,
    replay_text,
    teacher_forced_logits,
)

HONEST = [
    pytest.param({"temperature": 0.0}, id="greedy"),
    pytest.param({}, id="default-temperature"),
    pytest.param({"temperature": 0.7, "top_p": 0.9}, id="top-p"),
    pytest.param({"temperature": 1.3, "top_k": 5}, id="top-k"),
    pytest.param({"temperature": 0.9, "top_p": 0.5, "top_k": 20, "seed": -12345}, id="both+seed"),
    pytest.param({"temperature": 1.0, "max_tokens": 3}, id="max-tokens-cut"),
    pytest.param({"temperature": 0.5, "max_completion_tokens": 9}, id="max-completion-tokens"),
]


def _passes(engine: TransformersEngine, job: AuditJob) -> None:
    report = audit_job(engine, job)
    assert report.reason == ""
    assert report.passed and report.failed_checks == ()
    assert report.steps == len(job.output_token_ids)
    assert report.worst_margin >= -DEFAULT_THRESHOLDS.margin_tolerance
    assert report.worst_logprob_error <= DEFAULT_THRESHOLDS.logprob_tolerance


@pytest.mark.parametrize("params", HONEST)
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_honest_answers_pass(
    tiny_ref: TransformersEngine, serve: Serve, params: dict[str, object], chat: bool
) -> None:
    for i in range(3):
        job = serve(f"Prompt {i}: a dragon é ✓", chat=chat, request_id=f"honest-{i}", **params)
        _passes(tiny_ref, job)


def _stop_from(text: str, length: int) -> str:
    """A stop sequence taken from the middle of an answer's text (no U+FFFD in it)."""
    for start in range(len(text) // 3, len(text) - length):
        piece = text[start : start + length]
        if "\ufffd" not in piece and piece.strip():
            return piece
    raise AssertionError(f"no stop sequence in {text!r}")


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_answers_cut_by_a_stop_sequence_pass(
    tiny_ref: TransformersEngine, serve: Serve, temperature: float, length: int, chat: bool
) -> None:
    """The same request with a stop sequence from its own answer stops there, and passes."""
    for i in range(2):
        params = {"temperature": temperature, "seed": i, "max_tokens": 32, "chat": chat}
        full = serve(f"Stop {i}", **params)
        stop = _stop_from(full.text, length)
        job = serve(f"Stop {i}", stop=[stop, "\x00\x00"], **params)
        assert job.finish_reason == "stop"
        assert job.output_token_ids[-1] not in tiny_ref.eos_token_ids
        assert job.text == full.text[: full.text.index(stop)]
        _passes(tiny_ref, job)


def test_answers_ending_on_eos_or_the_budget_pass(
    tiny_ref: TransformersEngine, serve: Serve
) -> None:
    cut = serve("Prompt 0", temperature=1.0, max_tokens=3)
    assert cut.finish_reason == "length" and len(cut.output_token_ids) == 3
    _passes(tiny_ref, cut)
    # The first seed of a fixed list whose answer ends on EOS (deterministic).
    for seed in range(100):
        ended = serve("Prompt 11", temperature=2.0, seed=seed, max_tokens=64)
        if ended.finish_reason == "stop":
            break
    assert ended.finish_reason == "stop", "no seed ended on EOS"
    assert ended.output_token_ids[-1] in tiny_ref.eos_token_ids
    _passes(tiny_ref, ended)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    set_torch_threads(2)
    yield
    set_torch_threads(before)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("params", HONEST[:5])
def test_answers_generated_on_two_threads_pass_an_audit_on_one(
    tiny_ref: TransformersEngine, serve: Serve, params: dict[str, object]
) -> None:
    jobs = [serve(f"Threads {i}", request_id=f"t-{i}", **params) for i in range(3)]
    torch.set_num_threads(1)
    for job in jobs:
        _passes(tiny_ref, job)


def test_an_answer_from_the_http_miner_passes(
    tiny_ref: TransformersEngine, attestor: Attestor
) -> None:
    """The job built from a real miner's HTTP answer (what a gateway relays) passes: serve_job,
    which the other tests use, is the miner's own path."""
    import http.client

    app = create_miner_app(tiny_ref, node_address=MINER, attestor=attestor)
    body = request_body(tiny_ref.name, "Over HTTP", temperature=0.8, top_p=0.95, max_tokens=12)
    with MinerServerThread(app) as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"content-type": "application/json", REQUEST_ID_HEADER: "http-1"},
        )
        answer = json.loads(conn.getresponse().read())
        conn.close()
    extension = answer[EXTENSION_KEY]
    job = AuditJob.from_json(
        {
            "request_id": "http-1",
            "endpoint": "chat",
            "body": base64.b64encode(body).decode(),
            "miner": MINER,
            "model": answer["model"],
            "prompt_token_ids": extension["prompt_token_ids"],
            "output_token_ids": extension["output_token_ids"],
            "output_logprobs": extension["output_logprobs"],
            "text": answer["choices"][0]["message"]["content"],
            "finish_reason": answer["choices"][0]["finish_reason"],
            "usage": answer["usage"],
            "attestation": extension["attestation"],
            "receipt": None,
        }
    )
    _passes(tiny_ref, job)


def test_teacher_forced_logits_are_the_decode_loops_logits(
    tiny_ref: TransformersEngine,
) -> None:
    """One pass gives, per output step, the logits the KV-cache loop sampled from."""
    prompt = tiny_ref.encode("Hello")
    tokens = list(tiny_ref.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0)))
    ids = [t.token_id for t in tokens]
    logits = teacher_forced_logits(tiny_ref, prompt, ids)
    assert logits.shape == (len(ids), tiny_ref.model.config.vocab_size)
    assert logits.dtype == torch.float64
    assert torch.argmax(logits, dim=1).tolist() == ids
    lp = torch.log_softmax(logits, dim=1)
    for step, token in enumerate(tokens):
        assert abs(float(lp[step, token.token_id]) - token.logprob) < 1e-3


def test_teacher_forcing_needs_tokens(tiny_ref: TransformersEngine) -> None:
    with pytest.raises(ValueError, match="at least one output token"):
        teacher_forced_logits(tiny_ref, [5], [])


def test_replay_text_follows_the_decode_loop(tiny_ref: TransformersEngine) -> None:
    ids = tiny_ref.encode("abcab")
    eos = min(tiny_ref.eos_token_ids)

    def replay(ids: list[int], max_tokens: int = 10, stop: tuple[str, ...] = ()) -> TextReplay:
        return replay_text(
            ids,
            max_tokens=max_tokens,
            stop=stop,
            eos_token_ids=tiny_ref.eos_token_ids,
            decode=tiny_ref.decode,
        )

    assert replay(ids) == TextReplay("abcab", None, None)  # not finished: truncated
    assert replay(ids, max_tokens=5) == TextReplay("abcab", "length", 5)
    assert replay(ids, max_tokens=3) == TextReplay("abc", "length", 3)
    assert replay(ids, stop=("ca",)) == TextReplay("ab", "stop", 4)
    assert replay(ids, stop=("b", "ca")) == TextReplay("a", "stop", 2)
    assert replay([*ids[:2], eos, *ids[2:]]) == TextReplay("ab", "stop", 3)


def test_a_job_for_another_model_cannot_be_audited(
    tiny_ref: TransformersEngine, tiny_other: TransformersEngine, serve: Serve
) -> None:
    job = serve(engine=tiny_other)
    with pytest.raises(CannotAudit, match=f"does not hold model {tiny_other.model_id}"):
        audit_job(tiny_ref, job)


def test_an_unparseable_body_cannot_be_audited(
    tiny_ref: TransformersEngine, serve: Serve, attestor: Attestor
) -> None:
    job = serve()
    body = b'{"model": "x", "messages": "not a list"}'
    from infergrid.protocol.messages import request_hash

    attestation = attestor.attestation_json(
        request_hash(job.request_id, body),
        job.output_token_ids,
        tiny_ref.model_id,
        len(job.prompt_token_ids),
    )
    bad = dataclasses.replace(job, body=body, attestation=attestation)
    with pytest.raises(CannotAudit, match="request body does not parse"):
        audit_job(tiny_ref, bad)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"output_token_ids": (5, 300), "output_logprobs": (-1.0, -1.0)},
            "malformed job: output_token_ids[1] = 300 is outside the model's vocabulary of 259",
        ),
        (
            {"prompt_token_ids": (999,)},
            "malformed job: prompt_token_ids[0] = 999 is outside the model's vocabulary of 259",
        ),
        ({"output_logprobs": ()}, "malformed job: 0 output logprobs for "),
        ({"output_token_ids": (), "output_logprobs": ()}, "malformed job: no output token ids"),
        ({"attestation": {"requestHash": "0x12"}}, "malformed job: attestation:"),
    ],
)
def test_a_malformed_job_fails_as_malformed(
    tiny_ref: TransformersEngine, serve: Serve, change: dict[str, object], reason: str
) -> None:
    job = dataclasses.replace(serve(), **change)  # type: ignore[arg-type]
    report = audit_job(tiny_ref, job)
    assert not report.passed
    assert report.failed_checks == ("malformed",)
    assert report.reason.startswith(reason)


def test_a_job_past_the_context_fails_as_malformed(
    tiny_ref: TransformersEngine, serve: Serve
) -> None:
    job = serve()
    long = dataclasses.replace(job, prompt_token_ids=(5,) * tiny_ref.context_length)
    report = audit_job(tiny_ref, long)
    assert report.failed_checks == ("malformed",)
    assert f"exceed the model's context of {tiny_ref.context_length}" in report.reason


def test_the_reference_precision_picks_the_thresholds(tiny_ref: TransformersEngine) -> None:
    from infergrid.verify.audit import thresholds_for

    assert thresholds_for(tiny_ref.precision) == DEFAULT_THRESHOLDS
    assert thresholds_for("bfloat16") == BF16_THRESHOLDS


@pytest.mark.slow
def test_honest_smollm2_answers_pass(attestor: Attestor) -> None:
    """SmolLM2, the default model: a greedy and a sampled answer pass (about 10 s)."""
    from infergrid.compute.attacks import serve_job

    engine = TransformersEngine.load("smollm2", quiet=True, device="cpu")
    for params in ({"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9, "top_k": 40}):
        body = request_body(engine.name, "Name three colours.", max_tokens=24, **params)
        job = serve_job(engine, body, chat=True, request_id="smol-1", attestor=attestor)
        _passes(engine, job)


def test_a_prompt_other_than_the_bodys_fails_the_prompt_check(
    tiny_ref: TransformersEngine, serve: Serve, attestor: Attestor
) -> None:
    """A miner that answered another prompt than the one it was sent (and attested its own
    counts for it) fails "prompt", whatever else holds."""
    from infergrid.protocol.messages import request_hash

    job = serve()
    other = (*job.prompt_token_ids[:-1], 50)
    attestation = attestor.attestation_json(
        request_hash(job.request_id, job.body), job.output_token_ids, tiny_ref.model_id, len(other)
    )
    report = audit_job(
        tiny_ref, dataclasses.replace(job, prompt_token_ids=other, attestation=attestation)
    )
    assert "prompt" in report.failed_checks
    assert report.reason.startswith("prompt: the reported prompt ids")


def test_an_attestation_for_another_request_fails_identity(
    tiny_ref: TransformersEngine, serve: Serve
) -> None:
    job = serve()
    report = audit_job(tiny_ref, dataclasses.replace(job, request_id="another-id"))
    assert report.failed_checks == ("identity",)
    assert report.reason.startswith("identity: the attestation's request hash")


def test_bf16_answers_pass_a_bf16_reference(tiny_ref: TransformersEngine, serve: Serve) -> None:
    """A miner claiming the bf16 model is audited by a verifier running bf16, at the bf16
    thresholds (the engine's precision picks them)."""
    from infergrid.compute.attacks import cast_copy

    bf16 = cast_copy(tiny_ref, torch.bfloat16)
    assert bf16.precision == "bfloat16" and bf16.model_id != tiny_ref.model_id
    for i, params in enumerate(HONEST[:5]):
        job = serve(f"bf16 {i}", engine=bf16, request_id=f"bf-{i}", **params.values[0])
        report = audit_job(bf16, job)
        assert report.passed, report.reason
        assert report.worst_logprob_error <= BF16_THRESHOLDS.logprob_tolerance
