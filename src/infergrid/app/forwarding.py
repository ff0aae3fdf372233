"""Forwarding with failover: a call goes to one miner after another until one answers.

The core of the completion path: pick a miner (the pool's scheduler holds a slot on it),
reserve what the call may cost there (metered, through `Metering`), send it under the
first-token deadline (app.deadlines), and fail over to another miner while nothing has reached
the client. A non-streamed answer is verified, committed and returned here; a stream is
handed, once primed, to a `StreamRelay`, which then owns the slot. Every slot is released
once, with how its attempt went: `Served`, `Failed` (the miner's fault) or `Cancelled` (the
request's fault, a client that left, a reservation that did not fit).

When every miner that may serve the model is at capacity the call is shed: 429
`network_saturated` with `retry-after`, before anything is reserved or sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from starlette.responses import Response
from starlette.types import Receive

from infergrid.app import relay
from infergrid.app.api_common import model_not_found
from infergrid.app.audits import AuditService
from infergrid.app.billing import InsufficientHeadroom
from infergrid.app.calls import Call
from infergrid.app.config import GatewayConfig
from infergrid.app.deadlines import DeadlineRule, FirstTokenWatch
from infergrid.app.failures import RECEIPT_FAILED, UPSTREAM_ERRORS, _MinerFailed, _ReceiptFailed
from infergrid.app.metering import Metering
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.miners import (
    MinerPool,
    MinerState,
    ModelNotServed,
    NetworkSaturated,
    NoHealthyMiner,
    NoMinerWithinPrice,
    PoolMaintainer,
    Slot,
)
from infergrid.app.settlement import Settlement, insufficient_error
from infergrid.app.stream_relay import StreamRelay, wait_for_disconnect
from infergrid.app.traces import TraceStore
from infergrid.compute.routing import Cancelled, Failed, Outcome, Served
from infergrid.protocol import json_body
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.wire import (
    ATTESTATION_KEY,
    EXTENSION_KEY,
    GATEWAY_HEADER,
    MINER_HEADER,
    PAYER_HEADER,
    REQUEST_ID_HEADER,
    REQUEST_STATUS_HEADER,
    request_status_path,
)
from infergrid.verify.attestation import AttestationRejected, Verified

__all__ = ["MAX_ANSWER_BYTES", "MAX_ERROR_BYTES", "Forwarder"]

# The gateway's one log, whichever of its modules writes to it.
log = logging.getLogger("infergrid.app.gateway")

MAX_ANSWER_BYTES = 256 * 1024 * 1024  # a non-streamed answer, extension included
MAX_ERROR_BYTES = 1024 * 1024


class Forwarder:
    """Sends calls to miners, with failover; the `RelayHost` of the streams it starts."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        pool: MinerPool,
        maintainer: PoolMaintainer,
        metrics: GatewayMetrics,
        traces: TraceStore,
        settlement: Settlement | None,
        metering: Metering | None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.maintainer = maintainer
        self.metrics = metrics
        self.traces = traces
        self.settlement = settlement
        self.metering = metering
        self.audits: AuditService | None = None  # metered gateways: set by the Gateway
        self.session: aiohttp.ClientSession | None = None  # set for the gateway's lifespan
        self.deadlines = DeadlineRule(
            floor_s=config.first_token_timeout_floor_s,
            cap_s=config.first_token_timeout_cap_s,
            factor=config.first_token_timeout_factor,
            answer_cap_s=config.read_timeout_s,
        )

    async def forward_while_connected(self, call: Call, receive: Receive) -> Response | StreamRelay:
        """`forward`, given up as soon as the client hangs up: the upstream request is then
        closed, which stops the miner generating an answer nobody will read. A receipt whose
        commit had already begun is still stored and charged (see `Metering.commit`).

        `forward` runs in this task and one watcher task cancels it when the client goes:
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
            return await self.forward(call)
        except asyncio.CancelledError:
            if not gone:
                raise  # the server is shutting down
            this.uncancel()
            log.info("request %s: the client closed the connection", call.request_id)
            raise APIError(499, "The client closed the connection.", code="client_closed") from None
        finally:
            done = True
            watch.cancel()

    async def forward(self, call: Call) -> Response | StreamRelay:
        """Serve the call from the first miner that can: pick one (reserving at its prices,
        metered), attempt it, and fail over while nothing reached the client, up to
        `max_attempts` miners. Raises APIError: 404 for a model nobody serves, 402 when the
        payer can afford no miner, 503 when no miner could take it."""
        tried: list[MinerState] = []
        last_error = "no healthy miner"
        refused: InsufficientHeadroom | None = None  # the cheapest miner the payer can't afford
        attempts = 0
        metering = self.metering
        pool = self.pool
        limit = max(1, self.config.max_attempts)
        demand_model = pool.offer_name(call.model)
        if pool.serves(call.model):
            route = call.route
            asked = call.max_tokens + (route.prompt_tokens if route is not None else 0)
            pool.demand.requested(demand_model, asked, time.time())

        def can_fail_over() -> bool:
            """Whether another miner could still take the call if this attempt gave up."""
            return attempts < limit and pool.can_serve(call.model, tried, canary=call.canary)

        while attempts < limit:
            try:
                slot = pool.pick(call.model, tried, canary=call.canary, request=call.route)
            except NetworkSaturated as exc:
                self.metrics.shed.labels(demand_model).inc()
                pool.demand.shed(demand_model, time.time())
                call.trace.error = last_error if tried else None
                raise APIError(
                    429,
                    f"Every miner serving `{call.model}` is at capacity; retry after"
                    f" {exc.retry_after} s.",
                    type="server_error",
                    code="network_saturated",
                    headers={"retry-after": exc.retry_after},
                ) from None
            except NoMinerWithinPrice:
                if tried:
                    break  # the ones within the price failed: not the client's fault
                raise APIError(
                    400,
                    f"No miner serving `{call.model}` is within infergrid.route.max_price.",
                    param="infergrid.route.max_price",
                    code="no_miner_within_price",
                ) from None
            except ModelNotServed:
                if not self.maintainer.discovered:
                    # Not "no such model": we have not been able to read the registry yet.
                    raise APIError(
                        503,
                        "The gateway has not read the miner registry yet; please retry.",
                        type="server_error",
                        code="registry_unavailable",
                    ) from None
                raise model_not_found(call.model) from None
            except NoHealthyMiner:
                break
            miner = slot.miner
            tried.append(miner)
            if metering is not None:
                try:
                    reserved = metering.reserve(call, miner)
                except InsufficientHeadroom as exc:
                    # A cheaper miner may still fit the payer's headroom; this one is skipped.
                    if refused is None or exc.needed_wei < refused.needed_wei:
                        refused = exc
                    reserved = False
                if not reserved:
                    pool.release(slot, Cancelled())
                    continue
            attempts += 1
            call.trace.attempts += 1
            try:
                if call.stream and self.config.hedge_streams and not call.canary:
                    return await self._hedged(call, slot, tried, can_fail_over)
                return await self._attempt(call, slot, can_fail_over)
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

    async def _hedged(
        self,
        call: Call,
        slot: Slot,
        tried: list[MinerState],
        can_fail_over: Callable[[], bool],
    ) -> Response | StreamRelay:
        """`_attempt` on the slot, raced by a second miner if its first token is late.

        At the scheduler's `hedge_delay`, if its hedge budget allows and a miner outside
        `tried` has a free slot (a hedge never overflows a full network), the call also goes
        there (metered: the hold grows to the dearer miner's cost). The first attempt to
        prime a first token (or to answer at all: a 4xx) serves the call; the other is closed
        before it sends anything to the client, its slot released as `Cancelled`, and the call
        is charged at the winner's prices. If both fail, the last failure is raised and the
        caller fails over past both."""
        pool = self.pool
        primary = asyncio.ensure_future(self._attempt(call, slot, can_fail_over))
        racing = [primary]
        try:
            delay = pool.hedge_delay(slot)
            if delay is not None:
                await asyncio.wait(racing, timeout=delay)
            if not primary.done() and pool.should_hedge(slot):
                second = self._hedge_slot(call, tried)
                if second is not None:
                    tried.append(second.miner)
                    call.trace.attempts += 1
                    self.metrics.hedges.inc()
                    racing.append(asyncio.ensure_future(self._attempt(call, second, can_fail_over)))
            failure: BaseException | None = None
            pending = set(racing)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in (t for t in racing if t in done):  # the primary first on a tie
                    failure = task.exception()
                    if failure is None:
                        await self._close_losers([t for t in racing if t is not task])
                        result = task.result()
                        if len(racing) > 1 and self.metering is not None:
                            served_by = result.miner if isinstance(result, StreamRelay) else None
                            if served_by is not None:
                                self.metering.won(call, served_by)
                        return result
                    if not isinstance(failure, _MinerFailed):
                        await self._close_losers([t for t in racing if t is not task])
                        raise failure
                    if pending:
                        log.info(
                            "request %s: a raced attempt failed (%s)", call.request_id, failure
                        )
            assert failure is not None
            raise failure
        except BaseException:
            await self._close_losers(racing)
            raise

    def _hedge_slot(self, call: Call, tried: list[MinerState]) -> Slot | None:
        """A second miner's slot for the call, reserved for (metered); None if there is none
        to be had now."""
        try:
            second = self.pool.pick(call.model, tried, request=call.route, hedge=True)
        except (NetworkSaturated, NoHealthyMiner, NoMinerWithinPrice, ModelNotServed):
            return None
        if self.metering is not None:
            try:
                reserved = self.metering.reserve_hedge(call, second.miner)
            except InsufficientHeadroom:
                reserved = False
            if not reserved:
                self.pool.release(second, Cancelled())
                return None
        return second

    async def _close_losers(self, tasks: list[asyncio.Future[Response | StreamRelay]]) -> None:
        """Stop attempts that lost a race (or whose caller went away). One that already
        primed a stream is closed without a word to the client; its slot is released as
        `Cancelled` (its miner did nothing wrong) and the call's hold is left to the winner."""
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, StreamRelay):
                result.resp.close()
                self.pool.release(result.slot, Cancelled())

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
        self, call: Call, slot: Slot, can_fail_over: Callable[[], bool]
    ) -> Response | StreamRelay:
        """Send the call to the slot's miner. Raises _MinerFailed if nothing reached the
        client: the miner failed, missed its first-token deadline, or was taken out of service
        while the call waited for its first token and another miner could take it
        (app.deadlines). Releases the slot unless a StreamRelay took it."""
        pool = self.pool
        miner = slot.miner
        handed_off = False  # a StreamRelay took over the response and its bookkeeping
        ok = False
        # Until the attempt ends otherwise: a client leaving, a server stopping.
        outcome: Outcome = Cancelled()
        prompt_bytes = len(call.payload)
        latency = pool.latency(call.model)
        rule = self.deadlines
        if call.stream:
            deadline, cap = rule.first_token_s(latency, prompt_bytes), rule.cap_s
        else:
            deadline = rule.answer_s(latency, prompt_bytes, call.max_tokens)
            cap = rule.answer_cap_s
        sent = time.perf_counter()
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
                        miner_down=lambda: not pool.in_service(miner),
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
                        stream = StreamRelay(self, call, slot, resp)
                        stream.sent_at = sent
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
            completion = relay.usage_of(answer)[1]
            pool.observed_latency(call.model).observe_answer(prompt_bytes, answer_s, completion)
            # Non-streamed, the first token comes with the whole answer, which cannot be split
            # into a first token and the rest: it teaches a (pessimistic) first-token time.
            outcome = Served(ttft_s=answer_s)
            return await self._answer(call, miner, answer, verified)
        except _MinerFailed as exc:
            outcome = Failed(str(exc))
            raise
        finally:
            if not handed_off:
                pool.release(slot, outcome)

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
            if self.audits is not None and call.receipt is not None:
                self._record_answer(call, miner, answer)
            if isinstance(usage, dict):
                relay.add_cost(usage, value)
        content = relay.encode(relay.client_view(answer, wants_logprobs=call.wants_logprobs))
        elapsed = time.perf_counter() - call.started
        self.finish_trace(call, miner, 200, elapsed, prompt, completion)
        return Response(
            content,
            200,
            headers={
                REQUEST_ID_HEADER: call.request_id,
                MINER_HEADER: miner.owner,
                REQUEST_STATUS_HEADER: request_status_path(call.request_id),
            },
            media_type="application/json",
        )

    def _record_answer(self, call: Call, miner: MinerState, answer: dict[str, Any]) -> None:
        """Hand a committed non-streamed answer to the audits (before the extension goes)."""
        assert self.audits is not None
        ext = answer.get(EXTENSION_KEY)
        ext = ext if isinstance(ext, dict) else {}
        choices = answer.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        choice = choice if isinstance(choice, dict) else {}
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        usage = answer.get("usage")
        self.audits.record(
            call,
            miner,
            prompt_token_ids=ext.get("prompt_token_ids"),
            output_token_ids=ext.get("output_token_ids"),
            output_logprobs=ext.get("output_logprobs"),
            text=text if isinstance(text, str) else "",
            finish_reason=choice.get("finish_reason"),
            usage=dict(usage) if isinstance(usage, dict) else {},
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
            headers={
                REQUEST_ID_HEADER: call.request_id,
                MINER_HEADER: miner.owner,
                REQUEST_STATUS_HEADER: request_status_path(call.request_id),
            },
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
        if status == 200:
            self.pool.demand.served(
                self.pool.offer_name(call.model), (prompt or 0) + (completion or 0), time.time()
            )
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
