"""Gateway overhead: the same requests sent straight to a miner, through the gateway and,
with `--peer litellm`, through the LiteLLM proxy in front of the same upstream.

Starts an upstream in its own process (the real miner server, by default over a tiny
random-weight model; `--miner-model smollm2` serves the devnet's default model on the engine
`infergrid up` picks for it (compute.engine_factory.default_engine: llama.cpp where
llama-cpp-python is installed), a few requests/s on two CPU cores rather than tens;
`--upstream scripted` uses the tests' ScriptedMiner stand-in, which answers without a model
and so shows the gateway's own ceiling), a gateway in another process (auth, metering, traces
all on), and measures from this process:

  sequential   one request at a time, the paths in turn, so drift hits them alike
  concurrent   --concurrency clients in flight (default 32), a phase per path

and reports latency percentiles, the latency each proxy adds (proxy minus direct, per
percentile) and requests/s. Every phase is bounded by --requests and --max-seconds.

`--metered` runs settlement as production does: an embedded EVM served over JSON-RPC in its
own process, the four contracts deployed with the devnet's parameters, a payer's escrow
deposit with the gateway's signer authorized and an API key charged to it; the miner (the real
one: compute.node.run_miner, with its attestor and durable receipt log; or the stand-in,
signing with its registered key) registered on-chain, and the gateway started by
app.node.run_gateway_node (registry discovery, attestation checks, durable receipts, audits'
request records, anchoring). Unmetered, the gateway finds the miner from a fixed record.

`--peer litellm` installs LiteLLM (LITELLM_VERSION, with its proxy extras) into
bench/.venv-litellm once, and runs its proxy (one uvicorn worker, master-key auth, no
database) in front of the same upstream, measured in the same phases.

    .venv/bin/python bench/gateway_overhead.py [--upstream miner|scripted]
        [--miner-model tiny|smollm2] [--miner-threads N] [--stream] [--metered]
        [--peer litellm] [--json]
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from infergrid.processes import ManagedProcess, free_port
from machine_info import cpu_model

REPO = Path(__file__).resolve().parent.parent
MINER_ADDRESS = "0x" + "42" * 20
TINY_MODEL = "bench-tiny"
SCRIPTED_MODEL = "tiny-test"
# LiteLLM as pinned for this benchmark. Not 1.107.x: 1.107.0 and 1.107.1 were compromised
# releases (PyPI has removed them). 1.106.0 is the last release uploaded before any 1.107
# final could have been (2026-10-18, between 1.107.0rc1 and rc2; 1.107.0rc2 came out on
# 2026-10-20 and the 1.107 finals after it), so it predates the compromise; the later 1.106.x
# patches were published while the attacker may still have held the publishing credentials.
LITELLM_VERSION = "1.106.0"
LITELLM_MASTER_KEY = "sk-bench-master"
LITELLM_VENV = ".venv-litellm"
# Metered: dev keys of the embedded chain, funded at genesis (settle.chain.dev_private_keys).
DEPLOYER, GATEWAY_KEY, MINER_KEY, PAYER_KEY = 0, 1, 2, 3
# The miner CLI's default prices (infergrid miner --price-in/--price-out), in wei per token.
PRICE_IN_WEI, PRICE_OUT_WEI = 10**12, 2


# -- the servers, each in a process of its own --------------------------------------------------


@dataclass(frozen=True)
class MinerModel:
    """What the real miner serves: `spec` as `infergrid miner --model` takes it, on the
    engine `engine` (compute.engine_factory.ENGINE_KINDS) with `threads` CPU threads and
    `device`; `served` is the model name it answers to."""

    spec: str
    engine: str
    threads: int
    device: str
    served: str


def miner_model(choice: str, threads: int | None, tmp_dir: Path) -> MinerModel:
    """The upstream model for `--miner-model choice`.

    "tiny": a tiny random-weight model built into tmp_dir, on the transformers engine, on the
    CPU, one thread unless `threads` says otherwise (two cores hold the client, the gateway
    and the miner: keep torch from fighting them). "smollm2": the devnet's default model
    (DevnetOptions.model) on the engine `infergrid up --engine auto` picks for it
    (engine_factory.default_engine), on the device the miner CLI picks ("auto"), with the
    miner CLI's thread count unless `threads` says otherwise (run_miner: every core this
    process may use).
    """
    if choice == "tiny":
        from infergrid.compute.model_store import build_tiny_model

        model_dir = build_tiny_model(tmp_dir / "model", seed=0, name=TINY_MODEL)
        return MinerModel(str(model_dir), "transformers", threads or 1, "cpu", TINY_MODEL)
    from infergrid.compute.engine_factory import default_engine
    from infergrid.compute.model_store import served_model_name
    from infergrid.compute.transformers_engine import available_cores
    from infergrid.devnet import DevnetOptions

    spec = DevnetOptions.model
    return MinerModel(
        spec,
        default_engine(spec),
        threads or available_cores(),  # as run_miner: settings.threads or available_cores()
        "auto",
        served_model_name(spec),
    )


def _serve_miner(model: MinerModel, port: int) -> None:
    """The miner server without settlement, over the engine loaded as run_miner loads it."""
    from infergrid.compute.engine_factory import load_engine
    from infergrid.compute.miner_server import create_miner_app, run_miner_server

    engine = load_engine(
        model.engine, model.spec, num_threads=model.threads, device=model.device, quiet=True
    )
    app = create_miner_app(engine, node_address=MINER_ADDRESS)
    run_miner_server(app, "127.0.0.1", port, log_level="warning")


@dataclass(frozen=True)
class Network:
    """A metered run's chain: its JSON-RPC URL, the contracts, the dev keys."""

    rpc: str
    registry: str
    escrow: str
    rewards: str
    chain_id: int
    keys: tuple[str, ...]

    def address(self, index: int) -> str:
        from infergrid.settle.chain import as_account

        return as_account(self.keys[index]).address


