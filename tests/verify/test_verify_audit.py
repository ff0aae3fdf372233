"""verify.audit: each check of the audit on crafted inputs, without a model.

A job is built by hand (a body, ids, an attestation over them); each test breaks one thing and
names the exact finding. The model side (verify.recompute) is tested on tiny models in
test_verify_recompute.py.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from audit_helpers import BODY, MINER, OTHER_MINER, make_job

import infergrid.verify
from infergrid.protocol import sampling
from infergrid.protocol.messages import Attestation, response_hash
from infergrid.verify.audit import (
    BF16_THRESHOLDS,
    CHECKS,
    DEFAULT_THRESHOLDS,
    MARGIN_CLAMP,
    AuditThresholds,
    Finding,
    SamplerPlan,
    StepMargin,
    TextReplay,
    check_consistency,
    check_identity,
    check_logprobs,
    check_malformed,
    check_prompt,
    check_sampler,
    greedy_margins,
    logprob_errors,
    make_report,
    parse_attestation,
    robust_kept,
    sampled_margin,
    sampler_margins,
    thresholds_for,
)


def attestation(**change: Any) -> Attestation:
    return dataclasses.replace(Attestation.from_json(make_job().attestation), **change)


# -- thresholds and reports --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_thresholds_are_finite_and_non_negative(bad: float) -> None:
    with pytest.raises(ValueError, match="margin_tolerance must be a finite number >= 0"):
        AuditThresholds(margin_tolerance=bad, logprob_tolerance=0.1)
    with pytest.raises(ValueError, match="logprob_tolerance must be a finite number >= 0"):
        AuditThresholds(margin_tolerance=0.1, logprob_tolerance=bad)


def test_thresholds_follow_the_reference_precision() -> None:
    assert thresholds_for("float32") is DEFAULT_THRESHOLDS
    assert thresholds_for("bfloat16") is BF16_THRESHOLDS
    assert thresholds_for("float16") is BF16_THRESHOLDS
    assert DEFAULT_THRESHOLDS.margin_tolerance < BF16_THRESHOLDS.margin_tolerance


def test_a_finding_names_a_known_check() -> None:
    assert set(CHECKS) == {"identity", "prompt", "consistency", "sampler", "logprobs", "malformed"}
    with pytest.raises(ValueError, match="unknown check 'speed'"):
        Finding("speed", "too slow")


def test_a_report_passes_iff_nothing_was_found() -> None:
    assert make_report([], worst_margin=0.5, steps=3).passed
    report = make_report(
        [Finding("sampler", "first"), Finding("logprobs", "second"), Finding("sampler", "third")],
        worst_margin=-math.inf,
        worst_logprob_error=math.inf,
    )
    assert not report.passed
    assert report.reason == "first"
    assert report.failed_checks == ("sampler", "logprobs")
    assert report.worst_margin == -MARGIN_CLAMP and report.worst_logprob_error == MARGIN_CLAMP
    text = json.dumps(report.to_json(), allow_nan=False)  # finite: any JSON reader takes it
    assert json.loads(text)["failed_checks"] == ["sampler", "logprobs"]


# -- malformed, identity, prompt ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"prompt_token_ids": ()}, "malformed job: no prompt token ids"),
        (
            {"output_token_ids": (), "output_logprobs": ()},
            "malformed job: no output token ids (a generation has at least its ending token)",
        ),
        ({"output_logprobs": (-0.1,)}, "malformed job: 1 output logprobs for 3 output tokens"),
        (
            {"output_token_ids": (10, 100, 12)},
            "malformed job: output_token_ids[1] = 100 is outside the model's vocabulary of 100",
        ),
        (
            {"prompt_token_ids": (3, 2**32 - 1)},
            "malformed job: prompt_token_ids[1] = 4294967295 is outside the model's vocabulary"
            " of 100",
        ),
        (
            {"prompt_token_ids": (3,) * 8},
            "malformed job: 8 prompt + 3 output tokens exceed the model's context of 10",
        ),
    ],
)
def test_malformed_jobs(change: dict[str, Any], reason: str) -> None:
    assert check_malformed(make_job(), vocab_size=100, context_length=10) is None
    assert check_malformed(make_job(**change), vocab_size=100, context_length=10) == Finding(
        "malformed", reason
    )


def test_an_unreadable_attestation_is_malformed() -> None:
    assert isinstance(parse_attestation(make_job()), Attestation)
    finding = parse_attestation(make_job(attestation={"requestHash": "0x12"}))
    assert isinstance(finding, Finding) and finding.check == "malformed"
    assert finding.reason.startswith("malformed job: attestation: ")


@pytest.mark.parametrize(
    ("job_change", "attestation_change", "reason"),
    [
        ({"body": BODY + b" "}, {}, "identity: the attestation's request hash 0x"),
        ({"request_id": "other"}, {}, "identity: the attestation's request hash 0x"),
        (
            {},
            {"response_hash": response_hash([10, 11])},
            "identity: the attestation's response hash is not the hash of the output token ids",
        ),
        (
            {},
            {"tokens_in": 4},
            "identity: the attestation counts 4 prompt tokens, the job has 3",
        ),
        (
            {},
            {"tokens_out": 2},
            "identity: the attestation counts 2 output tokens, the job has 3",
        ),
        (
            {},
            {"miner": OTHER_MINER},
            f"identity: the attestation names miner {OTHER_MINER}, the job {MINER}",
        ),
    ],
)
def test_identity_mismatches(
    job_change: dict[str, Any], attestation_change: dict[str, Any], reason: str
) -> None:
    assert check_identity(make_job(), attestation()) is None
    finding = check_identity(make_job(**job_change), attestation(**attestation_change))
    assert finding is not None and finding.check == "identity"
    assert finding.reason.startswith(reason)


def test_the_prompt_must_be_the_bodys() -> None:
    assert check_prompt([3, 4, 5], [3, 4, 5]) is None
    assert check_prompt([3, 9, 5], [3, 4, 5]) == Finding(
        "prompt",
        "prompt: the reported prompt ids (3) differ from the body's prompt under the model's "
        "tokenizer (3) at position 1",
    )
    assert check_prompt([3, 4], [3, 4, 5]) == Finding(
        "prompt",
        "prompt: the reported prompt ids (2) differ from the body's prompt under the model's "
        "tokenizer (3) at position 2",
    )


# -- consistency -------------------------------------------------------------------------------

REPLAYED = TextReplay("abc", "length", 3)


@pytest.mark.parametrize(
    ("change", "replay", "reason"),
    [
        (
            {"usage": {"prompt_tokens": 4, "completion_tokens": 3}},
            REPLAYED,
            "consistency: usage.prompt_tokens is 4, the prompt has 3 tokens",
        ),
        (
            {"usage": {"prompt_tokens": 3, "completion_tokens": 2}},
            REPLAYED,
            "consistency: usage.completion_tokens is 2, the output has 3 tokens",
        ),
        (
            {},
            TextReplay("abc", None, None),
            "consistency: the generation does not end after its 3 tokens (no EOS, no stop "
            "sequence, and fewer than the 3-token budget): finish_reason 'length' is not what "
            "the output ids give; truncated?",
        ),
        (
            {},
            TextReplay("a", "stop", 1),
            "consistency: the generation ended at step 0 (stop) but 2 more tokens follow",
        ),
        (
            {"finish_reason": "stop"},
            REPLAYED,
            "consistency: finish_reason is 'stop', the output ids end with 'length'",
        ),
        (
            {"text": "abd"},
            REPLAYED,
            "consistency: the text (3 characters) is not what the output ids decode to (3 "
            "characters); they differ at character 2",
        ),
        (
            {"text": "ab"},
            REPLAYED,
            "consistency: the text (2 characters) is not what the output ids decode to (3 "
            "characters); they differ at character 2",
        ),
    ],
)
def test_consistency(change: dict[str, Any], replay: TextReplay, reason: str) -> None:
    assert check_consistency(make_job(), REPLAYED, max_tokens=3) is None
    assert check_consistency(make_job(**change), replay, max_tokens=3) == Finding(
        "consistency", reason
    )


# -- sampler replay ----------------------------------------------------------------------------


def test_greedy_margins_are_the_lead_over_the_best_other_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5], [0.0, 0.0, -1.0], [4.0, 1.0, 0.0]])
    margins = greedy_margins(logits, [1, 1, 2])
    assert margins.tolist() == pytest.approx([0.5, 0.0, -4.0])  # won, tied, lost by 4
    report = [StepMargin(float(m), False) for m in margins]
    worst, finding = check_sampler(report, 0.01)
    assert worst == pytest.approx(-4.0)
    assert finding == Finding(
        "sampler", "sampler: step 2: the emitted token loses its step by 4 logits (tolerance 0.01)"
    )


def _winner(logits: torch.Tensor, plan: SamplerPlan, step: int) -> int:
    return sampling.sample_token(logits, plan.seed, step, plan.temperature, plan.top_p, plan.top_k)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_a_sampled_margin_is_in_logits_at_any_temperature(temperature: float) -> None:
    """The sampled token wins by T·(its perturbed score − the best other's) >= 0; any other
    token loses by as much as the winner led it."""
    logits = torch.linspace(-2.0, 2.0, 50, dtype=torch.float64)
    plan = SamplerPlan(temperature, None, None, seed=42)
    winner = _winner(logits, plan, 3)
    z = sampling.perturbed_scores(logits, 42, 3, temperature)
    runner_up = int(torch.topk(z, 2).indices[1])
    won = sampled_margin(logits, winner, plan, 3, 0.01)
    lost = sampled_margin(logits, runner_up, plan, 3, 0.01)
    assert won.margin > 0 and not won.outside
    assert lost.margin == pytest.approx(-won.margin)
    assert won.margin == pytest.approx(temperature * float(z[winner] - z[runner_up]))


def test_a_token_outside_top_k_cannot_be_sampled() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, -3.0], dtype=torch.float64)
    plan = SamplerPlan(1.0, None, 2, seed=1)
    margin = sampled_margin(logits, 3, plan, 0, 0.01)
    assert margin.outside and margin.margin == -math.inf
    _, finding = check_sampler([StepMargin(1.0, False), margin], 0.01)
    assert finding == Finding(
        "sampler", "sampler: step 1: the emitted token is outside the request's top-k/top-p set"
    )


def test_a_token_at_the_top_k_edge_passes_a_boundary_flip() -> None:
    """Tokens 1 and 2 tie for the k-th place to 1e-4: the verifier keeps 2, a miner whose
    logits differ by that much keeps 1. Its token 1 passes, judged against token 0 only."""
    logits = torch.tensor([5.0, 3.0, 3.0 + 1e-4, -3.0], dtype=torch.float64)
    plan = SamplerPlan(1.0, None, 2, seed=0)
    step = next(
        s
        for s in range(1000)
        if float(sampling.gumbel_noise(0, s, 4)[1]) + 3.0
        > max(
            float(sampling.gumbel_noise(0, s, 4)[0]) + 5.0,
            float(sampling.gumbel_noise(0, s, 4)[2]) + 3.0,
        )
    )
    strict = sampling.perturbed_scores(logits, 0, step, 1.0, None, 2)
    assert strict[1] == -math.inf  # the verifier's own set drops it
    margin = sampled_margin(logits, 1, plan, step, 0.01)
    assert not margin.outside and margin.margin > 0


def test_robust_top_p_sets_widen_and_narrow_the_edge() -> None:
    """Token 2's more-likely mass is 0.8 + 1e-7 against top_p 0.8: dropped by the rule,
    kept by the widened set, out of the narrowed one."""
    probs = torch.tensor([0.5, 0.3 + 1e-7, 0.2 - 1e-7], dtype=torch.float64)
    scores = probs.log()
    strict = sampling.allowed_mask(scores, 1.0, 0.8, None)
    assert strict is not None and strict.tolist() == [True, True, False]
    widened, narrowed = robust_kept(scores, 0.8, None, 0.01)
    assert widened.tolist() == [True, True, True]
    assert narrowed.tolist() == [True, True, False]
    far_widened, _ = robust_kept(scores, 0.4, None, 0.01)  # far from any edge
    assert far_widened.tolist() == [True, False, False]


def test_sampler_margins_cover_every_step() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = SamplerPlan(0.8, 0.9, 20, seed=7)
    emitted = [_winner(logits[s], plan, s) for s in range(5)]
    margins = sampler_margins(logits, emitted, plan, 0.01)
    assert len(margins) == 5 and all(m.margin >= 0 and not m.outside for m in margins)
    greedy = sampler_margins(
        logits, logits.argmax(dim=1).tolist(), SamplerPlan(0.0, None, None, 0), 0.01
    )
    assert all(m.margin > 0 for m in greedy)


# -- logprobs ----------------------------------------------------------------------------------


def test_logprob_errors_against_the_raw_softmax() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, -math.inf]], dtype=torch.float64)
    half = math.log(0.5)
    errors = logprob_errors(logits, [0, 1], [half + 0.25, -math.inf])
    assert errors.tolist() == pytest.approx([0.25, 0.0])  # two -inf agree
    worst, finding = check_logprobs(errors, 0.1)
    assert worst == pytest.approx(0.25)
    assert finding == Finding(
        "logprobs", "logprobs: step 0: the reported logprob is off by 0.25 (tolerance 0.1)"
    )
    assert check_logprobs(errors, 0.3) == (pytest.approx(0.25), None)
    wrong = logprob_errors(logits[1:], [1], [-1.0])  # a token the model gives no chance
    assert wrong.tolist() == [math.inf]


# -- purity ------------------------------------------------------------------------------------

IO_MODULES = (
    "asyncio", "http", "os", "pathlib", "shutil", "socket", "sqlite3", "subprocess",
    "threading", "urllib", "infergrid.app", "infergrid.compute", "infergrid.settle",
)  # fmt: skip


@pytest.mark.parametrize("name", ["audit.py", "verdict.py"])
def test_the_checks_do_no_io(name: str) -> None:
    tree = ast.parse((Path(infergrid.verify.__file__).parent / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported = [node.module or ""]
        else:
            continue
        for module in imported:
            assert not any(
                module == banned or module.startswith(banned + ".") for banned in IO_MODULES
            ), f"{name} imports {module}"
