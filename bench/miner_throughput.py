"""Miner throughput: each engine bare and behind the real miner server, beside llama-cpp-python.

For every engine of `--engines` (loaded by compute.engine_factory.load_engine, as the miner
CLI loads it) and every concurrency of `--concurrency` (default 1, 4, 8, 16), in one run:

  bare engine   engine.generate called from N threads at once, in a process of its own
  miner         the same engine served by compute.miner_server.create_miner_app on
                127.0.0.1, N concurrent streaming chat clients (aiohttp) in this process

and, on the same GGUF file (model_store.smollm2_gguf_path(); SmolLM2 only):

  llama-cpp-python   llama_cpp.Llama(...).create_completion(stream=True), one Llama shared
                     by N threads under a lock (a Llama serves one completion at a time)
  llama_cpp.server   with --llama-server: llama-cpp-python's own OpenAI server, installed
                     with its [server] extras in bench/.venv-llama-server, streaming clients

Every request asks for the same fixed `--max-tokens` from one of PROMPTS (chosen to give long
answers: no engine here can ignore EOS), at `--temperature` and `--top-k` (default 40,
llama.cpp's own default; its min_p is switched off) with a fixed seed per request.
Tokens are counted from the answer's usage (the miner, a bare engine's tokens), or as text
chunks where a peer reports no usage when streaming (llama-cpp-python streams one chunk per
token, holding back only the bytes of an unfinished UTF-8 character).

Per concurrency it reports time to first token (p50), per-stream tok/s (tokens over the
request's whole time, queueing and prefill included), decode tok/s (tokens after the first
over the time after the first; through the miner only meaningful while tokens come slower than
its 20 ms stream chunks, so not for tiny models) and aggregate tok/s (all tokens over the
phase's wall time), the median over `--rounds` (targets alternate within a round, so drift hits
them alike), and the ratios issue 10 asks for: miner per-stream over llama-cpp-python
per-stream at concurrency 1 (target >= 0.90), miner aggregate at 8 over its single stream
(target >= 4x), miner over its bare engine. Only one target runs at a time; every phase is
bounded by --requests-per-stream and --max-seconds; servers bind 127.0.0.1 and stop with this
process.

    .venv/bin/python bench/miner_throughput.py [--engines transformers,llamacpp]
        [--concurrency 1,4,8,16] [--threads N] [--max-tokens 128] [--rounds 1]
        [--llama-server] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from infergrid.processes import ManagedProcess, free_port
from machine_info import cpu_model

MINER_ADDRESS = "0x" + "42" * 20
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
LOAD_TIMEOUT_S = 600.0
# Prompts that make SmolLM2 write at length, so most answers run to max_tokens. Different
# prompts on consecutive requests keep llama.cpp's prompt-prefix cache from skipping prefills
# that the miner does.
PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious student.",
    "Describe a walk through a busy city market in the morning, with all its sights and sounds.",
    "Write a detailed essay on why people should learn to cook at home.",
    "Tell a long adventure story about two friends crossing a desert.",
    "Explain in detail how plants make food from sunlight, as a teacher would to a class.",
    "Write a long letter from a sailor to his family describing a storm at sea.",
    "Describe, in detail, how to plan a garden for vegetables through a whole year.",
    "Write a long story about a robot who wants to become a painter.",
    "Explain the history of the bicycle in detail, from the first models to today.",
    "Write a detailed travel guide to a small mountain village and its people.",
    "Tell a long story about a girl who can talk to birds, and what they tell her.",
    "Explain in detail how a library organizes its books and helps its readers.",
    "Write a long, detailed description of a thunderstorm over a farm in summer.",
    "Describe step by step how bread is made, from the field of wheat to the table.",
    "Write a long story about an old clockmaker and the clock he never finished.",
)


# -- what one request measured ------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request, on perf_counter's clock: sent, first token, last token; tokens made."""

    submitted: float
    first: float
    end: float
    tokens: int


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def summarize(samples: list[Sample], wall_s: float, errors: int = 0) -> dict[str, float]:
    """The figures of one phase: requests, TTFT percentiles (ms), mean per-stream and decode
    tok/s over its requests, and aggregate tok/s (every token over the phase's wall time)."""
    per_stream = [s.tokens / (s.end - s.submitted) for s in samples if s.end > s.submitted]
    decode = [
        (s.tokens - 1) / (s.end - s.first) for s in samples if s.tokens > 1 and s.end > s.first
    ]
    ttft = [(s.first - s.submitted) * 1000 for s in samples]
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "errors": errors,
        "tokens": tokens,
        "mean_tokens": tokens / len(samples) if samples else 0.0,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p90_ms": _pct(ttft, 90),
        "per_stream_tok_s": statistics.fmean(per_stream) if per_stream else 0.0,
        "decode_tok_s": statistics.fmean(decode) if decode else 0.0,
        "aggregate_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
    }


