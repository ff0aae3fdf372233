"""Miners sharing a machine: torch's default threads in every miner vs. the cores divided.

Starts each configuration fresh, one after the other, every miner a process of its own (the
real miner server, no chain: attestation and settlement do not change the arithmetic):

  1 miner,  default threads   torch's default: a thread per core
  N miners, default threads   each miner's torch a thread per core: N x oversubscribed
  N miners, divided threads   cores // N each (at least 1), as `infergrid up` starts them

and measures from this process, round-robin over the miners, straight to them (no gateway):

  1 client     one request at a time
  8 clients    8 requests in flight

Every phase is bounded by --requests and --max-seconds; everything binds to 127.0.0.1.

    .venv/bin/python bench/miner_threads.py [--model smollm2|tiny] [--miners 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from infergrid.processes import free_port
from machine_info import cpu_model

MINER_ADDRESS = "0x" + "42" * 20
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# -- one miner, in a process of its own -------------------------------------------------------


def serve(model_dir: str, port: int, threads: int | None) -> None:
    """The miner server over `model_dir`; `threads` None leaves torch at its default."""
    from infergrid.compute.miner_server import create_miner_app, run_miner_server
    from infergrid.compute.transformers_engine import TransformersEngine

    engine = TransformersEngine.from_dir(model_dir, device="cpu", num_threads=threads)
    app = create_miner_app(engine, node_address=MINER_ADDRESS)
    run_miner_server(app, "127.0.0.1", port, log_level="warning")


@contextlib.contextmanager
def miners(model_dir: Path, count: int, threads: int | None) -> Iterator[list[str]]:
    """`count` miner processes; yields their base URLs and stops them all on exit."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    if threads is not None:  # as the devnet starts its miners
        env.update({name: str(threads) for name in THREAD_ENV})
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for _ in range(count):
            port = free_port()
            argv = [sys.executable, __file__, "--serve", str(model_dir), "--port", str(port)]
            if threads is not None:
                argv += ["--threads", str(threads)]
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_ready(session: aiohttp.ClientSession, urls: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become ready in {timeout:.0f} s")
            await asyncio.sleep(0.2)


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Phase:
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0


async def load(
    session: aiohttp.ClientSession,
    urls: list[str],
    body: bytes,
    *,
    clients: int,
    count: int,
    max_seconds: float,
) -> Phase:
    """`count` requests from `clients` concurrent clients, round-robin over `urls`."""
    phase = Phase()
    issued = 0
    deadline = time.monotonic() + max_seconds
    headers = {"content-type": "application/json"}

    async def client() -> None:
        nonlocal issued
        while issued < count and time.monotonic() < deadline:
            url = urls[issued % len(urls)] + "/v1/chat/completions"
            issued += 1
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    phase.requests += 1
                else:
                    phase.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    phase.elapsed_s = time.perf_counter() - started
    return phase


async def measure_config(
    model_dir: Path, model: str, count: int, threads: int | None, args: argparse.Namespace
) -> dict[str, Any]:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "seed": 1,
        }
    ).encode()
    timeout = aiohttp.ClientTimeout(total=120)
    with miners(model_dir, count, threads) as urls:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:
            await wait_ready(session, urls, 300)
            # Warm every miner (first forward passes allocate and tune).
            await load(session, urls, body, clients=count, count=2 * count, max_seconds=60)
            one = await load(
                session, urls, body, clients=1, count=args.requests, max_seconds=args.max_seconds
            )
            many = await load(
                session,
                urls,
                body,
                clients=args.clients,
                count=2 * args.requests,
                max_seconds=args.max_seconds,
            )
    return {
        "miners": count,
        "threads_per_miner": threads,
        "one_client": {"requests": one.requests, "errors": one.errors, "rps": one.rps},
        "many_clients": {"requests": many.requests, "errors": many.errors, "rps": many.rps},
    }


# -- reporting --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from infergrid.compute.transformers_engine import available_cores

    cpu = cpu_model()
    load_avg = float("nan")
    with contextlib.suppress(OSError):
        load_avg = os.getloadavg()[0]
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "load_average_1m_at_start": round(load_avg, 2),
        "python": platform.python_version(),
    }


def prepare(model: str, tmp: Path) -> tuple[Path, str]:
    """The model's directory and the name its miners serve it under."""
    from infergrid.compute import model_store

    if model == model_store.TINY_SPEC:
        path = model_store.build_tiny_model(tmp / "tiny", seed=0, name="bench-tiny")
    else:
        path = model_store.resolve_model_dir(model, quiet=True)
    meta = model_store.directory_metadata(path)
    return path, meta.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model directory")
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, phase 2")
    parser.add_argument("--requests", type=int, default=24, help="phase 1; phase 2 sends 2x")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per phase")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one miner
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.threads)
        return

    import torch

    from infergrid.compute.transformers_engine import available_cores
    from infergrid.devnet import threads_per_miner

    default = torch.get_num_threads()  # what a miner's torch takes when not told
    divided = threads_per_miner(args.miners, available_cores())
    configs: list[tuple[int, int | None, str]] = [
        (1, None, "1 miner, default threads"),
        (args.miners, None, f"{args.miners} miners, default threads"),
        (args.miners, divided, f"{args.miners} miners, divided threads"),
    ]
    report: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "clients": args.clients,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, served = prepare(args.model, Path(tmp))
        for count, threads, label in configs:
            result = asyncio.run(measure_config(model_dir, served, count, threads, args))
            result["threads_per_miner"] = threads or default
            report["results"][label] = result
            if not args.json:
                print(f"done: {label}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"model:    {args.model}, chat, max_tokens={args.max_tokens}, straight to the miners")
    print(
        f"machine:  {m['cpu']}, {m['cores']} cores, load {m['load_average_1m_at_start']}"
        f" at start, Python {m['python']}\n"
    )
    header = f"{'configuration':<28}{'threads':>8}{'1 client':>12}{f'{args.clients} clients':>12}"
    print(header + "\n" + "-" * len(header))
    for label, row in report["results"].items():
        errors = row["one_client"]["errors"] + row["many_clients"]["errors"]
        note = f"  ({errors} errors)" if errors else ""
        print(
            f"{label:<28}{row['threads_per_miner']!s:>8}"
            f"{row['one_client']['rps']:>8.2f} r/s{row['many_clients']['rps']:>8.2f} r/s{note}"
        )


if __name__ == "__main__":
    main()
