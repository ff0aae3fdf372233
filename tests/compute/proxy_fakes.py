"""Stand-ins for what cannot run here: vLLM's batch bookkeeping and a vLLM server (vLLM is
CUDA-only). A uniquely named module, since test folders have no __init__.py.

FakeVLLMServer answers /v1/completions the way `vllm serve <model> --logits-processors
infergrid.compute.plugins.vllm_sampler:InferGridSampler --logprobs-mode raw_logprobs` does
for what the proxy engine sends: prompt token ids, temperature 0, the plugin's `vllm_xargs`,
`return_tokens_as_token_ids`, streamed chunks whose logprobs are log_softmax of the raw
logits in float32 and whose tokens read "token_id:N". Its model is a real transformers model
(the tiny one), run step by step with a KV cache, and each step's token is the greedy argmax
of the logits after the REAL plugin class rewrote them, driven through FakeBatchUpdate as
vLLM's persistent batch drives it (one shared plugin, one row per request).
"""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from infergrid.compute.plugins.vllm_sampler import InferGridSampler
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.http_serving import ServerThread


@dataclass
class FakeSamplingParams:
    """The part of vllm.SamplingParams a logits processor reads."""

    extra_args: dict[str, Any] | None = None


@dataclass(frozen=True)
class FakeBatchUpdate:
    """vllm.v1.sample.logits_processor.BatchUpdate: the same four fields, same meaning."""

    batch_size: int
    removed: Sequence[int] = ()
    added: Sequence[tuple[int, FakeSamplingParams, list[int] | None, list[int]]] = ()
    moved: Sequence[tuple[int, int, Any]] = ()


@dataclass
class FakeVLLMStats:
    requests: int = 0
    requests_seen: list[dict[str, Any]] = field(default_factory=list)


class FakeVLLMServer(ServerThread):
    """A vLLM-like OpenAI completions server over one transformers model (see module doc)."""

    what = "fake vLLM server"

    def __init__(self, engine: TransformersEngine, served_model: str = "fake-vllm-model") -> None:
        self.engine = engine
        self.served_model = served_model
        self.plugin = InferGridSampler(None, torch.device("cpu"), False)
        self.stats = FakeVLLMStats()
        # When set, answers break off after this many tokens, with no finish_reason.
        self.cut_after: int | None = None
        # One model, one persistent batch of one row: requests take turns.
        self._lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/v1/models", self._models),
                Route("/v1/completions", self._completions, methods=["POST"]),
            ]
        )
        super().__init__(app)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.served_model}]})

    async def _completions(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.stats.requests += 1
        self.stats.requests_seen.append(body)
        prompt = body.get("prompt")
        if body.get("model") != self.served_model:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return _error(400, "this fake takes prompts as token ids only")
        if body.get("temperature") != 0 or not body.get("return_tokens_as_token_ids"):
            return _error(400, "the proxy must send temperature 0 and ask for token ids")
        params = FakeSamplingParams(extra_args=body.get("vllm_xargs"))
        try:
            InferGridSampler.validate_params(params)
        except ValueError as exc:
            return _error(400, str(exc))
        # The whole answer is made first, under the lock, then streamed: a client that
        # leaves early must not leave the shared plugin holding its row.
        chunks = await run_in_threadpool(self._generate, prompt, params, body)
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    def _generate(
        self, prompt: list[int], params: FakeSamplingParams, body: dict[str, Any]
    ) -> list[bytes]:
        chunks: list[bytes] = []
        max_tokens = int(body["max_tokens"])
        k = int(body.get("logprobs") or 0)
        stop_ids = set(body.get("stop_token_ids") or ()) | set(self.engine.eos_token_ids)
        model = self.engine.model
        with self._lock:
            output: list[int] = []
            self.plugin.update_state(FakeBatchUpdate(1, added=[(0, params, prompt, output)]))
            try:
                with torch.inference_mode():
                    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
                for _ in range(max_tokens):
                    if self.cut_after is not None and len(output) >= self.cut_after:
                        break
                    logits = out.logits[0, -1].float()
                    raw = torch.log_softmax(logits, dim=-1)  # --logprobs-mode raw_logprobs
                    self.plugin.update_state(None)
                    processed = self.plugin.apply(logits.clone().unsqueeze(0))
                    token = int(torch.argmax(processed[0]))  # temperature 0: greedy
                    output.append(token)
                    finish = None
                    if token in stop_ids:
                        finish = "stop"
                    elif len(output) == max_tokens:
                        finish = "length"
                    chunks.append(_chunk(self.served_model, self.engine, token, raw, k, finish))
                    if finish is not None:
                        break
                    with torch.inference_mode():
                        out = model(
                            input_ids=torch.tensor([[token]]),
                            past_key_values=out.past_key_values,
                            use_cache=True,
                        )
            finally:
                self.plugin.update_state(FakeBatchUpdate(0, removed=[0]))
        chunks.append(b"data: [DONE]\n\n")
        return chunks


def _chunk(
    model: str,
    engine: TransformersEngine,
    token: int,
    raw: torch.Tensor,
    k: int,
    finish: str | None,
) -> bytes:
    top = {f"token_id:{token}": float(raw[token])}
    if k:
        values, indices = torch.topk(raw, k)
        top.update(
            {
                f"token_id:{i}": float(v)
                for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            }
        )
    choice = {
        "index": 0,
        "text": engine.decode([token]),
        "logprobs": {
            "text_offset": [0],
            "token_logprobs": [float(raw[token])],
            "tokens": [f"token_id:{token}"],
            "top_logprobs": [top],
        },
        "finish_reason": finish,
        "stop_reason": None,
    }
    chunk = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model}
    chunk["choices"] = [choice]
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _error(status: int, message: str) -> Response:
    body = {"error": {"message": message, "type": "BadRequestError", "code": status}}
    return JSONResponse(body, status_code=status)


