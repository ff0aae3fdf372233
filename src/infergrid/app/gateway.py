"""The gateway: an OpenAI-compatible HTTP API in front of the network's miners.

Per request, on the hot path: a hash and a dict lookup for the API key, one JSON decode and the
protocol's pydantic validation, a routing decision in memory, one upstream call on a pooled
keep-alive connection, and stripping the `infergrid` extension from what comes back. Traces go to
an in-memory queue that a background task writes to SQLite; nothing on the path touches disk.

Failover: the gateway holds a response back until the miner has produced its first token, so a
miner that fails before that (refused connection, 5xx, a stream that dies early) is replaced by
another without the client noticing. After the first token the client has seen output; the
stream then ends with an OpenAI-shaped error event.

Settlement (when the gateway is given a `Settlement`; without one it serves unmetered): the key's
payer must have headroom for the most the request can cost at the chosen miner's prices
(protocol.pricing.max_request_value of the forwarded body and its completion limit; 402
otherwise), the miner's signed attestation must vouch for exactly what was relayed and bill
within the request's limits, and the receipt is stored durably before the response finishes
(non-streamed: before the body goes out; streamed: the finish chunk, usage and [DONE] wait for
it). A request that sets no completion limit is forwarded with the gateway's default as its
max_tokens, the limit it reserved for. Usage then tells the cost. A response whose attestation
does not check out is the miner's failure: failed over when nothing reached the client yet,
otherwise the stream ends with an error event and nothing is charged.

Layout: this module is the router (the app factory, the server, the small GET endpoints); the
completion endpoints are app.serving, forwarding with failover app.forwarding, the stream relay
app.stream_relay, and charging (reserve, verify, commit, release) app.metering, which the plain
path and the relay both call. app.calls, app.failures and app.api_common hold what they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from infergrid.app.api_common import (
    authenticate,
    error_response,
    json_response,
    model_not_found,
    new_request_id,
    request_id,
)
from infergrid.app.audits import AuditService
from infergrid.app.config import GatewayConfig
from infergrid.app.dispute_watch import DisputeWatch
from infergrid.app.forwarding import Forwarder
from infergrid.app.keys import KeyStore
from infergrid.app.lookups import Lookups
from infergrid.app.metering import Metering
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.miners import MinerPool, PoolMaintainer
from infergrid.app.openapi import OPENAPI_PATH, document_bytes
from infergrid.app.request_status import RequestLog, requests_db_path
from infergrid.app.serving import CompletionServing
from infergrid.app.settlement import Settlement
from infergrid.app.stream_relay import StreamRelay
from infergrid.app.traces import TraceStore
from infergrid.protocol.nodes import NodeRecord
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.wire import REQUEST_ID_HEADER
from infergrid.settle.disputes import DisputeManager

__all__ = [
    "Gateway",
    "GatewayConfig",
    "build_server",
    "create_gateway_app",
    "error_response",
    "new_request_id",
    "run_gateway",
]

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
OWNED_BY = "infergrid"


class Gateway:
    """The gateway's state and its routes' handlers; `create_gateway_app` wires it into
    Starlette. The completion endpoints are served by `serving` (app.serving), which forwards
    through `forwarder` (app.forwarding); metered, both charge through `metering`."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        discover: Callable[[], list[NodeRecord]],
        keys: KeyStore,
        traces: TraceStore,
        pool: MinerPool | None = None,
        settlement: Settlement | None = None,
        disputes: DisputeManager | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.traces = traces
        self.settlement = settlement
        self.pool = pool or MinerPool()
        # Metered: every request's record, its audit, and the miners' standing (app.audits).
        self.requests: RequestLog | None = None
        self.audits: AuditService | None = None
        self.dispute_watch: DisputeWatch | None = None
        if settlement is not None:
            self.requests = RequestLog(
                requests_db_path(config.db_path),
                max_records=config.request_retention_max,
                retention_s=config.request_retention_s,
            )
            self.audits = AuditService(config, requests=self.requests, settlement=settlement)
            if disputes is not None:
                self.dispute_watch = DisputeWatch(
                    disputes,
                    gateway=settlement.gateway,
                    audits=self.audits,
                    requests=self.requests,
                    interval_s=config.discovery_interval_s,
                )
        self.maintainer = PoolMaintainer(
            self.pool,
            self._discover_with(discover),
            discovery_interval_s=config.discovery_interval_s,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
        )
        self.metrics = GatewayMetrics(self.pool)
        self.metering = Metering(settlement, self.metrics) if settlement is not None else None
        self.metrics.watch_writer("traces", lambda: traces.rejected)
        if settlement is not None:
            self.metrics.watch_writer("receipts", lambda: settlement.store.rejected)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        self._openapi = document_bytes(max_body_bytes=config.max_body_bytes)
        self.forwarder = Forwarder(
            config,
            pool=self.pool,
            maintainer=self.maintainer,
            metrics=self.metrics,
            traces=traces,
            settlement=settlement,
            metering=self.metering,
        )
        self.forwarder.audits = self.audits
        self.deadlines = self.forwarder.deadlines
        self.lookups = Lookups(
            keys=keys,
            traces=traces,
            pool=self.pool,
            settlement=settlement,
            requests=self.requests,
            audits=self.audits,
        )
        self.serving = CompletionServing(
            config,
            keys=keys,
            traces=traces,
            metrics=self.metrics,
            settlement=settlement,
            forwarder=self.forwarder,
        )

    def _discover_with(
        self, discover: Callable[[], list[NodeRecord]]
    ) -> Callable[[], list[NodeRecord]]:
        """Discovery that also tells the audits about the verifiers and miners it read, and
        turns qualification routing on while some verifier is active."""
        audits = self.audits
        if audits is None:
            return discover

        def read() -> list[NodeRecord]:
            records = discover()
            audits.observe_nodes(records)
            self.pool.route_filter = audits.route if audits.qualifying else None
            return records

        return read

    def _feed_audit_records(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the scheduler every miner's audit record now and at each change. Discovery's
        thread may change one (a new miner): the pool is only touched on the loop."""
        audits, pool = self.audits, self.pool
        assert audits is not None
        for owner, record in audits.miners.items():
            pool.set_audit_record(owner, passed=record.passed, failed=record.failed)

        def changed(owner: str, passed: int, failed: int) -> None:
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                pool.set_audit_record(owner, passed=passed, failed=failed)
            else:
                loop.call_soon_threadsafe(
                    functools.partial(pool.set_audit_record, owner, passed=passed, failed=failed)
                )

        audits.on_record = changed

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The pooled upstream session, during the lifespan only."""
        return self.forwarder.session

    # -- lifecycle ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.forwarder.session = session
        if self.audits is not None:
            self.audits.session = session
            self._feed_audit_records(asyncio.get_running_loop())
        settlement = self.settlement
        if settlement is not None:
            # Receipts from before a restart count against headroom from the first request.
            await settlement.start()
        # Know the miners and their health before taking the first request, but do not let a
        # hung registry read keep the gateway from starting: the loop below retries.
        try:
            await asyncio.wait_for(
                self.maintainer.refresh(session), self.config.startup_discovery_timeout_s
            )
        except TimeoutError:
            log.warning("the first registry read is taking long; serving without miners for now")
        tasks = [
            asyncio.create_task(self.maintainer.run(session), name="miner-pool"),
            asyncio.create_task(self.traces.run_flusher(), name="trace-flusher"),
        ]
        if settlement is not None:
            tasks.append(asyncio.create_task(settlement.run(), name="settlement"))
        if self.dispute_watch is not None:
            tasks.append(asyncio.create_task(self.dispute_watch.run(), name="dispute-watch"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.audits is not None:
                await self.audits.close()
            if self.requests is not None:
                await asyncio.to_thread(self.requests.close)
            await session.close()
            self.forwarder.session = None

    # -- small endpoints ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        miners = self.pool.miners()
        healthy = sum(1 for m in miners if m.healthy)
        body = {
            "status": "ok",
            "miners": {"registered": len(miners), "healthy": healthy},
            "models": [name for name, _ in self.pool.models()],
            "discovery_error": self.maintainer.discovery_error,
        }
        audits = self.audits
        if audits is not None:
            body["audits"] = {
                "verifiers": len(audits.verifiers),
                "qualifying": audits.qualifying,
                "pending": sum(m.pending for m in audits.miners.values()),
            }
        settlement = self.settlement
        if settlement is not None:
            anchorer = settlement.anchorer
            body["settlement"] = {
                "gateway": settlement.gateway,
                "escrow": settlement.domain.verifying_contract,
                "chain_id": settlement.domain.chain_id,
                "escrow_error": settlement.escrow_error,
                "anchoring": anchorer is not None,
                "anchor_failures": anchorer.failures if anchorer is not None else 0,
            }
        return json_response(body, request_id(request.scope))

    async def openapi(self, request: Request) -> Response:
        return Response(
            self._openapi,
            headers={REQUEST_ID_HEADER: request_id(request.scope)},
            media_type="application/json",
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(
            self.metrics.render(),
            headers={REQUEST_ID_HEADER: request_id(request.scope)},
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    async def list_models(self, request: Request) -> Response:
        rid = request_id(request.scope)
        try:
            authenticate(self.keys, request)
        except APIError as exc:
            return error_response(exc, rid)
        data = [self._model_object(name, seen) for name, seen in self.pool.models()]
        return json_response({"object": "list", "data": data}, rid)

    async def get_model(self, request: Request) -> Response:
        rid = request_id(request.scope)
        name = request.path_params["model"]
        try:
            authenticate(self.keys, request)
            for model, seen in self.pool.models():
                if model == name:
                    return json_response(self._model_object(model, seen), rid)
            raise model_not_found(name)
        except APIError as exc:
            return error_response(exc, rid)

    @staticmethod
    def _model_object(name: str, first_seen: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": first_seen, "owned_by": OWNED_BY}

    # -- errors Starlette raises itself (unknown path, wrong method) and bugs ----------------

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        if status == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            code = "method_not_allowed"
        elif status == 404:
            message = f"Unknown path {request.url.path}."
            code = "not_found"
        else:
            message, code = str(exc.detail), None
        api = APIError(status, message, code=code)
        return error_response(api, request_id(request.scope), dict(exc.headers or {}))

    async def server_error(self, request: Request, exc: Exception) -> Response:
        api = APIError(500, "The gateway failed to handle the request.", type="server_error")
        return error_response(api, request_id(request.scope))

    # -- completions -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response | StreamRelay:
        return await self.serving.chat_completions(request)

    async def completions(self, request: Request) -> Response | StreamRelay:
        return await self.serving.completions(request)


def create_gateway_app(
    config: GatewayConfig,
    *,
    discover: Callable[[], list[NodeRecord]],
    keys: KeyStore,
    traces: TraceStore,
    pool: MinerPool | None = None,
    settlement: Settlement | None = None,
    disputes: DisputeManager | None = None,
) -> Starlette:
    """The gateway as an ASGI app; background work starts and stops with its lifespan.

    Without `settlement` it serves unmetered; with one, every request is charged to its key's
    payer (the caller still owns the settlement's receipt store and closes it), recorded and
    audited (app.audits), and with `disputes` (the registry's slasher) the disputes about its
    requests are watched."""
    gateway = Gateway(
        config,
        discover=discover,
        keys=keys,
        traces=traces,
        pool=pool,
        settlement=settlement,
        disputes=disputes,
    )
    routes = [
        Route(CHAT_PATH, gateway.chat_completions, methods=["POST"]),
        Route(COMPLETIONS_PATH, gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.get_model, methods=["GET"]),
        Route("/v1/vouchers", gateway.lookups.vouchers, methods=["GET"]),
        Route("/v1/receipts/{request_id}", gateway.lookups.receipt, methods=["GET"]),
        Route("/v1/requests/{request_id}", gateway.lookups.request_status, methods=["GET"]),
        Route("/v1/miners", gateway.lookups.list_miners, methods=["GET"]),
        Route("/v1/miners/epoch", gateway.lookups.miner_epoch, methods=["GET"]),
        Route("/v1/verifiers", gateway.lookups.list_verifiers, methods=["GET"]),
        Route("/v1/network", gateway.lookups.network, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
        Route(OPENAPI_PATH, gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=gateway.lifespan,
        exception_handlers={HTTPException: gateway.http_error, Exception: gateway.server_error},
    )
    app.state.gateway = gateway
    return app


def build_server(
    config: GatewayConfig,
    discover: Callable[[], list[NodeRecord]],
    *,
    keys: KeyStore | None = None,
    traces: TraceStore | None = None,
    settlement: Settlement | None = None,
    disputes: DisputeManager | None = None,
) -> uvicorn.Server:
    """A uvicorn server for the gateway (uvloop + httptools); `await server.serve()` runs it."""
    keys = keys or KeyStore(config.db_path, refresh_s=config.key_refresh_s)
    traces = traces or TraceStore(config.db_path, flush_interval_s=config.trace_flush_s)
    app = create_gateway_app(
        config,
        discover=discover,
        keys=keys,
        traces=traces,
        settlement=settlement,
        disputes=disputes,
    )
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=config.log_level,
        server_header=False,
        # Streams still running at shutdown get this long to finish, then are cut.
        timeout_graceful_shutdown=config.shutdown_grace_s,
    )
    return uvicorn.Server(uv_config)


def run_gateway(
    config: GatewayConfig,
    discover: Callable[[], list[NodeRecord]],
    settlement: Settlement | None = None,
    disputes: DisputeManager | None = None,
) -> None:
    """Serve the gateway until interrupted (blocking); traces still queued are written, and
    the receipt store (metered) is closed after its last commit."""
    keys = KeyStore(config.db_path, refresh_s=config.key_refresh_s)
    traces = TraceStore(config.db_path, flush_interval_s=config.trace_flush_s)
    try:
        build_server(
            config, discover, keys=keys, traces=traces, settlement=settlement, disputes=disputes
        ).run()
    finally:
        if settlement is not None:
            settlement.close()
        traces.close()
        keys.close()
