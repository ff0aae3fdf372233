"""The miner's HTTP API: OpenAI's chat and legacy completions over one engine, plus /health.

Generation runs in worker threads (at most `max_concurrency` at once; further requests
queue) and hands tokens to the event loop in batches (see _Job). A client that goes away
stops its generation at the next token. Client mistakes are OpenAI-shaped 4xx responses,
checked by the same rules as the gateway's (protocol.openai_types.parse_request: parameters
the network cannot honour, penalties among them, are refused by name; vLLM's `top_k` extra
is honoured). A body larger than `max_body_bytes` or slower than `body_timeout_s` is refused
(413, 408).

When the client sends no `max_tokens`, the miner allows min(DEFAULT_MAX_TOKENS, what is
left of the context after the prompt). A metered gateway always states the limit it reserved
for, so this default only serves requests sent to the miner directly.

With an `Attestor` (settlement on), every successful response ends with a signed attestation
(see protocol.wire) over request_hash(request id, the exact body bytes received) and the
output token ids; the request id is the x-request-id header, or the id the miner generates
and returns in that header. A prompt that tokenizes to more tokens than the request can be
billed for (protocol.pricing.max_prompt_tokens of the body's length; the gateway refuses such
an attestation) is refused with a 400 before generating, since that work could not be paid.
Each request hash is attested at most once: a repeat, or a twin while the first is still
generating, is refused with 409, since two different signed answers to one request are
slashable. A `ReceiptLog` records each attested response with its value at the miner's own
prices, for checking gateways' vouchers (compute.collector).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from infergrid.compute.attestation import (
    DEFAULT_REMEMBERED,
    AttestedRequests,
    Attestor,
)
from infergrid.compute.engine import (
    Engine,
    GeneratedToken,
    SamplingParams,
    UnsupportedRequest,
)
from infergrid.compute.openai_format import ResponseContext, StreamWriter, completion_body, dumps
from infergrid.compute.receipt_log import LoggedResponse, ReceiptLog, normalize_address
from infergrid.http_serving import ERROR_HANDLERS, ServerThread, serve
from infergrid.protocol.generation import (
    billable_prompt,
    chat_messages,
    plan_generation,
    requested_logprobs,
)
from infergrid.protocol.generation import token_budget as token_budget  # re-exported
from infergrid.protocol.json_body import decode_request_json, read_body
from infergrid.protocol.messages import request_hash, signed_json
from infergrid.protocol.nodes import ModelOffer
from infergrid.protocol.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    parse_request,
)
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS, request_value
from infergrid.protocol.sampling import SAMPLER_VERSION
from infergrid.protocol.wire import (
    GATEWAY_HEADER,
    MINER_HEADER,
    PAYER_HEADER,
    REQUEST_ID_HEADER,
    completion_id,
)

logger = logging.getLogger(__name__)

# Streams send at most one chunk per this many seconds (tokens gather in between; the first
# and the last token are never held back). 50 updates a second look smooth, and a model
# faster than that pays one event-loop wake-up per chunk instead of one per token.
DEFAULT_STREAM_INTERVAL = 0.02
# Prompts longer than this are templated and tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4096
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# The gateway forwards up to its own limit (16 MiB by default) plus the fields it adds.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


class _Done:
    """Sentinel: the worker has finished with a job."""


_DONE = _Done()


class GenerationFailed(Exception):
    pass


@dataclass
class MinerStats:
    """Counters for /health and for tests; mutated on the event loop only."""

    in_flight: int = 0  # accepted generations, queued or running
    requests: int = 0
    tokens_generated: int = 0
    cancelled: int = 0  # generations stopped before their finish reason (client gone)


class _Job:
    """One generation: the worker thread appends tokens, the event loop takes them in batches.

    Waking the event loop costs far more than producing a token of a small model, so the
    worker wakes it only when it is waiting for that kind of item: any token while it is
    ready to send, and only the last one while it is lingering (letting a few tokens gather
    into one chunk) or collecting a non-streamed answer.
    """

    __slots__ = (
        "_error",
        "_every_token",
        "_final_only",
        "_final_seen",
        "_finished",
        "_items",
        "_loop",
        "_signalled",
        "_waiter",
        "_waiting",
        "cancel",
        "completed",
        "generated",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, every_token: bool) -> None:
        self._loop = loop
        self._every_token = every_token
        self._items: deque[GeneratedToken | BaseException | _Done] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._waiting = False
        self._final_only = False
        self._signalled = False
        self._final_seen = False
        self._finished = False
        self._error: BaseException | None = None
        self.cancel = threading.Event()
        self.generated = 0  # written by the worker, read by the loop once it is done
        self.completed = False  # the generation reached its finish reason

    # -- worker thread side

    def push(self, item: GeneratedToken | BaseException | _Done, *, final: bool) -> None:
        self._items.append(item)
        if final:
            self._final_seen = True
        # The flags are read after the append and the loop sets them before it re-checks
        # the items, so an item is never left behind with the loop asleep.
        if (
            self._waiting
            and not self._signalled
            and (final or (self._every_token and not self._final_only))
        ):
            self._signalled = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                self.cancel.set()

    # -- event loop side

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stop(self) -> None:
        """Stop generating and wake any reader."""
        self.cancel.set()
        self._wake()

    def _drain(self) -> list[GeneratedToken]:
        batch: list[GeneratedToken] = []
        items = self._items
        while items:
            item = items.popleft()
            if isinstance(item, _Done):
                self._finished = True
            elif isinstance(item, BaseException):
                self._error = item
                break
            else:
                batch.append(item)
        return batch

    async def next_batch(self, not_before: float = 0.0) -> list[GeneratedToken] | None:
        """The tokens ready (at least one), or None once nothing more will come.

        Before the loop time `not_before` it returns only if the generation has ended, so
        that tokens arriving meanwhile go out together; the last token never waits.
        """
        loop = self._loop
        while True:
            if self._error is not None:
                raise GenerationFailed(str(self._error)) from self._error
            lingering = loop.time() < not_before and not self._final_seen
            if not lingering:
                batch = self._drain()
                if batch:
                    return batch
                if self._error is not None:
                    continue
                if self._finished:
                    return None
            if self.cancel.is_set():
                return None
            self._waiter = loop.create_future()
            self._signalled = False
            self._final_only = lingering
            timer = loop.call_at(not_before, self._wake) if lingering else None
            self._waiting = True
            try:
                if not self._final_seen and (lingering or not self._items):
                    await self._waiter
            finally:
                self._waiting = False
                self._waiter = None
                if timer is not None:
                    timer.cancel()


def _produce(engine: Engine, prompt_ids: list[int], params: SamplingParams, job: _Job) -> None:
    """Worker thread body: run the engine until it finishes or the job is cancelled."""
    try:
        if job.cancel.is_set():
            return
        tokens = engine.generate(prompt_ids, params)
        try:
            for token in tokens:
                job.generated += 1
                if token.finish_reason is not None:
                    job.completed = True
                job.push(token, final=token.finish_reason is not None)
                if job.cancel.is_set():
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
    except Exception as exc:
        job.push(exc, final=True)
    finally:
        job.push(_DONE, final=True)


@dataclass
class Settlement:
    """What a miner needs to attest and to keep its own record of what it attested."""

    attestor: Attestor
    guard: AttestedRequests
    offer: ModelOffer | None = None  # the miner's registered prices, for the log's values
    log: ReceiptLog | None = None


class _Attesting:
    """One request's attestation: signed at most once, when its response is complete.

    The request hash is reserved in the guard before generation; `release()` gives it back
    if the response ended without a signature (client gone, engine error), so that a retry
    can be served: nothing was signed, so nothing can conflict.
    """

    __slots__ = ("_settlement", "done", "gateway", "payer", "request_hash", "request_id")

    def __init__(
        self,
        settlement: Settlement,
        request_hash: bytes,
        request_id: str,
        payer: str | None,
        gateway: str | None,
    ) -> None:
        self._settlement = settlement
        self.request_hash = request_hash
        self.request_id = request_id
        self.payer = payer
        self.gateway = gateway
        self.done = False

    def reserve(self) -> bool:
        """Claim the request hash; False if this miner attested it or is answering it."""
        return self._settlement.guard.reserve(self.request_hash)

    def sign(self, model_id: str, tokens_in: int, output_ids: Sequence[int]) -> dict[str, Any]:
        if self.done:
            raise RuntimeError("a response is attested once")
        settlement = self._settlement
        # Recorded before signing: should signing fail half-way, refusing the hash later is
        # harmless, while forgetting a signature that got out is not.
        self.done = True
        settlement.guard.signed(self.request_hash)
        attestation, signature = settlement.attestor.attest(
            self.request_hash, output_ids, model_id, tokens_in
        )
        if settlement.log is not None and settlement.offer is not None:
            record = LoggedResponse(
                request_id=self.request_id,
                request_hash=self.request_hash,
                payer=self.payer,
                gateway=self.gateway,
                model_id=model_id,
                tokens_in=tokens_in,
                tokens_out=attestation.tokens_out,
                value_wei=request_value(tokens_in, attestation.tokens_out, settlement.offer),
                created_at=time.time(),
            )
            try:
                settlement.log.append(record)
            except RuntimeError:  # closed while the server shuts down: the answer still goes
                logger.warning("receipt log closed; response %s not logged", self.request_id)
        return signed_json(attestation, signature)

    def release(self) -> None:
        if not self.done:
            self._settlement.guard.release(self.request_hash)


@dataclass
class _Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    ctx: ResponseContext
    stream: bool
    request_id: str
    attesting: _Attesting | None = None


@dataclass
class MinerState:
    engine: Engine
    node_address: str
    max_concurrency: int
    default_max_tokens: int
    stream_interval: float
    executor: ThreadPoolExecutor
    stats: MinerStats = field(default_factory=MinerStats)
    jobs: set[_Job] = field(default_factory=set)
    settlement: Settlement | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def model_matches(self, model: str) -> bool:
        return model in (self.engine.name, self.engine.model_id)

    def health(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "status": "ok",
            "models": [
                {
                    "name": engine.name,
                    "model_id": engine.model_id,
                    "context_length": engine.context_length,
                    "sampler": SAMPLER_VERSION,
                }
            ],
            "in_flight": self.stats.in_flight,
            "max_concurrency": self.max_concurrency,
            "address": self.node_address,
            **(
                {"signer": self.settlement.attestor.signer_address}
                if self.settlement is not None
                else {}
            ),
            **self._receipt_log_health(),
        }

    def _receipt_log_health(self) -> dict[str, Any]:
        log = self.settlement.log if self.settlement is not None else None
        if log is None:
            return {}
        # Responses the log dropped as unstorable, and batches its database failed.
        return {"receipt_log": {"rejected_rows": log.rejected, "write_errors": log.write_errors}}


# -- request parsing (pure apart from the tokenizer; the rules are protocol.generation's) ---


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(given):
        raise APIError(
            400,
            f"Invalid '{REQUEST_ID_HEADER}' header: use 1-128 of A-Z a-z 0-9 . _ : -",
            code="invalid_request_id",
        )
    return given


async def _prompt_ids(engine: Engine, req: ChatCompletionRequest | CompletionRequest) -> list[int]:
    if isinstance(req, ChatCompletionRequest):
        messages = chat_messages(req)
        size = sum(len(m["content"]) for m in messages)

        def work() -> list[int]:
            return engine.chat_prompt_ids(messages)

    else:
        text = req.prompt_text()
        size = len(text)

        def work() -> list[int]:
            return engine.encode(text)

    try:
        ids = work() if size <= _INLINE_TOKENIZE_CHARS else await run_in_threadpool(work)
    except Exception as exc:  # a chat template rejecting the conversation, say
        raise APIError(
            400, f"Could not build the prompt: {exc}", param="messages", code="invalid_prompt"
        ) from None
    if not ids:
        raise APIError(
            400, "The prompt is empty after tokenization.", param="prompt", code="empty_prompt"
        )
    return ids


def _address_header(request: Request, name: str) -> str | None:
    try:
        return normalize_address(request.headers.get(name))
    except ValueError:
        raise APIError(
            400, f"Invalid '{name}' header: expected a 0x address.", code="invalid_header"
        ) from None


async def _prepare(state: MinerState, request: Request, chat: bool) -> _Prepared:
    # The exact bytes received: the attestation's request hash covers them, not a re-encoding.
    try:
        raw = await read_body(
            request.stream(), max_bytes=state.max_body_bytes, timeout_s=state.body_timeout_s
        )
    except ClientDisconnect:
        raise APIError(499, "The client closed the connection.", code="client_closed") from None
    body = decode_request_json(raw)
    req: ChatCompletionRequest | CompletionRequest = parse_request(
        ChatCompletionRequest if chat else CompletionRequest, body
    )
    engine = state.engine
    if not state.model_matches(req.model):
        raise APIError(
            404,
            f"The model '{req.model}' does not exist on this miner; it serves '{engine.name}'.",
            param="model",
            code="model_not_found",
        )
    request_id = _request_id(request)
    attesting: _Attesting | None = None
    if state.settlement is not None:
        attesting = _Attesting(
            state.settlement,
            request_hash(request_id, raw),
            request_id,
            _address_header(request, PAYER_HEADER),
            _address_header(request, GATEWAY_HEADER),
        )
    prompt_ids = await _prompt_ids(engine, req)
    prompt_param = "messages" if chat else "prompt"
    if attesting is not None:
        billable_prompt(len(prompt_ids), len(raw), prompt_param=prompt_param)
    plan = plan_generation(
        req,
        prompt_ids,
        request_hash=attesting.request_hash if attesting is not None else None,
        context_length=engine.context_length,
        default_max_tokens=state.default_max_tokens,
    )
    logprobs = requested_logprobs(req)
    seed = plan.seed
    params = SamplingParams(
        max_tokens=plan.max_tokens,
        temperature=plan.temperature,
        top_p=plan.top_p,
        top_k=plan.top_k,
        seed=seed,
        stop=plan.stop,
        top_logprobs=plan.top_logprobs,
    )
    check_params = getattr(engine, "check_params", None)
    if check_params is not None:
        try:
            check_params(params)
        except UnsupportedRequest as exc:
            raise APIError(400, str(exc), param=exc.param, code="unsupported_parameter") from None
    ctx = ResponseContext(
        completion_id=completion_id(request_id, chat=chat),
        created=int(time.time()),
        model=engine.name,
        model_id=engine.model_id,
        chat=chat,
        seed=seed,
        prompt_token_ids=prompt_ids,
        eos_token_ids=engine.eos_token_ids,
        token_bytes=engine.token_bytes,
        decode=engine.decode,
        logprobs=logprobs,
        include_usage=req.include_usage(),
        attest=_attest_fn(attesting, engine.model_id, len(prompt_ids)),
    )
    return _Prepared(prompt_ids, params, ctx, req.stream, request_id, attesting)


def _attest_fn(
    attesting: _Attesting | None, model_id: str, tokens_in: int
) -> Callable[[Sequence[int]], dict[str, Any]] | None:
    if attesting is None:
        return None

    def attest(output_ids: Sequence[int]) -> dict[str, Any]:
        return attesting.sign(model_id, tokens_in, output_ids)

    return attest


# -- the I/O shell ---------------------------------------------------------------------------


async def _watch_disconnect(receive: Receive, job: _Job) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.stop()
            return


class _EventStream(Response):
    """An SSE response fed by a job; it owns the job's disconnect watcher from here on."""

    media_type = "text/event-stream"

    def __init__(
        self,
        first: bytes,
        job: _Job,
        writer: StreamWriter,
        watcher: asyncio.Task[None],
        headers: Mapping[str, str],
        interval: float,
        attesting: _Attesting | None = None,
    ) -> None:
        self.status_code = 200
        self._attesting = attesting
        self._interval = interval
        self.background = None
        self._first = first
        self._job = job
        self._writer = writer
        self._watcher = watcher
        self.init_headers(headers)

    async def _events(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        yield self._first
        # Each chunk costs the engine a wake-up of this loop, worth a fraction of a
        # millisecond of its time; a fast model's tokens therefore go out in small groups,
        # at most one chunk per interval (the last token is never held back).
        not_before = loop.time() + self._interval
        while not self._writer.done:
            if self._job.cancel.is_set():
                return
            try:
                batch = await self._job.next_batch(not_before)
            except GenerationFailed as exc:
                yield _sse_error(exc)
                return
            if batch is None:
                return
            yield self._writer.feed(batch)
            not_before = loop.time() + self._interval

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self._events():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # some servers raise when the client has gone; that is not an error
            pass
        finally:
            self._watcher.cancel()
            self._job.stop()
            if self._attesting is not None:
                self._attesting.release()


def _sse_error(exc: Exception) -> bytes:
    body = error_body(f"Generation failed: {exc}", type="server_error", code="engine_error")
    return b"data: " + dumps(body) + b"\n\n"


def _error_response(exc: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**exc.headers, **(headers or {})}
    )