@dataclass(frozen=True)
class Plan:
    """What every target is asked, the same for all."""

    levels: tuple[int, ...]
    requests_per_stream: int
    max_tokens: int
    temperature: float
    max_seconds: float
    threads: int
    top_k: int = 40  # every target samples from the same top-k (llama.cpp's own default)

    def prompt_index(self, stream: int, request: int, level: int) -> int:
        return (stream + request * level) % len(PROMPTS)

    @staticmethod
    def seed(stream: int, request: int) -> int:
        return 1000 * request + stream + 1


def run_threads(plan: Plan, level: int, one: Callable[[int, int], Sample]) -> dict[str, float]:
    """`level` threads, each calling one(stream, request) for its requests until the plan's
    count or deadline; the phase's summary."""
    samples: list[Sample] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + plan.max_seconds
    lock = threading.Lock()

    def stream(index: int) -> None:
        for request in range(plan.requests_per_stream):
            if time.monotonic() > deadline:
                return
            try:
                sample = one(index, request)
            except Exception as exc:  # counted, and the first one shown: a benchmark goes on
                with lock:
                    errors.append(exc)
                continue
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(level)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(plan.max_seconds + 600)
    summary = summarize(samples, time.perf_counter() - started, len(errors))
    if errors:
        print(f"  {len(errors)} error(s), first: {errors[0]!r}", file=sys.stderr, flush=True)
    return summary


# -- workers, each in a spawned process of its own --------------------------------------------


