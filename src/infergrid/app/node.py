"""The gateway node's shell: optionally register on-chain, then serve the API from the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from rich.console import Console

from infergrid.protocol.nodes import NodeRecord, Role


@dataclass(frozen=True)
class GatewaySettings:
    chain_rpc: str
    registry: str
    db_path: Path
    host: str
    port: int
    discovery_interval_s: float
    private_key: str | None
    stake_wei: int


def run_gateway_node(settings: GatewaySettings, console: Console) -> None:
    from infergrid.app.gateway import GatewayConfig, run_gateway
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    registry = Registry(Chain.connect(settings.chain_rpc), settings.registry)
    if settings.private_key:
        owner = Account.from_key(settings.private_key).address
        registry.ensure_registered(
            settings.private_key,
            Role.GATEWAY,
            f"http://{settings.host}:{settings.port}",
            owner,
            [],
            settings.stake_wei,
        )
        console.print(f"gateway {owner} registered")

    def discover() -> list[NodeRecord]:
        return registry.nodes(active_only=True)

    config = GatewayConfig(
        db_path=settings.db_path,
        host=settings.host,
        port=settings.port,
        discovery_interval_s=settings.discovery_interval_s,
    )
    run_gateway(config, discover)
