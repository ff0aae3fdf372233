"""The gateway: an OpenAI-compatible HTTP API in front of the network's miners.

Per request, on the hot path: a hash and a dict lookup for the API key, one JSON decode and the
protocol's pydantic validation, a routing decision in memory, one upstream call on a pooled
keep-alive connection, and stripping the `infergrid` extension from what comes back. Traces go to
an in-memory queue that a background task writes to SQLite; nothing on the path touches disk.

Failover: the gateway holds a response back until the miner has produced its first token, so a
miner that fails before that (refused connection, 5xx, a stream that dies early) is replaced by
another without the client noticing. After the first token the client has seen output; the
stream then ends with an OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from infergrid.app import relay
from infergrid.app.config import GatewayConfig
from infergrid.app.keys import KeyRecord, KeyStore, mask_secret
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.miners import (
    MinerPool,
    MinerState,
    ModelNotServed,
    NoHealthyMiner,
    PoolMaintainer,
)
from infergrid.app.traces import Trace, TraceStore
from infergrid.protocol import json_body
from infergrid.protocol.nodes import NodeRecord
from infergrid.protocol.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from infergrid.protocol.wire import EXTENSION_KEY, MINER_HEADER, REQUEST_ID_HEADER, SSE_DONE

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
# One SSE line may carry a whole prompt's token ids (the usage chunk's extension), but a
# miner must not make the gateway buffer without bound.
MAX_SSE_LINE = 64 * 1024 * 1024
MAX_ANSWER_BYTES = 256 * 1024 * 1024  # a non-streamed answer, extension included
MAX_ERROR_BYTES = 1024 * 1024
_RID_SCOPE_KEY = "infergrid.request_id"
# Failures that mean the miner, not the request, is the problem.
_UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)

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
    all_headers = {REQUEST_ID_HEADER: request_id}
    if headers:
        all_headers.update(headers)
    return Response(
        relay.encode(exc.body()), exc.status, headers=all_headers, media_type="application/json"
    )


class _MinerFailed(Exception):
    """This miner could not serve this request; another one may."""


@dataclass(slots=True)
class _Call:
    """One client request on its way through the gateway."""

    request_id: str
    path: str
    model: str
    stream: bool
    wants_logprobs: bool
    include_usage: bool
    payload: bytes
    started: float  # perf_counter at arrival
    trace: Trace


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
    ) -> None:
        self.config = config
        self.keys = keys
        self.traces = traces
        self.pool = pool or MinerPool()
        self.maintainer = PoolMaintainer(
            self.pool,
            discover,
            discovery_interval_s=config.discovery_interval_s,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
        )
        self.metrics = GatewayMetrics(self.pool)
        self.session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        self._seeds = random.SystemRandom()

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
        return self._json(body, _request_id(request.scope))

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

    async def chat_completions(self, request: Request) -> Response | _StreamRelay:
        return await self._complete(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response | _StreamRelay:
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
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="too_large")
        return raw

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
    ) -> Response | _StreamRelay:
        started = time.perf_counter()
        created = time.time()
        scope = request.scope
        rid = _request_id(scope)
        path: str = scope["path"]
        trace: Trace | None = None
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
            )
            # parse_request accepted it, so body is a dict.
            payload, seed = relay.upstream_body(
                body, stream=parsed.stream, seed=self._seeds.getrandbits(relay.SEED_BITS)
            )
            trace.seed = seed
            call = _Call(
                request_id=rid,
                path=path,
                model=parsed.model,
                stream=parsed.stream,
                wants_logprobs=parsed.wants_logprobs(),
                include_usage=parsed.include_usage(),
                payload=payload,
                started=started,
                trace=trace,
            )
            return await self._forward(call)
        except APIError as exc:
            elapsed = time.perf_counter() - started
            if trace is not None:
                trace.status = exc.status
                trace.error = trace.error or exc.message
                trace.total_ms = elapsed * 1000
                self.traces.record(trace)
            self.metrics.observe(path, exc.status, elapsed)
            headers = {"retry-after": "1"} if exc.status == 503 else None
            return error_response(exc, rid, headers)

    async def _forward(self, call: _Call) -> Response | _StreamRelay:
        tried: list[MinerState] = []
        last_error = "no healthy miner"
        for _ in range(max(1, self.config.max_attempts)):
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
            call.trace.attempts += 1
            try:
                return await self._attempt(call, miner)
            except _MinerFailed as exc:
                last_error = f"{miner.owner}: {exc}"
                self.metrics.failovers.inc()
                log.info("request %s: miner %s failed (%s)", call.request_id, miner.owner, exc)
        call.trace.error = last_error  # the details are for the operator, not the client
        raise APIError(
            503,
            f"No miner serving `{call.model}` can take the request right now; please retry.",
            type="server_error",
            code="no_miner_available",
        )

    async def _attempt(self, call: _Call, miner: MinerState) -> Response | _StreamRelay:
        """Send the call to one miner. Raises _MinerFailed if nothing reached the client."""
        assert self.session is not None, "gateway used outside its lifespan"
        pool = self.pool
        pool.acquire(miner)
        handed_off = False  # a _StreamRelay took over the response and its bookkeeping
        ok = False
        latency_ms: float | None = None
        sent = time.perf_counter()
        try:
            try:
                resp = await self.session.post(
                    miner.base_url + call.path,
                    data=call.payload,
                    headers={
                        "content-type": "application/json",
                        REQUEST_ID_HEADER: call.request_id,
                    },
                )
            except _UPSTREAM_ERRORS as exc:
                pool.mark_unreachable(miner, f"{type(exc).__name__}: {exc}")
                raise _MinerFailed(f"unreachable: {type(exc).__name__}: {exc}") from None
            try:
                status = resp.status
                if status >= 500 or status == 429:
                    # 429 too: a busy miner is not the client's fault, and another may be idle.
                    detail = (await resp.content.read(200)).decode("utf-8", "replace")
                    raise _MinerFailed(f"HTTP {status}: {detail}")
                if status >= 400:
                    passed = await self._pass_through(call, miner, resp)
                    ok = True  # the miner did its job: the request itself is bad
                    return passed
                if call.stream:
                    stream = _StreamRelay(self, call, miner, resp)
                    await stream.prime()
                    handed_off = True
                    return stream
                raw = await _read_bounded(resp)
                latency_ms = (time.perf_counter() - sent) * 1000
                answer = json_body.loads(raw, strict=False)
                if not isinstance(answer, dict):
                    raise _MinerFailed("answer is not a JSON object")
            except _UPSTREAM_ERRORS as exc:
                pool.mark_unreachable(miner, f"{type(exc).__name__}: {exc}")
                raise _MinerFailed(f"broke before answering: {type(exc).__name__}: {exc}") from None
            except ValueError as exc:
                raise _MinerFailed(f"sent invalid JSON: {exc}") from None
            finally:
                if not handed_off:
                    resp.release()
            ok = True
            return self._answer(call, miner, answer)
        finally:
            if not handed_off:
                pool.release(miner, ok=ok, latency_ms=latency_ms)

    def _answer(self, call: _Call, miner: MinerState, answer: dict[str, Any]) -> Response:
        prompt, completion = relay.usage_of(answer)
        content = relay.encode(relay.client_view(answer, wants_logprobs=call.wants_logprobs))
        elapsed = time.perf_counter() - call.started
        self._finish_trace(call, miner, 200, elapsed, prompt, completion)
        return Response(
            content,
            200,
            headers={REQUEST_ID_HEADER: call.request_id, MINER_HEADER: miner.owner},
            media_type="application/json",
        )

    async def _pass_through(
        self, call: _Call, miner: MinerState, resp: aiohttp.ClientResponse
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
        self._finish_trace(call, miner, resp.status, elapsed, None, None)
        return Response(
            raw,
            resp.status,
            headers={REQUEST_ID_HEADER: call.request_id, MINER_HEADER: miner.owner},
            media_type="application/json",
        )

    def _finish_trace(
        self,
        call: _Call,
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


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _StreamRelay:
    """An ASGI response that relays one miner's SSE stream to the client, cleaned up.

    `prime()` reads until the miner has produced output; only then does the gateway commit to
    this miner. The relay owns the upstream response and the miner's in-flight slot from then
    on, and gives both back however the stream ends (finished, broken, or the client leaving).
    """

    def __init__(
        self, gateway: Gateway, call: _Call, miner: MinerState, resp: aiohttp.ClientResponse
    ) -> None:
        self.gateway = gateway
        self.call = call
        self.miner = miner
        self.resp = resp
        self.buffer: list[bytes] = []
        self.ttft: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.upstream_done = False  # the miner sent [DONE] or an error event
        self.error: str | None = None
        self.status = 200
        self._finished = False
        self._queued: deque[dict[str, Any] | None] = deque()
        self._partial = b""  # the start of a line whose end has not arrived yet

    async def _read_events(self) -> None:
        """Wait for the miner's next bytes and queue every complete event in them (None for
        [DONE]). Raises on a broken stream.

        Reading whatever has arrived, rather than a line at a time, lets events that arrive
        together (a finish, the usage chunk and [DONE], typically) go out in one write.
        """
        content = self.resp.content
        while not self._queued:
            data = await content.readany()
            if not data:
                raise _MinerFailed("stream ended without [DONE]")
            if self._partial:
                data = self._partial + data
            lines = data.split(b"\n")
            self._partial = lines.pop()
            if len(self._partial) > MAX_SSE_LINE:
                raise _MinerFailed(f"an SSE line longer than {MAX_SSE_LINE} bytes")
            for line in lines:
                payload = relay.parse_sse_data(line)
                if not payload:
                    continue
                if payload == b"[DONE]":
                    self._queued.append(None)
                    return
                event = json_body.loads(payload, strict=False)
                if not isinstance(event, dict):
                    raise _MinerFailed("stream event is not a JSON object")
                self._queued.append(event)

    def _take(self, event: dict[str, Any]) -> bytes | None:
        """Account for one miner event; returns what the client gets for it, if anything."""
        call = self.call
        if "error" in event:
            self.upstream_done = True
            self.error = f"miner error event: {event.get('error')}"
            self.status = 502
            self.gateway.metrics.stream_errors.inc()
            event.pop(EXTENSION_KEY, None)
            return relay.sse_event(event)
        if relay.is_usage_chunk(event):
            self.prompt_tokens, self.completion_tokens = relay.usage_of(event)
            if not call.include_usage:
                return None
        elif self.ttft is None and relay.carries_output(event):
            self.ttft = time.perf_counter() - call.started
        view = relay.client_view(
            event, wants_logprobs=call.wants_logprobs, drop_usage=not call.include_usage
        )
        return relay.sse_event(view)

    async def prime(self) -> None:
        """Buffer events until the first output. Raises _MinerFailed if the miner fails first."""
        queued = self._queued
        try:
            while True:
                await self._read_events()
                while queued:
                    event = queued.popleft()
                    if event is None:
                        self.upstream_done = True
                        return
                    if "error" in event:
                        raise _MinerFailed(f"error before the first token: {event['error']}")
                    committed = relay.carries_output(event)
                    out = self._take(event)
                    if out is not None:
                        self.buffer.append(out)
                    if committed:
                        return  # anything still queued goes out with the stream
        except _UPSTREAM_ERRORS as exc:
            self.gateway.pool.mark_unreachable(self.miner, f"{type(exc).__name__}: {exc}")
            raise _MinerFailed(f"stream broke before the first token: {exc!r}") from None
        except ValueError as exc:
            raise _MinerFailed(f"sent invalid JSON: {exc}") from None

    async def _pump(self, send: Send) -> None:
        call = self.call
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (REQUEST_ID_HEADER.encode(), call.request_id.encode()),
                    (MINER_HEADER.encode(), self.miner.owner.encode()),
                ],
            }
        )
        if self.buffer:
            await send(
                {"type": "http.response.body", "body": b"".join(self.buffer), "more_body": True}
            )
            self.buffer.clear()
        queued = self._queued
        try:
            while not self.upstream_done:
                if not queued:
                    await self._read_events()
                out: list[bytes] = []
                while queued and not self.upstream_done:
                    event = queued.popleft()
                    if event is None:
                        self.upstream_done = True
                        break
                    piece = self._take(event)  # an error event also ends the stream
                    if piece is not None:
                        out.append(piece)
                if out:
                    body = out[0] if len(out) == 1 else b"".join(out)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        except (_MinerFailed, ValueError, *_UPSTREAM_ERRORS) as exc:
            # The client already has output, so there is no failing over now: end the stream
            # with an error the OpenAI clients raise, and charge nothing for it.
            reason = f"{type(exc).__name__}: {exc}"
            self.error = f"miner stream broke after the first token: {reason}"
            self.status = 502
            if not isinstance(exc, _MinerFailed | ValueError):
                self.gateway.pool.mark_unreachable(self.miner, reason)
            self.gateway.metrics.stream_errors.inc()
            message = (
                "The miner serving this request failed mid-stream; the response is incomplete."
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": relay.stream_error_event(message),
                    "more_body": False,
                }
            )
            return
        tail = SSE_DONE if self.error is None else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                # The client hung up: stop reading, which also stops the miner generating.
                self.status = 499
                self.error = "client closed the connection"
        finally:
            for task in (pump, watch):
                task.cancel()
            results = await asyncio.gather(pump, watch, return_exceptions=True)
            if isinstance(results[0], Exception) and self.error is None:
                self.status = 500
                self.error = f"gateway bug: {results[0]!r}"
            self._finish()
        if isinstance(results[0], Exception):
            raise results[0]

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        gateway, call = self.gateway, self.call
        ok = self.status == 200
        if ok and self.upstream_done:
            self.resp.release()
        else:
            self.resp.close()  # a half-read stream cannot go back to the keep-alive pool
        ttft_ms = self.ttft * 1000 if self.ttft is not None else None
        # A client hanging up is not the miner's failure.
        miner_ok = ok or self.status == 499
        gateway.pool.release(self.miner, ok=miner_ok, latency_ms=ttft_ms)
        call.trace.error = self.error
        elapsed = time.perf_counter() - call.started
        if not ok:
            # An unfinished stream is not charged, so it is not metered either.
            self.prompt_tokens = self.completion_tokens = None
        gateway._finish_trace(
            call,
            self.miner,
            self.status,
            elapsed,
            self.prompt_tokens,
            self.completion_tokens,
            self.ttft,
        )


def create_gateway_app(
    config: GatewayConfig,
    *,
    discover: Callable[[], list[NodeRecord]],
    keys: KeyStore,
    traces: TraceStore,
    pool: MinerPool | None = None,
) -> Starlette:
    """The gateway as an ASGI app; background work starts and stops with its lifespan."""
    gateway = Gateway(config, discover=discover, keys=keys, traces=traces, pool=pool)
    routes = [
        Route(CHAT_PATH, gateway.chat_completions, methods=["POST"]),
        Route(COMPLETIONS_PATH, gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.get_model, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
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
) -> uvicorn.Server:
    """A uvicorn server for the gateway (uvloop + httptools); `await server.serve()` runs it."""
    keys = keys or KeyStore(config.db_path, refresh_s=config.key_refresh_s)
    traces = traces or TraceStore(config.db_path, flush_interval_s=config.trace_flush_s)
    app = create_gateway_app(config, discover=discover, keys=keys, traces=traces)
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


def run_gateway(config: GatewayConfig, discover: Callable[[], list[NodeRecord]]) -> None:
    """Serve the gateway until interrupted (blocking); traces still queued are written."""
    keys = KeyStore(config.db_path, refresh_s=config.key_refresh_s)
    traces = TraceStore(config.db_path, flush_interval_s=config.trace_flush_s)
    try:
        build_server(config, discover, keys=keys, traces=traces).run()
    finally:
        traces.close()
        keys.close()
