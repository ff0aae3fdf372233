"""ScriptedMiner: stands in for a miner so gateway logic can be tested without a model;
end-to-end tests use real miners.

It speaks the wire format of `infergrid.protocol.wire` (OpenAI bodies plus the `infergrid`
extension, the usage chunk always sent when streaming, the request id as the completion id) and
answers with a fixed reply, one word per "token". Its `mode` scripts the failures a gateway must
survive. Given a signer key and the escrow's domain it signs real attestations, as a miner does
with settlement on; `attest` scripts the forgeries a gateway must refuse to pay for. `serve()`
runs any ASGI app on a free 127.0.0.1 port for the length of a `with` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import Attestation, request_hash, response_hash, signed_json
from infergrid.protocol.models import model_id
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.protocol.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from infergrid.protocol.wire import (
    ATTESTATION_KEY,
    EXTENSION_KEY,
    REQUEST_ID_HEADER,
    SSE_DONE,
    completion_id,
)

Mode = Literal[
    "ok",
    "http_500",  # every completion answers 500 before streaming
    "die_before_first",  # streams: headers and the role chunk, then the connection dies
    "die_mid_stream",  # streams: two tokens, then the connection dies
    "leak_logprobs",  # includes OpenAI logprobs even when not asked (a misbehaving miner)
    "text_400",  # refuses with a 400 whose body is plain text, not OpenAI's error shape
    # Hung, while /health still says ok (a stuck generation, not a dead process): every
    # completion is held for hang_s before its first token (streams: after the role chunk).
    "hang_before_first",
    "stall_mid_stream",  # streams: two tokens, then nothing for hang_s, then the rest
    "die_after_usage",  # streams: everything up to the attested usage chunk, then dies
    # Generates its whole reply whatever max_tokens says, and reports (and attests) all of it
    # consistently: a miner billing for output nobody asked for.
    "ignore_max_tokens",
]

Attest = Literal[
    "ok",
    "missing",  # no attestation at all
    "wrong_key",  # signed by a key that is not the registered signer
    "wrong_response",  # response hash over other tokens than those sent
    "wrong_request",  # request hash over another body
    "wrong_tokens",  # claims one more output token than it sent
    "wrong_model",  # another model id
    "wrong_miner",  # names another miner
]

DEFAULT_REPLY = "Hello from a scripted miner , nothing here is a model ."


class ScriptedDeath(Exception):
    """Raised inside a response to make uvicorn drop the connection mid-way."""


def address(n: int) -> str:
    return "0x" + f"{n:040x}"


@dataclass
class ScriptedMiner:
    owner: str
    models: tuple[str, ...] = ("tiny-test",)
    reply: str = DEFAULT_REPLY
    mode: Mode = "ok"
    healthy: bool = True
    token_delay_s: float = 0.0
    hang_s: float = 30.0  # how long the hang modes hold a request (unless the client leaves)
    max_concurrency: int | None = None  # declared on /health when set, as real miners do
    # Token ids it claims for the prompt, whatever the request holds, and reports (and attests)
    # consistently: large ones make a long SSE line, or inflate the bill.
    prompt_len: int = 7
    base_url: str = ""
    price_in_wei: int = 1
    price_out_wei: int = 2
    # Settlement: sign attestations with this key in this domain (both or neither).
    signer_key: str | None = None
    domain: Domain | None = None
    attest: Attest = "ok"
    # Every completion request as received: (headers, body).
    seen: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    # Requests held by a hang mode whose client (the gateway) hung up during the hold.
    hung_up: int = 0

    def offers(self) -> tuple[ModelOffer, ...]:
        return tuple(
            ModelOffer(
                name, model_id(name, "0x00", "main", "f32"), self.price_in_wei, self.price_out_wei
            )
            for name in self.models
        )

    @property
    def signer(self) -> str:
        return Signer(self.signer_key).address if self.signer_key else self.owner

    def record(self) -> NodeRecord:
        return NodeRecord(
            owner=self.owner,
            role=Role.MINER,
            endpoint=self.base_url,
            signer=self.signer,
            models=self.offers(),
            stake_wei=10**18,
        )

    def attestation(
        self, rid: str, raw: bytes, model: str, prompt_ids: list[int], ids: list[int]
    ) -> dict[str, Any] | None:
        """The signed attestation a miner puts in the extension (None without settlement)."""
        if self.signer_key is None or self.domain is None or self.attest == "missing":
            return None
        offer = next(o for o in self.offers() if model in (o.name, o.model_id))
        forge = self.attest
        attestation = Attestation(
            request_hash=request_hash(rid, raw + (b" " if forge == "wrong_request" else b"")),
            response_hash=response_hash([*ids, 999] if forge == "wrong_response" else ids),
            model_id=("0x" + "ee" * 32) if forge == "wrong_model" else offer.model_id,
            miner=address(0xBAD) if forge == "wrong_miner" else self.owner,
            tokens_in=len(prompt_ids),
            tokens_out=len(ids) + (1 if forge == "wrong_tokens" else 0),
        )
        key = "0x" + "42" * 32 if forge == "wrong_key" else self.signer_key
        signature = Signer(key).sign(self.domain.digest(attestation.struct_hash()))
        return signed_json(attestation, signature)

    @property
    def served(self) -> int:
        return len(self.seen)

    async def _hold(self, request: Request) -> None:
        """Hold for hang_s, or until the client hangs up (counted in hung_up). A streaming
        response is cancelled when its client leaves, which counts too."""
        deadline = time.monotonic() + self.hang_s
        try:
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    self.hung_up += 1
                    return
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.hung_up += 1
            raise

    # -- the app -----------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
            ]
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedMiner]:
        async with serve(self.app()) as url:
            self.base_url = url
            yield self

    async def _health(self, request: Request) -> Response:
        if not self.healthy:
            return JSONResponse({"status": "down"}, 503)
        declared = {} if self.max_concurrency is None else {"max_concurrency": self.max_concurrency}
        return JSONResponse({"status": "ok", "models": list(self.models), **declared})

    async def _chat(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    async def _serve(
        self, request: Request, kind: type[ChatCompletionRequest | CompletionRequest], chat: bool
    ) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse(APIError(400, "bad json").body(), 400)
        self.seen.append((dict(request.headers), body))
        try:
            req = parse_request(kind, body)
        except APIError as exc:
            return JSONResponse(exc.body(), exc.status)
        if req.model not in self.models:
            err = APIError(404, f"model {req.model} not served here", code="model_not_found")
            return JSONResponse(err.body(), 404)
        if self.mode == "text_400":
            return PlainTextResponse("bad things", 400)
        if self.mode == "http_500":
            return JSONResponse(APIError(500, "scripted failure", type="server_error").body(), 500)
        rid = request.headers.get(REQUEST_ID_HEADER) or "no-request-id"
        words = self.reply.split()
        limit = req.token_limit() or len(words)
        if self.mode == "ignore_max_tokens":
            limit = len(words)
        tokens = [w + " " for w in words[:limit]]
        finish = "stop" if limit >= len(words) else "length"
        prompt_ids = list(range(self.prompt_len))
        ids = [100 + i for i in range(len(tokens))]
        lps = [-0.25 - 0.01 * i for i in range(len(tokens))]
        logprobs_wanted = req.wants_logprobs() or self.mode == "leak_logprobs"
        cid = completion_id(rid, chat=chat)
        created = int(time.time())
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt_ids) + len(tokens),
        }
        if not req.stream:
            if self.mode == "hang_before_first":
                await self._hold(request)
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s * len(tokens))  # "generating"
            text = "".join(tokens)
            lp = _logprobs(tokens, lps, chat) if logprobs_wanted else None
            choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            answer = {
                "id": cid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": req.model,
                "choices": [choice],
                "usage": usage,
                EXTENSION_KEY: {
                    "model_id": self.record().models[0].model_id,
                    "seed": req.seed,
                    "prompt_token_ids": prompt_ids,
                    "output_token_ids": ids,
                    "output_logprobs": lps,
                },
            }
            signed = self.attestation(rid, raw, req.model, prompt_ids, ids)
            if signed is not None:
                answer[EXTENSION_KEY][ATTESTATION_KEY] = signed
            return JSONResponse(answer)

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], ext: dict[str, Any] | None, **extra: Any) -> bytes:
            data: dict[str, Any] = {
                "id": cid,
                "object": obj,
                "created": created,
                "model": req.model,
                "choices": choices,
                **extra,
            }
            if ext is not None:
                data[EXTENSION_KEY] = ext
            return b"data: " + _dumps(data) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            if chat:
                yield chunk(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    None,
                )
            if self.mode == "die_before_first":
                await asyncio.sleep(0.01)
                raise ScriptedDeath
            if self.mode == "hang_before_first":
                await self._hold(request)
            for i, token in enumerate(tokens):
                if self.mode == "die_mid_stream" and i == 2:
                    await asyncio.sleep(0.01)
                    raise ScriptedDeath
                if self.mode == "stall_mid_stream" and i == 2:
                    await self._hold(request)
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                lp = _logprobs([token], [lps[i]], chat) if logprobs_wanted else None
                c: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": None}
                if chat:
                    c["delta"] = {"content": token}
                else:
                    c["text"] = token
                yield chunk([c], {"token_ids": [ids[i]], "logprobs": [lps[i]]})
            end: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                end["delta"] = {}
            else:
                end["text"] = ""
            yield chunk([end], None)
            ext = {
                "model_id": self.record().models[0].model_id,
                "seed": req.seed,
                "prompt_token_ids": prompt_ids,
            }
            signed = self.attestation(rid, raw, req.model, prompt_ids, ids)
            if signed is not None:
                ext[ATTESTATION_KEY] = signed
            yield chunk([], ext, usage=usage)
            if self.mode == "die_after_usage":
                await asyncio.sleep(0.01)
                raise ScriptedDeath
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")


def _logprobs(tokens: list[str], lps: list[float], chat: bool) -> dict[str, Any]:
    if chat:
        return {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(tokens, lps, strict=True)
            ]
        }
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": []}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve(app: Any, *, log_level: str = "critical") -> AsyncIterator[str]:
    """Run an ASGI app on a free loopback port until the block exits; yields its base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 5)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        sock.close()
