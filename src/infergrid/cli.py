"""The `infergrid` command: every role of the network, and tools to use it."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="InferGrid: a decentralized AI inference network with on-chain settlement.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Manage the gateway's API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])

StateDir = Annotated[
    Path, typer.Option("--state-dir", help="Where `infergrid up` keeps its state and logs.")
]
DEFAULT_STATE_DIR = Path(".infergrid")
PRIVATE_KEY_ENV = "INFERGRID_PRIVATE_KEY"


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit code 1."""


def friendly_errors(func: F) -> F:
    """Turn expected failures into one readable line and a non-zero exit, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (CLIError, FileNotFoundError, ValueError, ConnectionError, RuntimeError) as exc:
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


@app.command()
@friendly_errors
def miner(
    chain_rpc: Annotated[str, typer.Option(help="EVM JSON-RPC URL.")],
    registry: Annotated[str, typer.Option(help="NodeRegistry contract address.")],
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
) -> None:
    """Run a miner: load the model, register and stake on-chain (idempotent), serve requests.

    The node's private key is read from the INFERGRID_PRIVATE_KEY environment variable.
    """
    from infergrid.compute.node import MinerSettings, run_miner

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
    )
    run_miner(settings, err)


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
) -> None:
    """Run a gateway: OpenAI-compatible API in front of the miners in the registry.

    With INFERGRID_PRIVATE_KEY set, the gateway registers itself in the registry too.
    """
    from infergrid.app.node import GatewaySettings, run_gateway_node

    settings = GatewaySettings(
        chain_rpc=chain_rpc,
        registry=registry,
        db_path=db,
        host=host,
        port=port,
        discovery_interval_s=discovery_interval,
        private_key=os.environ.get(PRIVATE_KEY_ENV) or None,
        stake_wei=int(stake * 10**18),
    )
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
    db: DbOption = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create an API key; the secret is printed once and stored only as a hash."""
    from infergrid.app.keys import KeyStore

    key_id, secret = KeyStore(_key_db(db, state_dir)).create(name)
    if as_json:
        out.print_json(data={"id": key_id, "name": name, "key": secret})
    else:
        out.print(f"created key {key_id} ({name}); the secret is shown only once:")
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
            "created": _iso_time(record.created_at),
            "revoked": _iso_time(record.revoked_at) if record.revoked_at else None,
        }
        for record in records
    ]
    if as_json:
        out.print_json(data=rows)
        return
    table = Table(*rows[0].keys()) if rows else Table("id", "name", "hint", "created", "revoked")
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
