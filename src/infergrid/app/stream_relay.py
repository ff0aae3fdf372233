"""The stream relay: one miner's SSE stream to the client, cleaned up, as an ASGI response.

It holds the response back until the miner's first output (failing over before that is the
forwarding's job), meters the stream through the same `Metering` the plain path uses, and gives
back the miner's slot, the upstream connection and the reservation however the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Protocol

import aiohttp
from starlette.types import Receive, Scope, Send

from infergrid.app import relay
from infergrid.app.audits import AuditService
from infergrid.app.calls import Call
from infergrid.app.config import GatewayConfig
from infergrid.app.deadlines import StallWatch
from infergrid.app.failures import (
    RECEIPT_FAILED,
    UPSTREAM_ERRORS,
    _MinerFailed,
    _ReceiptFailed,
    _Stalled,
    _Unverified,
)
from infergrid.app.metering import Metering
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.miners import MinerPool, MinerState, Slot
from infergrid.compute.routing import Cancelled, Failed, Outcome, Served
from infergrid.protocol import json_body
from infergrid.protocol.wire import (
    ATTESTATION_KEY,
    EXTENSION_KEY,
    MINER_HEADER,
    REQUEST_ID_HEADER,
    REQUEST_STATUS_HEADER,
    SSE_DONE,
    request_status_path,
)
from infergrid.verify.attestation import AttestationRejected

__all__ = ["MAX_SSE_LINE", "RelayHost", "StreamRelay", "wait_for_disconnect"]

# The gateway's one log, whichever of its modules writes to it.
log = logging.getLogger("infergrid.app.gateway")

# One SSE line may carry a whole prompt's token ids (the usage chunk's extension), but a
# miner must not make the gateway buffer without bound.
MAX_SSE_LINE = 64 * 1024 * 1024


class RelayHost(Protocol):
    """What a relay needs from the gateway that forwarded the call."""

    config: GatewayConfig
    pool: MinerPool
    metrics: GatewayMetrics
    metering: Metering | None  # None: unmetered
    audits: AuditService | None  # None: unmetered

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
        """Record the call's trace and metrics once its outcome is known."""
        ...


