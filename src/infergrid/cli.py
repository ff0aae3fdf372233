"""The `infergrid` command: every role of the network, and tools to use it."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from infergrid.app.keys import KeyStore
    from infergrid.settle.escrow import PaymentEscrow

app = typer.Typer(
    help="InferGrid: a decentralized AI inference network with on-chain settlement.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Manage the gateway's API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
account_app = typer.Typer(
    help="A developer's escrow account: deposit BTT, check it, authorize gateways, withdraw.",
    no_args_is_help=True,
)
app.add_typer(account_app, name="account")

err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])

StateDir = Annotated[
    Path, typer.Option("--state-dir", help="Where `infergrid up` keeps its state and logs.")
]
DEFAULT_STATE_DIR = Path(".infergrid")
ChainRpcOption = Annotated[
    str | None, typer.Option("--chain-rpc", help="EVM JSON-RPC URL (default: the devnet's).")
]
EscrowOption = Annotated[
    str | None, typer.Option("--escrow", help="PaymentEscrow address (default: the devnet's).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
PRIVATE_KEY_ENV = "INFERGRID_PRIVATE_KEY"


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit code 1."""


_USER_ERRORS = (CLIError, FileNotFoundError, ValueError, ConnectionError, RuntimeError)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, _USER_ERRORS):
        return True
    # A contract revert or a chain that said no (settle.chain.ChainError). Looked up rather
    # than imported: web3 loads only for commands that use the chain, and where it did not
    # load, nothing can have raised one.
    chain = sys.modules.get("infergrid.settle.chain")
    if chain is not None and isinstance(exc, chain.ChainError):
        return True
    # A chain that stopped answering in the middle of a command (web3's HTTP client).
    requests = sys.modules.get("requests")
    return requests is not None and isinstance(exc, requests.RequestException)


def friendly_errors(func: F) -> F:
    """Turn expected failures into one readable line and a non-zero exit, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not _is_user_error(exc):
                raise
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _private_key() -> str:
    key = os.environ.get(PRIVATE_KEY_ENV, "").strip()
    if not key:
        raise CLIError(f"set {PRIVATE_KEY_ENV} to the node's private key (0x… hex)")
    return key


def _devnet_info(state_dir: Path) -> dict[str, Any]:
    from infergrid.devnet import read_devnet

    return read_devnet(state_dir)


# -- network ----------------------------------------------------------------------------------


@app.command()
@friendly_errors
def up(
    miners: Annotated[int, typer.Option(min=1, max=8, help="How many miners to start.")] = 2,
    verifiers: Annotated[
        int,
        typer.Option(
            min=0,
            max=8,
            help="How many verifiers to start (they audit the miners, send canaries and vote"
            " on disputes; 0: none, and miners are not audited).",
        ),
    ] = 3,
    model: Annotated[
        str, typer.Option(help="Model every miner serves: smollm2, tiny, or a model path.")
    ] = "smollm2",
    engine: Annotated[
        str,
        typer.Option(
            help="Engine of every miner and verifier: transformers, llamacpp (the GGUF"
            " natively; its model id differs, so verifiers run it too), or auto: llamacpp for"
            " a GGUF model such as smollm2, else transformers."
        ),
    ] = "auto",
    chain_rpc: Annotated[
        str | None,
        typer.Option(help="Use this EVM JSON-RPC node (e.g. anvil) instead of the embedded one."),
    ] = None,
    port: Annotated[int, typer.Option(help="Gateway port (another is picked if busy).")] = 8000,
    chain_port: Annotated[int, typer.Option(help="Embedded chain's JSON-RPC port.")] = 8545,
    collect_interval: Annotated[
        float,
        typer.Option(help="Seconds between miners' voucher collections (0: only by hand)."),
    ] = 30.0,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Start a local network: chain, contracts, verifiers, miners and a gateway. Ctrl-C stops
    it."""
    from infergrid.compute.engine_factory import AUTO, default_engine
    from infergrid.devnet import DevnetOptions, run_devnet

    options = DevnetOptions(
        miners=miners,
        verifiers=verifiers,
        model=model,
        engine=_engine_kind(default_engine(model) if engine == AUTO else engine, built_in=True),
        chain_rpc=chain_rpc,
        gateway_port=port,
        chain_port=chain_port,
        collect_interval_s=collect_interval,
        state_dir=state_dir,
    )
    run_devnet(options, err)


@app.command()
@friendly_errors
def chain(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="JSON-RPC port.")] = 8545,
    block_time: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Also mine an empty block every this many seconds, so the chain's clock moves"
            " while no transaction comes (default: blocks only on transactions).",
        ),
    ] = None,
) -> None:
    """Serve an embedded EVM (py-evm) over JSON-RPC, funded dev accounts included."""
    from infergrid.settle.rpc_server import serve_embedded_chain

    serve_embedded_chain(
        host,
        port,
        ready_callback=lambda url: err.print(f"chain at {url}"),
        block_time_s=block_time,
    )


miner_app = typer.Typer(
    help="Run a miner (`infergrid miner --model …`), or collect what gateways owe it.",
    invoke_without_command=True,
)
app.add_typer(miner_app, name="miner")