# -- the other upstreams: SGLang, llama.cpp's llama-server, Ollama ------------------------


def _steps(
    engine: TransformersEngine,
    prompt: list[int],
    max_tokens: int,
    stop_ids: set[int],
    choose: Callable[[torch.Tensor, list[int]], int],
) -> Iterator[tuple[int, torch.Tensor, str | None]]:
    """(token, float32 raw logprobs, finish) per step of a KV-cached decode of `engine`'s
    model; `choose(logits, output so far)` picks each token."""
    model = engine.model
    output: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    while True:
        logits = out.logits[0, -1].float()
        token = choose(logits.clone(), output)
        output.append(token)
        finish = "stop" if token in stop_ids else "length" if len(output) == max_tokens else None
        yield token, torch.log_softmax(logits, dim=-1), finish
        if finish is not None:
            return
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )


def _greedy(logits: torch.Tensor, output: list[int]) -> int:
    return int(torch.argmax(logits))


def _alternatives(
    engine: TransformersEngine, raw: torch.Tensor, k: int, *, ids: bool
) -> list[dict[str, Any]]:
    values, indices = torch.topk(raw, k) if k else (torch.empty(0), torch.empty(0, dtype=int))
    return [_entry(engine, int(i), float(v), ids=ids) for i, v in zip(indices, values, strict=True)]


def _entry(engine: TransformersEngine, token: int, logprob: float, *, ids: bool) -> dict[str, Any]:
    raw = engine.token_bytes(token)
    entry: dict[str, Any] = {
        "token": raw.decode(errors="replace"),
        "logprob": logprob,
        "bytes": list(raw),
    }
    if ids:
        entry["id"] = token
    return entry


