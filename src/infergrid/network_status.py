"""`infergrid status`: every registered node, its stake as the chain says, its health, and
(from a gateway's `GET /v1/miners`) each miner's state and audit record; and per model (from
its `GET /v1/network`) demand against supply: requests, shed, slots, utilization, price and
the model's share of the miners' emission, so operators can choose what to serve.

A node's state: `frozen` while a dispute about it is open (the registry says so), `inactive`
once deregistered; for miners the gateway's view otherwise: `probation` (qualifying, or after a
failed audit until its disputes end), `active`, `slashed`. Without a gateway to ask, a miner
that is neither frozen nor inactive shows `registered`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from infergrid.processes import health_ok
from infergrid.protocol.nodes import WEI_PER_BTT, NodeRecord, Role

HEALTH_TIMEOUT_S = 2.0
_HEADERS = ("role", "owner", "endpoint", "stake (BTT)", "models", "health", "state", "audits")


def node_health(node: NodeRecord) -> str:
    if not node.active:
        return "inactive"
    return "ok" if health_ok(node.endpoint.rstrip("/") + "/health") else "down"


def gateway_miners(base_url: str, api_key: str) -> dict[str, dict[str, Any]]:
    """The gateway's view of its miners by address (GET /v1/miners); empty if it cannot say."""
    from infergrid.gateway_client import get_gateway_json

    try:
        data = get_gateway_json(base_url, "/miners", api_key, timeout_s=HEALTH_TIMEOUT_S)
    except (RuntimeError, ConnectionError):
        return {}
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return {}
    return {
        str(entry["address"]).lower(): entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("address"), str)
    }


def node_state(node: NodeRecord, seen: dict[str, Any] | None) -> str:
    if not node.active:
        return "inactive"
    if node.frozen:
        return "frozen"
    if node.role == Role.MINER:
        return str(seen.get("state", "registered")) if seen else "registered"
    return "active"


def audit_record(seen: dict[str, Any] | None) -> str:
    audits = seen.get("audits") if seen else None
    if not isinstance(audits, dict):
        return "-"
    return f"{audits.get('passed', 0)} passed, {audits.get('failed', 0)} failed"


def collect_status(
    chain_rpc: str, registry_address: str, gateway: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every node the registry lists; `gateway` (base URL ending in /v1, API key) adds the
    miners' states and audit records as that gateway sees them."""
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    nodes = Registry(Chain.connect(chain_rpc), registry_address).nodes(active_only=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        health = list(pool.map(node_health, nodes))
    seen = gateway_miners(*gateway) if gateway is not None else {}
    return [
        {
            "owner": node.owner,
            "role": node.role.name.lower(),
            "endpoint": node.endpoint,
            "signer": node.signer,
            "stake_wei": str(node.stake_wei),
            "stake_btt": node.stake_wei / WEI_PER_BTT,
            "unbonding_wei": str(node.unbonding_wei),
            "models": [
                {
                    "name": offer.name,
                    "model_id": offer.model_id,
                    "price_in_wei": str(offer.price_in_wei),
                    "price_out_wei": str(offer.price_out_wei),
                }
                for offer in node.models
            ],
            "active": node.active,
            "frozen": node.frozen,
            "health": state,
            "state": node_state(node, seen.get(node.owner.lower())),
            "audits": (seen.get(node.owner.lower()) or {}).get("audits"),
        }
        for node, state in zip(nodes, health, strict=True)
    ]


def render_status(nodes: list[dict[str, Any]], out: Console) -> None:
    if not nodes:
        out.print("no nodes registered")
        return
    # Fold rather than truncate: an address cut to "0x90F7…" is useless to an operator.
    table = Table(*(Column(header, overflow="fold") for header in _HEADERS))
    colours = {"ok": "green", "down": "red", "inactive": "dim"}
    state_colours = {"active": "green", "probation": "yellow", "frozen": "red", "slashed": "red"}
    for node in nodes:
        state = node["state"]
        table.add_row(
            node["role"],
            node["owner"],
            node["endpoint"],
            f"{node['stake_btt']:,.2f}",
            ", ".join(model["name"] for model in node["models"]) or "-",
            f"[{colours[node['health']]}]{node['health']}[/]",
            f"[{state_colours.get(state, 'dim')}]{state}[/]",
            audit_record({"audits": node["audits"]}) if node["role"] == "miner" else "-",
        )
    out.print(table)


# slots: in use / offered; util: busy slot time / offered; BTT per million tokens, prompt /
# completion (median); share: of the miners' emission.
_MODEL_HEADERS = ("model", "miners", "slots", "requests", "shed", "util", "BTT/M in/out", "share")


def gateway_network(base_url: str, api_key: str) -> list[dict[str, Any]] | None:
    """The gateway's `GET /v1/network` rows; None if it cannot say."""
    from infergrid.gateway_client import get_gateway_json

    try:
        data = get_gateway_json(base_url, "/network", api_key, timeout_s=HEALTH_TIMEOUT_S)
    except (RuntimeError, ConnectionError):
        return None
    rows = data.get("models") if isinstance(data, dict) else None
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else None


def render_models(rows: list[dict[str, Any]] | None, out: Console) -> None:
    """Each model's demand against supply over the gateway's window (the last 300 s)."""
    if rows is None:
        out.print("the gateway did not say how its models are used (GET /v1/network)")
        return
    if not rows:
        out.print("no model is served")
        return
    table = Table(*(Column(header, overflow="fold") for header in _MODEL_HEADERS))
    for row in rows:
        price = row.get("price_wei") or {}
        share = row.get("reward_share_ppm")
        standby = int(row.get("standby", 0))
        table.add_row(
            str(row.get("model")),
            f"{row.get('healthy', 0)}/{row.get('miners', 0)} up"
            + (f", {standby} standby" if standby else ""),
            f"{row.get('in_flight', 0)}/{row.get('capacity', 0)}",
            str(row.get("requests", 0)),
            str(row.get("shed", 0)),
            f"{float(row.get('utilization', 0.0)):.1%}",
            f"{_per_million(price.get('prompt'))}/{_per_million(price.get('completion'))}",
            "-" if share is None else f"{int(share) / 10_000:.1f}%",
        )
    out.print(table)


def _per_million(wei_per_token: object) -> str:
    """A per-token price in wei as BTT per million tokens (how operators compare prices)."""
    if not isinstance(wei_per_token, int):
        return "-"
    return f"{wei_per_token * 1_000_000 / WEI_PER_BTT:g}"