def _worker_setup(threads: int, lifetime_s: float) -> None:
    """Thread counts before torch or llama.cpp load, and a watchdog: the process ends when the
    benchmark that started it is gone, or after `lifetime_s` whatever happens."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    parent = os.getppid()
    deadline = time.monotonic() + lifetime_s

    def watch() -> None:
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


def load_bench_engine(kind: str, model: str, threads: int, max_batch: int | None) -> Any:
    """The engine as the miner CLI loads it (engine_factory.load_engine), on CPU."""
    from infergrid.compute.engine_factory import load_engine

    return load_engine(
        kind, model, num_threads=threads, device="cpu", max_batch=max_batch, quiet=True
    )


def _chat_ids(engine: Any, prompt: str) -> list[int]:
    return list(engine.chat_prompt_ids([{"role": "user", "content": prompt}]))


def bare_engine_worker(
    conn: Connection, kind: str, model: str, max_batch: int | None, plan: Plan, lifetime_s: float
) -> None:
    """engine.generate from N threads per level; sends {level: summary} back on `conn`."""
    _worker_setup(plan.threads, lifetime_s)
    from infergrid.compute.engine import SamplingParams

    engine = load_bench_engine(kind, model, plan.threads, max_batch)
    prompts = [_chat_ids(engine, p) for p in PROMPTS]
    for _ in engine.generate(prompts[0], SamplingParams(max_tokens=8, temperature=0.0)):
        pass  # warm: first-call allocations and lazy initialization off the clock

    def make(level: int) -> Callable[[int, int], Sample]:
        def one(stream: int, request: int) -> Sample:
            params = SamplingParams(
                max_tokens=plan.max_tokens,
                temperature=plan.temperature,
                top_k=plan.top_k,
                seed=plan.seed(stream, request),
            )
            ids = prompts[plan.prompt_index(stream, request, level)]
            submitted = time.perf_counter()
            first, count = 0.0, 0
            for _ in engine.generate(ids, params):
                count += 1
                if count == 1:
                    first = time.perf_counter()
            return Sample(submitted, first, time.perf_counter(), count)

        return one

    results = {level: run_threads(plan, level, make(level)) for level in plan.levels}
    close = getattr(engine, "close", None)
    if close is not None:  # stop a batcher's worker thread before the interpreter exits
        close()
    conn.send(results)


def llama_cpp_worker(conn: Connection, gguf: str, plan: Plan, lifetime_s: float) -> None:
    """llama-cpp-python's create_completion on the GGUF, N threads sharing one Llama under a
    lock; sends {level: summary} back on `conn`."""
    _worker_setup(plan.threads, lifetime_s)
    import llama_cpp
    from transformers import AutoTokenizer

    from infergrid.compute.model_store import default_model_dir

    # The prompt ids the miner sends its engine: SmolLM2's chat template, tokenized.
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(quiet=True))
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in PROMPTS
    ]
    llm = llama_cpp.Llama(
        model_path=gguf,
        n_ctx=max(len(p) for p in prompts) + plan.max_tokens + 16,
        n_threads=plan.threads,
        n_threads_batch=plan.threads,
        verbose=False,
    )
    lock = threading.Lock()

    def complete(ids: list[int], max_tokens: int, seed: int) -> Iterator[dict[str, Any]]:
        return llm.create_completion(
            prompt=ids,
            max_tokens=max_tokens,
            temperature=plan.temperature,
            top_k=plan.top_k,
            top_p=1.0,
            min_p=0.0,  # llama.cpp's default 0.05 would be one more filter than ours
            repeat_penalty=1.0,  # the network refuses penalties: none on either side
            seed=seed,
            stream=True,
        )

    with lock:
        for _ in complete(prompts[0], 8, 1):
            pass

    def make(level: int) -> Callable[[int, int], Sample]:
        def one(stream: int, request: int) -> Sample:
            ids = prompts[plan.prompt_index(stream, request, level)]
            submitted = time.perf_counter()
            first, count = 0.0, 0
            with lock:
                for chunk in complete(ids, plan.max_tokens, plan.seed(stream, request)):
                    if chunk["choices"][0]["text"]:
                        count += 1
                        if count == 1:
                            first = time.perf_counter()
            return Sample(submitted, first, time.perf_counter(), count)

        return one

    conn.send({level: run_threads(plan, level, make(level)) for level in plan.levels})


def miner_worker(
    kind: str,
    model: str,
    max_batch: int | None,
    max_concurrency: int,
    port: int,
    threads: int,
    lifetime_s: float,
) -> None:
    """The real miner server over the engine, on 127.0.0.1:port, until stopped."""
    _worker_setup(threads, lifetime_s)
    from infergrid.compute.miner_server import create_miner_app, run_miner_server

    engine = load_bench_engine(kind, model, threads, max_batch)
    app = create_miner_app(engine, node_address=MINER_ADDRESS, max_concurrency=max_concurrency)
    run_miner_server(app, "127.0.0.1", port, log_level="warning")


_spawn = multiprocessing.get_context("spawn")


def _answering(target: Callable[..., None], conn: Connection, *args: Any) -> None:
    """Run a worker; if it fails, its error is its answer (then the traceback on stderr)."""
    try:
        target(conn, *args)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


def in_process(target: Callable[..., None], *args: Any, timeout_s: float) -> Any:
    """Run a worker that answers on a pipe; its answer, or RuntimeError if it fails, dies or
    is late."""
    receiver, sender = _spawn.Pipe(duplex=False)
    process = _spawn.Process(target=_answering, args=(target, sender, *args), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise RuntimeError(f"{target.__name__} gave no answer in {timeout_s:.0f} s")
        answer = receiver.recv()
        if isinstance(answer, tuple) and answer[:1] == ("error",):
            raise RuntimeError(f"{target.__name__} failed: {answer[1]}")
        return answer
    except EOFError:
        raise RuntimeError(f"{target.__name__} died (exit code {process.exitcode})") from None
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


@contextlib.contextmanager
def serving(target: Callable[..., None], *args: Any) -> Iterator[None]:
    process = _spawn.Process(target=target, args=args, daemon=True)
    process.start()
    try:
        yield
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


# -- HTTP clients ------------------------------------------------------------------------------


async def wait_ready(url: str, timeout_s: float = LOAD_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url + "/v1/models") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.25)
    raise TimeoutError(f"{url} did not become ready in {timeout_s:.0f} s")


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/v1/models") as resp:
        return str((await resp.json())["data"][0]["id"])


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Sample:
    """One streamed chat completion: tokens from its usage chunk, else its content chunks."""
    submitted = time.perf_counter()
    first = 0.0
    chunks = 0
    usage_tokens: int | None = None
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if chunks == 1:
                        first = time.perf_counter()
    end = time.perf_counter()
    return Sample(
        submitted, first or end, end, usage_tokens if usage_tokens is not None else chunks
    )


async def http_levels(url: str, plan: Plan, extra: dict[str, Any] | None = None) -> dict[int, Any]:
    """N concurrent streaming chat clients per level against an OpenAI-compatible server."""
    await wait_ready(url)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=plan.max_seconds + 600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = await served_model(session, url)

        def body(prompt: int, seed: int, max_tokens: int) -> dict[str, Any]:
            return {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[prompt]}],
                "max_tokens": max_tokens,
                "temperature": plan.temperature,
                "top_k": plan.top_k,
                "seed": seed,
                "stream": True,
                **(extra or {}),
            }

        await stream_chat(session, url, body(0, 1, 8))  # warm
        return {level: await http_phase(session, url, plan, level, body) for level in plan.levels}


async def http_phase(
    session: aiohttp.ClientSession,
    url: str,
    plan: Plan,
    level: int,
    body: Callable[[int, int, int], dict[str, Any]],
) -> dict[str, float]:
    """`level` concurrent streams, each sending its requests one after the other."""
    samples: list[Sample] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + plan.max_seconds

    async def stream(index: int) -> None:
        for request in range(plan.requests_per_stream):
            if time.monotonic() > deadline:
                return
            prompt = plan.prompt_index(index, request, level)
            try:
                sample = await stream_chat(
                    session, url, body(prompt, plan.seed(index, request), plan.max_tokens)
                )
            except (aiohttp.ClientError, RuntimeError, ValueError) as exc:
                errors.append(exc)
                continue
            samples.append(sample)

    started = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(level)))
    if errors:
        print(f"  {len(errors)} error(s), first: {errors[0]!r}", file=sys.stderr, flush=True)
    return summarize(samples, time.perf_counter() - started, len(errors))


# -- llama-cpp-python's own server, in a venv of its own ----------------------------------------


def llama_server_python() -> Path:
    """bench/.venv-llama-server with llama-cpp-python[server] at the version in our .venv,
    from the wheel already built (never a second compile)."""
    import llama_cpp

    from side_venv import ensure_venv

    version = llama_cpp.__version__
    wheels = os.environ.get("LLAMA_CPP_WHEELS", "/tmp/wheels")
    return ensure_venv(
        ".venv-llama-server",
        [f"llama-cpp-python[server]=={version}"],
        check=f"import llama_cpp.server, llama_cpp; assert llama_cpp.__version__ == {version!r}",
        pip_args=["--only-binary", "llama-cpp-python", "--find-links", wheels],
    )


@contextlib.contextmanager
def llama_server(python: Path, gguf: str, port: int, plan: Plan, log_dir: Path) -> Iterator[str]:
    """`python -m llama_cpp.server` on 127.0.0.1:port (stops with this process: SIGTERM on our
    exit, and Linux's parent-death signal if we are killed)."""
    proc = ManagedProcess(
        "llama_cpp.server",
        [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(plan.threads),
            "--n_threads_batch",
            str(plan.threads),
            "--n_ctx",
            "2048",
            # Its default lets each new request cut off the one being served: concurrent
            # clients would get truncated answers. Queued, as a Llama serves them, instead.
            "--interrupt_requests",
            "False",
        ],
        log_dir / "llama_server.log",
        env={name: str(plan.threads) for name in THREAD_ENV},
    )
    proc.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


# -- the run ------------------------------------------------------------------------------------


def miner_path(kind: str) -> str:
    return f"miner ({kind})"


def bare_path(kind: str) -> str:
    return f"bare {kind}"


LLAMA_CPP_PYTHON = "llama-cpp-python"
LLAMA_SERVER = "llama_cpp.server"


def one_round(
    args: argparse.Namespace, plan: Plan, gguf: str | None, log_dir: Path
) -> dict[str, Any]:
    """Every target once, one after the other: {path: {level: summary}}."""
    results: dict[str, Any] = {}
    lifetime = LOAD_TIMEOUT_S + len(plan.levels) * (plan.max_seconds + 120)
    for kind in args.engines:
        print(f"{bare_path(kind)} ...", flush=True)
        results[bare_path(kind)] = in_process(
            bare_engine_worker,
            kind,
            args.model,
            args.max_batch,
            plan,
            lifetime,
            timeout_s=lifetime,
        )
        print(f"{miner_path(kind)} ...", flush=True)
        port = free_port()
        with serving(
            miner_worker,
            kind,
            args.model,
            args.max_batch,
            args.miner_concurrency or max(plan.levels),
            port,
            plan.threads,
            lifetime,
        ):
            results[miner_path(kind)] = asyncio.run(http_levels(f"http://127.0.0.1:{port}", plan))
    if gguf is not None:
        print(f"{LLAMA_CPP_PYTHON} ...", flush=True)
        peer_plan = Plan(**{**asdict(plan), "levels": tuple(args.peer_concurrency)})
        results[LLAMA_CPP_PYTHON] = in_process(
            llama_cpp_worker, gguf, peer_plan, lifetime, timeout_s=lifetime
        )
        if args.llama_server:
            print(f"{LLAMA_SERVER} ...", flush=True)
            with llama_server(args.llama_server_python, gguf, free_port(), plan, log_dir) as url:
                results[LLAMA_SERVER] = asyncio.run(
                    http_levels(url, peer_plan, {"top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0})
                )
    return results


def median_rounds(rounds: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Each figure's median over the rounds (counts are summed)."""
    merged: dict[str, dict[int, dict[str, float]]] = {}
    for path in rounds[0]:
        merged[path] = {}
        for level in rounds[0][path]:
            rows = [r[path][level] for r in rounds if level in r.get(path, {})]
            merged[path][level] = {
                key: (
                    sum(row[key] for row in rows)
                    if key in ("requests", "errors", "tokens")
                    else statistics.median(row[key] for row in rows)
                )
                for key in rows[0]
            }
    return merged


def ratios(results: dict[str, dict[int, dict[str, float]]], engines: list[str]) -> dict[str, Any]:
    """The issue's "done when" figures, per engine, where the phases they need were run."""

    def figure(path: str, level: int, key: str) -> float | None:
        value = results.get(path, {}).get(level, {}).get(key)
        return value or None

    out: dict[str, Any] = {}
    peer = figure(LLAMA_CPP_PYTHON, 1, "per_stream_tok_s")
    for kind in engines:
        miner = miner_path(kind)
        row: dict[str, Any] = {}
        single = figure(miner, 1, "per_stream_tok_s")
        if single and peer:
            row["per_stream_vs_llama_cpp_python"] = single / peer  # target >= 0.90
        agg1, agg8 = figure(miner, 1, "aggregate_tok_s"), figure(miner, 8, "aggregate_tok_s")
        if agg1 and agg8:
            row["aggregate_8_over_1"] = agg8 / agg1  # target >= 4
        overhead = {}
        for level in results.get(miner, {}):
            served = figure(miner, level, "aggregate_tok_s")
            bare = figure(bare_path(kind), level, "aggregate_tok_s")
            if served and bare:
                overhead[level] = served / bare
        row["miner_over_bare_aggregate"] = overhead
        out[kind] = row
    return out


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    header = (
        f"{'path':<22}{'conc':>5}{'reqs':>6}{'tokens':>8}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'per-stream':>12}{'decode':>9}{'aggregate':>11}"
    )
    units = (
        f"{'':<22}{'':>5}{'':>6}{'':>8}{'ms':>10}{'ms':>10}{'tok/s':>12}{'tok/s':>9}{'tok/s':>11}"
    )
    lines = [header, units, "-" * len(header)]
    for path, levels in results.items():
        for level, s in levels.items():
            lines.append(
                f"{path:<22}{level:>5}{s['requests']:>6.0f}{s['tokens']:>8.0f}"
                f"{s['ttft_p50_ms']:>10.0f}{s['ttft_p90_ms']:>10.0f}{s['per_stream_tok_s']:>12.1f}"
                f"{s['decode_tok_s']:>9.1f}{s['aggregate_tok_s']:>11.1f}"
            )
    return "\n".join(lines)


def ratio_lines(found: dict[str, Any]) -> list[str]:
    lines = []
    for kind, row in found.items():
        per = row.get("per_stream_vs_llama_cpp_python")
        agg = row.get("aggregate_8_over_1")
        lines.append(
            f"{kind}: miner per-stream / llama-cpp-python per-stream at 1:"
            f" {f'{per:.2f}' if per else 'n/a'} (target >= 0.90);"
            f" miner aggregate at 8 / at 1: {f'{agg:.2f}x' if agg else 'n/a'} (target >= 4x)"
        )
        overhead = row["miner_over_bare_aggregate"]
        if overhead:
            cells = ", ".join(f"{level}: {value:.2f}" for level, value in overhead.items())
            lines.append(f"{kind}: miner aggregate / bare engine aggregate by concurrency: {cells}")
    return lines


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1: {text!r}")
    return levels


def _engines(text: str) -> list[str]:
    engines = [part.strip() for part in text.split(",") if part.strip()]
    from infergrid.compute.engine_factory import ENGINE_KINDS

    unknown = [e for e in engines if e not in ENGINE_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {unknown}: choose from {ENGINE_KINDS}")
    if "openai" in engines:
        raise argparse.ArgumentTypeError(
            "the openai proxy engine needs an upstream: not benchmarked here"
        )
    return engines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from infergrid.compute.transformers_engine import available_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=_engines, default=["transformers", "llamacpp"])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny")
    parser.add_argument("--concurrency", type=_levels, default=[1, 4, 8, 16])
    parser.add_argument(
        "--peer-concurrency",
        type=_levels,
        default=None,
        help="levels for llama-cpp-python (default: the same as --concurrency)",
    )
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=40, help="the same for every target")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=None, help="the engine's (its default)")
    parser.add_argument(
        "--miner-concurrency",
        type=int,
        default=None,
        help="the miner's max_concurrency (default: the highest level)",
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python")
    parser.add_argument("--llama-server", action="store_true", help="also llama_cpp.server")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    for name in ("threads", "max_tokens", "requests_per_stream", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")
    if args.peer_concurrency is None:
        args.peer_concurrency = args.concurrency
    return args


def main(argv: list[str] | None = None) -> None:
    import tempfile

    args = parse_args(argv)
    plan = Plan(
        levels=tuple(args.concurrency),
        requests_per_stream=args.requests_per_stream,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        max_seconds=args.max_seconds,
        threads=args.threads,
        top_k=args.top_k,
    )
    gguf: str | None = None
    notes: list[str] = []
    if args.no_llama_cpp:
        notes.append("llama-cpp-python skipped (--no-llama-cpp)")
    elif args.model != "smollm2":
        notes.append(f"llama-cpp-python skipped: no GGUF for model {args.model!r}")
    else:
        try:
            import llama_cpp

            from infergrid.compute.model_store import smollm2_gguf_path

            gguf = str(smollm2_gguf_path())
            notes.append(f"llama-cpp-python {llama_cpp.__version__} on {gguf}")
        except ImportError:
            notes.append("llama-cpp-python skipped: not installed in this venv")
    if args.llama_server and gguf is not None:
        args.llama_server_python = llama_server_python()
    elif args.llama_server:
        args.llama_server = False
        notes.append("llama_cpp.server skipped: needs llama-cpp-python and the SmolLM2 GGUF")
    load = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        rounds = []
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            rounds.append(one_round(args, plan, gguf, Path(tmp)))
    results = median_rounds(rounds)
    found = ratios(results, args.engines)
    report = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": load,
            "load_average_end": os.getloadavg(),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": asdict(plan),
        "model": args.model,
        "notes": notes,
        "elapsed_s": time.monotonic() - started,
        "results": {
            path: {str(k): v for k, v in levels.items()} for path, levels in results.items()
        },
        "rounds": [
            {path: {str(k): v for k, v in levels.items()} for path, levels in r.items()}
            for r in rounds
        ],
        "ratios": found,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    m = report["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, Python {m['python']};"
        f" load average {load[0]:.2f} at the start, {m['load_average_end'][0]:.2f} at the end"
    )
    print(
        f"model {args.model}, {args.threads} threads, max_tokens {args.max_tokens},"
        f" temperature {args.temperature}, {args.requests_per_stream} request(s) per stream,"
        f" {args.rounds} round(s) (medians)"
    )
    for note in notes:
        print(f"note: {note}")
    print()
    print(table(results))
    print()
    for line in ratio_lines(found):
        print(line)


if __name__ == "__main__":
    main()
