"""`infergrid up`: one command that starts a whole local network.

Order: chain (embedded EVM served over JSON-RPC, unless --chain-rpc names one) → contracts →
verifiers (each registers and stakes itself, and gets a canary payer account with an escrow
deposit and a canary API key) → miners (each registers and stakes itself) → gateway → the
miners' qualification (the verifiers' canaries pass their audits). Every node is its own
process with its log under the state directory; the parent watches them and stops them all on
Ctrl-C.

Dev accounts (the dev mnemonic's indices): 0 deployer, treasury and reward arbiter; 1 the
gateway; 2-9 miners; 10 the developer; 11-18 verifiers; 19-26 the verifiers' canary payers; 27
on are spare (tests use them). `infergrid miner --devnet` and `infergrid verifier --devnet`
take the next index of their range that no node has registered (devnet_join).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from infergrid.devnet_state import StateLock, move_previous_state
from infergrid.processes import (
    ManagedProcess,
    free_port,
    health_ok,
    infergrid_command,
    port_is_free,
    rpc_ready,
)
from infergrid.protocol.nodes import WEI_PER_BTT

DEVNET_FILE = "devnet.json"
GATEWAY_DB = "gateway.db"
MAX_MINERS = 8
DEPLOYER_INDEX = 0  # also the treasury and the reward arbiter
# The devnet chain mines an empty block this often, so epochs end while nobody transacts.
DEVNET_BLOCK_TIME_S = 5
GATEWAY_KEY_INDEX = 1
FIRST_MINER_KEY_INDEX = 2
# The developer whose API key the devnet hands out; it pays from its escrow deposit.
DEVELOPER_KEY_INDEX = FIRST_MINER_KEY_INDEX + MAX_MINERS

MAX_VERIFIERS = 8
FIRST_VERIFIER_KEY_INDEX = DEVELOPER_KEY_INDEX + 1
# Verifier i pays for its canaries from account FIRST_CANARY_KEY_INDEX + i: an ordinary payer,
# not its registered address, so a miner cannot tell its canaries from other traffic.
FIRST_CANARY_KEY_INDEX = FIRST_VERIFIER_KEY_INDEX + MAX_VERIFIERS
SPARE_KEY_INDEX = FIRST_CANARY_KEY_INDEX + MAX_VERIFIERS  # no devnet node uses these
DEFAULT_VERIFIERS = 3

DEVNET_MINER_STAKE_WEI = 100 * WEI_PER_BTT
DEVNET_VERIFIER_STAKE_WEI = 20 * WEI_PER_BTT
DEVNET_CANARY_DEPOSIT_WEI = 20 * WEI_PER_BTT
# Canaries in steady state: rare enough to leave two cores to real traffic. While a miner
# qualifies, verifiers send them every couple of seconds.
DEVNET_CANARY_INTERVAL_S = 120.0
QUALIFICATION_TIMEOUT_S = 300.0
DEVNET_QUALIFICATION_AUDITS = 3  # the gateway's default
# A devnet runs every node on one machine: a miner answering short canaries behind the others'
# work measures far below its real rate, so the floor is lower than a real gateway's (1.0).
DEVNET_QUALIFICATION_TOKENS_PER_S = 0.2
DEVNET_GATEWAY_STAKE_WEI = 10 * WEI_PER_BTT
DEVNET_DEPOSIT_WEI = 100 * WEI_PER_BTT
DEVNET_ANCHOR_INTERVAL_S = 30.0
# Enough for a node's stake and a lifetime of gas on any dev chain.
NODE_FUNDING_WEI = 1_000 * WEI_PER_BTT


@dataclass
class DevnetOptions:
    miners: int = 2
    verifiers: int = DEFAULT_VERIFIERS
    model: str = "smollm2"
    # Every miner's and verifier's engine: one kind for all, so that they hold one model id.
    engine: str = "transformers"
    chain_rpc: str | None = None
    host: str = "127.0.0.1"
    gateway_port: int = 8000
    chain_port: int = 8545
    state_dir: Path = field(default_factory=lambda: Path(".infergrid"))
    # Seconds between the gateway's reads of the registry; short on a devnet so new miners
    # appear at once.
    discovery_interval_s: float = 2.0
    # Miners collect their vouchers this often; short so a developer sees payments land.
    collect_interval_s: float = 30.0


def devnet_file(state_dir: Path) -> Path:
    return state_dir / DEVNET_FILE


def read_devnet(state_dir: Path) -> dict[str, Any]:
    path = devnet_file(state_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"no running network described at {path}: start one with `infergrid up`"
        )
    return json.loads(path.read_text())


def threads_per_miner(miners: int, cores: int) -> int:
    """Each miner's share of the machine's cores (at least one): torch in every miner
    running a thread per core would oversubscribe the CPU, and N miners would then serve
    less than one."""
    return max(1, cores // max(1, miners))


def _pick_port(preferred: int, host: str) -> tuple[int, str | None]:
    """The preferred port if nothing listens there (one in TIME_WAIT after a stop counts as
    free), else a free one and a line saying why it was picked."""
    if port_is_free(preferred, host):
        return preferred, None
    port = free_port(host)
    return port, f"port {preferred} on {host} is in use by another process; using {port} instead"


class Devnet:
    """A running local network; `start()` brings it up, `stop()` takes it down."""

    def __init__(self, options: DevnetOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console(stderr=True)
        self.processes: list[ManagedProcess] = []
        self.description: dict[str, Any] = {}
        self.state_dir = options.state_dir.resolve()
        self.log_dir = self.state_dir / "logs"
        self.lock = StateLock(self.state_dir)

    def acquire(self) -> None:
        """Take the state directory (DevnetRunning if a network runs from it) and move what a
        previous network left there aside: it belongs to another chain (devnet_state)."""
        if self.lock.held:
            return
        self.lock.acquire()
        moved = move_previous_state(self.state_dir)
        if moved is not None:
            folder, count = moved
            self._done(
                f"previous   network's state ({count} entries: gateway database, receipt"
                f" logs, logs) moved to {folder}; this chain starts fresh"
            )

    # -- start ----------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        from infergrid.app.keys import KeyStore
        from infergrid.compute.node import default_receipt_log_path
        from infergrid.compute.transformers_engine import available_cores
        from infergrid.settle.chain import Chain, as_account, dev_private_keys
        from infergrid.settle.deploy import deploy_network
        from infergrid.settle.escrow import PaymentEscrow
        from infergrid.settle.profiles import DEVNET_PARAMS

        opts = self.options
        self.acquire()
        step = self.console.status

        chain_rpc = opts.chain_rpc
        if chain_rpc is None:
            port, note = _pick_port(opts.chain_port, opts.host)
            if note:
                self._note(f"chain      {note}")
            chain_rpc = f"http://{opts.host}:{port}"
            with step(f"starting the embedded EVM at {chain_rpc}"):
                chain_proc = self._spawn(
                    "chain",
                    infergrid_command(
                        "chain",
                        "--host",
                        opts.host,
                        "--port",
                        str(port),
                        "--block-time",
                        str(DEVNET_BLOCK_TIME_S),
                    ),
                    endpoint=chain_rpc,
                )
                chain_proc.wait_until(lambda: rpc_ready(chain_rpc), 60, "JSON-RPC answer")
            self._done(f"chain      {chain_rpc} (embedded EVM)")
        elif not rpc_ready(chain_rpc):
            raise RuntimeError(f"no JSON-RPC answer from {chain_rpc}")

        chain = Chain.connect(chain_rpc)
        if not 1 <= opts.miners <= MAX_MINERS:
            raise ValueError(f"a devnet runs 1 to {MAX_MINERS} miners")
        if not 0 <= opts.verifiers <= MAX_VERIFIERS:
            raise ValueError(f"a devnet runs 0 to {MAX_VERIFIERS} verifiers")
        keys = dev_private_keys(SPARE_KEY_INDEX)
        deployer = keys[DEPLOYER_INDEX]
        developer_key = keys[DEVELOPER_KEY_INDEX]
        gateway_signer = as_account(keys[GATEWAY_KEY_INDEX]).address
        verifier_keys = keys[FIRST_VERIFIER_KEY_INDEX:][: opts.verifiers]
        canary_keys = keys[FIRST_CANARY_KEY_INDEX:][: opts.verifiers]
        node_keys = [
            keys[GATEWAY_KEY_INDEX],
            *keys[FIRST_MINER_KEY_INDEX:][: opts.miners],
            *verifier_keys,
            *canary_keys,
        ]
        with step("deploying the settlement contracts"):
            contracts = deploy_network(chain, deployer, DEVNET_PARAMS)
            # Dev chains fund the first ten accounts already; an external chain may not.
            for key in [*node_keys, developer_key]:
                address = as_account(key).address
                shortfall = NODE_FUNDING_WEI - chain.balance(address)
                if shortfall > 0:
                    chain.transfer(deployer, address, shortfall)
        registry_address = contracts.NodeRegistry
        for name, address in contracts.as_dict().items():
            self._done(f"contract   {name:<17} {address}")
        self._done(f"chain id   {chain.chain_id}")

        developer = as_account(developer_key).address
        with step("funding the developer's escrow account"):
            escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
            escrow.deposit(developer_key, DEVNET_DEPOSIT_WEI)
            escrow.authorize_signer(developer_key, gateway_signer)
        self._done(
            f"developer  {developer}: {DEVNET_DEPOSIT_WEI // WEI_PER_BTT} BTT in escrow,"
            f" gateway signer {gateway_signer} authorized"
        )

        self._prepare_model(opts.model, opts.engine)

        gateway_port, gateway_note = _pick_port(opts.gateway_port, opts.host)
        base_url = f"http://{opts.host}:{gateway_port}/v1"
        db_path = self.state_dir / GATEWAY_DB
        keystore = KeyStore(db_path)
        api_key = keystore.create("devnet demo key", payer=developer)[1]

        common = [
            "--chain-rpc",
            chain_rpc,
            "--registry",
            registry_address,
            "--escrow",
            contracts.PaymentEscrow,
        ]
        verifier_info = self._start_verifiers(
            chain, escrow, keystore, verifier_keys, canary_keys, gateway_signer, base_url, common,
            contracts.ScoreBoard,
        )  # fmt: skip
        keystore.close()

        threads = threads_per_miner(opts.miners, available_cores())
        # The OpenMP and MKL pools too, for whatever in the miner sizes them before torch does.
        thread_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        miners: list[ManagedProcess] = []
        miner_info: list[dict[str, Any]] = []
        for index in range(opts.miners):
            port = free_port(opts.host)
            endpoint = f"http://{opts.host}:{port}"
            name = f"miner-{index + 1}"
            key = keys[FIRST_MINER_KEY_INDEX + index]
            address = as_account(key).address
            receipt_log = default_receipt_log_path(address, self.state_dir)
            proc = self._spawn(
                name,
                infergrid_command(
                    "miner",
                    "--model",
                    opts.model,
                    "--engine",
                    opts.engine,
                    "--host",
                    opts.host,
                    "--port",
                    str(port),
                    "--stake",
                    str(DEVNET_MINER_STAKE_WEI // WEI_PER_BTT),
                    "--collect-interval",
                    str(opts.collect_interval_s),
                    "--receipt-log",
                    str(receipt_log),
                    "--threads",
                    str(threads),
                    *common,
                ),
                endpoint=endpoint,
                env={"INFERGRID_PRIVATE_KEY": key, **thread_env},
            )
            miners.append(proc)
            miner_info.append(
                {
                    "name": name,
                    "address": address,
                    # A dev-mnemonic key, public by design: `infergrid miner collect` uses it.
                    "key": key,
                    "endpoint": endpoint,
                    "receipt_log": str(receipt_log),
                    "threads": threads,
                }
            )
        with step(
            f"starting {opts.miners} miner(s) with {opts.model} on {opts.engine},"
            f" {threads} CPU thread(s) each:"
            " loading, registering"
        ):
            for proc in miners:
                proc.wait_until(lambda e=proc.endpoint: health_ok(e + "/health"), 300, "health")
        for proc in miners:
            self._done(f"{proc.name:<10} {proc.endpoint} (pid {proc.pid})")

        if gateway_note:
            self._note(f"gateway    {gateway_note}")
        gateway = self._spawn(
            "gateway",
            infergrid_command(
                "gateway",
                "--host",
                opts.host,
                "--port",
                str(gateway_port),
                "--db",
                str(db_path),
                "--qualification-tokens-per-s",
                str(DEVNET_QUALIFICATION_TOKENS_PER_S),
                "--discovery-interval",
                str(opts.discovery_interval_s),
                "--rewards",
                contracts.RewardDistributor,
                "--anchor-interval",
                str(DEVNET_ANCHOR_INTERVAL_S),
                "--stake",
                str(DEVNET_GATEWAY_STAKE_WEI // WEI_PER_BTT),
                *common,
            ),
            endpoint=base_url,
            env={"INFERGRID_PRIVATE_KEY": keys[GATEWAY_KEY_INDEX]},
        )
        with step("starting the gateway and waiting for it to see the miners"):
            gateway.wait_until(
                lambda: self._gateway_sees_miners(base_url, api_key), 120, "miners in /v1/models"
            )
        self._done(f"gateway    {base_url} (pid {gateway.pid})")
        if verifier_info:
            with step(
                f"qualifying the miners: the verifiers' canaries must pass"
                f" {DEVNET_QUALIFICATION_AUDITS} audits each"
            ):
                gateway.wait_until(
                    lambda: self._miners_qualified(base_url, api_key, opts.miners),
                    QUALIFICATION_TIMEOUT_S,
                    "every miner qualified in /v1/miners",
                )
            self._done(f"miners     {opts.miners} qualified by the verifiers' audited canaries")

        self.description = {
            "base_url": base_url,
            "api_key": api_key,
            "chain_rpc": chain_rpc,
            "chain_id": chain.chain_id,
            "contracts": contracts.as_dict(),
            "gateway_signer": gateway_signer,
            "developer": developer,
            # A dev-mnemonic key, public by design: `infergrid account …` uses it by default.
            "developer_key": developer_key,
            "model": opts.model,
            "engine": opts.engine,
            "gateway_db": str(db_path),
            "miners": miner_info,
            "verifiers": verifier_info,
            "state_dir": str(self.state_dir),
            "nodes": [
                {
                    "name": proc.name,
                    "pid": proc.pid,
                    "endpoint": proc.endpoint,
                    "log": str(proc.log_path),
                }
                for proc in self.processes
            ],
        }
        devnet_file(self.state_dir).write_text(json.dumps(self.description, indent=2) + "\n")
        return self.description

    def _start_verifiers(
        self,
        chain: Any,
        escrow: Any,
        keystore: Any,
        verifier_keys: list[str],
        canary_keys: list[str],
        gateway_signer: str,
        base_url: str,
        common: list[str],
        scoreboard: str | None = None,
    ) -> list[dict[str, Any]]:
        """Start the verifiers (registered and staked by themselves), each with a canary payer
        account: an escrow deposit, the gateway's signer authorized, a canary API key; with a
        ScoreBoard, each scores the miners there every epoch."""
        from infergrid.settle.chain import as_account

        opts = self.options
        if not verifier_keys:
            return []
        info: list[dict[str, Any]] = []
        procs: list[ManagedProcess] = []
        with self.console.status("funding the verifiers' canary accounts"):
            for index, (key, canary_key) in enumerate(zip(verifier_keys, canary_keys, strict=True)):
                canary_payer = as_account(canary_key).address
                escrow.deposit(canary_key, DEVNET_CANARY_DEPOSIT_WEI)
                escrow.authorize_signer(canary_key, gateway_signer)
                name = f"verifier-{index + 1}"
                api_key = keystore.create(f"{name} canaries", payer=canary_payer, canary=True)[1]
                port = free_port(opts.host)
                endpoint = f"http://{opts.host}:{port}"
                argv = [
                    "verifier",
                    "--model", opts.model,
                    "--engine", opts.engine,
                    "--host", opts.host,
                    "--port", str(port),
                    "--stake", str(DEVNET_VERIFIER_STAKE_WEI // WEI_PER_BTT),
                    "--gateway", base_url,
                    "--canary-interval", str(DEVNET_CANARY_INTERVAL_S),
                    *(["--scoreboard", scoreboard] if scoreboard else []),
                    "--threads", "1",
                    # Its evidence and scores belong to this network, not to the cwd.
                    "--state-dir", str(self.state_dir),
                    *common,
                ]  # fmt: skip
                proc = self._spawn(
                    name,
                    infergrid_command(*argv),
                    endpoint=endpoint,
                    env={
                        "INFERGRID_PRIVATE_KEY": key,
                        "INFERGRID_CANARY_KEY": api_key,
                        "OMP_NUM_THREADS": "1",
                        "MKL_NUM_THREADS": "1",
                    },
                )
                procs.append(proc)
                info.append(
                    {
                        "name": name,
                        "address": as_account(key).address,
                        # Dev-mnemonic keys, public by design.
                        "key": key,
                        "endpoint": endpoint,
                        "canary_payer": canary_payer,
                        "canary_payer_key": canary_key,
                        "canary_api_key": api_key,
                    }
                )
        with self.console.status(
            f"starting {len(procs)} verifier(s) with {opts.model} on {opts.engine}: loading,"
            " registering"
        ):
            for proc in procs:
                proc.wait_until(lambda e=proc.endpoint: health_ok(e + "/health"), 300, "health")
        for proc, entry in zip(procs, info, strict=True):
            self._done(
                f"{proc.name:<10} {proc.endpoint} (pid {proc.pid}); canaries paid by"
                f" {entry['canary_payer']} ({DEVNET_CANARY_DEPOSIT_WEI // WEI_PER_BTT} BTT)"
            )
        return info

    def _miners_qualified(self, base_url: str, api_key: str, expected: int) -> bool:
        listed = _get_json(base_url, "/miners", api_key)
        if listed is None:
            return False
        states = [entry.get("state") for entry in listed.get("data", [])]
        return len(states) >= expected and all(state == "active" for state in states)

    def _prepare_model(self, model: str, engine: str) -> None:
        # Done once here so that N miners starting together don't each dequantize the weights.
        from infergrid.compute.model_store import prepare_model

        if engine == "llamacpp":
            # llama.cpp maps the GGUF itself: nothing to convert, only check it is there.
            from infergrid.compute.llamacpp_engine import resolve_gguf

            self._done(f"model      {model} ({resolve_gguf(model)})")
            return
        with self.console.status(f"preparing {model} (first run dequantizes GGUF, ~20 s)"):
            prepare_model(model, quiet=True)
        self._done(f"model      {model} cached")

    def _gateway_sees_miners(self, base_url: str, api_key: str) -> bool:
        listed = _get_json(base_url, "/models", api_key)
        return listed is not None and bool(listed.get("data"))

    def _spawn(
        self, name: str, argv: list[str], *, endpoint: str, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(
            name, argv, self.log_dir / f"{name}.log", endpoint=endpoint, env=env or {}
        )
        proc.start()
        self.processes.append(proc)
        return proc

    def _done(self, line: str) -> None:
        self.console.print(f"[green]✓[/green] {line}")

    def _note(self, line: str) -> None:
        self.console.print(f"[yellow]![/yellow] {line}", highlight=False)

    # -- run and stop ---------------------------------------------------------------------

    def watch(self, should_stop: Callable[[], bool]) -> None:
        """Block until asked to stop; report (once) any node that dies on its own."""
        reported: set[str] = set()
        while not should_stop():
            for proc in self.processes:
                if not proc.alive() and proc.name not in reported:
                    reported.add(proc.name)
                    code = proc.process.returncode if proc.process else "?"
                    self.console.print(
                        f"[yellow]! {proc.name} exited (code {code}); see {proc.log_path}[/yellow]"
                    )
            time.sleep(0.5)

    def stop(self) -> None:
        # Gateway first so no request lands on a miner that is going away; chain last.
        for proc in reversed(self.processes):
            proc.stop()
        # Only the devnet that holds the directory may remove its description: a refused
        # second start must leave the running network's devnet.json alone.
        if self.lock.held:
            devnet_file(self.state_dir).unlink(missing_ok=True)
            self.lock.release()


def run_devnet(options: DevnetOptions, console: Console | None = None) -> None:
    """Start the network, print how to use it, and run until Ctrl-C or SIGTERM."""
    console = console or Console(stderr=True)
    devnet = Devnet(options, console)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    # SIGHUP too: a closed terminal must take the children down with the parent.
    stop_signals = (signal.SIGTERM, signal.SIGHUP)
    # Refused (a network already runs from this directory) before anything starts or prints.
    devnet.acquire()
    previous = {signum: signal.signal(signum, request_stop) for signum in stop_signals}
    try:
        try:
            info = devnet.start()
        except KeyboardInterrupt:
            console.print("interrupted while starting; stopping")
            return
        out = Console()
        out.print()
        out.print(f"[bold]InferGrid devnet is up[/bold]  ({devnet_file(devnet.state_dir)})")
        out.print(f"  base URL   {info['base_url']}")
        out.print(f"  API key    {info['api_key']}")
        out.print(f"  chain RPC  {info['chain_rpc']} (chain id {info['chain_id']})")
        if info["verifiers"]:
            out.print(
                f"  verifiers  {len(info['verifiers'])} staked, auditing every miner's answers"
                " (`infergrid status` shows each miner's audit record)"
            )
        else:
            out.print("  verifiers  none: answers are billed but not audited")
        out.print(
            f"  try        curl {info['base_url']}/chat/completions "
            f"-H 'Authorization: Bearer {info['api_key']}' -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{_served_model_name(options.model)}", '
            f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
            soft_wrap=True,
        )
        out.print(
            '  or         infergrid chat "What is the capital of France? Answer in one word."'
        )
        out.print("Press Ctrl-C to stop.")
        with contextlib.suppress(KeyboardInterrupt):
            devnet.watch(lambda: stopping)
    finally:
        console.print("stopping the network…")
        devnet.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        console.print("stopped")


def _get_json(base_url: str, path: str, api_key: str) -> dict[str, Any] | None:
    """The gateway's answer while polling it, None while it cannot give one."""
    from infergrid.gateway_client import get_gateway_json

    try:
        data = get_gateway_json(base_url, path, api_key, timeout_s=2.0)
    except (RuntimeError, ConnectionError):
        return None
    return data if isinstance(data, dict) else None


def _served_model_name(model: str) -> str:
    from infergrid.compute.model_store import served_model_name

    return served_model_name(model)