@miner_app.callback()
@friendly_errors
def miner(
    ctx: typer.Context,
    chain_rpc: Annotated[str | None, typer.Option(help="EVM JSON-RPC URL.")] = None,
    registry: Annotated[str | None, typer.Option(help="NodeRegistry contract address.")] = None,
    escrow: Annotated[
        str | None,
        typer.Option(help="PaymentEscrow address: attest responses and collect payments."),
    ] = None,
    model: Annotated[str, typer.Option(help="smollm2, tiny, or a model directory/GGUF file.")] = (
        "smollm2"
    ),
    engine: Annotated[
        str | None,
        typer.Option(
            help="Inference engine: transformers, llamacpp, or openai (a server you run,"
            " --upstream; docs/engines.md). Default: the devnet's with --devnet, else"
            " transformers."
        ),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(help="With --engine openai: the base URL of the server the miner fronts."),
    ] = None,
    upstream_flavor: Annotated[
        str | None,
        typer.Option(
            help="With --engine openai: vllm (default), sglang, llamacpp, ollama or openai"
            " (docs/engines.md says what each verifies)."
        ),
    ] = None,
    upstream_model: Annotated[
        str | None,
        typer.Option(
            help="With --engine openai: the upstream's name for the model (default: the"
            " first it lists)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8100,
    endpoint: Annotated[
        str | None, typer.Option(help="Public URL to register (default http://HOST:PORT).")
    ] = None,
    stake: Annotated[float, typer.Option(help="Stake to keep bonded, in BTT.")] = 100.0,
    price_in: Annotated[int, typer.Option(help="Price per prompt token, in wei.")] = 10**12,
    price_out: Annotated[int, typer.Option(help="Price per completion token, in wei.")] = 2
    * 10**12,
    collect_interval: Annotated[
        float, typer.Option(help="Seconds between voucher collections (0: only `collect`).")
    ] = 300.0,
    gateway_url: Annotated[
        list[str] | None,
        typer.Option(help="Gateway to collect from (repeatable; default: all registered)."),
    ] = None,
    receipt_log: Annotated[
        Path | None, typer.Option(help="The miner's own receipt log (SQLite).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for inference (default: every core; miners sharing a machine"
            " should split its cores).",
        ),
    ] = None,
    devnet: Annotated[
        bool,
        typer.Option(
            "--devnet",
            help="Join the network `infergrid up` runs from --state-dir: its chain and"
            " contracts, the next unused dev account (funded), a free port, one CPU thread"
            " unless --threads says otherwise.",
        ),
    ] = False,
    attack: Annotated[
        str | None,
        typer.Option(
            help="RED TEAM, for testing the verifiers: 'substitute=MODEL' serves MODEL's tokens"
            " under --model's id. Such a miner is audited, disputed and slashed.",
        ),
    ] = None,
    attack_after: Annotated[
        int,
        typer.Option(min=0, help="With --attack: serve this many requests honestly first."),
    ] = 0,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Run a miner: load the model, register and stake on-chain (idempotent), serve requests;
    with --escrow, attest every response and collect vouchers on a schedule.

    The node's private key is read from the INFERGRID_PRIVATE_KEY environment variable
    (with --devnet, a dev account is picked unless it is set).
    """
    if ctx.invoked_subcommand is not None:
        return
    from infergrid.compute.engine_factory import upstream_options_error
    from infergrid.compute.node import MinerSettings, default_receipt_log_path, run_miner

    substitute = _parse_attack(attack)
    private_key = os.environ.get(PRIVATE_KEY_ENV, "").strip() or None
    if devnet:
        from infergrid.devnet_join import join_devnet
        from infergrid.processes import free_port, port_is_free
        from infergrid.protocol.nodes import Role

        plan = join_devnet(state_dir, Role.MINER)
        chain_rpc, registry, escrow = plan.chain_rpc, plan.registry, plan.escrow
        engine = engine or plan.engine
        if private_key is None:
            private_key = plan.private_key
            receipt_log = receipt_log or default_receipt_log_path(plan.address, state_dir)
        if not port_is_free(port, host):
            port = free_port(host)
        # The devnet's other nodes share this machine: one core each unless told otherwise.
        threads = threads or 1
        err.print(f"joining the devnet at {plan.chain_rpc} as {plan.address}")
    if chain_rpc is None or registry is None:
        raise CLIError("a miner needs --chain-rpc and --registry (or --devnet)")
    engine = _engine_kind(engine or "transformers")
    upstream_error = upstream_options_error(engine, upstream, upstream_flavor, upstream_model)
    if upstream_error is not None:  # before the key and the chain: nothing loads first
        raise CLIError(upstream_error)
    if private_key is None:
        private_key = _private_key()  # raises the one-line error
    settings = MinerSettings(
        chain_rpc=chain_rpc,
        registry=registry,
        private_key=private_key,
        model=model,
        host=host,
        port=port,
        endpoint=endpoint or f"http://{host}:{port}",
        stake_wei=int(stake * 10**18),
        price_in_wei=price_in,
        price_out_wei=price_out,
        escrow=escrow,
        collect_interval_s=collect_interval,
        gateway_urls=tuple(gateway_url or ()),
        receipt_log=receipt_log,
        threads=threads,
        substitute_model=substitute,
        honest_first=attack_after,
        engine=engine,
        upstream=upstream,
        upstream_flavor=upstream_flavor,
        upstream_model=upstream_model,
    )
    run_miner(settings, err)


def _engine_kind(engine: str, *, built_in: bool = False) -> str:
    """`engine` if it names an engine of compute.engine_factory (with `built_in`, one that
    computes itself rather than fronting an upstream), else the one-line error."""
    from infergrid.compute.engine_factory import ENGINE_KINDS

    kinds = [k for k in ENGINE_KINDS if not built_in or k != "openai"]
    if engine not in kinds:
        raise CLIError(f"unknown engine {engine!r} (available: {', '.join(kinds)})")
    return engine


def _parse_attack(attack: str | None) -> str | None:
    """The substitute model of `--attack substitute=MODEL`, or None without --attack."""
    if attack is None:
        return None
    kind, _, model = attack.partition("=")
    if kind != "substitute" or not model:
        raise CLIError(f"unknown --attack {attack!r}: the one attack is 'substitute=MODEL'")
    return model


verifier_app = typer.Typer(
    help="Run a verifier (`infergrid verifier --model …`), pay the verifiers an epoch from the"
    " escrow's verifier pool (`pay`), or claim a verifier's pay (`claim`).",
    invoke_without_command=True,
)
app.add_typer(verifier_app, name="verifier")


@verifier_app.callback()
@friendly_errors
def verifier(
    ctx: typer.Context,
    chain_rpc: Annotated[str | None, typer.Option(help="EVM JSON-RPC URL.")] = None,
    registry: Annotated[str | None, typer.Option(help="NodeRegistry contract address.")] = None,
    escrow: Annotated[
        str | None,
        typer.Option(help="PaymentEscrow address: verdicts are signed in its EIP-712 domain."),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Model to audit (repeatable): smollm2, tiny, tiny:<seed>, or a model"
            " directory/GGUF file, from the same model store as miners."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve audits on.")] = 8200,
    endpoint: Annotated[
        str | None, typer.Option(help="Public URL to register (default http://HOST:PORT).")
    ] = None,
    stake: Annotated[
        float | None,
        typer.Option(help="Stake to keep bonded, in BTT (default: the registry's minimum)."),
    ] = None,
    gateway_url: Annotated[
        str | None,
        typer.Option("--gateway", help="Gateway whose public API canaries go through."),
    ] = None,
    canary_key: Annotated[
        str | None,
        typer.Option(
            envvar="INFERGRID_CANARY_KEY",
            help="The verifier's own API key at --gateway (a paying developer's).",
        ),
    ] = None,
    canary_interval: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds between canary prompts (0: none, except while a miner is on probation).",
        ),
    ] = 60.0,
    qualification_interval: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds between canaries while the gateway shows a miner on probation"
            " (0: no faster than --canary-interval).",
        ),
    ] = 2.0,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads for audits (default: every core)."),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Engine that recomputes answers, the miners' (their model id depends on it):"
            " transformers or llamacpp (default: the devnet's with --devnet, else"
            " transformers)."
        ),
    ] = None,
    scoreboard: Annotated[
        str | None,
        typer.Option(
            help="ScoreBoard address: after every epoch, score the miners from what --gateway"
            " observed and commit, then reveal, the scores there (default: the devnet's with"
            " --devnet, else none)."
        ),
    ] = None,
    devnet: Annotated[
        bool,
        typer.Option(
            "--devnet",
            help="Join the network `infergrid up` runs from --state-dir: its chain, contracts"
            " and gateway, the next unused dev account (funded), a funded canary account and"
            " canary key, a free port, one CPU thread unless --threads says otherwise.",
        ),
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Run a verifier: load the reference model(s), register and stake as a verifier
    (idempotent), audit the jobs gateways send, dispute confirmed failures on-chain, vote on
    other verifiers' disputes, (with --gateway and --canary-key) send canary prompts, and
    (with --scoreboard too) score the miners every epoch.

    The node's private key is read from the INFERGRID_PRIVATE_KEY environment variable
    (with --devnet, a dev account is picked unless it is set).
    """
    if ctx.invoked_subcommand is not None:
        return
    from infergrid.verify.node import VerifierSettings, run_verifier

    private_key = os.environ.get(PRIVATE_KEY_ENV, "").strip() or None
    if devnet:
        from infergrid.devnet_join import join_devnet
        from infergrid.processes import free_port, port_is_free
        from infergrid.protocol.nodes import Role

        plan = join_devnet(state_dir, Role.VERIFIER)
        chain_rpc, registry, escrow = plan.chain_rpc, plan.registry, plan.escrow
        engine = engine or plan.engine
        if private_key is None:
            private_key = plan.private_key
        gateway_url = gateway_url or plan.base_url
        canary_key = canary_key or plan.canary_api_key
        scoreboard = scoreboard or plan.scoreboard
        if model is None:
            model = [_devnet_info(state_dir)["model"]]
        if not port_is_free(port, host):
            port = free_port(host)
        # The devnet's other nodes share this machine: one core each unless told otherwise.
        threads = threads or 1
        err.print(f"joining the devnet at {plan.chain_rpc} as {plan.address}")
    if private_key is None:
        private_key = _private_key()  # raises the one-line error
    if chain_rpc is None or registry is None or escrow is None:
        raise CLIError("a verifier needs --chain-rpc, --registry and --escrow (or --devnet)")
    if (gateway_url is None) != (canary_key is None):
        raise CLIError("canaries need both --gateway and --canary-key (or neither)")
    settings = VerifierSettings(
        chain_rpc=chain_rpc,
        registry=registry,
        escrow=escrow,
        private_key=private_key,
        models=tuple(model or ["smollm2"]),
        host=host,
        port=port,
        endpoint=endpoint,
        stake_wei=None if stake is None else int(stake * 10**18),
        state_dir=state_dir,
        threads=threads,
        gateway_url=gateway_url,
        canary_key=canary_key,
        canary_interval_s=canary_interval,
        qualification_interval_s=qualification_interval,
        engine=_engine_kind(engine or "transformers"),
        scoreboard=scoreboard,
    )
    run_verifier(settings, err)


RewardsOption = Annotated[
    str | None,
    typer.Option("--rewards", help="RewardDistributor address (default: the devnet's)."),
]
RegistryOption = Annotated[
    str | None, typer.Option("--registry", help="NodeRegistry address (default: the devnet's).")
]
PayStateOption = Annotated[
    Path | None,
    typer.Option(
        "--state-file",
        help="The epochs paid so far, their windows and allocations (JSON; default:"
        " STATE_DIR/verifier-pay.json). Verifiers claim from it: publish it to them.",
    ),
]


@dataclass(frozen=True)
class _PayTarget:
    chain_rpc: str
    registry: str
    escrow: str
    rewards: str
    state_file: Path
    info: dict[str, Any] | None  # devnet.json, when a default came from it


def _pay_target(
    chain_rpc: str | None,
    registry: str | None,
    escrow: str | None,
    rewards: str | None,
    state_file: Path | None,
    state_dir: Path,
) -> _PayTarget:
    from infergrid.verify.pay_epoch import PAY_STATE_FILE

    info = None
    if chain_rpc is None or registry is None or escrow is None or rewards is None:
        info = _devnet_info(state_dir)
        contracts = info["contracts"]
        chain_rpc = chain_rpc or info["chain_rpc"]
        registry = registry or contracts["NodeRegistry"]
        escrow = escrow or contracts["PaymentEscrow"]
        rewards = rewards or contracts["RewardDistributor"]
    return _PayTarget(
        chain_rpc, registry, escrow, rewards, state_file or state_dir / PAY_STATE_FILE, info
    )


def _pay_contracts(target: _PayTarget) -> Any:
    from infergrid.settle.chain import Chain
    from infergrid.verify.pay_epoch import PayContracts

    return PayContracts.connect(
        Chain.connect(target.chain_rpc),
        registry=target.registry,
        escrow=target.escrow,
        rewards=target.rewards,
    )


def _pay_table(result: Any) -> list[str]:
    """The work and shares of one pay run, as `infergrid verifier pay` prints them."""
    from infergrid.protocol.pricing import format_btt

    lines = [
        f"chain     [{result.since}, {result.until}) {_iso_time(result.since)} .."
        f" {_iso_time(result.until)} (block times: fees and votes)",
        f"gateway   [{result.audits_since}, {result.audits_until})"
        f" {_iso_time(result.audits_since)} .. {_iso_time(result.audits_until)} (audits)",
        f"pool      {format_btt(result.pool_wei)} BTT ({result.pool_wei} wei) credited by"
        " the escrow in the window",
        f"{'verifier':<42} {'audits':>6} {'agreed':>6} {'lost':>5} {'score':>6}  share",
    ]
    for work in result.work:
        share = result.shares.get(work.verifier, 0)
        lost = work.votes_against_upheld + work.votes_for_rejected
        lines.append(
            f"{work.verifier:<42} {work.audits:>6} {work.votes_agreeing:>6} {lost:>5}"
            f" {work.score():>6}  {format_btt(share)} BTT"
        )
    if not result.work:
        lines.append("(no verifier audited or voted in the window)")
    return lines


@verifier_app.command("pay")
@friendly_errors
def verifier_pay(
    chain_rpc: ChainRpcOption = None,
    registry: RegistryOption = None,
    escrow: EscrowOption = None,
    rewards: RewardsOption = None,
    gateway_url: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            help="Gateway whose recorded verdicts count as audits (default: the devnet's).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="INFERGRID_API_KEY", help="An API key at --gateway (default: the devnet's)."
        ),
    ] = None,
    since: Annotated[
        int | None,
        typer.Option(
            min=0, help="Window start, unix seconds (default: where the last epoch ended; 0)."
        ),
    ] = None,
    until: Annotated[
        int | None,
        typer.Option(
            min=0, help="Window end, exclusive (default: now, or the chain's latest block)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the work and shares; send nothing.")
    ] = False,
    state_file: PayStateOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Pay the verifiers one epoch from the escrow's verifier pool (run by the pool's holder:
    INFERGRID_PRIVATE_KEY; on a devnet the deployer's dev key).

    Counts each verifier's audits (the verdicts --gateway recorded in the window, GET
    /v1/verifiers) and its votes on disputes resolved in the window (a vote against the
    outcome earns nothing), splits the verifier fees the escrow credited in the window by
    score = audits + 5 x agreeing votes, then claims the escrow's fees, funds the
    RewardDistributor and proposes the epoch's root with the proposer bond. Earlier epochs
    whose challenge window has passed are finalized first. Verifiers then run `infergrid
    verifier claim`.
    """
    from infergrid.verify.pay_epoch import fetch_verifier_audits, finalize_due, pay_epoch

    target = _pay_target(chain_rpc, registry, escrow, rewards, state_file, state_dir)
    key = os.environ.get(PRIVATE_KEY_ENV, "").strip()
    if not key and target.info is not None:
        from infergrid.devnet import DEPLOYER_INDEX
        from infergrid.settle.chain import dev_private_keys

        key = dev_private_keys(DEPLOYER_INDEX + 1)[DEPLOYER_INDEX]  # the devnet's pool
    if not key:
        key = _private_key()  # raises the one-line error
    if gateway_url is None or api_key is None:
        info = target.info or _devnet_info(state_dir)
        gateway_url = gateway_url or info["base_url"]
        api_key = api_key or info["api_key"]
    assert gateway_url is not None and api_key is not None
    net = _pay_contracts(target)
    finalized = [] if dry_run else finalize_due(net, key, target.state_file)
    result = pay_epoch(
        net,
        key,
        target.state_file,
        lambda start, end: fetch_verifier_audits(gateway_url, api_key, since=start, until=end),
        since=since,
        until=until,
        dry_run=dry_run,
    )
    if as_json:
        out.print_json(data={**result.to_json(), "finalized": finalized})
        return
    for epoch in finalized:
        out.print(f"finalized epoch {epoch}", highlight=False)
    for line in _pay_table(result):
        out.print(line, highlight=False, soft_wrap=True)
    if result.epoch is None:
        out.print(result.note, highlight=False)
        return
    window = net.rewards.challenge_window()
    out.print(
        f"proposed epoch {result.epoch} (tx {result.tx}); final after the {window} s challenge"
        f" window, then each verifier runs `infergrid verifier claim`",
        highlight=False,
        soft_wrap=True,
    )


@verifier_app.command("claim")
@friendly_errors
def verifier_claim(
    chain_rpc: ChainRpcOption = None,
    registry: RegistryOption = None,
    escrow: EscrowOption = None,
    rewards: RewardsOption = None,
    verifier_name: Annotated[
        str | None,
        typer.Option(
            "--verifier",
            help="Which devnet verifier (its name in devnet.json, e.g. verifier-1); default:"
            f" the one whose key is in {PRIVATE_KEY_ENV}.",
        ),
    ] = None,
    state_file: PayStateOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Claim a verifier's share of every finalized epoch of verifier pay (finalizing those
    whose challenge window has passed first). The verifier: its key in INFERGRID_PRIVATE_KEY,
    or on a devnet --verifier NAME."""
    from infergrid.protocol.pricing import format_btt
    from infergrid.settle.chain import as_account
    from infergrid.verify.pay_epoch import claim_rewards

    target = _pay_target(chain_rpc, registry, escrow, rewards, state_file, state_dir)
    if verifier_name is not None:
        described = (target.info or _devnet_info(state_dir)).get("verifiers") or []
        found = [entry for entry in described if entry["name"] == verifier_name]
        if not found:
            names = ", ".join(entry["name"] for entry in described) or "none"
            raise CLIError(f"the devnet has no verifier {verifier_name!r} (it has {names})")
        key = found[0]["key"]
    else:
        key = _private_key()
    if not target.state_file.exists():
        raise CLIError(
            f"no verifier pay yet: {target.state_file} does not exist (the pool's holder writes"
            " it with `infergrid verifier pay`)"
        )
    results = claim_rewards(_pay_contracts(target), key, target.state_file)
    if as_json:
        out.print_json(data=[r.to_json() for r in results])
        return
    if not results:
        address = as_account(key).address
        out.print(f"no epoch in {target.state_file} pays {address}", highlight=False)
    for r in results:
        tx = f" (tx {r.tx})" if r.tx else ""
        if r.final_at is not None:
            tx = f" (its challenge window ends at block time {_iso_time(r.final_at)})"
        out.print(
            f"epoch {r.epoch}: {format_btt(r.amount_wei)} BTT to {r.account}: {r.status}{tx}",
            highlight=False,
            soft_wrap=True,
        )


@dataclass(frozen=True)
class _CollectingMiner:
    name: str | None  # its name in devnet.json, if it is a devnet miner
    key: str
    receipt_log: Path


def _collecting_miners(
    miner: str | None, receipt_log: Path | None, state_dir: Path
) -> list[_CollectingMiner]:
    """Whose vouchers to collect: the devnet miner named `miner`; else the operator's key
    (INFERGRID_PRIVATE_KEY); else every miner the devnet describes."""
    from infergrid.compute.node import default_receipt_log_path
    from infergrid.settle.chain import as_account

    key = os.environ.get(PRIVATE_KEY_ENV, "").strip()
    if miner is None and key:
        log = receipt_log or default_receipt_log_path(as_account(key).address, state_dir)
        return [_CollectingMiner(None, key, log)]
    described = _devnet_info(state_dir).get("miners") or []
    if not described:
        raise CLIError(
            f"the devnet at {state_dir} describes no miners: set {PRIVATE_KEY_ENV} to the"
            " miner's key"
        )
    if miner is not None:
        described = [entry for entry in described if entry["name"] == miner]
        if not described:
            names = ", ".join(entry["name"] for entry in _devnet_info(state_dir)["miners"])
            raise CLIError(f"the devnet has no miner {miner!r} (it has {names})")
    if receipt_log is not None and len(described) > 1:
        raise CLIError("--receipt-log names one miner's log: pick the miner with --miner NAME")
    return [
        _CollectingMiner(entry["name"], entry["key"], receipt_log or Path(entry["receipt_log"]))
        for entry in described
    ]


@miner_app.command("collect")
@friendly_errors
def miner_collect(
    chain_rpc: ChainRpcOption = None,
    registry: Annotated[
        str | None, typer.Option(help="NodeRegistry address (default: the devnet's).")
    ] = None,
    escrow: EscrowOption = None,
    gateway_url: Annotated[
        list[str] | None,
        typer.Option(help="Gateway to ask (repeatable; default: every registered gateway)."),
    ] = None,
    receipt_log: Annotated[
        Path | None,
        typer.Option(help="The miner's receipt log, to check vouchers against."),
    ] = None,
    miner: Annotated[
        str | None,
        typer.Option(
            "--miner",
            help="Which devnet miner (its name in devnet.json, e.g. miner-1); default: the"
            f" one whose key is in {PRIVATE_KEY_ENV}, else every devnet miner.",
        ),
    ] = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Ask gateways for a miner's vouchers, check them against its receipt log, and collect
    each on-chain (one transaction per payer and gateway). The miner: its key in
    INFERGRID_PRIVATE_KEY, or on a devnet --miner NAME (default: all of the devnet's)."""
    from infergrid.compute.collector import collect_now
    from infergrid.settle.chain import as_account

    miners = _collecting_miners(miner, receipt_log, state_dir)
    if chain_rpc is None or registry is None or escrow is None:
        info = _devnet_info(state_dir)
        chain_rpc = chain_rpc or info["chain_rpc"]
        registry = registry or info["contracts"]["NodeRegistry"]
        escrow = escrow or info["contracts"]["PaymentEscrow"]
    rows: list[dict[str, Any]] = []
    failed = False
    for one in miners:
        address = as_account(one.key).address
        label = one.name or address
        results = collect_now(
            chain_rpc,
            registry,
            escrow,
            one.key,
            one.receipt_log,
            list(gateway_url) if gateway_url else None,
        )
        failed = failed or any(result.status.startswith("failed") for result in results)
        rows += [
            {"miner": address, "miner_name": one.name, **result.to_json()} for result in results
        ]
        if as_json:
            continue
        prefix = f"{label}: " if len(miners) > 1 or one.name else ""
        if not results:
            out.print(f"{prefix}no gateway has receipts for this miner", highlight=False)
        for result in results:
            out.print(f"{prefix}{result.summary()}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(data=rows)
    if failed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def gateway(
    chain_rpc: Annotated[str, typer.Option(help="EVM JSON-RPC URL.")],
    registry: Annotated[str, typer.Option(help="NodeRegistry contract address.")],
    db: Annotated[Path, typer.Option(help="SQLite file for keys and traces.")] = Path(
        ".infergrid/gateway.db"
    ),
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    discovery_interval: Annotated[
        float, typer.Option(help="Seconds between reads of the on-chain registry.")
    ] = 10.0,
    stake: Annotated[float, typer.Option(help="Stake to register with, in BTT.")] = 10.0,
    escrow: Annotated[
        str | None,
        typer.Option(help="PaymentEscrow address: bill requests, sign receipts and vouchers."),
    ] = None,
    rewards: Annotated[
        str | None,
        typer.Option(help="RewardDistributor address: anchor receipt Merkle roots there."),
    ] = None,
    anchor_interval: Annotated[
        float, typer.Option(help="Seconds between receipt anchors.")
    ] = 300.0,
    first_token_timeout_floor: Annotated[
        float,
        typer.Option(
            help="Seconds a miner may always take to its first token before the request moves"
            " to another miner (the deadline is 3 × the model's observed time to first token,"
            " longer for long prompts, within floor and cap)."
        ),
    ] = 10.0,
    first_token_timeout_cap: Annotated[
        float,
        typer.Option(
            help="Longest wait for a miner's first token (also the wait before the model's"
            " speed has been observed, or when no other miner could take the request)."
        ),
    ] = 60.0,
    stream_stall_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds of silence after the first token that end a stream with an error"
            " (not charged)."
        ),
    ] = 30.0,
    qualification_audits: Annotated[
        int,
        typer.Option(
            help="Passed audits a new miner needs before it gets developers' traffic (until"
            " then it serves only verifiers' canary requests). Ignored while the registry"
            " lists no active verifier: then every miner serves."
        ),
    ] = 3,
    qualification_tokens_per_s: Annotated[
        float,
        typer.Option(help="Completion tokens per second a new miner must also reach to qualify."),
    ] = 1.0,
    audit_timeout: Annotated[
        float,
        typer.Option(help="Seconds a verifier may take to answer one audit job."),
    ] = 30.0,
    request_retention: Annotated[
        int,
        typer.Option(
            help="Most per-request records (for GET /v1/requests/{id} and audits) kept;"
            " the oldest go first."
        ),
    ] = 100_000,
    request_retention_days: Annotated[
        float, typer.Option(help="Days a per-request record is kept.")
    ] = 7.0,
    receipts_wait_for_disk: Annotated[
        bool,
        typer.Option(
            help="Release each metered answer only after its receipt is fsynced. By default"
            " it waits for the commit (safe from the gateway dying, kill -9 included) and the"
            " disk is synced in the background, before any voucher or anchor covers it."
        ),
    ] = False,
    hedge: Annotated[
        bool,
        typer.Option(
            help="Send a stream whose first token is late to a second miner too (within a"
            " budget of about one hedge per ten requests); the first to answer serves it."
        ),
    ] = True,
) -> None:
    """Run a gateway: OpenAI-compatible API in front of the miners in the registry.

    With INFERGRID_PRIVATE_KEY set, the gateway registers itself in the registry too; with
    --escrow it also bills: that key signs receipts and vouchers, and API keys need a payer.
    """
    from infergrid.app.node import GatewaySettings, run_gateway_node

    if not 0 < first_token_timeout_floor <= first_token_timeout_cap:
        raise CLIError(
            f"--first-token-timeout-floor ({first_token_timeout_floor:g} s) must be positive and"
            f" at most --first-token-timeout-cap ({first_token_timeout_cap:g} s)"
        )
    if stream_stall_timeout <= 0:
        raise CLIError(f"--stream-stall-timeout must be positive, not {stream_stall_timeout:g}")
    if qualification_audits < 0 or qualification_tokens_per_s < 0:
        raise CLIError("--qualification-audits and --qualification-tokens-per-s must be >= 0")
    if audit_timeout <= 0:
        raise CLIError(f"--audit-timeout must be positive, not {audit_timeout:g}")
    if request_retention < 1 or request_retention_days <= 0:
        raise CLIError("--request-retention must be >= 1 and --request-retention-days positive")
    settings = GatewaySettings(
        chain_rpc=chain_rpc,
        registry=registry,
        db_path=db,
        host=host,
        port=port,
        discovery_interval_s=discovery_interval,
        private_key=os.environ.get(PRIVATE_KEY_ENV) or None,
        stake_wei=int(stake * 10**18),
        escrow=escrow,
        rewards=rewards,
        anchor_interval_s=anchor_interval,
        first_token_timeout_floor_s=first_token_timeout_floor,
        first_token_timeout_cap_s=first_token_timeout_cap,
        stream_stall_timeout_s=stream_stall_timeout,
        qualification_audits=qualification_audits,
        qualification_tokens_per_s=qualification_tokens_per_s,
        audit_timeout_s=audit_timeout,
        request_retention_max=request_retention,
        request_retention_s=request_retention_days * 86400.0,
        receipts_wait_for_disk=receipts_wait_for_disk,
        hedge_streams=hedge,
    )
    if escrow is not None and settings.private_key is None:
        raise CLIError(f"a billing gateway (--escrow) signs receipts: set {PRIVATE_KEY_ENV}")
    run_gateway_node(settings, err)


# -- keys -------------------------------------------------------------------------------------

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db", help="The gateway's SQLite file (default: the devnet's, under --state-dir)."
    ),
]