def _serve_metered_miner(model: MinerModel, port: int, net: Network, receipt_log: str) -> None:
    """The production miner (compute.node.run_miner): registers and stakes, attests every
    answer in the escrow's domain, logs it in its durable receipt log, collects vouchers."""
    from rich.console import Console

    from infergrid.compute.node import MinerSettings, run_miner
    from infergrid.devnet import DEVNET_MINER_STAKE_WEI

    settings = MinerSettings(
        chain_rpc=net.rpc,
        registry=net.registry,
        private_key=net.keys[MINER_KEY],
        model=model.spec,
        host="127.0.0.1",
        port=port,
        endpoint=f"http://127.0.0.1:{port}",
        stake_wei=DEVNET_MINER_STAKE_WEI,
        price_in_wei=PRICE_IN_WEI,
        price_out_wei=PRICE_OUT_WEI,
        escrow=net.escrow,
        receipt_log=Path(receipt_log),
        threads=model.threads,
        engine=model.engine,
    )
    run_miner(settings, Console(stderr=True, quiet=True))


def _scripted(owner: str, net: Network | None) -> Any:
    sys.path.insert(0, str(REPO / "tests" / "app"))
    from scripted_miner import ScriptedMiner

    if net is None:
        return ScriptedMiner(owner, models=(SCRIPTED_MODEL,))
    from infergrid.protocol.eip712 import Domain

    return ScriptedMiner(
        owner,
        models=(SCRIPTED_MODEL,),
        signer_key=net.keys[MINER_KEY],
        domain=Domain(net.chain_id, net.escrow),
    )