async def _serve_completion(request: Request, chat: bool) -> Response:
    state: MinerState = request.app.state.miner
    try:
        prepared = await _prepare(state, request, chat)
    except APIError as exc:
        return _error_response(exc)
    ctx = prepared.ctx
    headers = {
        REQUEST_ID_HEADER: prepared.request_id,
        MINER_HEADER: state.node_address,
    }
    attesting = prepared.attesting
    if attesting is not None and not attesting.reserve():
        return _error_response(
            APIError(
                409,
                f"Request {prepared.request_id!r} (request hash "
                f"0x{attesting.request_hash.hex()}) was already answered or is being "
                "answered by this miner; a miner attests each request once. Send a new "
                f"'{REQUEST_ID_HEADER}'.",
                code="duplicate_request",
            ),
            headers,
        )
    loop = asyncio.get_running_loop()
    job = _Job(loop, every_token=prepared.stream)
    stats = state.stats
    stats.in_flight += 1
    stats.requests += 1
    state.jobs.add(job)

    def finished(_: object) -> None:
        stats.in_flight -= 1
        stats.tokens_generated += job.generated
        if not job.completed:
            stats.cancelled += 1
        state.jobs.discard(job)

    future = loop.run_in_executor(
        state.executor, _produce, state.engine, prepared.prompt_ids, prepared.params, job
    )
    future.add_done_callback(finished)
    watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
    handed_over = False
    try:
        if prepared.stream:
            writer = StreamWriter(ctx)
            # Wait for the first token before committing to a 200, so that an engine failure
            # (or a client gone while queued) is still a clean error the gateway can retry.
            batch = await job.next_batch()
            if batch is None:
                return Response(status_code=499)
            handed_over = True
            sse_headers = {**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
            return _EventStream(
                writer.feed(batch),
                job,
                writer,
                watcher,
                sse_headers,
                state.stream_interval,
                attesting,
            )
        tokens: list[GeneratedToken] = []
        while True:
            batch = await job.next_batch()
            if batch is None:
                break
            tokens.extend(batch)
            if tokens[-1].finish_reason is not None:
                break
        if not tokens or tokens[-1].finish_reason is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        return JSONResponse(completion_body(ctx, tokens), headers=headers)
    except GenerationFailed as exc:
        return _error_response(
            APIError(500, f"Generation failed: {exc}", type="server_error", code="engine_error"),
            headers,
        )
    finally:
        if not handed_over:
            watcher.cancel()
            job.stop()
            if attesting is not None:
                attesting.release()


async def chat_completions(request: Request) -> Response:
    return await _serve_completion(request, chat=True)


async def completions(request: Request) -> Response:
    return await _serve_completion(request, chat=False)


async def health(request: Request) -> Response:
    return JSONResponse(request.app.state.miner.health())


async def list_models(request: Request) -> Response:
    engine = request.app.state.miner.engine
    model = {"id": engine.name, "object": "model", "created": 0, "owned_by": "infergrid"}
    return JSONResponse({"object": "list", "data": [model]})


def create_miner_app(
    engine: Engine,
    *,
    node_address: str,
    max_concurrency: int = 1,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    stream_interval: float = DEFAULT_STREAM_INTERVAL,
    attestor: Attestor | None = None,
    receipt_log: ReceiptLog | None = None,
    offer: ModelOffer | None = None,
    remembered: int = DEFAULT_REMEMBERED,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> Starlette:
    """The miner's ASGI app over one engine; `app.state.miner` holds its state and stats.

    With `attestor`, responses carry signed attestations; with `receipt_log` too (which
    needs `offer`, the miner's registered prices for this engine's model), each attested
    response is logged, and the log also tells the equivocation guard about request hashes
    older than the `remembered` it keeps in memory. The caller owns and closes the log.
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    settlement: Settlement | None = None
    if attestor is not None:
        if receipt_log is not None:
            if offer is None:
                raise ValueError("a receipt log needs the miner's ModelOffer for its values")
            if offer.model_id.lower() != engine.model_id.lower():
                raise ValueError(
                    f"the offer is for model {offer.model_id}, the engine serves {engine.model_id}"
                )
        guard = AttestedRequests(
            receipt_log.contains if receipt_log is not None else None, remembered
        )
        settlement = Settlement(attestor, guard, offer, receipt_log)
    elif receipt_log is not None:
        raise ValueError("a receipt log records attested responses: pass an attestor too")
    executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
    state = MinerState(
        engine,
        node_address,
        max_concurrency,
        default_max_tokens,
        stream_interval,
        executor,
        settlement=settlement,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for job in list(state.jobs):
                job.cancel.set()
            executor.shutdown(wait=False, cancel_futures=True)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers=ERROR_HANDLERS,
        lifespan=lifespan,
    )
    app.state.miner = state
    return app


# -- running it ------------------------------------------------------------------------------


def run_miner_server(
    app: Starlette, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning"
) -> None:
    """Serve until interrupted (uvicorn with uvloop and httptools)."""
    serve(app, host, port, log_level=log_level)


class MinerServerThread(ServerThread):
    """The miner server on a background thread (http_serving.ServerThread), for tests and the
    devnet."""

    what = "miner server"


def iter_sse(lines: Iterator[bytes] | Sequence[bytes]) -> Iterator[dict[str, Any]]:
    """Parse `data: {...}` SSE lines into objects, stopping at [DONE] (a small client helper)."""
    for line in lines:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)
