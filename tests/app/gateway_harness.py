"""Scripted miners and a gateway served on free loopback ports, for the HTTP tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
from scripted_miner import ScriptedMiner, address, serve

from infergrid.app.config import GatewayConfig
from infergrid.app.gateway import Gateway, create_gateway_app
from infergrid.app.keys import KeyStore
from infergrid.app.settlement import Settlement
from infergrid.app.traces import TraceStore
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.settle.disputes import DisputeManager

MODEL = "tiny-test"


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    miners: list[ScriptedMiner]
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, key: str) -> openai.AsyncOpenAI:
        """An official OpenAI client for this gateway, closed when the gateway stops."""
        oa = openai.AsyncOpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=10)
        self.clients.append(oa)
        return oa


@contextlib.asynccontextmanager
async def running_gateway(
    miners: list[ScriptedMiner],
    keys: KeyStore,
    traces: TraceStore,
    *,
    settlement: Settlement | None = None,
    discover: Callable[[], list[NodeRecord]] | None = None,
    disputes: DisputeManager | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningGateway]:
    """A gateway routing to `miners` (which must already be running), found through
    `discover` (default: the miners' own records); metered when given a settlement, and
    watching `disputes` (a DisputeManager) when given one."""
    settings: dict[str, Any] = {
        "discovery_interval_s": 0.5,
        "health_interval_s": 0.5,
        "health_timeout_s": 0.5,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 5.0,
    }
    settings.update(overrides)
    config = GatewayConfig(**settings)
    app = create_gateway_app(
        config,
        discover=discover or (lambda: [m.record() for m in miners]),
        keys=keys,
        traces=traces,
        settlement=settlement,
        disputes=disputes,
    )
    async with serve(app) as url:
        running = RunningGateway(url, app.state.gateway, miners)
        try:
            yield running
        finally:
            for oa in running.clients:
                await oa.close()


@contextlib.asynccontextmanager
async def miners_running(count: int, **kwargs: Any) -> AsyncIterator[list[ScriptedMiner]]:
    async with contextlib.AsyncExitStack() as stack:
        miners = [
            await stack.enter_async_context(ScriptedMiner(address(i + 1), **kwargs).running())
            for i in range(count)
        ]
        yield miners


@dataclass
class RealMiner:
    """A real miner server (compute.miner_server over `engine`) as the harness needs it: an
    owner, a base URL and a registry record to discover (prices 1 and 2 wei per token)."""

    owner: str
    base_url: str
    engine: Any

    def record(self) -> NodeRecord:
        offer = ModelOffer(self.engine.name, self.engine.model_id, 1, 2)
        return NodeRecord(self.owner, Role.MINER, self.base_url, self.owner, (offer,))