def _serve_scripted(port: int, net: Network | None) -> None:
    import uvicorn

    owner = MINER_ADDRESS if net is None else net.address(MINER_KEY)
    uvicorn.run(
        _scripted(owner, net).app(),
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


def _serve_metered_gateway(db_path: str, port: int, net: Network) -> None:
    """The production gateway (app.node.run_gateway_node) with settlement on: registry
    discovery, attestation checks, durable receipts, request records, anchoring."""
    from rich.console import Console

    from infergrid.app.node import GatewaySettings, run_gateway_node
    from infergrid.devnet import DEVNET_GATEWAY_STAKE_WEI, DevnetOptions

    settings = GatewaySettings(
        chain_rpc=net.rpc,
        registry=net.registry,
        db_path=Path(db_path),
        host="127.0.0.1",
        port=port,
        discovery_interval_s=DevnetOptions.discovery_interval_s,
        private_key=net.keys[GATEWAY_KEY],
        stake_wei=DEVNET_GATEWAY_STAKE_WEI,
        escrow=net.escrow,
        rewards=net.rewards,
    )
    run_gateway_node(settings, Console(stderr=True, quiet=True))


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


@contextlib.contextmanager
def _managed(proc: ManagedProcess) -> Iterator[ManagedProcess]:
    """A child that Linux stops if this process dies (ManagedProcess), stopped on exit."""
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def start_network(stack: contextlib.ExitStack, log_dir: Path) -> Network:
    """An embedded EVM in its own process (`infergrid chain`, as the devnet starts it), the
    contracts at the devnet's parameters, and the payer's deposit with the gateway's signer
    authorized to charge it."""
    from infergrid.devnet import DEVNET_DEPOSIT_WEI
    from infergrid.processes import infergrid_command, rpc_ready
    from infergrid.settle.chain import Chain, dev_private_keys
    from infergrid.settle.deploy import deploy_network
    from infergrid.settle.escrow import PaymentEscrow
    from infergrid.settle.profiles import DEVNET_PARAMS

    port = free_port()
    rpc = f"http://127.0.0.1:{port}"
    argv = infergrid_command("chain", "--host", "127.0.0.1", "--port", str(port))
    proc = stack.enter_context(_managed(ManagedProcess("chain", argv, log_dir / "chain.log")))
    proc.wait_until(lambda: rpc_ready(rpc), 60, "JSON-RPC answer")
    chain = Chain.connect(rpc)
    keys = tuple(dev_private_keys(10))
    contracts = deploy_network(chain, keys[DEPLOYER], DEVNET_PARAMS)
    net = Network(
        rpc,
        contracts.NodeRegistry,
        contracts.PaymentEscrow,
        contracts.RewardDistributor,
        chain.chain_id,
        keys,
    )
    escrow = PaymentEscrow(chain, net.escrow)
    escrow.deposit(keys[PAYER_KEY], DEVNET_DEPOSIT_WEI)
    escrow.authorize_signer(keys[PAYER_KEY], net.address(GATEWAY_KEY))
    return net


def register_scripted(net: Network, miner_url: str) -> None:
    """The stand-in on-chain, as a miner registers: its owner key is its signer."""
    from infergrid.devnet import DEVNET_MINER_STAKE_WEI
    from infergrid.protocol.nodes import Role
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    owner = net.address(MINER_KEY)
    offers = _scripted(owner, net).offers()
    Registry(Chain.connect(net.rpc), net.registry).register(
        net.keys[MINER_KEY], Role.MINER, miner_url, owner, offers, DEVNET_MINER_STAKE_WEI
    )


# -- the LiteLLM proxy, in a venv of its own ---------------------------------------------------


def litellm_executable() -> Path:
    """bench/.venv-litellm/bin/litellm at LITELLM_VERSION, installed on first use."""
    from side_venv import ensure_venv

    python = ensure_venv(
        LITELLM_VENV,
        [f"litellm[proxy]=={LITELLM_VERSION}"],
        check=(
            "from importlib.metadata import version; import fastapi, uvicorn;"
            f" assert version('litellm') == {LITELLM_VERSION!r}"
        ),
    )
    return python.parent / "litellm"


def litellm_proxy(
    executable: Path, upstream: str, model: str, port: int, log_dir: Path
) -> ManagedProcess:
    """LiteLLM's proxy on 127.0.0.1:port serving `model` from the OpenAI-compatible
    `upstream`: one uvicorn worker, master-key auth, no database, no callbacks."""
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream + "/v1",
                    "api_key": "unused",
                },
            }
        ],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    path = log_dir / "litellm.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    argv = [
        str(executable),
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
    ]
    # No network here: the bundled model cost map, not a fetch of the remote one.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    return ManagedProcess("litellm", argv, log_dir / "litellm.log", env=env)