class FakeSGLangServer(ServerThread):
    """SGLang's native /generate as the proxy uses it: `input_ids`, the REAL custom logit
    processor (named in `custom_logit_processor`, as SGLang loads it) called with one
    parameter dict per row carrying `__req__`, cumulative `output_ids` in each streamed
    event, and a scoring request (`max_new_tokens: 0`) answered with teacher-forced
    `input_token_logprobs` / `input_top_logprobs` from `logprob_start_len` on."""

    what = "fake SGLang server"

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.requests_seen: list[dict[str, Any]] = []
        app = Starlette(
            routes=[
                Route("/v1/models", self._models),
                Route("/generate", self._generate_route, methods=["POST"]),
            ]
        )
        super().__init__(app)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-sglang-model"}]})

    async def _generate_route(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests_seen.append(body)
        sampling_params = body.get("sampling_params") or {}
        if sampling_params.get("max_new_tokens") == 0:
            return JSONResponse(await run_in_threadpool(self._score, body))
        spec = json.loads(body["custom_logit_processor"])
        processor = pickle.loads(bytes.fromhex(spec["callable"]))()
        events = await run_in_threadpool(self._generate, body, processor)
        return StreamingResponse(iter(events), media_type="text/event-stream")

    def _generate(self, body: dict[str, Any], processor: Any) -> list[bytes]:
        sampling_params = body["sampling_params"]
        params = dict(sampling_params["custom_params"])
        request = _FakeSGLangReq()

        def choose(logits: torch.Tensor, output: list[int]) -> int:
            request.output_ids = list(output)
            rows = processor(logits.unsqueeze(0), [{**params, "__req__": request}])
            return int(torch.argmax(rows[0]))

        stop_ids = set(sampling_params.get("stop_token_ids") or ()) | set(self.engine.eos_token_ids)
        output: list[int] = []
        events = []
        for token, _, finish in _steps(
            self.engine, body["input_ids"], sampling_params["max_new_tokens"], stop_ids, choose
        ):
            output.append(token)
            meta = {"completion_tokens": len(output), "finish_reason": finish and {"type": finish}}
            event = {
                "text": self.engine.decode(output),
                "output_ids": list(output),
                "meta_info": meta,
            }
            events.append(b"data: " + json.dumps(event).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def _score(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body["input_ids"]
        start = body["logprob_start_len"]
        k = body.get("top_logprobs_num") or 0
        with torch.inference_mode():
            logits = self.engine.model(input_ids=torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        entries, tops = [], []
        for position in range(start, len(ids)):
            row = logprobs[position - 1]
            entries.append([float(row[ids[position]]), ids[position], None])
            values, indices = torch.topk(row, k) if k else (torch.empty(0), torch.empty(0))
            tops.append([[float(v), int(i), None] for v, i in zip(values, indices, strict=True)])
        meta = {"input_token_logprobs": entries, "input_top_logprobs": tops}
        return {"text": "", "meta_info": meta}


@dataclass
class _FakeSGLangReq:
    output_ids: list[int] = field(default_factory=list)


class FakeLlamaServer(ServerThread):
    """llama.cpp's llama-server /v1/completions as the proxy uses it: token-id prompts, greedy
    at temperature 0 (it refuses nothing else, like the real one, which would sample), and
    `logprobs.content[]` entries with `id`, `token`, `logprob`, `bytes` and `top_logprobs`.
    Like the real server's OpenAI mode it streams one token per chunk; this fake reports the
    end-of-generation token too (what the proxy needs to attest an answer ending on it)."""

    what = "fake llama-server"

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.requests_seen: list[dict[str, Any]] = []
        app = Starlette(
            routes=[
                Route("/v1/models", self._models),
                Route("/v1/completions", self._completions, methods=["POST"]),
            ]
        )
        super().__init__(app)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "model.gguf"}]})

    async def _completions(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests_seen.append(body)
        events = await run_in_threadpool(self._generate, body)
        return StreamingResponse(iter(events), media_type="text/event-stream")

    def _generate(self, body: dict[str, Any]) -> list[bytes]:
        k = int(body.get("n_probs") or 0)
        events = []
        steps = _steps(
            self.engine, body["prompt"], body["max_tokens"], set(self.engine.eos_token_ids), _greedy
        )
        for token, raw, finish in steps:
            entry = _entry(self.engine, token, float(raw[token]), ids=True)
            entry["top_logprobs"] = _alternatives(self.engine, raw, k, ids=True)
            choice = {
                "index": 0,
                "text": self.engine.decode([token]),
                "logprobs": {"content": [entry]},
                "finish_reason": finish,
            }
            chunk = {"object": "text_completion", "choices": [choice]}
            events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events


class FakeOllamaServer(ServerThread):
    """Ollama's /api/generate as the proxy uses it: a raw text prompt (tokenized by the
    server itself), greedy at temperature 0, NDJSON events whose `logprobs` entries carry
    the token's text and bytes but no id, `done` with `done_reason` last. Like
    FakeLlamaServer it reports the end token too."""

    what = "fake Ollama"

    def __init__(self, engine: TransformersEngine, served_model: str = "tiny-q") -> None:
        self.engine = engine
        self.served_model = served_model
        self.requests_seen: list[dict[str, Any]] = []
        app = Starlette(
            routes=[
                Route("/v1/models", self._models),
                Route("/api/generate", self._generate_route, methods=["POST"]),
            ]
        )
        super().__init__(app)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.served_model}]})

    async def _generate_route(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests_seen.append(body)
        if body.get("model") != self.served_model or not body.get("raw"):
            return JSONResponse({"error": "model not found or not raw"}, status_code=404)
        events = await run_in_threadpool(self._generate, body)
        return StreamingResponse(iter(events), media_type="application/x-ndjson")

    def _generate(self, body: dict[str, Any]) -> list[bytes]:
        prompt = self.engine.encode(body["prompt"])
        options = body["options"]
        k = int(body.get("top_logprobs") or 0)
        events = []
        reason = "length"
        steps = _steps(
            self.engine, prompt, options["num_predict"], set(self.engine.eos_token_ids), _greedy
        )
        for token, raw, finish in steps:
            entry = _entry(self.engine, token, float(raw[token]), ids=False)
            entry["top_logprobs"] = _alternatives(self.engine, raw, k, ids=False)
            event = {"response": self.engine.decode([token]), "done": False, "logprobs": [entry]}
            events.append(json.dumps(event).encode() + b"\n")
            reason = finish or reason
        events.append(json.dumps({"response": "", "done": True, "done_reason": reason}).encode())
        return events
