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
import threading
from collections.abc import Sequence
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
