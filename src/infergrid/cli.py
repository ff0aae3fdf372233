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
from rich.table import Table

if TYPE_CHECKING:
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
    return chain is not None and isinstance(exc, chain.ChainError)


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
    model: Annotated[
        str, typer.Option(help="Model every miner serves: smollm2, tiny, or a model path.")
    ] = "smollm2",
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
    """Start a local network: chain, contracts, miners and a gateway. Ctrl-C stops it."""
    from infergrid.devnet import DevnetOptions, run_devnet

    options = DevnetOptions(
        miners=miners,
        model=model,
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
) -> None:
    """Serve an embedded EVM (py-evm) over JSON-RPC, funded dev accounts included."""
    from infergrid.settle.rpc_server import serve_embedded_chain

    serve_embedded_chain(host, port, ready_callback=lambda url: err.print(f"chain at {url}"))


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
    engine: Annotated[str, typer.Option(help="Inference engine.")] = "transformers",
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
) -> None:
    """Run a miner: load the model, register and stake on-chain (idempotent), serve requests;
    with --escrow, attest every response and collect vouchers on a schedule.

    The node's private key is read from the INFERGRID_PRIVATE_KEY environment variable.
    """
    if ctx.invoked_subcommand is not None:
        return
    from infergrid.compute.node import MinerSettings, run_miner

    if chain_rpc is None or registry is None:
        raise CLIError("a miner needs --chain-rpc and --registry")
    if engine != "transformers":
        raise CLIError(f"unknown engine {engine!r} (available: transformers)")
    settings = MinerSettings(
        chain_rpc=chain_rpc,
        registry=registry,
        private_key=_private_key(),
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
    )
    run_miner(settings, err)


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
    as_json: JsonOption = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Ask gateways for this miner's vouchers, check them against its receipt log, and
    collect each on-chain (one transaction per payer and gateway). Key: INFERGRID_PRIVATE_KEY."""
    from infergrid.compute.collector import collect_now
    from infergrid.compute.node import default_receipt_log_path
    from infergrid.settle.chain import as_account

    key = _private_key()
    if chain_rpc is None or registry is None or escrow is None:
        info = _devnet_info(state_dir)
        chain_rpc = chain_rpc or info["chain_rpc"]
        registry = registry or info["contracts"]["NodeRegistry"]
        escrow = escrow or info["contracts"]["PaymentEscrow"]
    owner = as_account(key).address
    results = collect_now(
        chain_rpc,
        registry,
        escrow,
        key,
        receipt_log or default_receipt_log_path(owner, state_dir),
        list(gateway_url) if gateway_url else None,
    )
    if as_json:
        out.print_json(data=[result.to_json() for result in results])
    else:
        if not results:
            out.print("no gateway has receipts for this miner")
        for result in results:
            out.print(result.summary(), highlight=False)
    if any(result.status.startswith("failed") for result in results):
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
    )
    if escrow is not None and settings.private_key is None:
        raise CLIError(f"a billing gateway (--escrow) signs receipts: set {PRIVATE_KEY_ENV}")
    run_gateway_node(settings, err)


# -- keys -------------------------------------------------------------------------------------

DbOption = Annotated[
    Path | None,
    typer.Option("--db", help="Gateway SQLite file (default: the running devnet's)."),
]


def _key_db(db: Path | None, state_dir: Path) -> Path:
    if db is not None:
        return db
    from infergrid.devnet import GATEWAY_DB

    return state_dir / GATEWAY_DB


@keys_app.command("create")
@friendly_errors
def keys_create(
    name: Annotated[str, typer.Argument(help="A label for the key.")],
    payer: Annotated[
        str | None,
        typer.Option(help="Escrow account that pays for this key's requests (0x… address)."),
    ] = None,
    db: DbOption = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: JsonOption = False,
) -> None:
    """Create an API key; the secret is printed once and stored only as a hash.

    A gateway that bills (settlement on) serves only keys bound to a payer account."""
    from infergrid.app.keys import KeyStore

    if payer is not None:
        payer = _checked_address(payer)
    key_id, secret = KeyStore(_key_db(db, state_dir)).create(name, payer=payer)
    if as_json:
        out.print_json(data={"id": key_id, "name": name, "payer": payer, "key": secret})
    else:
        billed = f", billed to {payer}" if payer else ""
        out.print(f"created key {key_id} ({name}{billed}); the secret is shown only once:")
        out.print(secret, highlight=False)


@keys_app.command("list")
@friendly_errors
def keys_list(
    db: DbOption = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List API keys (never their secrets)."""
    from infergrid.app.keys import KeyStore

    records = KeyStore(_key_db(db, state_dir)).list()
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
    table = (
        Table(*rows[0].keys())
        if rows
        else Table("id", "name", "hint", "payer", "created", "revoked")
    )
    for row in rows:
        table.add_row(*(str(value or "") for value in row.values()))
    out.print(table)


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
    from infergrid.app.keys import KeyStore

    if not KeyStore(_key_db(db, state_dir)).revoke(key_id):
        raise CLIError(f"no active key with id {key_id!r}")
    out.print(f"revoked key {key_id}")


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
    from infergrid.protocol.pricing import btt_to_wei

    wei = btt_to_wei(amount)
    if wei == 0:
        raise CLIError("deposit a positive amount")
    target = _escrow_target(chain_rpc, escrow, state_dir, need_key=True)
    assert target.key is not None
    payer = for_account or _sender(target)
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
        out.print_json(data={**body, "checks": [check.to_json() for check in checks]})
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
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Show every registered node: role, endpoint, stake (read from the chain), models, health."""
    from infergrid.network_status import collect_status, render_status

    if chain_rpc is None or registry is None:
        info = _devnet_info(state_dir)
        chain_rpc = chain_rpc or info["chain_rpc"]
        registry = registry or info["contracts"]["NodeRegistry"]
    nodes = collect_status(chain_rpc, registry)
    if as_json:
        sys.stdout.write(json.dumps(nodes, indent=2) + "\n")
    else:
        render_status(nodes, out)


if __name__ == "__main__":
    app()
