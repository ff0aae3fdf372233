"""The miner node's shell: load the engine, register and stake on-chain, serve requests."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from rich.console import Console

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role


@dataclass(frozen=True)
class MinerSettings:
    chain_rpc: str
    registry: str
    private_key: str
    model: str
    host: str
    port: int
    endpoint: str
    stake_wei: int
    price_in_wei: int
    price_out_wei: int


def run_miner(settings: MinerSettings, console: Console) -> None:
    from infergrid.compute.miner_server import create_miner_app, run_miner_server
    from infergrid.compute.transformers_engine import TransformersEngine
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    owner = Account.from_key(settings.private_key).address
    console.print(f"miner {owner}: loading {settings.model}")
    engine = TransformersEngine.load(settings.model)
    offer = ModelOffer(
        name=engine.name,
        model_id=engine.model_id,
        price_in_wei=settings.price_in_wei,
        price_out_wei=settings.price_out_wei,
    )
    console.print(f"model {offer.name} id {offer.model_id}")

    registry = Registry(Chain.connect(settings.chain_rpc), settings.registry)
    # Idempotent: a restarted miner updates its record and tops up its stake, never re-registers.
    registry.ensure_registered(
        settings.private_key,
        Role.MINER,
        settings.endpoint,
        owner,
        [offer],
        settings.stake_wei,
    )
    node = registry.node(owner)
    stake = node.stake_wei / WEI_PER_BTT if node else 0.0
    console.print(f"registered at {settings.endpoint} with {stake:,.2f} BTT staked")

    app = create_miner_app(engine, node_address=owner)
    run_miner_server(app, settings.host, settings.port)
