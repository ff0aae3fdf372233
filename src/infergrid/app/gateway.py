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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import uvicorn
from eth_utils import is_address, to_checksum_address
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope

from infergrid.app import relay
from infergrid.app.billing import InsufficientHeadroom
from infergrid.app.calls import Call
from infergrid.app.config import GatewayConfig
from infergrid.app.deadlines import DeadlineRule, FirstTokenWatch
from infergrid.app.failures import RECEIPT_FAILED, UPSTREAM_ERRORS, _MinerFailed, _ReceiptFailed
from infergrid.app.keys import KeyRecord, KeyStore, mask_secret
from infergrid.app.metering import Metering
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.miners import (
    MinerPool,
    MinerState,
    ModelNotServed,
    NoHealthyMiner,
    PoolMaintainer,
)
from infergrid.app.openapi import OPENAPI_PATH, document_bytes
from infergrid.app.settlement import (
    AttestationRejected,
    Settlement,
    Verified,
    insufficient_error,
    no_payer_error,
)
from infergrid.app.stream_relay import StreamRelay, wait_for_disconnect
from infergrid.app.traces import Trace, TraceStore
from infergrid.protocol import json_body
from infergrid.protocol.nodes import NodeRecord
from infergrid.protocol.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS
from infergrid.protocol.wire import (
    ATTESTATION_KEY,
    EXTENSION_KEY,
    GATEWAY_HEADER,
    MINER_HEADER,
    PAYER_HEADER,
    REQUEST_ID_HEADER,
)

__all__ = [
    "Gateway",
    "GatewayConfig",
    "build_server",
    "create_gateway_app",
    "run_gateway",
]

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
OWNED_BY = "infergrid"
MAX_ANSWER_BYTES = 256 * 1024 * 1024  # a non-streamed answer, extension included
MAX_ERROR_BYTES = 1024 * 1024
_RID_SCOPE_KEY = "infergrid.request_id"

_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header"
    " using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def new_request_id() -> str:
    return os.urandom(12).hex()


def _request_id(scope: Scope) -> str:
    rid = scope.get(_RID_SCOPE_KEY)
    if rid is None:
        rid = scope[_RID_SCOPE_KEY] = new_request_id()
    return rid


def error_response(
    exc: APIError, request_id: str, headers: dict[str, str] | None = None
) -> Response:
    all_headers = {REQUEST_ID_HEADER: request_id, **exc.headers}
    if headers:
        all_headers.update(headers)
    return Response(
        relay.encode(exc.body()), exc.status, headers=all_headers, media_type="application/json"
    )


