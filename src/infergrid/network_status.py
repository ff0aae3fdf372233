"""`infergrid status`: every registered node, its stake as the chain says, and its health."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.console import Console
from rich.table import Column, Table

from infergrid.processes import health_ok
from infergrid.protocol.nodes import WEI_PER_BTT, NodeRecord

HEALTH_TIMEOUT_S = 2.0


def node_health(node: NodeRecord) -> str:
    if not node.active:
        return "inactive"
    return "ok" if health_ok(node.endpoint.rstrip("/") + "/health") else "down"


def collect_status(chain_rpc: str, registry_address: str) -> list[dict[str, Any]]:
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    nodes = Registry(Chain.connect(chain_rpc), registry_address).nodes(active_only=False)
    with ThreadPoolExecutor(max_workers=8) as pool:
        health = list(pool.map(node_health, nodes))
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
            "health": state,
        }
        for node, state in zip(nodes, health, strict=True)
    ]


def render_status(nodes: list[dict[str, Any]], out: Console) -> None:
    if not nodes:
        out.print("no nodes registered")
        return
    # Fold rather than truncate: an address cut to "0x90F7…" is useless to an operator.
    table = Table(
        *(
            Column(header, overflow="fold")
            for header in ("role", "owner", "endpoint", "stake (BTT)", "models", "health")
        )
    )
    colours = {"ok": "green", "down": "red", "inactive": "dim"}
    for node in nodes:
        table.add_row(
            node["role"],
            node["owner"],
            node["endpoint"],
            f"{node['stake_btt']:,.2f}",
            ", ".join(model["name"] for model in node["models"]) or "-",
            f"[{colours[node['health']]}]{node['health']}[/]",
        )
    out.print(table)
