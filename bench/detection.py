"""Detection benchmark: how often an audit catches each attack, and never an honest miner.

For each model (tiny random models, SmolLM2) it serves requests the way the miner does
(compute.attacks.serve_job: protocol.generation's plan, the engine's protocol sampler, a
signed attestation; or the real HTTP miner for the concurrent configuration) and audits every
answer with verify.recompute.audit_job at the default (precision's) thresholds.

Honest matrix: fp32 generated on 1 thread; fp32 generated on 2 threads (audited on 1); fp32
through a real miner server answering 4 concurrent HTTP requests; bf16 generated and audited
in bf16 (a bf16 miner and a bf16 verifier). Requests cycle through chat and completions,
greedy and sampled (temperature, top-p, top-k, explicit seeds, a stop sequence).

Attacks (compute.attacks; each claims the fp32 reference's model id): substitution (tiny:1
under tiny's id; for SmolLM2, SmolLM2 with half its layers), weight noise (1 % of each
matrix's std), int8 and int4 weights (fake-quantized per row), bf16 served for fp32, prefill
(tokens from the substitute, logprobs from the real model), random tokens (real logprobs),
wrong temperature (1.5 whatever was asked), and three derived from the honest fp32 answers,
which costs only their audits: truncation (cut to half, reported "length"), fabricated
logprobs (all -0.5), and replay (the answer re-attested for another request id, hence another
seed; sampled requests without an explicit seed only, since a greedy or same-seed replay is an
honest answer).

llama.cpp (--llamacpp-trials N): SmolLM2's GGUF served natively by compute.llamacpp_engine
at batch sizes 1, 4 and 16 (as many requests in flight, prompts of mixed lengths), audited by a
llama.cpp verifier (teacher forcing in its own context) at thresholds_for("gguf-q4_1"); then
the attacks that apply to a llama.cpp claim: substitution (SmolLM2 with half its layers),
the dequantized float32 model under the GGUF's id (an engine swap, reported as such), prefill,
random tokens, wrong temperature and the three derived attacks.

Output: a markdown table per model (trials, detection or false-positive rate, the rule-of-three
95 % upper bound when nothing was seen, which checks fired, the worst honest margin deficit and
logprob error, audit seconds / generation seconds) and, with --out, JSON.

    nice -n 10 .venv/bin/python bench/detection.py [--tiny-trials 1000] [--smollm2-trials 12]
        [--llamacpp-trials 0] [--llamacpp-batches 1,4,16] [--out detection.json]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import gc
import http.client
import json
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from infergrid.compute import attacks
from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import Engine
from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.model_store import cached_tiny_dir
from infergrid.compute.transformers_engine import TransformersEngine, set_torch_threads
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import request_hash
from infergrid.protocol.wire import EXTENSION_KEY, REQUEST_ID_HEADER
from infergrid.verify.audit import AuditReport, thresholds_for
from infergrid.verify.recompute import audit_job, replay_text

MINER = "0x" + "42" * 20
ATTESTOR = Attestor(Domain(1337, "0x" + "e5" * 20), Signer("0x" + "11" * 32), MINER)
PROMPTS = (
    "Tell me a story about a dragon number {i}.",
    "Write a haiku about the sea, variation {i}.",
    "List three facts about the number {i}.",
    "Explain photosynthesis to a child ({i}).",
    "Translate 'good morning' into French and say why ({i}).",
)
SAMPLING: tuple[dict[str, Any], ...] = (
    {"temperature": 0.0},
    {"temperature": 0.7},
    {"temperature": 1.0, "top_p": 0.9},
    {"temperature": 0.8, "top_k": 20},
    {"temperature": 1.2, "top_p": 0.95, "top_k": 50, "seed": 1234},
    {"temperature": 0.9, "stop": ["\n\n", "."]},
)
GENERATING_ATTACKS = (
    "substitution",
    "weight-noise",
    "int8",
    "int4",
    "bf16",
    "prefill",
    "random-tokens",
    "wrong-temperature",
)
BF16_ATTACKS = (
    "substitution",
    "prefill",
    "random-tokens",
    "wrong-temperature",
    "fabricated-logprobs",
)
DERIVED_ATTACKS = ("truncation", "fabricated-logprobs", "replay")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def request(engine: Engine, i: int, max_tokens: int) -> tuple[bytes, bool, str]:
    """Trial i's request: (body, chat?, request id)."""
    chat = i % 2 == 0
    text = PROMPTS[i % len(PROMPTS)].format(i=i)
    payload: dict[str, Any] = {"model": engine.name, "max_tokens": max_tokens}
    payload.update(SAMPLING[(i // 2) % len(SAMPLING)])
    if chat:
        payload["messages"] = [{"role": "user", "content": text}]
    else:
        payload["prompt"] = text
    return json.dumps(payload).encode(), chat, f"bench-{i}"


@dataclasses.dataclass
class Trial:
    job: AuditJob
    report: AuditReport
    generation_s: float


def run_trials(
    engine: Engine,
    reference: Engine,
    trials: int,
    max_tokens: int,
    label: str,
    *,
    start: int = 0,
    threads: int = 1,
) -> list[Trial]:
    """Serve and audit `trials` requests; generation on `threads` torch threads, audits on 1."""
    out: list[Trial] = []
    started = time.perf_counter()
    for i in range(trials):
        body, chat, rid = request(reference, start + i, max_tokens)
        if threads != 1:
            set_torch_threads(threads)
        t0 = time.perf_counter()
        job = attacks.serve_job(engine, body, chat=chat, request_id=rid, attestor=ATTESTOR)
        generation = time.perf_counter() - t0
        if threads != 1:
            set_torch_threads(1)
        out.append(Trial(job, audit_job(reference, job), generation))
        if (i + 1) % 200 == 0:
            log(f"  {label}: {i + 1}/{trials} ({time.perf_counter() - started:.0f} s)")
    return out


def audit_all(reference: Engine, jobs: Iterable[AuditJob]) -> list[Trial]:
    return [Trial(job, audit_job(reference, job), 0.0) for job in jobs]


# -- the concurrent configuration: a real miner over HTTP --------------------------------------


def _post(port: int, body: bytes, chat: bool, rid: str) -> AuditJob:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: rid}
        conn.request("POST", path, body=body, headers=headers)
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    ext = answer[EXTENSION_KEY]
    choice = answer["choices"][0]
    return AuditJob.from_json(
        {
            "request_id": rid,
            "endpoint": "chat" if chat else "completions",
            "body": base64.b64encode(body).decode(),
            "miner": MINER,
            "model": answer["model"],
            "prompt_token_ids": ext["prompt_token_ids"],
            "output_token_ids": ext["output_token_ids"],
            "output_logprobs": ext["output_logprobs"],
            "text": choice["message"]["content"] if chat else choice["text"],
            "finish_reason": choice["finish_reason"],
            "usage": answer["usage"],
            "attestation": ext["attestation"],
        }
    )


def concurrent_trials(
    reference: TransformersEngine, trials: int, max_tokens: int, concurrency: int
) -> list[Trial]:
    app = create_miner_app(
        reference, node_address=MINER, attestor=ATTESTOR, max_concurrency=concurrency
    )
    requests = [request(reference, 100_000 + i, max_tokens) for i in range(trials)]
    with MinerServerThread(app) as server, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        jobs = list(pool.map(lambda r: _post(server.port, *r), requests))
        wall = time.perf_counter() - t0
    trials_out = audit_all(reference, jobs)
    for trial in trials_out:
        trial.generation_s = wall / max(1, len(jobs))  # wall per answer, 4 in flight
    return trials_out


# -- derived attacks ---------------------------------------------------------------------------


def reattest(job: AuditJob, **change: Any) -> AuditJob:
    new = dataclasses.replace(job, **change)
    attestation = ATTESTOR.attestation_json(
        request_hash(new.request_id, new.body),
        new.output_token_ids,
        str(job.attestation["modelId"]),
        len(new.prompt_token_ids),
    )
    return dataclasses.replace(new, attestation=attestation)


def truncated(job: AuditJob, reference: Engine) -> AuditJob | None:
    keep = len(job.output_token_ids) // 2
    if keep < 1:
        return None
    ids = job.output_token_ids[:keep]
    text = replay_text(
        ids,
        max_tokens=keep,
        stop=(),
        eos_token_ids=reference.eos_token_ids,
        decode=reference.decode,
    ).text
    return reattest(
        job,
        output_token_ids=ids,
        output_logprobs=job.output_logprobs[:keep],
        text=text,
        finish_reason="length",
        usage={"prompt_tokens": len(job.prompt_token_ids), "completion_tokens": keep},
    )


def replayed(job: AuditJob) -> AuditJob | None:
    body = json.loads(job.body)
    if body.get("temperature") == 0.0 or "seed" in body:
        return None  # the same answer is the honest one
    return reattest(job, request_id=job.request_id + "-replayed")


def fabricated(job: AuditJob) -> AuditJob:
    return dataclasses.replace(job, output_logprobs=(-0.5,) * len(job.output_token_ids))


# -- summaries ---------------------------------------------------------------------------------


def _rate(k: int, n: int) -> str:
    """k of n, with the rule-of-three 95 % bound (3/n) on a rate when none were seen."""
    if n == 0:
        return "n/a"
    if n < 3:
        return f"{k}/{n}"
    if k == 0:
        return f"0/{n} (< {300 / n:.2g} %)"
    if k == n:
        return f"{n}/{n} (100 %; miss < {300 / n:.2g} %)"
    return f"{k}/{n} ({100 * k / n:.1f} %)"


def honest_summary(name: str, trials: list[Trial]) -> dict[str, Any]:
    failed = [t for t in trials if not t.report.passed]
    generation = sum(t.generation_s for t in trials)
    audit = sum(t.report.seconds for t in trials)
    return {
        "config": name,
        "trials": len(trials),
        "false_positives": len(failed),
        "false_positive_reasons": [t.report.reason for t in failed[:5]],
        "worst_margin": min(t.report.worst_margin for t in trials),
        "worst_logprob_error": max(t.report.worst_logprob_error for t in trials),
        "tokens": sum(len(t.job.output_token_ids) for t in trials),
        "audit_s": audit,
        "generation_s": generation,
        "audit_over_generation": audit / generation if generation else None,
    }


def altered(job: AuditJob, honest: AuditJob | None) -> bool:
    """Whether an attack's answer differs from the honest answer to the same request at all
    (tokens or logprobs): an identical answer is not a cheat an audit could or should see."""
    if honest is None:
        return True
    # Logprobs to 1e-6: two runs of one engine may differ in the last bits (kernel choice).
    return (
        job.output_token_ids != honest.output_token_ids
        or job.text != honest.text
        or job.finish_reason != honest.finish_reason
        or any(
            abs(a - b) > 1e-6
            for a, b in zip(job.output_logprobs, honest.output_logprobs, strict=True)
        )
    )


def attack_summary(name: str, trials: list[Trial], honest: list[AuditJob | None]) -> dict[str, Any]:
    """Detection among the answers the attack altered; `honest[i]` answers trial i's request
    honestly (None: known to differ)."""
    changed = [t for t, h in zip(trials, honest, strict=True) if altered(t.job, h)]
    unchanged = len(trials) - len(changed)
    caught = [t for t in changed if not t.report.passed]
    by: Counter[str] = Counter(c for t in changed for c in t.report.failed_checks)
    signal = [max(-t.report.worst_margin, t.report.worst_logprob_error) for t in changed]
    return {
        "attack": name,
        "trials": len(trials),
        "altered": len(changed),
        "identical_to_honest": unchanged,
        "identical_flagged": sum(
            1
            for t, h in zip(trials, honest, strict=True)
            if not altered(t.job, h) and not t.report.passed
        ),
        "caught": len(caught),
        "detection": len(caught) / len(changed) if changed else None,
        "caught_by": dict(by),
        "median_signal": statistics.median(signal) if signal else None,
        # The weakest evidence among the trials: how close this attack comes to the thresholds.
        "p10_signal": statistics.quantiles(signal, n=10)[0] if len(signal) >= 2 else None,
        "missed_examples": [
            {"worst_margin": t.report.worst_margin, "lp": t.report.worst_logprob_error}
            for t in changed
            if t.report.passed
        ][:5],
    }


def table(model: str, honest: list[dict[str, Any]], attacked: list[dict[str, Any]]) -> str:
    lines = [
        f"### {model}",
        "",
        "| honest configuration | trials | false positives | worst margin | worst logprob error"
        " | audit s / generation s |",
        "|---|---|---|---|---|---|",
    ]
    for h in honest:
        ratio = h["audit_over_generation"]
        lines.append(
            f"| {h['config']} | {h['trials']} | {_rate(h['false_positives'], h['trials'])} | "
            f"{h['worst_margin']:.3g} | {h['worst_logprob_error']:.3g} | "
            f"{'n/a' if ratio is None else f'{100 * ratio:.1f} %'} |"
        )
    lines += [
        "",
        "| attack | trials (altered) | detected of altered | caught by | signal p10 / median |",
        "|---|---|---|---|---|",
    ]
    for a in attacked:
        by = ", ".join(f"{k} {v}" for k, v in sorted(a["caught_by"].items())) or "-"
        p10, median = a["p10_signal"], a["median_signal"]
        signal = "n/a" if median is None or p10 is None else f"{p10:.3g} / {median:.3g}"
        lines.append(
            f"| {a['attack']} | {a['trials']} ({a['altered']}) | {_rate(a['caught'], a['altered'])}"
            f" | {by} | "
            f"{signal} |"
        )
    return "\n".join(lines)


# -- one model ---------------------------------------------------------------------------------


def bench_model(
    label: str,
    reference: TransformersEngine,
    cheap: TransformersEngine,
    *,
    trials: int,
    max_tokens: int,
    concurrency: int,
    only: set[str] | None,
    bf16_trials: int,
    attacks_only: bool = False,
) -> dict[str, Any]:
    def wanted(name: str) -> bool:
        return only is None or name in only

    log(f"{label}: {trials} trials per configuration, max_tokens {max_tokens}")
    honest: list[dict[str, Any]] = []
    set_torch_threads(1)
    base = run_trials(reference, reference, trials, max_tokens, "fp32 1 thread")
    honest.append(honest_summary("fp32, 1 thread", base))
    if not attacks_only:
        two = run_trials(
            reference, reference, trials, max_tokens, "fp32 2 threads", start=50_000, threads=2
        )
        honest.append(honest_summary("fp32, generated on 2 threads, audited on 1", two))
        log(f"  fp32 2 threads done; concurrent miner ({concurrency} in flight)")
        honest.append(
            honest_summary(
                f"fp32, HTTP miner, {concurrency} concurrent",
                concurrent_trials(reference, trials, max_tokens, concurrency),
            )
        )
    bf16 = attacks.cast_copy(reference, torch.bfloat16)
    bf16_honest = run_trials(bf16, bf16, trials, max_tokens, "bf16")
    honest.append(honest_summary("bf16 miner, bf16 verifier", bf16_honest))
    # The attacks that still make sense against a bf16 claim, judged at the bf16 thresholds.
    bf16_attacked: list[dict[str, Any]] = []
    cheap16 = attacks.cast_copy(cheap, torch.bfloat16)
    for name in BF16_ATTACKS:
        if not wanted(name) or bf16_trials <= 0:
            continue
        engine = attacks.make_attack(name, bf16, cheap=cheap16, seed=7)
        run = run_trials(engine, bf16, bf16_trials, max_tokens, f"bf16 {name}")
        bf16_attacked.append(
            attack_summary(name + " (bf16 claim)", run, [t.job for t in bf16_honest[: len(run)]])
        )
        log(f"  bf16 {name}: {bf16_attacked[-1]['caught']}/{bf16_attacked[-1]['altered']}")
    del bf16, cheap16
    gc.collect()

    attacked: list[dict[str, Any]] = []
    for name in GENERATING_ATTACKS:
        if not wanted(name):
            continue
        engine = attacks.make_attack(name, reference, cheap=cheap, seed=7)
        attacked.append(
            attack_summary(
                name,
                run_trials(engine, reference, trials, max_tokens, name),
                [t.job for t in base],  # the same requests, answered honestly
            )
        )
        log(f"  {name}: {attacked[-1]['caught']}/{attacked[-1]['trials']}")
        del engine
        gc.collect()
    derived: dict[str, Callable[[AuditJob], AuditJob | None]] = {
        "truncation": lambda job: truncated(job, reference),
        "fabricated-logprobs": fabricated,
        "replay": replayed,
    }
    for name in DERIVED_ATTACKS:
        if not wanted(name):
            continue
        made = [job for job in (derived[name](t.job) for t in base) if job is not None]
        if name == "replay":  # the honest answer to the replayed request, for comparison
            counterparts: list[AuditJob | None] = [
                attacks.serve_job(
                    reference, job.body, chat=job.chat, request_id=job.request_id, attestor=ATTESTOR
                )
                for job in made
            ]
        else:
            counterparts = [None] * len(made)
        attacked.append(attack_summary(name, audit_all(reference, made), counterparts))
        log(f"  {name}: {attacked[-1]['caught']}/{attacked[-1]['trials']}")
    return {
        "model": label,
        "model_id": reference.model_id,
        "max_tokens": max_tokens,
        "thresholds": dataclasses.asdict(thresholds_for(reference.precision)),
        "bf16_thresholds": dataclasses.asdict(thresholds_for("bfloat16")),
        "honest": honest,
        "attacks": attacked + bf16_attacked,
    }


# -- llama.cpp ---------------------------------------------------------------------------------

LLAMACPP_ATTACKS = (
    "substitution",
    "dequantized-fp32",
    "prefill",
    "random-tokens",
    "wrong-temperature",
)
FILLER = " Please answer carefully, step by step, and mention every detail that matters."


def mixed_request(engine: Engine, i: int, max_tokens: int) -> tuple[bytes, bool, str]:
    """request(), with a prompt of mixed length: up to 12 filler sentences appended, so the
    sequences of one batch prefill different lengths."""
    body, chat, rid = request(engine, i, max_tokens)
    payload = json.loads(body)
    extra = FILLER * ((i * 7) % 13)
    if chat:
        payload["messages"][0]["content"] += extra
    else:
        payload["prompt"] += extra
    return json.dumps(payload).encode(), chat, rid


def batched_trials(
    engine: Engine, verifier: Engine, trials: int, max_tokens: int, batch: int, *, start: int
) -> list[Trial]:
    """`trials` requests served `batch` at a time (the engine's batcher decodes them in one
    batch), each audited by `verifier`."""
    requests = [mixed_request(engine, start + i, max_tokens) for i in range(trials)]

    def serve(r: tuple[bytes, bool, str]) -> AuditJob:
        return attacks.serve_job(engine, r[0], chat=r[1], request_id=r[2], attestor=ATTESTOR)

    with ThreadPoolExecutor(batch) as pool:
        t0 = time.perf_counter()
        jobs = list(pool.map(serve, requests))
        wall = time.perf_counter() - t0
    out = audit_all(verifier, jobs)
    for trial in out:
        trial.generation_s = wall / max(1, len(jobs))  # wall per answer, `batch` in flight
    return out


def bench_llamacpp(
    *,
    trials: int,
    attack_trials: int,
    max_tokens: int,
    batches: list[int],
    threads: int,
    only: set[str] | None,
) -> dict[str, Any]:
    """The honest matrix at each batch size, then the attacks on a llama.cpp claim."""
    from infergrid.compute.llamacpp_engine import LlamaCppEngine

    log(f"llama.cpp: {trials} trials per batch size {batches}, max_tokens {max_tokens}")
    verifier = LlamaCppEngine.load("smollm2", num_threads=threads, max_batch=1)
    honest: list[dict[str, Any]] = []
    base: list[Trial] = []
    for batch in batches:
        miner = LlamaCppEngine.load("smollm2", num_threads=threads, max_batch=batch)
        run = batched_trials(miner, verifier, trials, max_tokens, batch, start=200_000)
        honest.append(honest_summary(f"llama.cpp Q4_1, batch {batch}", run))
        log(
            f"  batch {batch}: {honest[-1]['false_positives']} false positives, worst margin"
            f" {honest[-1]['worst_margin']:.3g}, logprob error"
            f" {honest[-1]['worst_logprob_error']:.3g}"
        )
        if not base:
            base = run
        miner.close()
    # An honest llama.cpp that takes other kernel paths (llama.cpp's default F16 KV cache,
    # as llama-server runs): what the audit must tolerate from llama.cpp builds that differ.
    other = LlamaCppEngine.load("smollm2", num_threads=threads, max_batch=4, kv_cache_type="f16")
    run = batched_trials(other, verifier, trials, max_tokens, 4, start=200_000)
    honest.append(honest_summary("llama.cpp Q4_1, F16 KV cache (other kernels), batch 4", run))
    log(
        f"  f16 cache: {honest[-1]['false_positives']} false positives, worst margin"
        f" {honest[-1]['worst_margin']:.3g}, logprob error"
        f" {honest[-1]['worst_logprob_error']:.3g}"
    )
    other.close()

    claimed = LlamaCppEngine.load("smollm2", num_threads=threads, max_batch=4)
    fp32 = TransformersEngine.load("smollm2", quiet=True, device="cpu", num_threads=threads)
    cheap = attacks.layer_dropped_copy(fp32, fp32.model.config.num_hidden_layers // 2)
    makers: dict[str, Callable[[], Engine]] = {
        "substitution": lambda: attacks.SubstitutedEngine(claimed, cheap),
        "dequantized-fp32": lambda: attacks.SubstitutedEngine(claimed, fp32),
        "prefill": lambda: attacks.PrefillEngine(claimed, cheap),  # type: ignore[arg-type]
        "random-tokens": lambda: attacks.RandomTokensEngine(
            claimed,  # type: ignore[arg-type]
            claimed.vocab_size,
            7,
        ),
        "wrong-temperature": lambda: attacks.WrongTemperatureEngine(claimed, 1.5),
    }
    attacked: list[dict[str, Any]] = []
    for name in LLAMACPP_ATTACKS:
        if only is not None and name not in only:
            continue
        try:
            run = batched_trials(
                makers[name](), verifier, attack_trials, max_tokens, 1, start=200_000
            )
        except AssertionError as exc:  # an attack that needs a transformers claim
            log(f"  {name}: skipped ({exc})")
            continue
        attacked.append(attack_summary(name, run, [t.job for t in base[: len(run)]]))
        log(f"  {name}: {attacked[-1]['caught']}/{attacked[-1]['altered']}")
    derived: dict[str, Callable[[AuditJob], AuditJob | None]] = {
        "truncation": lambda job: truncated(job, claimed),
        "fabricated-logprobs": fabricated,
        "replay": replayed,
    }
    for name in DERIVED_ATTACKS:
        if only is not None and name not in only:
            continue
        made = [
            job for job in (derived[name](t.job) for t in base[:attack_trials]) if job is not None
        ]
        counterparts: list[AuditJob | None] = (
            [
                attacks.serve_job(
                    claimed, job.body, chat=job.chat, request_id=job.request_id, attestor=ATTESTOR
                )
                for job in made
            ]
            if name == "replay"
            else [None] * len(made)
        )
        attacked.append(attack_summary(name, audit_all(verifier, made), counterparts))
        log(f"  {name}: {attacked[-1]['caught']}/{attacked[-1]['altered']}")
    claimed.close()
    verifier.close()
    return {
        "model": f"SmolLM2-135M-Instruct on llama.cpp ({verifier.precision})",
        "model_id": verifier.model_id,
        "max_tokens": max_tokens,
        "thresholds": dataclasses.asdict(thresholds_for(verifier.precision)),
        "honest": honest,
        "attacks": attacked,
    }


def long_answer_cost(reference: TransformersEngine, max_tokens: int, count: int) -> dict[str, Any]:
    """Audit cost on answers of `max_tokens` tokens (greedy, so they run to the budget)."""
    set_torch_threads(1)
    gen = audit = 0.0
    tokens = 0
    for i in range(count):
        body = json.dumps(
            {
                "model": reference.name,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)].format(i=i)}],
                "max_tokens": max_tokens,
                "temperature": 0.7,
            }
        ).encode()
        t0 = time.perf_counter()
        job = attacks.serve_job(
            reference, body, chat=True, request_id=f"long-{i}", attestor=ATTESTOR
        )
        gen += time.perf_counter() - t0
        report = audit_job(reference, job)
        assert report.passed, report.reason
        audit += report.seconds
        tokens += len(job.output_token_ids)
    return {
        "answers": count,
        "mean_tokens": tokens / count,
        "generation_s": gen,
        "audit_s": audit,
        "audit_over_generation": audit / gen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-trials", type=int, default=1000)
    parser.add_argument("--tiny-max-tokens", type=int, default=16)
    parser.add_argument("--smollm2-trials", type=int, default=12, help="0 skips SmolLM2")
    parser.add_argument("--smollm2-max-tokens", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=128, help="SmolLM2 cost run length")
    parser.add_argument("--long-answers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--llamacpp-trials", type=int, default=0, help="per batch size; 0 skips llama.cpp"
    )
    parser.add_argument(
        "--llamacpp-attack-trials", type=int, default=50, help="per llama.cpp attack"
    )
    parser.add_argument("--llamacpp-max-tokens", type=int, default=32)
    parser.add_argument("--llamacpp-batches", default="1,4,16")
    parser.add_argument("--llamacpp-threads", type=int, default=1)
    parser.add_argument(
        "--bf16-attack-fraction",
        type=float,
        default=0.5,
        help="trials of the attacks on a bf16 claim, as a fraction of the trials",
    )
    parser.add_argument("--only", help="comma-separated attacks to run (default: all)")
    parser.add_argument(
        "--attacks-only",
        action="store_true",
        help="of the honest matrix, only the runs the attacks are compared with",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None

    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "models": [],
    }
    try:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from machine_info import cpu_model

        results["machine"]["cpu"] = cpu_model()
    except Exception:  # informational only
        pass
    started = time.perf_counter()
    if args.tiny_trials > 0:
        reference = TransformersEngine.from_dir(cached_tiny_dir(0), device="cpu")
        cheap = TransformersEngine.from_dir(cached_tiny_dir(1), device="cpu")
        results["models"].append(
            bench_model(
                "tiny (tiny:0; substitute tiny:1)",
                reference,
                cheap,
                trials=args.tiny_trials,
                max_tokens=args.tiny_max_tokens,
                concurrency=args.concurrency,
                only=only,
                bf16_trials=int(args.tiny_trials * args.bf16_attack_fraction),
                attacks_only=args.attacks_only,
            )
        )
    if args.smollm2_trials > 0:
        reference = TransformersEngine.load("smollm2", quiet=True, device="cpu")
        cheap = attacks.layer_dropped_copy(reference, reference.model.config.num_hidden_layers // 2)
        results["models"].append(
            bench_model(
                "SmolLM2-135M-Instruct (substitute: its first 15 of 30 layers)",
                reference,
                cheap,
                trials=args.smollm2_trials,
                max_tokens=args.smollm2_max_tokens,
                concurrency=args.concurrency,
                only=only,
                bf16_trials=int(args.smollm2_trials * args.bf16_attack_fraction),
                attacks_only=args.attacks_only,
            )
        )
        if args.long_answers > 0:
            results["smollm2_long_answer_cost"] = long_answer_cost(
                reference, args.long_tokens, args.long_answers
            )
    if args.llamacpp_trials > 0:
        results["models"].append(
            bench_llamacpp(
                trials=args.llamacpp_trials,
                attack_trials=min(args.llamacpp_attack_trials, args.llamacpp_trials),
                max_tokens=args.llamacpp_max_tokens,
                batches=[int(b) for b in args.llamacpp_batches.split(",")],
                threads=args.llamacpp_threads,
                only=only,
            )
        )
    results["seconds"] = time.perf_counter() - started
    for model in results["models"]:
        print(table(model["model"], model["honest"], model["attacks"]))
        print()
    if "smollm2_long_answer_cost" in results:
        c = results["smollm2_long_answer_cost"]
        print(
            f"SmolLM2 audit cost on {c['answers']} answers of {c['mean_tokens']:.0f} tokens: "
            f"{100 * c['audit_over_generation']:.1f} % of generation"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