class Gateway:
    """The gateway's state and handlers; `create_gateway_app` wires it into Starlette."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        discover: Callable[[], list[NodeRecord]],
        keys: KeyStore,
        traces: TraceStore,
        pool: MinerPool | None = None,
        settlement: Settlement | None = None,
    ) -> None:
        self.config = config
        self.keys = keys
        self.traces = traces
        self.settlement = settlement
        self.pool = pool or MinerPool()
        self.maintainer = PoolMaintainer(
            self.pool,
            discover,
            discovery_interval_s=config.discovery_interval_s,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
        )
        self.metrics = GatewayMetrics(self.pool)
        self.metering = Metering(settlement, self.metrics) if settlement is not None else None
        self.metrics.watch_writer("traces", lambda: traces.rejected)
        if settlement is not None:
            self.metrics.watch_writer("receipts", lambda: settlement.store.rejected)
        self.session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        self._seeds = random.SystemRandom()
        self._openapi = document_bytes(max_body_bytes=config.max_body_bytes)
        self.deadlines = DeadlineRule(
            floor_s=config.first_token_timeout_floor_s,
            cap_s=config.first_token_timeout_cap_s,
            factor=config.first_token_timeout_factor,
            answer_cap_s=config.read_timeout_s,
        )

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
        self.session = session
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
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()
            self.session = None

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
        return self._json(body, _request_id(request.scope))

    async def openapi(self, request: Request) -> Response:
        return Response(
            self._openapi,
            headers={REQUEST_ID_HEADER: _request_id(request.scope)},
            media_type="application/json",
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(
            self.metrics.render(),
            headers={REQUEST_ID_HEADER: _request_id(request.scope)},
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    async def list_models(self, request: Request) -> Response:
        rid = _request_id(request.scope)
        try:
            self._authenticate(request)
        except APIError as exc:
            return error_response(exc, rid)
        data = [self._model_object(name, seen) for name, seen in self.pool.models()]
        return self._json({"object": "list", "data": data}, rid)

    async def get_model(self, request: Request) -> Response:
        rid = _request_id(request.scope)
        name = request.path_params["model"]
        try:
            self._authenticate(request)
            for model, seen in self.pool.models():
                if model == name:
                    return self._json(self._model_object(model, seen), rid)
            raise self._model_not_found(name)
        except APIError as exc:
            return error_response(exc, rid)

    # -- settlement endpoints ----------------------------------------------------------------

    def _settlement_or_404(self) -> Settlement:
        if self.settlement is None:
            raise APIError(
                404,
                "This gateway does not meter requests: it signs no receipts or vouchers.",
                code="settlement_disabled",
            )
        return self.settlement

    async def vouchers(self, request: Request) -> Response:
        """A miner's cumulative vouchers, one per payer. No API key: a voucher pays only the
        miner named in it, so handing it to anyone gives nothing away that the miner's own
        endpoint log does not already say."""
        rid = _request_id(request.scope)
        try:
            settlement = self._settlement_or_404()
            miner = request.query_params.get("miner", "").strip()
            if not miner or not is_address(miner):
                raise APIError(
                    400,
                    "Give the miner's address: /v1/vouchers?miner=0x…",
                    param="miner",
                    code="invalid_value",
                )
            # Signing and the Merkle roots run in a worker thread, off the event loop.
            found = await asyncio.to_thread(
                settlement.store.vouchers_for, to_checksum_address(miner)
            )
        except APIError as exc:
            return error_response(exc, rid)
        body = {"gateway": settlement.gateway, "vouchers": [v.to_json() for v in found]}
        return self._json(body, rid)

    async def receipt(self, request: Request) -> Response:
        """The receipt of one request, with its anchor proof once anchored; only for the key
        that made the request (anyone else gets the same 404 as for an unknown id)."""
        rid = _request_id(request.scope)
        wanted = request.path_params["request_id"]
        try:
            key = self._authenticate(request)
            settlement = self._settlement_or_404()
            trace = self.traces.get_pending(wanted) or await asyncio.to_thread(
                self.traces.get_flushed, wanted
            )
            stored = None
            if trace is not None and trace.key_id == key.key_id:
                stored = await asyncio.to_thread(settlement.store.get, wanted)
            if stored is None:
                raise APIError(
                    404,
                    f"No receipt for request `{wanted}` under this API key.",
                    code="receipt_not_found",
                )
            proof = await asyncio.to_thread(settlement.store.anchor_proof, wanted)
        except APIError as exc:
            return error_response(exc, rid)
        assert trace is not None
        body = {
            **stored.to_json(),
            "anchor": proof.to_json() if proof is not None else None,
            "trace": {
                "model": trace.model,
                "route": trace.route,
                "stream": trace.stream,
                "status": trace.status,
                "created_at": trace.created_at,
                "miner": trace.miner,
                "prompt_tokens": trace.prompt_tokens,
                "completion_tokens": trace.completion_tokens,
                "ttft_ms": trace.ttft_ms,
                "total_ms": trace.total_ms,
                "attempts": trace.attempts,
                "cost_wei": trace.cost_wei,
            },
        }
        return self._json(body, rid)

    @staticmethod
    def _model_object(name: str, first_seen: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": first_seen, "owned_by": OWNED_BY}

    @staticmethod
    def _json(body: Any, request_id: str, status: int = 200) -> Response:
        return Response(
            relay.encode(body),
            status,
            headers={REQUEST_ID_HEADER: request_id},
            media_type="application/json",
        )

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
        return error_response(api, _request_id(request.scope), dict(exc.headers or {}))

    async def server_error(self, request: Request, exc: Exception) -> Response:
        api = APIError(500, "The gateway failed to handle the request.", type="server_error")
        return error_response(api, _request_id(request.scope))

    # -- completions -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response | StreamRelay:
        return await self._complete(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response | StreamRelay:
        return await self._complete(request, CompletionRequest)

    def _authenticate(self, request: Request) -> KeyRecord:
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, _MISSING_KEY, code="missing_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, _MISSING_KEY, code="missing_api_key")
        record = self.keys.verify(token)
        if record is None:
            raise APIError(
                401,
                f"Incorrect API key provided: {mask_secret(token)}. Ask the gateway's operator"
                " for a key (`infergrid keys create`).",
                code="invalid_api_key",
            )
        return record

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="too_large")
        try:
            return await json_body.read_body(
                request.stream(), max_bytes=limit, timeout_s=self.config.body_timeout_s
            )
        except ClientDisconnect:
            log.info("request %s: the client closed the connection", _request_id(request.scope))
            raise APIError(499, "The client closed the connection.", code="client_closed") from None

    @staticmethod
    def _model_not_found(model: str) -> APIError:
        return APIError(
            404,
            f"The model `{model}` does not exist or no miner in the network serves it.",
            param="model",
            code="model_not_found",
        )

    async def _complete(
        self, request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]
    ) -> Response | StreamRelay:
        started = time.perf_counter()
        created = time.time()
        scope = request.scope
        rid = _request_id(scope)
        path: str = scope["path"]
        trace: Trace | None = None
        call: Call | None = None
        handed_off = False  # a StreamRelay owns the call's reservation from then on
        settlement = self.settlement
        try:
            key = self._authenticate(request)
            body = json_body.decode_request_json(await self._read_body(request))
            parsed = parse_request(kind, body)
            trace = Trace(
                request_id=rid,
                key_id=key.key_id,
                model=parsed.model,
                route=path,
                stream=parsed.stream,
                created_at=created,
                status=0,
                payer=key.payer,
            )
            if settlement is not None:
                if key.payer is None:
                    raise no_payer_error(settlement.gateway)
                # Memory only, except the first request of a payer not seen lately, which
                # must wait for its escrow figures.
                await settlement.admit(key.payer)
            limit = parsed.token_limit()
            stated: int | None = None  # the limit a metered gateway writes into the body
            if settlement is not None and limit is None:
                limit = settlement.default_max_tokens
                # An honest miner gives a request that states no limit the protocol's
                # DEFAULT_MAX_TOKENS (less if its context is shorter), as OpenAI gives what
                # the context holds. A gateway reserving any other default must state it, or
                # the miner would generate (and bill) past the reservation.
                if limit != DEFAULT_MAX_TOKENS:
                    stated = limit
            # parse_request accepted it, so body is a dict.
            payload, seed = relay.upstream_body(
                body,
                stream=parsed.stream,
                seed=self._seeds.getrandbits(relay.SEED_BITS),
                max_tokens=stated,
            )
            trace.seed = seed
            call = Call(
                request_id=rid,
                path=path,
                model=parsed.model,
                stream=parsed.stream,
                wants_logprobs=parsed.wants_logprobs(),
                include_usage=parsed.include_usage(),
                payload=payload,
                started=started,
                trace=trace,
                max_tokens=limit or DEFAULT_MAX_TOKENS,
            )
            if settlement is not None:
                call.payer = key.payer
            if call.stream:
                response = await self._forward(call)  # the relay watches the client itself
            else:
                response = await self._forward_while_connected(call, request.receive)
            handed_off = isinstance(response, StreamRelay)
            return response
        except APIError as exc:
            elapsed = time.perf_counter() - started
            if trace is not None:
                trace.status = exc.status
                trace.error = trace.error or exc.message
                trace.total_ms = elapsed * 1000
                self.traces.record(trace)
            self.metrics.observe(path, exc.status, elapsed)
            headers = None
            if exc.status == 503:
                headers = {"retry-after": "1"}
            elif exc.status == 402:
                # OpenAI's clients retry 5xx and 429 by default; this header tells them (and
                # anyone reading) that retrying cannot help until the payer tops up.
                headers = {"x-should-retry": "false"}
                self.metrics.quota_refusals.inc()
            return error_response(exc, rid, headers)
        finally:
            if call is not None and not handed_off and self.metering is not None:
                self.metering.release(call)

    async def _forward_while_connected(
        self, call: Call, receive: Receive
    ) -> Response | StreamRelay:
        """`_forward`, given up as soon as the client hangs up: the upstream request is then
        closed, which stops the miner generating an answer nobody will read. A receipt whose
        commit had already begun is still stored and charged (see `Metering.commit`).

        `_forward` runs in this task and one watcher task cancels it when the client goes:
        cheaper on the hot path than racing two tasks."""
        this = asyncio.current_task()
        assert this is not None
        gone = done = False

        def client_left(watch: asyncio.Task[None]) -> None:
            nonlocal gone
            # `done`: a callback already scheduled when the forward ended must not cancel
            # whatever this task does next.
            if not done and not watch.cancelled() and watch.exception() is None:
                gone = True
                this.cancel()

        watch = asyncio.ensure_future(wait_for_disconnect(receive))
        watch.add_done_callback(client_left)
        try:
            return await self._forward(call)
        except asyncio.CancelledError:
            if not gone:
                raise  # the server is shutting down
            this.uncancel()
            log.info("request %s: the client closed the connection", call.request_id)
            raise APIError(499, "The client closed the connection.", code="client_closed") from None
        finally:
            done = True
            watch.cancel()

    async def _forward(self, call: Call) -> Response | StreamRelay:
        tried: list[MinerState] = []
        last_error = "no healthy miner"
        refused: InsufficientHeadroom | None = None  # the cheapest miner the payer can't afford
        attempts = 0
        metering = self.metering
        limit = max(1, self.config.max_attempts)

        def can_fail_over() -> bool:
            """Whether another miner could still take the call if this attempt gave up."""
            return attempts < limit and self.pool.can_serve(call.model, tried)

        while attempts < limit:
            try:
                miner = self.pool.pick(call.model, tried)
            except ModelNotServed:
                if not self.maintainer.discovered:
                    # Not "no such model": we have not been able to read the registry yet.
                    raise APIError(
                        503,
                        "The gateway has not read the miner registry yet; please retry.",
                        type="server_error",
                        code="registry_unavailable",
                    ) from None
                raise self._model_not_found(call.model) from None
            except NoHealthyMiner:
                break
            tried.append(miner)
            if metering is not None:
                try:
                    if not metering.reserve(call, miner):
                        continue
                except InsufficientHeadroom as exc:
                    # A cheaper miner may still fit the payer's headroom; this one is skipped.
                    if refused is None or exc.needed_wei < refused.needed_wei:
                        refused = exc
                    continue
            attempts += 1
            call.trace.attempts += 1
            try:
                return await self._attempt(call, miner, can_fail_over)
            except _MinerFailed as exc:
                last_error = f"{miner.owner}: {exc}"
                self.metrics.failovers.inc()
                log.info("request %s: miner %s failed (%s)", call.request_id, miner.owner, exc)
        if refused is not None and attempts == 0:
            raise insufficient_error(refused)
        call.trace.error = last_error  # the details are for the operator, not the client
        raise APIError(
            503,
            f"No miner serving `{call.model}` can take the request right now; please retry.",
            type="server_error",
            code="no_miner_available",
        )

    def _upstream_headers(self, call: Call) -> dict[str, str]:
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: call.request_id}
        settlement = self.settlement
        if settlement is not None:
            # The miner logs who pays and which signer will sign the receipt, to check the
            # vouchers it is later given against what it attested.
            assert call.payer is not None
            headers[PAYER_HEADER] = call.payer
            headers[GATEWAY_HEADER] = settlement.gateway
        return headers

    async def _attempt(
        self, call: Call, miner: MinerState, can_fail_over: Callable[[], bool]
    ) -> Response | StreamRelay:
        """Send the call to one miner. Raises _MinerFailed if nothing reached the client: the
        miner failed, missed its first-token deadline, or was taken out of service while the
        call waited for its first token and another miner could take it (app.deadlines)."""
        pool = self.pool
        pool.acquire(miner)
        handed_off = False  # a StreamRelay took over the response and its bookkeeping
        ok = False
        prompt_bytes = len(call.payload)
        latency = pool.latency(call.model)
        rule = self.deadlines
        if call.stream:
            deadline, cap = rule.first_token_s(latency, prompt_bytes), rule.cap_s
        else:
            deadline = rule.answer_s(latency, prompt_bytes, call.max_tokens)
            cap = rule.answer_cap_s
        sent = time.perf_counter()
        latency_ms: float | None = None  # time to the whole answer, non-streamed
        scope = asyncio.timeout(None)
        watch: FirstTokenWatch | None = None
        resp: aiohttp.ClientResponse | None = None
        try:
            try:
                # Everything until the first token (non-streamed: the whole answer) is bounded
                # by the watch; nothing that stores a receipt runs inside it.
                async with scope:
                    watch = FirstTokenWatch(
                        scope,
                        deadline,
                        cap,
                        can_fail_over=can_fail_over,
                        miner_down=lambda: miner.healthy is False,
                    )
                    miner.down_watchers.add(watch.on_miner_down)
                    resp = await self._post(call, miner)
                    status = resp.status
                    if status >= 500 or status == 429:
                        # 429 too: a busy miner is not the client's fault, another may be idle.
                        detail = (await resp.content.read(200)).decode("utf-8", "replace")
                        raise _MinerFailed(f"HTTP {status}: {detail}")
                    if status >= 400:
                        passed = await self._pass_through(call, miner, resp)
                        ok = True  # the miner did its job: the request itself is bad
                        return passed
                    if call.stream:
                        stream = StreamRelay(self, call, miner, resp)
                        await stream.prime()
                        stream.first_token_at = time.perf_counter()
                        pool.observed_latency(call.model).observe_first_token(
                            prompt_bytes, stream.first_token_at - sent
                        )
                        handed_off = True
                        return stream
                    raw = await _read_bounded(resp)
                answer_s = time.perf_counter() - sent
                answer = json_body.loads(raw, strict=False)
                if not isinstance(answer, dict):
                    raise _MinerFailed("answer is not a JSON object")
            except TimeoutError as exc:
                if watch is None or not scope.expired():  # aiohttp's own read timeout
                    pool.mark_unreachable(miner, f"{type(exc).__name__}: {exc}")
                    raise _MinerFailed(f"timed out: {type(exc).__name__}: {exc}") from None
                self.metrics.first_token_timeouts.labels(watch.reason or "deadline").inc()
                if watch.reason == "miner_down":
                    raise _MinerFailed("taken out of service before its first token") from None
                what = "first token" if call.stream else "answer"
                raise _MinerFailed(f"no {what} within {deadline:.1f} s") from None
            except UPSTREAM_ERRORS as exc:
                pool.mark_unreachable(miner, f"{type(exc).__name__}: {exc}")
                raise _MinerFailed(f"broke before answering: {type(exc).__name__}: {exc}") from None
            except ValueError as exc:
                raise _MinerFailed(f"sent invalid JSON: {exc}") from None
            finally:
                if watch is not None:
                    watch.stop()
                    miner.down_watchers.discard(watch.on_miner_down)
                if resp is not None and not handed_off:
                    # A half-read answer cannot go back to the keep-alive pool; closing it
                    # also tells the miner to stop generating.
                    resp.release() if ok or resp.content.is_eof() else resp.close()
            verified = None
            if self.metering is not None:
                ext = answer.get(EXTENSION_KEY)
                ext = ext if isinstance(ext, dict) else {}
                try:
                    verified = self.metering.verify(
                        call,
                        miner,
                        signed=ext.get(ATTESTATION_KEY),
                        output_token_ids=ext.get("output_token_ids"),
                        prompt_token_ids=ext.get("prompt_token_ids"),
                        usage=answer.get("usage"),
                    )
                except AttestationRejected as exc:
                    # Nothing reached the client: another miner may serve it honestly.
                    raise _MinerFailed(f"attestation rejected: {exc}") from None
            ok = True
            latency_ms = answer_s * 1000
            pool.observed_latency(call.model).observe_answer(
                prompt_bytes, answer_s, relay.usage_of(answer)[1]
            )
            return await self._answer(call, miner, answer, verified)
        finally:
            if not handed_off:
                pool.release(miner, ok=ok, latency_ms=latency_ms)

    async def _post(self, call: Call, miner: MinerState) -> aiohttp.ClientResponse:
        session = self.session
        assert session is not None, "gateway used outside its lifespan"
        try:
            return await session.post(
                miner.base_url + call.path, data=call.payload, headers=self._upstream_headers(call)
            )
        except UPSTREAM_ERRORS as exc:
            self.pool.mark_unreachable(miner, f"{type(exc).__name__}: {exc}")
            raise _MinerFailed(f"unreachable: {type(exc).__name__}: {exc}") from None

    async def _answer(
        self, call: Call, miner: MinerState, answer: dict[str, Any], verified: Verified | None
    ) -> Response:
        prompt, completion = relay.usage_of(answer)
        if verified is not None:
            assert self.metering is not None
            try:
                value = await self.metering.commit(call, miner, verified)
            except _ReceiptFailed:
                raise APIError(
                    500, RECEIPT_FAILED, type="server_error", code="receipt_failed"
                ) from None
            usage = answer.get("usage")
            if isinstance(usage, dict):
                relay.add_cost(usage, value)
        content = relay.encode(relay.client_view(answer, wants_logprobs=call.wants_logprobs))
        elapsed = time.perf_counter() - call.started
        self.finish_trace(call, miner, 200, elapsed, prompt, completion)
        return Response(
            content,
            200,
            headers={REQUEST_ID_HEADER: call.request_id, MINER_HEADER: miner.owner},
            media_type="application/json",
        )

    async def _pass_through(
        self, call: Call, miner: MinerState, resp: aiohttp.ClientResponse
    ) -> Response:
        """A miner's 4xx, which is the request's fault, goes to the client as it came, as long
        as it is an OpenAI error body; anything else is rewrapped into one."""
        raw = await _read_bounded(resp, MAX_ERROR_BYTES)
        elapsed = time.perf_counter() - call.started
        message = relay.error_message(raw)
        if message is None:
            text = raw[:500].decode("utf-8", "replace").strip()
            message = f"The miner refused the request ({resp.status}): {text or 'no details'}"
            raw = relay.encode(APIError(resp.status, message).body())
        call.trace.error = message
        self.finish_trace(call, miner, resp.status, elapsed, None, None)
        return Response(
            raw,
            resp.status,
            headers={REQUEST_ID_HEADER: call.request_id, MINER_HEADER: miner.owner},
            media_type="application/json",
        )

    def finish_trace(
        self,
        call: Call,
        miner: MinerState,
        status: int,
        elapsed: float,
        prompt: int | None,
        completion: int | None,
        ttft: float | None = None,
    ) -> None:
        trace = call.trace
        trace.status = status
        trace.miner = miner.owner
        trace.miner_endpoint = miner.endpoint
        trace.prompt_tokens = prompt
        trace.completion_tokens = completion
        trace.total_ms = elapsed * 1000
        if ttft is not None:
            trace.ttft_ms = ttft * 1000
            self.metrics.ttft.observe(ttft)
        self.traces.record(trace)
        metrics = self.metrics
        metrics.observe(call.path, status, elapsed)
        if prompt:
            metrics.prompt_tokens.inc(prompt)
        if completion:
            metrics.completion_tokens.inc(completion)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """A miner's whole body, refusing more than `limit` bytes: miners join without permission,
    so one must not be able to make the gateway buffer without end."""
    length = resp.content_length
    if length is not None and length <= limit:
        return await resp.read()  # the common case: aiohttp reads exactly content-length
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _MinerFailed(f"answer larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_gateway_app(
    config: GatewayConfig,
    *,
    discover: Callable[[], list[NodeRecord]],
    keys: KeyStore,
    traces: TraceStore,
    pool: MinerPool | None = None,
    settlement: Settlement | None = None,
) -> Starlette:
    """The gateway as an ASGI app; background work starts and stops with its lifespan.

    Without `settlement` it serves unmetered; with one, every request is charged to its key's
    payer (the caller still owns the settlement's receipt store and closes it)."""
    gateway = Gateway(
        config, discover=discover, keys=keys, traces=traces, pool=pool, settlement=settlement
    )
    routes = [
        Route(CHAT_PATH, gateway.chat_completions, methods=["POST"]),
        Route(COMPLETIONS_PATH, gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.get_model, methods=["GET"]),
        Route("/v1/vouchers", gateway.vouchers, methods=["GET"]),
        Route("/v1/receipts/{request_id}", gateway.receipt, methods=["GET"]),
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
) -> uvicorn.Server:
    """A uvicorn server for the gateway (uvloop + httptools); `await server.serve()` runs it."""
    keys = keys or KeyStore(config.db_path, refresh_s=config.key_refresh_s)
    traces = traces or TraceStore(config.db_path, flush_interval_s=config.trace_flush_s)
    app = create_gateway_app(
        config, discover=discover, keys=keys, traces=traces, settlement=settlement
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
) -> None:
    """Serve the gateway until interrupted (blocking); traces still queued are written, and
    the receipt store (metered) is closed after its last commit."""
    keys = KeyStore(config.db_path, refresh_s=config.key_refresh_s)
    traces = TraceStore(config.db_path, flush_interval_s=config.trace_flush_s)
    try:
        build_server(config, discover, keys=keys, traces=traces, settlement=settlement).run()
    finally:
        if settlement is not None:
            settlement.close()
        traces.close()
        keys.close()
