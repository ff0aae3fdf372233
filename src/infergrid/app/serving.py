"""Serving the completion endpoints: from an HTTP request to a `Call` the forwarder serves.

Per request: the API key, the body (bounded in size and time), the protocol's validation, the
payer's admission (metered), the forwarded body with its seed and stated limit, and, for any
APIError on the way, the OpenAI-shaped error response, its trace and its metrics.
"""

from __future__ import annotations

import logging
import random
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from infergrid.app import relay
from infergrid.app.api_common import authenticate, error_response, request_id
from infergrid.app.calls import Call, route_request
from infergrid.app.config import GatewayConfig
from infergrid.app.forwarding import Forwarder
from infergrid.app.keys import KeyStore
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.settlement import Settlement, no_payer_error
from infergrid.app.stream_relay import StreamRelay
from infergrid.app.traces import Trace, TraceStore
from infergrid.protocol import json_body
from infergrid.protocol.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS
from infergrid.protocol.wire import REQUEST_STATUS_HEADER, request_status_path

__all__ = ["CompletionServing"]

# The gateway's one log, whichever of its modules writes to it.
log = logging.getLogger("infergrid.app.gateway")


class CompletionServing:
    """The handlers of /v1/chat/completions and /v1/completions."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        keys: KeyStore,
        traces: TraceStore,
        metrics: GatewayMetrics,
        settlement: Settlement | None,
        forwarder: Forwarder,
    ) -> None:
        self.config = config
        self.keys = keys
        self.traces = traces
        self.metrics = metrics
        self.settlement = settlement
        self.forwarder = forwarder
        self._seeds = random.SystemRandom()

    async def chat_completions(self, request: Request) -> Response | StreamRelay:
        """POST /v1/chat/completions."""
        return await self._complete(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response | StreamRelay:
        """POST /v1/completions."""
        return await self._complete(request, CompletionRequest)

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
            log.info("request %s: the client closed the connection", request_id(request.scope))
            raise APIError(499, "The client closed the connection.", code="client_closed") from None

    async def _complete(
        self, request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]
    ) -> Response | StreamRelay:
        """One completion request, answered, streamed (a `StreamRelay`, which then owns the
        call's reservation) or refused with an OpenAI error; otherwise the reservation is
        released here however the request ends."""
        started = time.perf_counter()
        created = time.time()
        scope = request.scope
        rid = request_id(scope)
        path: str = scope["path"]
        trace: Trace | None = None
        call: Call | None = None
        handed_off = False  # a StreamRelay owns the call's reservation from then on
        settlement = self.settlement
        try:
            key = authenticate(self.keys, request)
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
            call.canary = key.canary
            call.key_id = key.key_id
            call.route = route_request(
                body, model=parsed.model, max_tokens=limit, payload_bytes=len(payload)
            )
            if settlement is not None:
                call.payer = key.payer
            if call.stream:
                # The relay watches the client itself.
                response = await self.forwarder.forward(call)
            else:
                response = await self.forwarder.forward_while_connected(call, request.receive)
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
            # Every completion response says where its status is, refusals included.
            headers = {REQUEST_STATUS_HEADER: request_status_path(rid)}
            if exc.status == 503:
                headers["retry-after"] = "1"
            elif exc.status == 402:
                # OpenAI's clients retry 5xx and 429 by default; this header tells them (and
                # anyone reading) that retrying cannot help until the payer tops up.
                headers["x-should-retry"] = "false"
                self.metrics.quota_refusals.inc()
            return error_response(exc, rid, headers)
        finally:
            if call is not None and not handed_off and self.forwarder.metering is not None:
                self.forwarder.metering.release(call)