def _key_store(db: Path | None, state_dir: Path, *, init: bool = False) -> KeyStore:
    """The key store of an existing gateway database; NoGatewayDatabase (one line) when there
    is none, so that no key is written where no gateway will read it. `init` creates one."""
    from infergrid.app.keys import KeyStore
    from infergrid.devnet import GATEWAY_DB

    return KeyStore(db if db is not None else state_dir / GATEWAY_DB, create=init)


def _unpaid_key_warning(store: KeyStore) -> str:
    """Why a key without a payer may be useless, as far as the database tells."""
    from infergrid.settle.binding import ESCROW

    binding = store.chain_binding()
    if binding is None:
        return (
            "no payer: if the gateway bills (--escrow), this key gets only 402 errors;"
            " create it with --payer 0x…"
        )
    escrow = binding.contract(ESCROW)
    if escrow is None:
        return ""
    return (
        f"no payer: the gateway using {store.db_path} bills through escrow {escrow}, so this"
        " key gets only 402 errors; create it with --payer 0x… (an escrow account)"
    )


@keys_app.command("create")
@friendly_errors
def keys_create(
    name: Annotated[str, typer.Argument(help="A label for the key.")],
    payer: Annotated[
        str | None,
        typer.Option(
            help="Escrow account that pays for this key's requests (0x… address). The binding"
            " is the gateway operator's word: nothing on-chain shows the payer asked for this"
            " key. The gateway can charge the payer only because the payer authorized its"
            " signer in the escrow (`infergrid account authorize`), which the payer can revoke."
        ),
    ] = None,
    db: DbOption = None,
    init: Annotated[
        bool,
        typer.Option(
            "--init",
            help="Create the gateway database if it does not exist (before a gateway's first"
            " start with this --db).",
        ),
    ] = False,
    canary: Annotated[
        bool,
        typer.Option(
            "--canary",
            help="A verifier's canary key: its requests go to miners on probation first, so"
            " their audits qualify them.",
        ),
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: JsonOption = False,
) -> None:
    """Create an API key; the secret is printed once and stored only as a hash.

    A gateway that bills (settlement on) serves only keys bound to a payer account."""
    if payer is not None:
        payer = _checked_address(payer)
    store = _key_store(db, state_dir, init=init)
    warning = "" if payer is not None else _unpaid_key_warning(store)
    key_id, secret = store.create(name, payer=payer, canary=canary)
    if warning:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(
            data={"id": key_id, "name": name, "payer": payer, "canary": canary, "key": secret}
        )
    else:
        billed = f", billed to {payer}" if payer else ""
        billed += ", canary" if canary else ""
        out.print(
            f"created key {key_id} ({name}{billed}); the secret is shown only once:",
            highlight=False,
            soft_wrap=True,
        )
        out.print(secret, highlight=False, markup=False, soft_wrap=True)


KEY_COLUMNS = ("id", "name", "hint", "payer", "created", "revoked")


@keys_app.command("list")
@friendly_errors
def keys_list(
    db: DbOption = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List API keys (never their secrets)."""
    records = _key_store(db, state_dir).list()
    rows = [
        {
            "id": record.key_id,
            "name": record.name,
            "hint": record.hint,
            "payer": record.payer,
            "created": _iso_time(record.created_at),
            "revoked": _iso_time(record.revoked_at) if record.revoked_at else None,
        }
        for record in records
    ]
    if as_json:
        out.print_json(data=rows)
        return
    # Plain aligned columns, never wrapped or cut to the terminal: the id is what
    # `keys revoke` takes, and an address cut short is no address.
    cells = [list(KEY_COLUMNS)] + [[str(row[c] or "-") for c in KEY_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(KEY_COLUMNS))]
    for line in cells:
        text = "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        out.print(text.rstrip(), highlight=False, markup=False, soft_wrap=True)
    if not rows:
        out.print("(no keys yet: `infergrid keys create NAME --payer 0x…`)", highlight=False)


def _iso_time(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds")


@keys_app.command("revoke")
@friendly_errors
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `infergrid keys list`).")],
    db: DbOption = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Revoke an API key; the gateway refuses it within a second or two."""
    if not _key_store(db, state_dir).revoke(key_id):
        raise CLIError(f"no active key with id {key_id!r}")
    out.print(f"revoked key {key_id}", highlight=False)


# -- escrow accounts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _EscrowTarget:
    escrow: PaymentEscrow
    key: str | None  # the account's private key, when the command sends a transaction


def _escrow_target(
    chain_rpc: str | None, escrow: str | None, state_dir: Path, *, need_key: bool
) -> _EscrowTarget:
    """The escrow to talk to and the key to sign with: explicit options and
    INFERGRID_PRIVATE_KEY first, else the running devnet's chain, escrow and developer key."""
    from infergrid.settle.chain import Chain
    from infergrid.settle.escrow import PaymentEscrow

    key = os.environ.get(PRIVATE_KEY_ENV, "").strip() or None
    if chain_rpc is None or escrow is None or (need_key and key is None):
        info = _devnet_info(state_dir)
        chain_rpc = chain_rpc or info["chain_rpc"]
        escrow = escrow or info["contracts"]["PaymentEscrow"]
        key = key or info.get("developer_key")
    if need_key and key is None:
        raise CLIError(f"set {PRIVATE_KEY_ENV} to the account's private key (0x… hex)")
    return _EscrowTarget(PaymentEscrow(Chain.connect(chain_rpc), escrow), key)


def _account_json(escrow: PaymentEscrow, payer: str) -> dict[str, Any]:
    from infergrid.protocol.pricing import format_btt

    account = escrow.account(payer)
    return {
        "account": payer,
        "escrow": escrow.address,
        "balance_wei": str(account.balance_wei),
        "thawing_wei": str(account.thawing_wei),
        "available_wei": str(account.available_wei),
        "thaw_end": account.thaw_end or None,
        "balance_btt": format_btt(account.balance_wei),
        "thawing_btt": format_btt(account.thawing_wei),
        "available_btt": format_btt(account.available_wei),
    }


def _print_account(data: dict[str, Any], as_json: bool, done: str | None = None) -> None:
    if as_json:
        out.print_json(data=data)
        return
    if done:
        out.print(done)
    out.print(
        f"account {data['account']}: {data['balance_btt']} BTT in escrow,"
        f" {data['thawing_btt']} thawing, {data['available_btt']} available",
        highlight=False,
    )
    if data["thaw_end"]:
        out.print(f"thaw matures at {_iso_time(data['thaw_end'])}", highlight=False)


def _checked_address(address: str) -> str:
    from infergrid.settle.registry import check_address

    return check_address(address, "address")


def _sender(target: _EscrowTarget) -> str:
    from infergrid.settle.chain import as_account

    assert target.key is not None
    return as_account(target.key).address


def _report_transaction(
    target: _EscrowTarget, payer: str, receipt: Any, as_json: bool, done: str
) -> None:
    """After a transaction on a payer's account: the account as it now stands, with the tx."""
    data = _account_json(target.escrow, _checked_address(payer))
    data["tx_hash"] = receipt["transactionHash"].to_0x_hex()
    _print_account(data, as_json, f"{done} (tx {data['tx_hash']})")


@account_app.command("deposit")
@friendly_errors
def account_deposit(
    amount: Annotated[str, typer.Argument(help="BTT to deposit, e.g. 10 or 0.5.")],
    for_account: Annotated[
        str | None, typer.Option("--for", help="Credit this payer instead of yourself.")
    ] = None,
    chain_rpc: ChainRpcOption = None,
    escrow: EscrowOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Deposit BTT into the escrow; gateways bill your requests against it."""
    from infergrid.protocol.pricing import btt_to_wei, format_btt

    wei = btt_to_wei(amount)
    if wei == 0:
        raise CLIError("deposit a positive amount")
    target = _escrow_target(chain_rpc, escrow, state_dir, need_key=True)
    assert target.key is not None
    sender = _sender(target)
    held = target.escrow.chain.balance(sender)
    if wei > held:
        raise CLIError(
            f"cannot deposit {amount} BTT: wallet {sender} holds {format_btt(held)} BTT"
            " (and the transaction needs gas too)"
        )
    payer = for_account or sender
    receipt = target.escrow.deposit(target.key, wei, payer=payer)
    _report_transaction(target, payer, receipt, as_json, f"deposited {amount} BTT")


@account_app.command("balance")
@friendly_errors
def account_balance(
    account: Annotated[
        str | None, typer.Argument(help="Payer address (default: your key's account).")
    ] = None,
    chain_rpc: ChainRpcOption = None,
    escrow: EscrowOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Show an escrow account: balance, thawing amount, what gateways can still bill."""
    target = _escrow_target(chain_rpc, escrow, state_dir, need_key=account is None)
    payer = account or _sender(target)
    _print_account(_account_json(target.escrow, _checked_address(payer)), as_json)


@account_app.command("thaw")
@friendly_errors
def account_thaw(
    amount: Annotated[str, typer.Argument(help="BTT to start withdrawing.")],
    chain_rpc: ChainRpcOption = None,
    escrow: EscrowOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Start withdrawing BTT: it can be withdrawn after the thaw period (and is still billable
    until then). Replaces any earlier thaw."""
    from infergrid.protocol.pricing import btt_to_wei

    target = _escrow_target(chain_rpc, escrow, state_dir, need_key=True)
    assert target.key is not None
    receipt = target.escrow.thaw(target.key, btt_to_wei(amount))
    _report_transaction(target, _sender(target), receipt, as_json, f"thawing {amount} BTT")


@account_app.command("withdraw")
@friendly_errors
def account_withdraw(
    chain_rpc: ChainRpcOption = None,
    escrow: EscrowOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Withdraw thawed BTT once the thaw period has passed."""
    target = _escrow_target(chain_rpc, escrow, state_dir, need_key=True)
    assert target.key is not None
    receipt = target.escrow.withdraw(target.key)
    _report_transaction(target, _sender(target), receipt, as_json, "withdrew thawed BTT")


@account_app.command("authorize")
@friendly_errors
def account_authorize(
    signer: Annotated[str, typer.Argument(help="The gateway signer address to authorize.")],
    revoke: Annotated[
        bool, typer.Option("--revoke", help="Revoke instead (effective after the thaw period).")
    ] = False,
    chain_rpc: ChainRpcOption = None,
    escrow: EscrowOption = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Let a gateway's signer bill this account (its vouchers pay miners from your deposit)."""
    target = _escrow_target(chain_rpc, escrow, state_dir, need_key=True)
    assert target.key is not None
    signer = _checked_address(signer)
    if revoke:
        receipt = target.escrow.revoke_signer(target.key, signer)
    else:
        receipt = target.escrow.authorize_signer(target.key, signer)
    payer = _sender(target)
    data = {
        "account": payer,
        "signer": signer,
        "authorized": target.escrow.is_authorized(payer, signer),
        "revoking": revoke,
        "tx_hash": receipt["transactionHash"].to_0x_hex(),
    }
    if as_json:
        out.print_json(data=data)
    elif revoke:
        out.print(f"revoking {signer}: it stops billing after the thaw period", highlight=False)
    else:
        out.print(f"{signer} may now bill account {payer}", highlight=False)


# -- using the network --------------------------------------------------------------------------


@app.command()
@friendly_errors
def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str | None, typer.Option(help="Model name (default: the devnet's).")] = None,
    base_url: Annotated[str | None, typer.Option(help="Gateway URL ending in /v1.")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="INFERGRID_API_KEY", help="API key (default: devnet's).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.0,
    stream: Annotated[bool, typer.Option(help="Print tokens as they arrive.")] = True,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Ask the network one question through its OpenAI-compatible API."""
    from infergrid.chat_client import ask

    if base_url is None or api_key is None:
        info = _devnet_info(state_dir)
        base_url = base_url or info["base_url"]
        api_key = api_key or info["api_key"]
    ask(
        base_url=base_url,
        api_key=api_key,
        prompt=prompt,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        stream=stream,
        out=out,
        err=err,
    )


@app.command()
@friendly_errors
def trace(
    request_id: Annotated[str, typer.Argument(help="The request's id (its x-request-id).")],
    base_url: Annotated[str | None, typer.Option(help="Gateway URL ending in /v1.")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="INFERGRID_API_KEY", help="The API key that made the request."),
    ] = None,
    chain_rpc: ChainRpcOption = None,
    escrow: EscrowOption = None,
    registry: Annotated[
        str | None, typer.Option(help="NodeRegistry address (default: the devnet's).")
    ] = None,
    rewards: Annotated[
        str | None, typer.Option(help="RewardDistributor address (default: the devnet's).")
    ] = None,
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Print a request's receipt and attestation and prove them: signatures, and the receipt's
    Merkle inclusion proof against the root its gateway anchored on-chain."""
    from infergrid.protocol.eip712 import Domain
    from infergrid.protocol.pricing import format_btt
    from infergrid.receipt_proof import check_receipt, fetch_receipt
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry
    from infergrid.settle.rewards import RewardDistributor

    if None in (base_url, api_key, chain_rpc, escrow, registry, rewards):
        info = _devnet_info(state_dir)
        base_url = base_url or info["base_url"]
        api_key = api_key or info["api_key"]
        chain_rpc = chain_rpc or info["chain_rpc"]
        escrow = escrow or info["contracts"]["PaymentEscrow"]
        registry = registry or info["contracts"]["NodeRegistry"]
        rewards = rewards or info["contracts"]["RewardDistributor"]
    assert base_url and api_key and chain_rpc and escrow and registry and rewards
    body = fetch_receipt(base_url, api_key, request_id)
    from infergrid.app.request_status import fetch_request_status, status_lines

    status_error = ""
    try:
        status: dict[str, Any] | None = fetch_request_status(base_url, api_key, request_id)
    except (RuntimeError, ConnectionError) as exc:
        status, status_error = None, str(exc)
    chain = Chain.connect(chain_rpc)
    domain = Domain(chain.chain_id, escrow)
    miner = body["receipt"]["miner"]
    anchored_root = None
    anchor = body.get("anchor")
    if anchor:
        record = RewardDistributor(chain, rewards).get_anchor(
            body["receipt"]["gateway"], anchor["anchor_index"]
        )
        anchored_root = record.root
    receipt, checks = check_receipt(
        body,
        domain,
        miner_signer=Registry(chain, registry).signer_of(miner),
        anchored_root=anchored_root,
    )
    if as_json:
        out.print_json(
            data={**body, "status": status, "checks": [check.to_json() for check in checks]}
        )
    else:
        out.print(f"request   {request_id}", highlight=False)
        out.print(f"payer     {receipt.payer}", highlight=False)
        out.print(f"miner     {receipt.miner}", highlight=False)
        out.print(f"gateway   {receipt.gateway}", highlight=False)
        out.print(
            f"usage     {receipt.tokens_in} in + {receipt.tokens_out} out ="
            f" {format_btt(receipt.value)} BTT ({receipt.value} wei)",
            highlight=False,
        )
        out.print(f"receipt   0x{receipt.struct_hash().hex()}", highlight=False)
        if anchor:
            out.print(f"anchor    #{anchor['anchor_index']} root {anchor['root']}", highlight=False)
            for node in anchor["proof"]:
                out.print(f"  proof   {node}", highlight=False)
        else:
            out.print("anchor    not anchored yet (gateways anchor every epoch)")
        if status is not None:
            for line in status_lines(status):
                out.print(line, highlight=False, markup=False)
        else:
            out.print(f"audit     unknown ({status_error})", highlight=False, markup=False)
        for check in checks:
            mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
            out.print(f"{mark} {check.name}: {check.detail}", highlight=False)
    if not all(check.ok for check in checks):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def status(
    chain_rpc: Annotated[
        str | None, typer.Option(help="EVM JSON-RPC URL (default: devnet's).")
    ] = None,
    registry: Annotated[
        str | None, typer.Option(help="NodeRegistry address (default: devnet's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    models: Annotated[
        bool,
        typer.Option(
            "--models",
            help="Show each model's demand against supply instead (the gateway's GET"
            " /v1/network): requests, shed, slots, utilization, price, emission share.",
        ),
    ] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Show every registered node: role, endpoint, stake (read from the chain), models, health,
    and each miner's state (probation, active, frozen, slashed) and audit record as the
    devnet's gateway sees them; then per model, demand against supply (see --models)."""
    from infergrid.network_status import (
        collect_status,
        gateway_network,
        render_models,
        render_status,
    )

    gateway: tuple[str, str] | None = None
    if chain_rpc is None or registry is None or models:
        info = _devnet_info(state_dir)
        chain_rpc = chain_rpc or info["chain_rpc"]
        registry = registry or info["contracts"]["NodeRegistry"]
        gateway = (info["base_url"], info["api_key"])
    if models:
        assert gateway is not None
        rows = gateway_network(*gateway)
        if rows is None:
            raise CLIError(f"the gateway at {gateway[0]} did not answer GET /v1/network")
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        else:
            render_models(rows, out)
        return
    nodes = collect_status(chain_rpc, registry, gateway)
    if as_json:
        sys.stdout.write(json.dumps(nodes, indent=2) + "\n")
    else:
        render_status(nodes, out)
        if gateway is not None:
            render_models(gateway_network(*gateway), out)


# Commands kept in modules of their own register themselves on `app` when imported.
import infergrid.cli_rewards  # noqa: E402, F401

if __name__ == "__main__":
    # Run the app of the module as imported (infergrid.cli), on which those modules register
    # their commands, not this `python -m` copy's.
    from infergrid.cli import app as imported_app

    imported_app()