async def _end(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has hung up (ASGI `http.disconnect`)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class StreamRelay:
    """An ASGI response that relays one miner's SSE stream to the client, cleaned up.

    `prime()` reads until the miner has produced output; only then does the gateway commit to
    this miner. The relay owns the upstream response and the miner's in-flight slot from then
    on, and gives both back however the stream ends (finished, broken, or the client leaving).

    Metered, it also collects the token ids of every chunk, holds the finish chunk back, and
    on the miner's usage chunk checks the attestation and stores the receipt; only then do the
    finish chunk (with usage and cost when the client did not ask for a usage chunk), the
    usage chunk (when it did) and [DONE] go out.
    """

    def __init__(
        self, gateway: RelayHost, call: Call, slot: Slot, resp: aiohttp.ClientResponse
    ) -> None:
        self.gateway = gateway
        self.call = call
        self.slot = slot  # released when the stream ends
        self.miner = slot.miner
        self.resp = resp
        self.sent_at = time.perf_counter()  # when the request went to the miner
        self.buffer: list[bytes] = []
        self.ttft: float | None = None
        self.first_token_at: float | None = None  # perf_counter when prime() got output
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.upstream_done = False  # the miner sent [DONE] or an error event
        self.error: str | None = None
        self.status = 200
        self.miner_to_blame = True  # False when the gateway itself failed the stream
        self._finished = False
        self._queued: deque[dict[str, Any] | None] = deque()
        self._partial = b""  # the start of a line whose end has not arrived yet
        # Settlement state.
        self.metering = gateway.metering
        self.metered = self.metering is not None
        self.token_ids: list[Any] = []
        # For the audit record: the per-chunk logprobs, the text the client got, the finish.
        self.logprobs: list[Any] = []
        self.text_parts: list[str] = []
        self.finish_reason: Any = None
        self.bad_token_ids = False  # a chunk's token_ids was not a list
        self.held: dict[str, Any] | None = None  # the finish chunk, until the receipt is stored
        self.usage_event: dict[str, Any] | None = None  # the miner's usage chunk, unsettled
        self.settled = False
        self.tail = b""  # what goes out with [DONE] once settled

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
        if self.metered:
            if self.settled:
                return None  # nothing after the attested usage chunk is relayed or charged
            ext = event.get(EXTENSION_KEY)
            if isinstance(ext, dict):
                ids = ext.get("token_ids")
                if isinstance(ids, list):
                    self.token_ids.extend(ids)
                    if len(self.token_ids) > call.max_tokens:
                        # More than it may bill: stop relaying output nobody will pay for.
                        # Before the first token this fails over; after it, ends the stream.
                        raise _MinerFailed(
                            f"streamed {len(self.token_ids)} tokens, above the request's"
                            f" limit {call.max_tokens}"
                        )
                elif ids is not None:
                    self.bad_token_ids = True
                chunk_logprobs = ext.get("logprobs")
                if isinstance(chunk_logprobs, list):
                    self.logprobs.extend(chunk_logprobs)
            self._collect_text(event)
        if relay.is_usage_chunk(event):
            self.prompt_tokens, self.completion_tokens = relay.usage_of(event)
            if self.metered:
                self.usage_event = event  # settled by the pump before anything else goes out
                return None
            if not call.include_usage:
                return None
        elif self.ttft is None and relay.carries_output(event):
            self.ttft = time.perf_counter() - call.started
        view = relay.client_view(
            event, wants_logprobs=call.wants_logprobs, drop_usage=not call.include_usage
        )
        if self.metered and relay.finishes(view):
            self.held = view
            return None
        return relay.sse_event(view)

    def _collect_text(self, event: dict[str, Any]) -> None:
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(piece, str):
            self.text_parts.append(piece)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice.get("finish_reason")

    async def prime(self) -> None:
        """Buffer events until the first output. Raises _MinerFailed if the miner fails first."""
        queued = self._queued
        try:
            while True:
                await self._read_events()
                while queued:
                    event = queued.popleft()
                    if event is None:
                        if self.metered:
                            # No usage chunk, so no attestation: nothing to charge for.
                            raise _MinerFailed("stream ended before any output")
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
        except UPSTREAM_ERRORS as exc:
            self.gateway.pool.mark_unreachable(self.miner, f"{type(exc).__name__}: {exc}")
            raise _MinerFailed(f"stream broke before the first token: {exc!r}") from None
        except ValueError as exc:
            raise _MinerFailed(f"sent invalid JSON: {exc}") from None

    async def _settle(self) -> None:
        """Check the attestation in the usage chunk and store the receipt; then prepare the
        held finish chunk and the usage chunk, with the cost, to go out with [DONE]."""
        metering, call = self.metering, self.call
        assert metering is not None
        event = self.usage_event
        assert event is not None
        self.usage_event = None
        ext = event.get(EXTENSION_KEY)
        ext = ext if isinstance(ext, dict) else {}
        try:
            verified = metering.verify(
                call,
                self.miner,
                signed=ext.get(ATTESTATION_KEY),
                output_token_ids=None if self.bad_token_ids else self.token_ids,
                prompt_token_ids=ext.get("prompt_token_ids"),
                usage=event.get("usage"),
            )
        except AttestationRejected as exc:
            raise _Unverified(str(exc)) from None
        value = await metering.commit(call, self.miner, verified)
        self.settled = True
        usage = event.get("usage")
        assert isinstance(usage, dict)  # is_usage_chunk said so
        audits = self.gateway.audits
        if audits is not None:
            audits.record(
                call,
                self.miner,
                prompt_token_ids=ext.get("prompt_token_ids"),
                output_token_ids=self.token_ids,
                output_logprobs=self.logprobs,
                text="".join(self.text_parts),
                finish_reason=self.finish_reason,
                usage=dict(usage),
            )
        relay.add_cost(usage, value)
        pieces: list[bytes] = []
        if self.held is not None:
            if not call.include_usage:
                # Every stream's last chunk tells what it cost, asked or not.
                self.held["usage"] = usage
            pieces.append(relay.sse_event(self.held))
            self.held = None
        if call.include_usage:
            view = relay.client_view(event, wants_logprobs=call.wants_logprobs)
            pieces.append(relay.sse_event(view))
        self.tail = b"".join(pieces)

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
                    (REQUEST_STATUS_HEADER.encode(), request_status_path(call.request_id).encode()),
                ],
            }
        )
        if self.buffer:
            await send(
                {"type": "http.response.body", "body": b"".join(self.buffer), "more_body": True}
            )
            self.buffer.clear()
        queued = self._queued
        # Only the waits for the miner count toward a stall, not a slow client or the receipt.
        stall = StallWatch(self.gateway.config.stream_stall_timeout_s, self._stalled)
        try:
            while not self.upstream_done:
                if self.usage_event is not None:
                    await self._settle()
                    continue
                if not queued:
                    stall.reading()
                    await self._read_events()
                    stall.idle()
                out: list[bytes] = []
                while queued and not self.upstream_done:
                    event = queued.popleft()
                    if event is None:
                        self.upstream_done = True
                        break
                    piece = self._take(event)  # an error event also ends the stream
                    if piece is not None:
                        out.append(piece)
                    if self.usage_event is not None:
                        break  # settle before anything after it goes out
                if out:
                    body = out[0] if len(out) == 1 else b"".join(out)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            if self.metered and self.error is None and not self.settled:
                raise _Unverified("the stream ended without a usage chunk")
        except _Unverified as exc:
            # The client has output we cannot charge for: end it with an error and no receipt.
            self.error = f"attestation rejected after the first token: {exc}"
            self.status = 502
            self.gateway.metrics.stream_errors.inc()
            message = (
                "The miner serving this request could not vouch for its response; it was not"
                " charged, and the response is incomplete."
            )
            await _end(send, relay.stream_error_event(message, code="attestation_failed"))
            return
        except _ReceiptFailed as exc:
            self.error = f"receipt not stored: {exc}"
            self.status = 500
            self.miner_to_blame = False
            await _end(send, relay.stream_error_event(RECEIPT_FAILED, code="receipt_failed"))
            return
        except (_MinerFailed, ValueError, *UPSTREAM_ERRORS) as exc:
            stalled = isinstance(exc, _Stalled)
            reason = f"{type(exc).__name__}: {exc}"
            if stalled:
                self.gateway.metrics.stream_stalls.inc()
            elif not isinstance(exc, _MinerFailed | ValueError):
                self.gateway.pool.mark_unreachable(self.miner, reason)
            if not self.settled:
                # The client already has output, so there is no failing over now: end the
                # stream with an error the OpenAI clients raise, and charge nothing for it.
                self.status = 502
                self.gateway.metrics.stream_errors.inc()
                if stalled:
                    self.error = f"miner stalled after the first token: {exc}"
                    message = (
                        f"The miner serving this request sent nothing for {exc}; the response"
                        " is incomplete and was not charged."
                    )
                    await _end(send, relay.stream_error_event(message, code="miner_stalled"))
                else:
                    self.error = f"miner stream broke after the first token: {reason}"
                    message = (
                        "The miner serving this request failed mid-stream; the response is"
                        " incomplete."
                    )
                    await _end(send, relay.stream_error_event(message))
                return
            # Broke or stalled after its usage chunk: the receipt is stored and the tail holds
            # everything the client paid for, so the stream ends as a success; only the
            # miner's [DONE] is missing. The half-read connection cannot be reused.
            self.resp.close()
            self.upstream_done = True
        finally:
            stall.stop()
        tail = self.tail + SSE_DONE if self.error is None else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _stalled(self) -> None:
        # Delivered as a read error, so it can only end a wait for the miner, never cut into
        # storing a receipt.
        gap = self.gateway.config.stream_stall_timeout_s
        self.resp.content.set_exception(_Stalled(f"{gap:g} s"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(wait_for_disconnect(receive))
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
            failure = results[0] if isinstance(results[0], Exception) else None
            if isinstance(failure, OSError) and self.error is None:
                # Some servers raise from send() once the client has gone: a hang-up too.
                self.status, self.error, failure = 499, "client closed the connection", None
            if failure is not None and self.error is None:
                self.status = 500
                self.error = f"gateway bug: {failure!r}"
            if self.status == 499:
                # One line: a client leaving is routine, and the trace records it.
                log.info("request %s: the client closed the connection", self.call.request_id)
            self._finish()
        if failure is not None:
            raise failure

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
        outcome: Outcome
        if ok and self.first_token_at is not None:
            decode_s = time.perf_counter() - self.first_token_at
            gateway.pool.observed_latency(call.model).observe_rest(decode_s, self.completion_tokens)
            outcome = Served(
                ttft_s=self.first_token_at - self.sent_at,
                output_tokens=self.completion_tokens or 0,
                decode_s=decode_s,
            )
        elif ok or self.status == 499 or not self.miner_to_blame:
            # A client hanging up is not the miner's failure, nor is the gateway's own.
            outcome = Cancelled()
        else:
            outcome = Failed(self.error or f"stream ended with {self.status}")
        gateway.pool.release(self.slot, outcome)
        if self.metering is not None:
            self.metering.release(call)
        call.trace.error = self.error
        elapsed = time.perf_counter() - call.started
        if not ok:
            # An unfinished stream is not charged, so it is not metered either.
            self.prompt_tokens = self.completion_tokens = None
        gateway.finish_trace(
            call,
            self.miner,
            self.status,
            elapsed,
            self.prompt_tokens,
            self.completion_tokens,
            self.ttft,
        )
