"""The proxy engine (`--engine openai --upstream URL`): a miner in front of an inference
server the operator already runs.

The miner keeps everything the protocol decides: it loads the model's tokenizer, chat
template, EOS ids and protocol id from the operator's local copy of the model (a weights
directory, a .gguf file or "smollm2"; no weights are loaded into memory), templates and
tokenizes every prompt itself and sends the upstream TOKEN IDS, so the attested prompt is
exactly what the upstream ran. The upstream only computes tokens; each one it returns goes
through compute.engine.RowDecoder, the same detokenizer, stop-sequence and finish rules every
engine uses. Flavours (`flavor`):

- "vllm": /v1/completions at temperature 0 with the protocol's sampling in `vllm_xargs`
  (compute.plugins.sampling_args) for the upstream's plugin
  (compute.plugins.vllm_sampler.InferGridSampler), token ids back
  (`return_tokens_as_token_ids`) with raw logprobs (server flag `--logprobs-mode
  raw_logprobs`), streamed. Every sampling the protocol has is served.
- "sglang": SGLang's native /generate with `custom_logit_processor`
  (compute.plugins.sglang_sampler) and `custom_params`. SGLang reports logprobs of the
  processed logits, so the proxy asks for the raw ones with a second, teacher-forced
  scoring request over prompt + output; tokens are released once that answer is in.
- "llamacpp" (llama.cpp's llama-server): /v1/completions with the prompt as ids, token ids
  from its `logprobs.content[].id`. Greedy only.
- "ollama": Ollama's /api/generate in raw mode with the prompt as text (Ollama takes no
  ids); token ids recovered from each token's bytes. Greedy only.
- "openai": any other OpenAI-compatible server (an InferGrid miner, llama-cpp-python, LM
  Studio, ...): /v1/completions with the prompt as text, token ids from the InferGrid
  extension, `logprobs.content[].id`, "token_id:N" strings or the token's bytes. Greedy only.

The greedy-only flavours take no custom sampler, so a request at any temperature but 0 is
refused before anything is sent (UnsupportedSampling, naming the parameter). A prompt sent as
text must tokenize back to the exact ids the miner attests, or the request is refused too.

Upstream failures (unreachable, an error status, a malformed or truncated stream, a token the
model cannot have produced) raise UpstreamError; the miner then answers with an error and
never attests a partial answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infergrid.compute import model_store
from infergrid.compute.engine import (
    GeneratedToken,
    RowDecoder,
    SamplingParams,
    TopLogprobs,
    UnsupportedRequest,
)
from infergrid.compute.plugins import sampling_args
from infergrid.compute.plugins.sglang_sampler import processor_spec
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol import sampling
from infergrid.protocol.models import gguf_precision
from infergrid.protocol.models import model_id as protocol_model_id
from infergrid.protocol.wire import EXTENSION_KEY

FLAVORS = ("vllm", "sglang", "llamacpp", "ollama", "openai")
# Flavours whose upstream runs the protocol sampler as a plugin; the others are greedy only.
SAMPLING_FLAVORS = frozenset({"vllm", "sglang"})
# Flavours that take the prompt as text rather than token ids.
TEXT_PROMPT_FLAVORS = frozenset({"ollama", "openai"})
# Seconds the upstream may stay silent (connecting, or between two streamed events).
DEFAULT_TIMEOUT_S = 300.0
_VLLM_TOKEN_PREFIX = "token_id:"
_LEGACY_MAX_LOGPROBS = 5
# float32 log_softmax can round the likeliest token's logprob a hair above 0.
_LOGPROB_SLACK = 1e-3


class UpstreamError(RuntimeError):
    """The upstream server failed, refused the request or answered something the proxy
    cannot attest."""


class UnsupportedSampling(UnsupportedRequest):
    """This upstream cannot serve the request's sampling; `param` names the request
    parameter (the miner answers 400 naming it)."""


@dataclass(frozen=True, slots=True)
class UpstreamToken:
    """One token as the upstream reported it."""

    token_id: int
    logprob: float
    top: TopLogprobs = ()


def _load_tokenizer_side(model_dir: Path, dtype: torch.dtype, name: str | None) -> Any:
    """A TransformersEngine over a weightless (meta-device) copy of the model: its
    tokenizer, chat template, EOS ids and decode rule are the reference engine's own, and
    nothing of the weights is read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    meta = model_store.directory_metadata(model_dir)
    with model_store.quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if (model_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return TransformersEngine(
        model,
        tokenizer,
        name=name or meta.name,
        weights_digest=meta.weights_digest,
        revision=meta.revision,
    )


def gguf_file_precision(path: Path) -> str:
    """The precision part of the model id of a GGUF file as llama.cpp serves it
    ("gguf-q4_1"), read from the file's `general.file_type` (names as llama.cpp's)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.file_type")
    if field is None:
        raise ValueError(f"{path} does not say its file type (general.file_type)")
    return gguf_precision(gguf.LlamaFileType(int(field.contents())).name)


class ProxyEngine:
    """An Engine whose tokens come from an upstream server (see the module docstring).
    Thread-safe: each generation has its own connection, so the upstream batches them."""

    # Generations the miner keeps in flight to the upstream at once (its worker threads); the
    # upstream's own scheduler batches them.
    max_batch = 64

    def __init__(
        self,
        upstream: str,
        *,
        flavor: str,
        local: Any,
        precision: str,
        upstream_model: str | None,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        context_length: int | None = None,
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown upstream flavour {flavor!r}: use one of {FLAVORS}")
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"the upstream must be an http(s) URL, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self.flavor = flavor
        self._local = local
        self._precision = precision
        self._model_id = protocol_model_id(
            local.name, local.weights_digest, local.revision, precision
        )
        self.upstream_model = upstream_model
        self.timeout = timeout
        self._api_key = api_key
        self._context_length = int(context_length or local.context_length)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port
        # A path prefix such as /v1 is part of the routes below; strip it from the base.
        self._base = parsed.path.rstrip("/").removesuffix("/v1")
        self._vocab_size = int(local.vocab_size)
        self._eos: frozenset[int] = frozenset(local.eos_token_ids)
        self._ids_by_bytes: dict[bytes, list[int]] | None = None

    # -- construction ------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        upstream: str,
        *,
        model: str | Path,
        flavor: str,
        tokenizer_dir: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        precision: str | None = None,
        upstream_model: str | None = None,
        api_key: str | None = None,
        context_length: int | None = None,
        quiet: bool = False,
    ) -> ProxyEngine:
        """Prepare the local side from `model` and check that the upstream answers.

        `model` is the operator's local copy of the served model ("smollm2", a .gguf file or
        a HF directory): its protocol name, weights digest and tokenizer (`tokenizer_dir`
        overrides where the tokenizer comes from). `precision` is the precision the upstream
        computes in (part of the model id): by default the config's dtype for vLLM and
        SGLang (what `--dtype auto` serves) and the GGUF's quantization for llama.cpp and
        Ollama on a .gguf file. `upstream_model` is the model name the upstream serves
        (default: the first of its /v1/models). Raises UpstreamError when it does not answer.
        """
        if flavor not in FLAVORS:
            raise ValueError(f"unknown upstream flavour {flavor!r}: use one of {FLAVORS}")
        model_dir = model_store.resolve_model_dir(model, quiet=quiet)
        gguf_path = Path(model) if str(model).endswith(".gguf") else None
        if isinstance(model, str) and model.lower() in model_store.DEFAULT_ALIASES:
            gguf_path = model_store.smollm2_gguf_path()
        if precision is None:
            if gguf_path is not None and flavor in ("llamacpp", "ollama"):
                precision = gguf_file_precision(gguf_path)
            else:
                precision = _config_dtype(model_dir)
        dtype = getattr(torch, precision, None)
        local = _load_tokenizer_side(
            Path(tokenizer_dir) if tokenizer_dir is not None else model_dir,
            dtype if isinstance(dtype, torch.dtype) else torch.float32,
            name=model_store.served_model_name(model),
        )
        if tokenizer_dir is not None:  # the identity is the model's, the tokenizer is borrowed
            meta = model_store.directory_metadata(model_dir)
            local.weights_digest, local.revision = meta.weights_digest, meta.revision
        engine = cls(
            upstream,
            flavor=flavor,
            local=local,
            precision=precision,
            upstream_model=upstream_model,
            timeout=timeout,
            api_key=api_key,
            context_length=context_length,
        )
        served = engine._first_model()  # also: does the upstream answer at all?
        if engine.upstream_model is None:
            engine.upstream_model = served
        return engine

    def _first_model(self) -> str:
        response, connection = self._request("GET", "/v1/models", None)
        try:
            body = _json_body(response, self.upstream)
        finally:
            connection.close()
        models = body.get("data") if isinstance(body, dict) else None
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise UpstreamError(f"{self.upstream}/v1/models lists no model")
        return str(models[0]["id"])

    # -- the Engine interface ----------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self._local.name)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return list(self._local.chat_prompt_ids(messages))

    def encode(self, text: str) -> list[int]:
        return list(self._local.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._local.decode(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes(self._local.token_bytes(token_id))

    def check_params(self, params: SamplingParams) -> None:
        """Raise UnsupportedSampling when this upstream cannot serve `params` exactly."""
        if self.flavor in SAMPLING_FLAVORS or sampling.is_greedy(params.temperature):
            return
        raise UnsupportedSampling(
            f"This miner's engine ({self.flavor} upstream) serves only greedy requests: "
            "set 'temperature' to 0, or use a miner that runs the protocol sampler.",
            param="temperature",
        )

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        """Stream the upstream's tokens through RowDecoder; checks run before anything is
        sent (UnsupportedSampling, ValueError), upstream failures raise UpstreamError."""
        self.check_params(params)
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        room = self._context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in a context of "
                f"{self._context_length}"
            )
        prompt = list(prompt_ids)
        text = self._prompt_text(prompt) if self.flavor in TEXT_PROMPT_FLAVORS else None
        limit = min(params.max_tokens, room)
        return self._generate(prompt, text, params, limit)

    def _generate(
        self, prompt: list[int], text: str | None, params: SamplingParams, limit: int
    ) -> Iterator[GeneratedToken]:
        row = RowDecoder(params, eos_token_ids=self.eos_token_ids, decode=self.decode, limit=limit)
        if self.flavor == "sglang":
            tokens: Iterator[UpstreamToken] = iter(self._sglang(prompt, params, limit))
        elif self.flavor == "ollama":
            assert text is not None
            tokens = self._ollama(text, params, limit)
        else:
            tokens = self._completions(prompt, text, params, limit)
        try:
            for upstream_token in tokens:
                token = upstream_token.token_id
                if not 0 <= token < self._vocab_size:
                    raise UpstreamError(
                        f"the upstream returned token {token}, outside the model's "
                        f"vocabulary of {self._vocab_size}"
                    )
                top = upstream_token.top[: params.top_logprobs]
                yield row.emit(token, upstream_token.logprob, top)
                if row.finished:
                    return
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        raise UpstreamError(
            f"the upstream ended the answer after {row.step} tokens without its end: it "
            "reported no end-of-sequence token, stopped early or was cut off"
        )

    # -- prompts as text -----------------------------------------------------------------

    def _prompt_text(self, prompt: list[int]) -> str:
        """The prompt as text for upstreams that take no ids; refused unless it tokenizes
        back to exactly the ids the miner attests."""
        tokenizer = self._local.tokenizer
        text = str(
            tokenizer.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
        if self.encode(text) != prompt:
            raise UnsupportedSampling(
                f"This prompt does not survive a round trip through text with this model's "
                f"tokenizer, and the {self.flavor} upstream takes no token ids; use an "
                "upstream that takes ids (vllm, sglang, llamacpp).",
                param="messages",
            )
        return text

    # -- HTTP ------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send one request on a fresh connection; UpstreamError unless it answers 200."""
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=self.timeout)
        headers = {"accept": "application/json, text/event-stream"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        try:
            connection.request(method, self._base + path, body=payload, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise UpstreamError(f"the upstream {self.upstream} is unreachable: {exc}") from None
        if response.status != 200:
            detail = _error_detail(response.read(8192))
            connection.close()
            raise UpstreamError(
                f"the upstream {self.upstream} answered {method} {path} with "
                f"{response.status}: {detail}"
            )
        return response, connection

    def _events(self, path: str, body: dict[str, Any], *, sse: bool) -> Iterator[Any]:
        """The JSON events of a streamed answer (SSE `data:` lines, or NDJSON lines), until
        `[DONE]` or the end; the connection closes when the iterator does (which tells the
        upstream to stop generating)."""
        response, connection = self._request("POST", path, body)
        try:
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise UpstreamError(f"the upstream's stream broke: {exc}") from None
                if not line:
                    return
                line = line.strip()
                if sse:
                    if not line.startswith(b"data:"):
                        continue  # comments, event names, blank separators
                    line = line[5:].strip()
                    if line == b"[DONE]":
                        return
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    raise UpstreamError(
                        f"the upstream sent a malformed event: {line[:200]!r}"
                    ) from None
        finally:
            connection.close()

    # -- /v1/completions: vllm, llamacpp, openai ---------------------------------------

    def _completions(
        self, prompt: list[int], text: str | None, params: SamplingParams, limit: int
    ) -> Iterator[UpstreamToken]:
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "prompt": text if text is not None else prompt,
            "max_tokens": limit,
            "temperature": 0.0,
            "stream": True,
            "logprobs": params.top_logprobs,
            # Neutral values, sent because servers may default otherwise (a model's
            # generation_config in vLLM, older llama.cpp builds): a penalty moves the argmax.
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }
        if self.flavor == "vllm":
            body["repetition_penalty"] = 1.0
            body["return_tokens_as_token_ids"] = True
            body["stop_token_ids"] = sorted(self.eos_token_ids)
            body["vllm_xargs"] = sampling_args(
                params.seed, params.temperature, params.top_p, params.top_k
            )
        elif self.flavor == "llamacpp":
            body["n_probs"] = params.top_logprobs
            body["repeat_penalty"] = 1.0
            body["dry_multiplier"] = 0.0
        else:
            # OpenAI's legacy completions list at most 5 alternatives per token.
            body["logprobs"] = min(params.top_logprobs, _LEGACY_MAX_LOGPROBS)
        for event in self._events("/v1/completions", body, sse=True):
            if isinstance(event, dict) and "error" in event:
                raise UpstreamError(f"the upstream failed mid-answer: {_error_detail(event)}")
            yield from self._chunk_tokens(event)

    def _chunk_tokens(self, chunk: Any) -> list[UpstreamToken]:
        """The tokens one /v1/completions stream chunk carries, ids recovered from the first
        form present: the InferGrid extension, llama.cpp's `content[].id`, vLLM's
        "token_id:N" strings, else each token's bytes looked up in the vocabulary."""
        if not isinstance(chunk, dict):
            raise UpstreamError(f"the upstream sent a chunk that is not an object: {chunk!r}")
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        logprobs = choice.get("logprobs") or {}
        extension = chunk.get(EXTENSION_KEY)
        if isinstance(extension, dict) and "token_ids" in extension:
            return self._extension_tokens(extension, logprobs)
        if isinstance(logprobs.get("content"), list):
            return [self._content_token(entry) for entry in logprobs["content"]]
        if isinstance(logprobs.get("tokens"), list):
            return self._legacy_tokens(logprobs)
        if choice.get("text"):
            raise UpstreamError(
                "the upstream returned text without logprobs: it cannot be attested"
            )
        return []

    def _extension_tokens(
        self, extension: Mapping[str, Any], logprobs: Mapping[str, Any]
    ) -> list[UpstreamToken]:
        ids = [_as_int(t) for t in extension.get("token_ids", [])]
        lps = [_as_float(lp) for lp in extension.get("logprobs", [])]
        if len(ids) != len(lps):
            raise UpstreamError("the upstream's extension has as many ids as logprobs")
        # Legacy logprobs list the visible tokens only (end tokens are not shown).
        tops = list(logprobs.get("top_logprobs") or [])
        out = []
        for token, lp in zip(ids, lps, strict=True):
            top: TopLogprobs = ()
            if token not in self.eos_token_ids and tops:
                top = self._legacy_top(tops.pop(0))
            out.append(UpstreamToken(token, lp, top))
        return out

    def _content_token(self, entry: Any) -> UpstreamToken:
        if not isinstance(entry, dict):
            raise UpstreamError(f"malformed logprobs entry: {entry!r}")
        token = self._entry_id(entry)
        top = tuple(
            (self._entry_id(alt), _as_float(alt.get("logprob")))
            for alt in entry.get("top_logprobs") or []
            if isinstance(alt, dict)
        )
        return UpstreamToken(token, _as_float(entry.get("logprob")), _sorted_top(top))

    def _entry_id(self, entry: Mapping[str, Any]) -> int:
        if "id" in entry:
            return _as_int(entry["id"])
        raw = entry.get("bytes")
        if isinstance(raw, list):
            return self._id_of_bytes(bytes(_as_int(b) for b in raw))
        return self._id_of_string(str(entry.get("token", "")))

    def _legacy_tokens(self, logprobs: Mapping[str, Any]) -> list[UpstreamToken]:
        tokens = logprobs["tokens"]
        lps = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        if len(lps) != len(tokens) or len(tops) != len(tokens):
            raise UpstreamError("the upstream's logprobs lists differ in length")
        return [
            UpstreamToken(self._id_of_string(str(t)), _as_float(lp), self._legacy_top(top))
            for t, lp, top in zip(tokens, lps, tops, strict=True)
        ]

    def _legacy_top(self, top: Any) -> TopLogprobs:
        if not isinstance(top, dict):
            return ()
        pairs = tuple((self._id_of_string(str(t)), _as_float(lp)) for t, lp in top.items())
        return _sorted_top(pairs)

    def _id_of_string(self, token: str) -> int:
        if token.startswith(_VLLM_TOKEN_PREFIX):
            return _as_int(token[len(_VLLM_TOKEN_PREFIX) :])
        if token.startswith("bytes:"):  # OpenAI's form of a partial character: \xNN...
            hexes = token[len("bytes:") :].split("\\x")[1:]
            return self._id_of_bytes(bytes(int(h, 16) for h in hexes))
        return self._id_of_bytes(token.encode())

    def _id_of_bytes(self, raw: bytes) -> int:
        """The one vocabulary entry that stands for exactly these bytes."""
        if self._ids_by_bytes is None:
            table: dict[bytes, list[int]] = {}
            for token_id in range(self._vocab_size):
                with contextlib.suppress(Exception):  # ids past the tokenizer's own vocab
                    table.setdefault(self.token_bytes(token_id), []).append(token_id)
            self._ids_by_bytes = table
        ids = self._ids_by_bytes.get(raw, [])
        if len(ids) != 1:
            raise UpstreamError(
                f"the upstream reported token {raw!r} without its id, and "
                f"{'no' if not ids else len(ids)} vocabulary entries have those bytes"
            )
        return ids[0]

    # -- Ollama's /api/generate ----------------------------------------------------------

    def _ollama(self, text: str, params: SamplingParams, limit: int) -> Iterator[UpstreamToken]:
        body = {
            "model": self.upstream_model,
            "prompt": text,
            "raw": True,
            "stream": True,
            "options": {
                "temperature": 0,
                "num_predict": limit,
                # Ollama's default repeat_penalty is 1.1: it would move the argmax.
                "repeat_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
            },
            "logprobs": True,
            "top_logprobs": params.top_logprobs,
        }
        for event in self._events("/api/generate", body, sse=False):
            if not isinstance(event, dict):
                raise UpstreamError(f"malformed Ollama event: {event!r}")
            if "error" in event:
                raise UpstreamError(f"Ollama failed: {_error_detail(event)}")
            for entry in event.get("logprobs") or []:
                yield self._content_token(entry)
            if event.get("done"):
                return

    # -- SGLang's /generate ----------------------------------------------------------------

    def _sglang(self, prompt: list[int], params: SamplingParams, limit: int) -> list[UpstreamToken]:
        """Generate with the plugin, then score prompt + output teacher-forced for the raw
        logprobs (SGLang's own are of the processed logits). Returns every token at once."""
        body: dict[str, Any] = {
            "input_ids": prompt,
            "sampling_params": {
                "temperature": 0.0,
                "max_new_tokens": limit,
                "stop_token_ids": sorted(self.eos_token_ids),
                "skip_special_tokens": False,
                "custom_params": sampling_args(
                    params.seed, params.temperature, params.top_p, params.top_k
                ),
            },
            "custom_logit_processor": processor_spec(),
            "stream": True,
        }
        output: list[int] = []
        for event in self._events("/generate", body, sse=True):
            if not isinstance(event, dict):
                raise UpstreamError(f"malformed SGLang event: {event!r}")
            if "error" in event:
                raise UpstreamError(f"SGLang failed: {_error_detail(event)}")
            ids = event.get("output_ids")
            meta = event.get("meta_info") or {}
            count = _as_int(meta.get("completion_tokens", len(output)))
            if isinstance(ids, list):
                ids = [_as_int(t) for t in ids]
                # Cumulative by default; incremental with --incremental-streaming-output.
                output = ids if len(ids) == count else output + ids
            if len(output) != count:
                raise UpstreamError("SGLang's stream lost track of its output tokens")
        if not output:
            raise UpstreamError("SGLang returned no tokens")
        scores = self._sglang_score(prompt, output, params.top_logprobs)
        return [UpstreamToken(t, lp, top) for t, (lp, top) in zip(output, scores, strict=True)]

    def _sglang_score(
        self, prompt: list[int], output: list[int], top_logprobs: int
    ) -> list[tuple[float, TopLogprobs]]:
        body = {
            "input_ids": prompt + output,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": len(prompt),
            "top_logprobs_num": top_logprobs,
        }
        response, connection = self._request("POST", "/generate", body)
        try:
            answer = _json_body(response, self.upstream)
        finally:
            connection.close()
        meta = (answer or {}).get("meta_info") or {}
        entries = list(meta.get("input_token_logprobs") or [])[-len(output) :]
        tops = list(meta.get("input_top_logprobs") or [])[-len(output) :]
        if len(entries) != len(output) or [_as_int(e[1]) for e in entries] != output:
            raise UpstreamError("SGLang's scoring pass does not cover the generated tokens")
        scores = []
        for i, entry in enumerate(entries):
            top: TopLogprobs = ()
            if top_logprobs and i < len(tops) and tops[i]:
                top = _sorted_top(tuple((_as_int(t[1]), _as_float(t[0])) for t in tops[i]))
            scores.append((_as_float(entry[0]), top))
        return scores


# -- small parsing helpers -------------------------------------------------------------------


def _config_dtype(model_dir: Path) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def _sorted_top(pairs: Sequence[tuple[int, float]]) -> TopLogprobs:
    """Alternatives most likely first (upstreams list the emitted token too, in any order)."""
    return tuple(sorted(pairs, key=lambda p: (-p[1], p[0])))


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UpstreamError(f"the upstream sent {value!r} where a token id belongs")
    try:
        return int(value)
    except ValueError:
        raise UpstreamError(f"the upstream sent {value!r} where a token id belongs") from None


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpstreamError(f"the upstream sent {value!r} where a logprob belongs")
    result = float(value)
    if math.isnan(result) or result > _LOGPROB_SLACK:
        raise UpstreamError(f"the upstream sent an impossible logprob {value!r}")
    return result


def _error_detail(raw: bytes | Any) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        body = json.loads(raw) if isinstance(raw, bytes | str) else raw
    except ValueError:
        return raw[:300].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(body)[:300]


def _json_body(response: http.client.HTTPResponse, upstream: str) -> Any:
    try:
        return json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise UpstreamError(f"the upstream {upstream} sent a malformed answer: {exc}") from None
