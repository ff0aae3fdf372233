"""Gateway overhead: the same requests sent straight to a miner and through the gateway.

Starts an upstream in its own process (the real miner server over a tiny random-weight model
by default; `--upstream scripted` uses the tests' ScriptedMiner stand-in, which answers without
a model and so shows the gateway's own ceiling), a gateway in another process (auth, metering,
traces all on), and measures from this process:

  sequential   one request at a time, alternating direct and gateway, so drift hits both alike
  concurrent   --concurrency clients in flight (default 32), direct phase then gateway phase

and reports latency percentiles, the latency the gateway adds (gateway minus direct, per
percentile) and requests/s. Every phase is bounded by --requests and --max-seconds.

    .venv/bin/python bench/gateway_overhead.py [--upstream miner|scripted] [--stream] [--json]
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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from infergrid.processes import free_port
from machine_info import cpu_model

REPO = Path(__file__).resolve().parent.parent
MINER_ADDRESS = "0x" + "42" * 20
TINY_MODEL = "bench-tiny"
SCRIPTED_MODEL = "tiny-test"


# -- the servers, each in a process of its own --------------------------------------------------


def _serve_miner(model_dir: str, port: int) -> None:
    import torch

    # Two cores hold the client, the gateway and the miner: keep torch from fighting them.
    torch.set_num_threads(1)
    from infergrid.compute.miner_server import create_miner_app, run_miner_server
    from infergrid.compute.transformers_engine import TransformersEngine

    engine = TransformersEngine.from_dir(model_dir, device="cpu")
    app = create_miner_app(engine, node_address=MINER_ADDRESS)
    run_miner_server(app, "127.0.0.1", port, log_level="warning")


def _serve_scripted(port: int) -> None:
    import uvicorn

    sys.path.insert(0, str(REPO / "tests" / "app"))
    from scripted_miner import ScriptedMiner

    miner = ScriptedMiner(MINER_ADDRESS, models=(SCRIPTED_MODEL,))
    uvicorn.run(
        miner.app(),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def _serve_gateway(db_path: str, port: int, miner_url: str, model: str) -> None:
    from infergrid.app.gateway import GatewayConfig, run_gateway
    from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role

    record = NodeRecord(
        owner=MINER_ADDRESS,
        role=Role.MINER,
        endpoint=miner_url,
        signer=MINER_ADDRESS,
        models=(ModelOffer(model, "0x" + "00" * 32, 1, 1),),
    )
    config = GatewayConfig(db_path=Path(db_path), port=port, log_level="warning")
    run_gateway(config, lambda: [record])


@contextlib.contextmanager
def _process(target: Any, *args: Any) -> Iterator[multiprocessing.Process]:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    try:
        yield process
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()


async def _wait_ready(url: str, timeout: float = 120.0, need_miner: bool = False) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url + "/health") as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 200 and (
                        not need_miner or body.get("miners", {}).get("healthy")
                    ):
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready")


# -- measuring ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    errors: int = 0
    gateway_cpu_s: float = 0.0

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies_ms)
        summary = {
            "requests": len(lat),
            "errors": self.errors,
            "rps": len(lat) / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_ms": _pct(lat, 50),
            "p90_ms": _pct(lat, 90),
            "p99_ms": _pct(lat, 99),
            "mean_ms": statistics.fmean(lat) if lat else 0.0,
        }
        if self.gateway_cpu_s and lat:
            summary["gateway_cpu_ms_per_request"] = self.gateway_cpu_s * 1000 / len(lat)
        return summary


def _pct(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


@dataclass
class Target:
    url: str
    headers: dict[str, str]


async def _one(session: aiohttp.ClientSession, target: Target, body: bytes) -> float | None:
    started = time.perf_counter()
    async with session.post(target.url, data=body, headers=target.headers) as resp:
        await resp.read()  # streamed or not: the whole answer, as a client would wait for it
        ok = resp.status == 200
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed if ok else None


async def sequential(
    session: aiohttp.ClientSession,
    direct: Target,
    gateway: Target,
    body: bytes,
    count: int,
    max_seconds: float,
) -> tuple[Phase, Phase]:
    """Alternate direct and gateway requests, one at a time."""
    phases = (Phase(), Phase())
    deadline = time.monotonic() + max_seconds
    for i in range(count):
        if time.monotonic() > deadline:
            break
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            target = (direct, gateway)[which]
            started = time.perf_counter()
            latency = await _one(session, target, body)
            phase = phases[which]
            phase.elapsed_s += time.perf_counter() - started
            if latency is None:
                phase.errors += 1
            else:
                phase.latencies_ms.append(latency)
    return phases


async def concurrent(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    count: int,
    concurrency: int,
    max_seconds: float,
) -> Phase:
    phase = Phase()
    remaining = count
    deadline = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            latency = await _one(session, target, body)
            if latency is None:
                phase.errors += 1
            else:
                phase.latencies_ms.append(latency)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.elapsed_s = time.perf_counter() - started
    return phase


async def measure(
    args: argparse.Namespace, miner_url: str, gateway_url: str, key: str, gateway_pid: int
) -> dict:
    model = TINY_MODEL if args.upstream == "miner" else SCRIPTED_MODEL
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "seed": 1,  # the same work on both paths: the gateway adds a seed only when none is given
    }
    if args.stream:
        request["stream"] = True
    body = json.dumps(request).encode()
    json_headers = {"content-type": "application/json"}
    direct = Target(miner_url + "/v1/chat/completions", json_headers)
    gateway = Target(
        gateway_url + "/v1/chat/completions", {**json_headers, "authorization": f"Bearer {key}"}
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await sequential(session, direct, gateway, body, args.warmup, 30)  # warm both paths
        seq_direct, seq_gateway = await sequential(
            session, direct, gateway, body, args.requests, args.max_seconds
        )
        await concurrent(session, direct, body, args.warmup, args.concurrency, 30)
        conc_direct = await concurrent(
            session, direct, body, args.requests, args.concurrency, args.max_seconds
        )
        await concurrent(session, gateway, body, args.warmup, args.concurrency, 30)
        cpu_before = cpu_seconds(gateway_pid)
        conc_gateway = await concurrent(
            session, gateway, body, args.requests, args.concurrency, args.max_seconds
        )
        conc_gateway.gateway_cpu_s = cpu_seconds(gateway_pid) - cpu_before
    results: dict[str, Any] = {}
    for name, d, g in (
        ("sequential", seq_direct, seq_gateway),
        (f"concurrency {args.concurrency}", conc_direct, conc_gateway),
    ):
        ds, gs = d.summary(), g.summary()
        results[name] = {
            "direct": ds,
            "gateway": gs,
            "added_p50_ms": gs["p50_ms"] - ds["p50_ms"],
            "added_p99_ms": gs["p99_ms"] - ds["p99_ms"],
            "rps_ratio": gs["rps"] / ds["rps"] if ds["rps"] else 0.0,
        }
    return results


# -- reporting ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = cpu_model()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def table(results: dict[str, Any]) -> str:
    header = (
        f"{'mode':<16}{'path':<9}{'requests':>9}{'req/s':>10}"
        f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    )
    lines = [header, "-" * len(header)]
    for mode, row in results.items():
        for path in ("direct", "gateway"):
            s = row[path]
            lines.append(
                f"{mode:<16}{path:<9}{s['requests']:>9}{s['rps']:>10.0f}"
                f"{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['p99_ms']:>9.2f}"
            )
        lines.append(
            f"{'':<16}{'added':<9}{'':>9}{row['rps_ratio']:>9.2f}x"
            f"{row['added_p50_ms']:>9.2f}{'':>9}{row['added_p99_ms']:>9.2f}"
        )
        cpu = row["gateway"].get("gateway_cpu_ms_per_request")
        if cpu:
            lines.append(f"{'':<16}gateway CPU per request: {cpu * 1000:.0f} us")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", choices=["miner", "scripted"], default="miner")
    parser.add_argument("--requests", type=int, default=1000, help="per path and mode")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    from infergrid.app.keys import KeyStore

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        miner_port, gateway_port = free_port(), free_port()
        if args.upstream == "miner":
            from infergrid.compute.model_store import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "model", seed=0, name=TINY_MODEL)
            upstream = "infergrid.compute.miner_server over a tiny random-weight model (CPU)"
            stack.enter_context(_process(_serve_miner, str(model_dir), miner_port))
            model = TINY_MODEL
        else:
            upstream = "ScriptedMiner stand-in (tests/app/scripted_miner.py), no model"
            stack.enter_context(_process(_serve_scripted, miner_port))
            model = SCRIPTED_MODEL
        miner_url = f"http://127.0.0.1:{miner_port}"
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        db_path = Path(tmp) / "gateway.db"
        key = KeyStore(db_path).create("bench")[1]

        async def run() -> dict[str, Any]:
            await _wait_ready(miner_url)
            gateway = stack.enter_context(
                _process(_serve_gateway, str(db_path), gateway_port, miner_url, model)
            )
            await _wait_ready(gateway_url, need_miner=True)
            assert gateway.pid is not None
            return await measure(args, miner_url, gateway_url, key, gateway.pid)

        try:
            import uvloop

            results = uvloop.run(run())
        except ImportError:
            results = asyncio.run(run())

    report = {
        "upstream": upstream,
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"upstream: {upstream}")
    print(f"machine:  {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    print(f"requests: chat, max_tokens={args.max_tokens}, stream={args.stream}\n")
    print(table(results))


if __name__ == "__main__":
    main()
