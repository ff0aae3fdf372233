"""compute.attacks: the red team's cheating engines, each caught by an audit on tiny models.

Every attack claims the reference's identity (so its attestations name the real model) and
answers fixed requests; the audit of each answer fails, always, and names the check that
caught it. The requests and seeds are fixed, so these outcomes are deterministic.
"""

from __future__ import annotations

import pytest
import torch

from infergrid.compute import attacks
from infergrid.compute.attacks import (
    ATTACKS,
    SubstitutedEngine,
    fake_quantized_copy,
    layer_dropped_copy,
    make_attack,
    serve_job,
)
from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import SamplingParams
from infergrid.compute.model_store import build_tiny_model
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.verify.recompute import audit_job

ATTESTOR = Attestor(Domain(1337, "0x" + "e5" * 20), Signer("0x" + "11" * 32), "0x" + "aa" * 20)
SAMPLED = [
    {"temperature": 0.0},
    {"temperature": 0.7},
    {"temperature": 1.0, "top_p": 0.9},
    {"temperature": 0.8, "top_k": 10},
]
# Which checks must catch each attack (others may catch it too).
CAUGHT_BY = {
    "substitution": {"sampler", "logprobs"},
    "weight-noise": {"logprobs"},
    "int8": {"logprobs"},
    "int4": {"sampler", "logprobs"},
    "bf16": {"logprobs"},
    "prefill": {"sampler"},
    "truncation": {"consistency"},
    "random-tokens": {"sampler"},
    "wrong-temperature": {"sampler"},
    "fabricated-logprobs": {"logprobs"},
    "replay": {"sampler"},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path = build_tiny_model(tmp_path_factory.mktemp("ref") / "model", seed=0)
    return TransformersEngine.from_dir(path, device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def cheap(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path = build_tiny_model(tmp_path_factory.mktemp("cheap") / "model", seed=1)
    return TransformersEngine.from_dir(path, device="cpu")


def _serve(
    engine: object, reference: TransformersEngine, prompt: str, rid: str, **params: object
) -> AuditJob:
    import json

    body = json.dumps(
        {"model": reference.name, "messages": [{"role": "user", "content": prompt}], **params}
    ).encode()
    return serve_job(engine, body, chat=True, request_id=rid, attestor=ATTESTOR)  # type: ignore[arg-type]


def test_every_attack_is_tested() -> None:
    assert set(CAUGHT_BY) == set(ATTACKS)


@pytest.mark.parametrize("name", ATTACKS)
def test_each_attack_is_caught(
    reference: TransformersEngine, cheap: TransformersEngine, name: str
) -> None:
    engine = make_attack(name, reference, cheap=cheap, seed=3)
    assert engine.model_id == reference.model_id and engine.name == reference.name
    for i in range(2):
        for k, params in enumerate(SAMPLED):
            if name == "replay":
                if params["temperature"] == 0.0:
                    continue  # greedy answers do not depend on the seed: a replay is honest
                _serve(
                    engine,
                    reference,
                    f"Attack {i}",
                    f"first-{i}-{k}",
                    seed=1,
                    max_tokens=16,
                    **params,
                )
                job = _serve(
                    engine,
                    reference,
                    f"Attack {i}",
                    f"again-{i}-{k}",
                    seed=2,
                    max_tokens=16,
                    **params,
                )
            else:
                job = _serve(
                    engine, reference, f"Attack {i}", f"r-{i}-{k}", max_tokens=16, **params
                )
            report = audit_job(reference, job)
            assert not report.passed, (name, params)
            assert CAUGHT_BY[name] & set(report.failed_checks), (name, params, report.reason)


def test_prefill_logprobs_are_the_real_models(
    reference: TransformersEngine, cheap: TransformersEngine
) -> None:
    """The prefill attack fools a logprob check: only the sampler replay catches it."""
    job = _serve(
        attacks.PrefillEngine(reference, cheap), reference, "Prefill", "p-1", max_tokens=16
    )
    report = audit_job(reference, job)
    assert report.failed_checks == ("sampler",)
    assert report.worst_logprob_error < 1e-3


def test_a_substituted_engine_is_honest_for_its_first_calls(
    reference: TransformersEngine, cheap: TransformersEngine
) -> None:
    engine = SubstitutedEngine(reference, cheap, honest_first=1)
    first = _serve(engine, reference, "Probation", "s-1", max_tokens=12, temperature=0.0)
    second = _serve(engine, reference, "Probation", "s-2", max_tokens=12, temperature=0.0)
    assert audit_job(reference, first).passed
    assert not audit_job(reference, second).passed
    assert engine.eos_token_ids == reference.eos_token_ids
    assert engine.encode("x") == reference.encode("x")


def test_a_replayed_answer_for_the_same_seed_is_honest(reference: TransformersEngine) -> None:
    engine = make_attack("replay", reference)
    _serve(engine, reference, "Same", "a", seed=4, max_tokens=12, temperature=0.9)
    job = _serve(engine, reference, "Same", "b", seed=4, max_tokens=12, temperature=0.9)
    assert audit_job(reference, job).passed


def test_fake_quantization_rounds_each_row_to_the_integer_grid(
    reference: TransformersEngine,
) -> None:
    q = fake_quantized_copy(reference, 4)
    w = dict(q.model.named_parameters())["model.layers.0.mlp.up_proj.weight"].detach()
    scale = w.abs().amax(dim=-1, keepdim=True) / 7
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-4)
    assert q.model_id == reference.model_id
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        fake_quantized_copy(reference, 1)


def test_a_layer_dropped_copy_is_a_cheaper_model_with_the_same_vocabulary(
    reference: TransformersEngine,
) -> None:
    small = layer_dropped_copy(reference, 1)
    assert len(small.model.model.layers) == 1
    tokens = list(small.generate(reference.encode("hi"), SamplingParams(max_tokens=4)))
    assert len(tokens) == 4
    with pytest.raises(ValueError, match=r"keep must be in \[1, 2\]"):
        layer_dropped_copy(reference, 3)


def test_an_unknown_attack_is_refused(reference: TransformersEngine) -> None:
    with pytest.raises(ValueError, match="unknown attack 'nope'; expected one of substitution"):
        make_attack("nope", reference)