async def _wait_ready(
    url: str,
    timeout: float = 120.0,
    need_miner: bool = False,
    path: str = "/health",
    alive: Callable[[], bool] | None = None,
) -> None:
    """Until `url + path` answers 200 (and, with need_miner, a gateway sees a healthy
    miner); TimeoutError after `timeout`, RuntimeError as soon as `alive()` says the server's
    process has exited."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"the server for {url} exited before it was ready")
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with session.get(url + path) as resp:
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
    proxy_cpu_s: float = 0.0

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
        if self.proxy_cpu_s and lat:
            summary["proxy_cpu_ms_per_request"] = self.proxy_cpu_s * 1000 / len(lat)
        return summary


def _pct(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


@dataclass
class Target:
    name: str  # direct, gateway or litellm
    url: str
    headers: dict[str, str]
    body: bytes
    pid: int | None = None  # the proxy's process, for its CPU per request


async def _one(session: aiohttp.ClientSession, target: Target) -> float | None:
    started = time.perf_counter()
    async with session.post(target.url, data=target.body, headers=target.headers) as resp:
        await resp.read()  # streamed or not: the whole answer, as a client would wait for it
        ok = resp.status == 200
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed if ok else None


async def sequential(
    session: aiohttp.ClientSession, targets: list[Target], count: int, max_seconds: float
) -> list[Phase]:
    """One request at a time, every target in turn (the order rotating each round)."""
    phases = [Phase() for _ in targets]
    deadline = time.monotonic() + max_seconds
    for i in range(count):
        if time.monotonic() > deadline:
            break
        for k in range(len(targets)):
            which = (i + k) % len(targets)
            started = time.perf_counter()
            latency = await _one(session, targets[which])
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
            latency = await _one(session, target)
            if latency is None:
                phase.errors += 1
            else:
                phase.latencies_ms.append(latency)

    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.elapsed_s = time.perf_counter() - started
    if target.pid:
        phase.proxy_cpu_s = cpu_seconds(target.pid) - cpu_before
    return phase


def request_body(args: argparse.Namespace, model: str) -> bytes:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "seed": 1,  # the same work on every path: the gateway adds a seed only when none is given
    }
    if args.stream:
        request["stream"] = True
    return json.dumps(request).encode()


async def measure(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    """Sequential then concurrent phases over `targets` (direct first); per mode, each
    path's summary and what each proxy adds over direct."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await sequential(session, targets, args.warmup, 30)  # warm every path
        seq = await sequential(session, targets, args.requests, args.max_seconds)
        conc: list[Phase] = []
        for target in targets:
            await concurrent(session, target, args.warmup, args.concurrency, 30)
            conc.append(
                await concurrent(session, target, args.requests, args.concurrency, args.max_seconds)
            )
    results: dict[str, Any] = {}
    for mode, phases in (("sequential", seq), (f"concurrency {args.concurrency}", conc)):
        row: dict[str, Any] = {t.name: p.summary() for t, p in zip(targets, phases, strict=True)}
        direct = row["direct"]
        for proxy in (t.name for t in targets[1:]):
            s = row[proxy]
            prefix = "" if proxy == "gateway" else f"{proxy}_"
            row[f"{prefix}added_p50_ms"] = s["p50_ms"] - direct["p50_ms"]
            row[f"{prefix}added_p99_ms"] = s["p99_ms"] - direct["p99_ms"]
            row[f"{prefix}rps_ratio"] = s["rps"] / direct["rps"] if direct["rps"] else 0.0
        if "litellm" in row and row["litellm"]["rps"]:
            row["gateway_over_litellm_rps"] = row["gateway"]["rps"] / row["litellm"]["rps"]
        results[mode] = row
    return results


# -- reporting ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = cpu_model()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


PATHS = ("direct", "gateway", "litellm")


def table(results: dict[str, Any]) -> str:
    header = (
        f"{'mode':<16}{'path':<9}{'requests':>9}{'req/s':>10}"
        f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    )
    lines = [header, "-" * len(header)]
    for mode, row in results.items():
        for path in (p for p in PATHS if p in row):
            s = row[path]
            lines.append(
                f"{mode:<16}{path:<9}{s['requests']:>9}{s['rps']:>10.0f}"
                f"{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['p99_ms']:>9.2f}"
                + (f"  ({s['errors']} errors)" if s["errors"] else "")
            )
        for proxy in (p for p in PATHS[1:] if p in row):
            prefix = "" if proxy == "gateway" else f"{proxy}_"
            lines.append(
                f"{'':<16}{'+' + proxy[:8]:<9}{'':>9}{row[prefix + 'rps_ratio']:>9.2f}x"
                f"{row[prefix + 'added_p50_ms']:>9.2f}{'':>9}{row[prefix + 'added_p99_ms']:>9.2f}"
            )
            cpu = row[proxy].get("proxy_cpu_ms_per_request")
            if cpu:
                lines.append(f"{'':<16}{proxy} CPU per request: {cpu * 1000:.0f} us")
    return "\n".join(lines)


def verdicts(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The issue's targets that this run's upstream speaks to."""
    seq = results["sequential"]
    conc = results[f"concurrency {args.concurrency}"]
    lines = [f"gateway added p50 (sequential): {seq['added_p50_ms']:.2f} ms (target <= 1 ms)"]
    if "gateway_over_litellm_rps" in conc:
        target = " (target >= 10x with the stand-in)" if args.upstream == "scripted" else ""
        lines.append(
            f"gateway req/s / LiteLLM req/s at {args.concurrency}:"
            f" {conc['gateway_over_litellm_rps']:.2f}x{target}"
        )
    target = " (target >= 0.95 with a real miner)" if args.upstream == "miner" else ""
    lines.append(f"gateway req/s / direct at {args.concurrency}: {conc['rps_ratio']:.2f}{target}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", choices=["miner", "scripted"], default="miner")
    parser.add_argument(
        "--miner-model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="with --upstream miner: a tiny random-weight model (default), or the devnet's"
        " default model on the devnet's default engine (much slower per request)",
    )
    parser.add_argument(
        "--miner-threads",
        type=int,
        default=None,
        help="the miner's CPU threads (default: 1 with the tiny model; with smollm2 the"
        " miner CLI's default, every core)",
    )
    parser.add_argument("--requests", type=int, default=1000, help="per path and mode")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument(
        "--metered",
        action="store_true",
        help="settlement on, as in production: chain, escrow deposit, attesting miner",
    )
    parser.add_argument(
        "--peer",
        choices=["litellm"],
        default=None,
        help=f"also through this proxy (LiteLLM {LITELLM_VERSION}, in bench/{LITELLM_VENV})",
    )
    parser.add_argument(
        "--db-dir",
        type=Path,
        default=None,
        help="where the gateway's databases and the miner's receipt log go (default: the"
        " system's temp dir); e.g. /dev/shm to take the disk's fsync out of the figures",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    for name in ("requests", "concurrency", "warmup", "max_tokens", "miner_threads"):
        if name == "miner_threads" and args.miner_threads is None:
            continue
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.upstream != "miner" and (args.miner_model != "tiny" or args.miner_threads):
        parser.error("--miner-model and --miner-threads are for --upstream miner")

    from infergrid.app.keys import KeyStore

    litellm = litellm_executable() if args.peer == "litellm" else None
    with (
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(dir=args.db_dir) as db_tmp,
        contextlib.ExitStack() as stack,
    ):
        tmp_dir, db_dir = Path(tmp), Path(db_tmp)
        miner_port, gateway_port = free_port(), free_port()
        miner_url = f"http://127.0.0.1:{miner_port}"
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        net = start_network(stack, tmp_dir) if args.metered else None
        if args.upstream == "miner":
            served = miner_model(args.miner_model, args.miner_threads, tmp_dir)
            what = (
                "a tiny random-weight model"
                if args.miner_model == "tiny"
                else f"{served.served} (the devnet's default model)"
            )
            server = "compute.node.run_miner" if net is not None else "compute.miner_server"
            upstream = (
                f"infergrid.{server} over {what}, engine {served.engine},"
                f" device {served.device}, {served.threads} thread(s)"
            )
            if net is None:
                miner = stack.enter_context(_process(_serve_miner, served, miner_port))
            else:
                receipts = str(db_dir / "miner.receipts.db")
                miner = stack.enter_context(
                    _process(_serve_metered_miner, served, miner_port, net, receipts)
                )
            model = served.served
        else:
            upstream = "ScriptedMiner stand-in (tests/app/scripted_miner.py), no model"
            if net is not None:
                register_scripted(net, miner_url)
            miner = stack.enter_context(_process(_serve_scripted, miner_port, net))
            model = SCRIPTED_MODEL
        if net is not None:
            upstream += "; metered: attesting miner, settlement on an embedded chain"
        db_path = db_dir / "gateway.db"
        payer = net.address(PAYER_KEY) if net is not None else None
        key = KeyStore(db_path).create("bench", payer=payer)[1]

        async def run() -> dict[str, Any]:
            await _wait_ready(miner_url, timeout=300, alive=miner.is_alive)
            if net is None:
                gateway = stack.enter_context(
                    _process(_serve_gateway, str(db_path), gateway_port, miner_url, model)
                )
            else:
                gateway = stack.enter_context(
                    _process(_serve_metered_gateway, str(db_path), gateway_port, net)
                )
            await _wait_ready(gateway_url, need_miner=True, alive=gateway.is_alive)
            assert gateway.pid is not None
            body = request_body(args, model)
            json_headers = {"content-type": "application/json"}
            targets = [
                Target("direct", miner_url + "/v1/chat/completions", json_headers, body),
                Target(
                    "gateway",
                    gateway_url + "/v1/chat/completions",
                    {**json_headers, "authorization": f"Bearer {key}"},
                    body,
                    gateway.pid,
                ),
            ]
            if litellm is not None:
                port = free_port()
                proc = stack.enter_context(
                    _managed(litellm_proxy(litellm, miner_url, model, port, tmp_dir))
                )
                url = f"http://127.0.0.1:{port}"
                await _wait_ready(url, timeout=180, path="/health/liveliness", alive=proc.alive)
                auth = {**json_headers, "authorization": f"Bearer {LITELLM_MASTER_KEY}"}
                targets.append(
                    Target("litellm", url + "/v1/chat/completions", auth, body, proc.pid)
                )
            return await measure(args, targets)

        try:
            import uvloop

            results = uvloop.run(run())
        except ImportError:
            results = asyncio.run(run())

    report = {
        "upstream": upstream,
        "miner_model": args.miner_model if args.upstream == "miner" else None,
        "metered": args.metered,
        "peer": f"litellm {LITELLM_VERSION}" if litellm is not None else None,
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "db_dir": str(args.db_dir or tempfile.gettempdir()),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(f"upstream: {upstream}")
    if litellm is not None:
        print(f"peer:     LiteLLM {LITELLM_VERSION} proxy (bench/{LITELLM_VENV})")
    print(f"machine:  {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    print(f"requests: chat, max_tokens={args.max_tokens}, stream={args.stream}")
    print(f"databases: {report['db_dir']}\n")
    print(table(results))
    print()
    for line in verdicts(results, args):
        print(line)


if __name__ == "__main__":
    main()
