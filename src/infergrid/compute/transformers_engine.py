"""The built-in engine: HuggingFace transformers, continuously batched, CPU or CUDA.

Concurrent generations share one forward pass per decode step: a
compute.batching.ContinuousBatcher steps them over a `TransformersBatchBackend`, and every
token comes from the protocol sampler (infergrid.protocol.sampling) for verifiers to replay
it. The loop is ours rather than `model.generate` or transformers' own continuous batching
(`generate_batch`, `init_continuous_batching`): those sample inside the model runner (argmax
or multinomial after their own logits processors) and never hand back a step's raw logits.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from infergrid.compute import model_store
from infergrid.compute.batching import BatcherStats, ContinuousBatcher
from infergrid.compute.engine import GeneratedToken, SamplingParams
from infergrid.protocol.models import model_id as protocol_model_id

# Chat templates written before the "developer" role treat it as unknown.
_ROLE_ALIASES = {"developer": "system"}


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (which taskset, cpusets and
    container limits narrow), else the machine's count; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def set_torch_threads(threads: int) -> None:
    """Size torch's CPU thread pools, process-wide: `threads` intra-op threads (one matmul
    split across cores) and as many inter-op threads.

    Each process on a machine should get its share of the cores, not all of them: two miners
    whose torch each runs a thread per core thrash each other's caches and serve less than
    one (see docs/benchmarks.md). The inter-op pool can be sized only before it first runs;
    after that it keeps its size, which is harmless because the decode loop never uses it.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # the inter-op pool already ran in this process
        torch.set_num_interop_threads(threads)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _byte_decoder() -> dict[str, int]:
    return {ch: b for b, ch in model_store.byte_to_unicode().items()}


class _Parked:
    """One sequence's KV cache outside the batch (a batch-1 DynamicCache, no padding) and
    the number of tokens in it."""

    __slots__ = ("cache", "length")

    def __init__(self, cache: Any, length: int) -> None:
        self.cache = cache
        self.length = length


class TransformersBatchBackend:
    """A HF causal LM as a compute.batching.BatchBackend: many sequences ('slots') decoded by
    one forward pass over a left-padded batch.

    A slot's first entry (its prompt) is prefilled alone, in one forward of its own, into a
    private KV cache. Decoding runs every slot of the step in ONE forward over a batched
    DynamicCache whose rows are left-padded to a common length, with an explicit attention
    mask (padding masked out) and per-row position ids (a row's positions are its own token
    count, as if it ran alone). The batch is rebuilt only when its membership changes: rows
    that leave are dropped by index (and leading columns that became padding in every row are
    cut), rows that join are padded on the left and concatenated. Logits therefore equal a
    single-row decode's up to floating-point reassociation (measured in
    tests/compute/test_compute_batching.py).

    Models whose cache is not plain full attention in every layer (sliding windows, linear
    attention) cannot be left-padded this way; for them `max_slots` is 1 and each slot keeps
    its private cache. Not thread-safe: one worker thread (the batcher's) calls it.
    """

    def __init__(self, model: Any, *, max_slots: int = 8) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        probe = DynamicCache(config=model.config)
        self.batchable = all(type(layer) is DynamicLayer for layer in probe.layers)
        self._max_slots = max_slots if self.batchable else 1
        self._parked: dict[int, _Parked] = {}
        # The batch: slot of each row, in row order; its cache; its attention mask [B, L];
        # each row's real token count (the position id of its next token).
        self._rows: list[int] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._lengths: dict[int, int] = {}

    @property
    def max_slots(self) -> int:
        return self._max_slots

    @property
    def active_slots(self) -> frozenset[int]:
        """Slots holding a KV cache (in the batch or parked)."""
        return frozenset(self._rows) | frozenset(self._parked)

    def forward(self, work: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Logits after the last token of each entry, [len(work), vocab], in `work`'s order.

        An entry for a slot without a cache is a prompt (any length >= 1) and is prefilled;
        an entry for a slot with one carries exactly one token and is decoded with the others
        in one forward. A slot may appear once per call.
        """
        slots = [slot for slot, _ in work]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot may appear once per forward, got {slots}")
        out: list[torch.Tensor | None] = [None] * len(work)
        decode: list[tuple[int, int, int]] = []  # (index in work, slot, token)
        for index, (slot, ids) in enumerate(work):
            if not 0 <= slot < self._max_slots:
                raise ValueError(f"slot {slot} is outside 0..{self._max_slots - 1}")
            if not ids:
                raise ValueError(f"slot {slot}: an entry needs at least one token")
            if slot in self._lengths or slot in self._parked:
                if len(ids) != 1:
                    raise ValueError(
                        f"slot {slot} is decoding: it takes one token per step, got {len(ids)}"
                    )
                decode.append((index, slot, int(ids[0])))
        for index, (slot, ids) in enumerate(work):
            if slot not in self._lengths and slot not in self._parked:
                out[index] = self._prefill(slot, [int(t) for t in ids])
        if decode:
            logits = self._decode([slot for _, slot, _ in decode], [t for _, _, t in decode])
            for (index, _, _), row in zip(decode, logits, strict=True):
                out[index] = row
        return torch.stack([row for row in out if row is not None])

    def release(self, slot: int) -> None:
        """Forget the slot's KV cache (a no-op for a slot without one); it may be reused."""
        self._parked.pop(slot, None)
        if slot in self._lengths:
            self._drop_rows([slot])

    # -- internals -----------------------------------------------------------------------

    def _prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1
            )
        self._parked[slot] = _Parked(out.past_key_values, len(ids))
        return out.logits[0, -1]

    def _decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        if not self.batchable:  # one slot, its own cache: the model's cache rules apply
            (slot,), (token,) = slots, tokens
            parked = self._parked[slot]
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([[token]], device=self.device),
                    past_key_values=parked.cache,
                    use_cache=True,
                )
            parked.cache = out.past_key_values
            parked.length += 1
            return out.logits[:, -1]
        wanted = set(slots)
        leaving = [slot for slot in self._rows if slot not in wanted]
        if leaving:  # in the batch but not stepped now: park them, so their cache waits
            self._park(leaving)
        joining = [slot for slot in slots if slot not in self._lengths]
        if joining:
            self._join(joining)
        assert self._mask is not None
        token_of = dict(zip(slots, tokens, strict=True))
        input_ids = torch.tensor(
            [[token_of[slot]] for slot in self._rows], dtype=torch.long, device=self.device
        )
        positions = torch.tensor(
            [[self._lengths[slot]] for slot in self._rows], dtype=torch.long, device=self.device
        )
        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=self.device)
        mask = torch.cat([self._mask, ones], dim=1)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        self._cache = out.past_key_values
        self._mask = mask
        for slot in self._rows:
            self._lengths[slot] += 1
        if slots == self._rows:  # the usual case: no gather, no copy
            return out.logits[:, -1]
        row_of = {slot: row for row, slot in enumerate(self._rows)}
        order = torch.tensor([row_of[slot] for slot in slots], device=self.device)
        return out.logits[order, -1]

    def _park(self, slots: list[int]) -> None:
        """Move rows out of the batch into private caches (padding stripped)."""
        from transformers import DynamicCache

        assert self._mask is not None
        width = self._mask.shape[1]
        for slot in slots:
            row = self._rows.index(slot)
            length = self._lengths[slot]
            layers = [
                (
                    layer.keys[row : row + 1, :, width - length :],
                    layer.values[row : row + 1, :, width - length :],
                )
                for layer in self._cache.layers
            ]
            self._parked[slot] = _Parked(DynamicCache(ddp_cache_data=layers), length)
        self._drop_rows(slots)

    def _drop_rows(self, slots: list[int]) -> None:
        keep = [row for row, slot in enumerate(self._rows) if slot not in slots]
        for slot in slots:
            del self._lengths[slot]
        self._rows = [self._rows[row] for row in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        # Columns that are padding in every remaining row would only cost attention work.
        start = int(mask.shape[1] - max(self._lengths[slot] for slot in self._rows))
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _join(self, slots: list[int]) -> None:
        """Add parked rows to the batch, everything left-padded to the longest row."""
        from transformers import DynamicCache

        parked = [self._parked.pop(slot) for slot in slots]
        width = max(
            [p.length for p in parked] + ([self._mask.shape[1]] if self._mask is not None else [])
        )
        masks: list[torch.Tensor] = []
        if self._mask is not None:
            masks.append(_pad_left(self._mask, width, dim=1))
        for p in parked:
            row = torch.ones((1, p.length), dtype=torch.long, device=self.device)
            masks.append(_pad_left(row, width, dim=1))
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(len(parked[0].cache.layers)):
            ks = [_pad_left(p.cache.layers[i].keys, width, dim=2) for p in parked]
            vs = [_pad_left(p.cache.layers[i].values, width, dim=2) for p in parked]
            if self._cache is not None:
                layer = self._cache.layers[i]
                ks.insert(0, _pad_left(layer.keys, width, dim=2))
                vs.insert(0, _pad_left(layer.values, width, dim=2))
            layers.append((torch.cat(ks, dim=0), torch.cat(vs, dim=0)))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat(masks, dim=0)
        for slot, p in zip(slots, parked, strict=True):
            self._rows.append(slot)
            self._lengths[slot] = p.length


def _pad_left(x: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """`x` with zeros prepended along `dim` up to `width` (zero keys and values are masked
    out; a zero in the mask marks padding)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class TransformersEngine:
    """One causal LM and its tokenizer. Thread-safe for concurrent `generate` calls: up to
    `max_batch` generations decode together in one batch (more wait for a free row); the
    batch's worker thread starts with the first generation."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        weights_digest: str,
        revision: str = model_store.DEFAULT_REVISION,
        context_length: int | None = None,
        max_batch: int = 8,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._name = name
        self.weights_digest = weights_digest
        self.revision = revision
        self.device: torch.device = next(model.parameters()).device
        self.precision = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._model_id = protocol_model_id(name, weights_digest, revision, self.precision)
        config = model.config
        self._context_length = int(
            context_length or getattr(config, "max_position_embeddings", 0) or 2048
        )
        self._eos = frozenset(self._collect_eos_ids())
        # The Rust tokenizer decodes without transformers' Python wrapper, which matters in a
        # loop that decodes twice per token.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_decoder = _byte_decoder()
        self._token_bytes: dict[int, bytes] = {}
        self._batch_backend = TransformersBatchBackend(self.model, max_slots=max_batch)
        # Started on first use: verifiers, proxies and attack copies hold engines that never
        # generate, and each batcher is a thread.
        self._batcher: ContinuousBatcher | None = None
        self._batcher_lock = threading.Lock()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: torch.dtype = torch.float32,
        context_length: int | None = None,
        cache_dir: Path | None = None,
        num_threads: int | None = None,
        max_batch: int = 8,
    ) -> TransformersEngine:
        """Load a safetensors directory (its infergrid.json names it, if present).

        `num_threads` sizes torch's CPU thread pools, process-wide (set_torch_threads); None
        leaves them as they are. On a small CPU one thread is as fast for small models (they
        are bound by memory or by Python, not by arithmetic) and leaves a core to the HTTP
        server. `max_batch` bounds how many generations decode together.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:
            set_torch_threads(num_threads)
        model_dir = Path(model_dir)
        meta = model_store.directory_metadata(model_dir, cache_dir)
        with model_store.quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.to(pick_device(device))
        return cls(
            model,
            tokenizer,
            name=name or meta.name,
            weights_digest=meta.weights_digest,
            revision=meta.revision,
            context_length=context_length,
            max_batch=max_batch,
        )

    @classmethod
    def load(
        cls,
        spec: str | Path = "smollm2",
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: torch.dtype = torch.float32,
        context_length: int | None = None,
        cache_dir: Path | None = None,
        quiet: bool = False,
        num_threads: int | None = None,
        max_batch: int = 8,
    ) -> TransformersEngine:
        """Load 'smollm2' (the default model), a .gguf file (cached as safetensors) or a dir."""
        model_dir = model_store.resolve_model_dir(spec, cache_dir=cache_dir, quiet=quiet)
        return cls.from_dir(
            model_dir,
            name=name,
            device=device,
            dtype=dtype,
            context_length=context_length,
            cache_dir=cache_dir,
            num_threads=num_threads,
            max_batch=max_batch,
        )

    def _collect_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        sources = [
            getattr(self.model, "generation_config", None),
            self.model.config,
            self.tokenizer,
        ]
        for source in sources:
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

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
        """Rows of the output embedding: the length of every logits vector."""
        return int(self.model.config.vocab_size)

    def teacher_forced_logits(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> torch.Tensor:
        """The raw logits the model gives before each output token: [len(output), vocab],
        float64 on the CPU, from ONE forward pass over prompt + output[:-1] (the audit's pass)."""
        if not prompt_ids or not output_ids:
            raise ValueError("teacher forcing needs a prompt and at least one output token")
        ids = list(prompt_ids) + list(output_ids[:-1])
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                use_cache=False,
                logits_to_keep=len(output_ids),
            )
        return out.logits[0].detach().to(device="cpu", dtype=torch.float64)

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        conversation = [
            {"role": _ROLE_ALIASES.get(m["role"], m["role"]), "content": m["content"]}
            for m in messages
        ]
        encoded = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=True))
        return str(
            self.tokenizer.decode(
                list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if piece and all(ch in self._byte_decoder for ch in piece):  # byte-level BPE
            raw = bytes(self._byte_decoder[ch] for ch in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        self._token_bytes[token_id] = raw
        return raw

    @property
    def max_batch(self) -> int:
        """How many generations decode together (1 for models that cannot be batched)."""
        return self._batch_backend.max_slots

    @property
    def batch_stats(self) -> BatcherStats:
        """The running batcher's counters (steps, rows served, the widest batch so far);
        all zero before the first generation and after `close`."""
        with self._batcher_lock:
            return self._batcher.stats if self._batcher is not None else BatcherStats()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        """Queue one generation into the running batch and yield its tokens (see
        compute.batching.ContinuousBatcher.generate: closing the iterator cancels it).

        Refused up front with ValueError, before it can touch the batch: an empty prompt, a
        token id outside the vocabulary, a prompt that leaves no room in the context.
        """
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        vocab = self.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        room = self._context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room in a context of "
                f"{self._context_length}"
            )
        return self._started_batcher().generate(list(prompt_ids), params, max_new_tokens=room)

    def close(self) -> None:
        """Stop the batch's worker thread; running generations end with GenerationError.
        A later `generate` starts a new one."""
        with self._batcher_lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()
            # Rows the closed batcher still held keep no cache into the next one's slots.
            for slot in self._batch_backend.active_slots:
                self._batch_backend.release(slot)

    def _started_batcher(self) -> ContinuousBatcher:
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = ContinuousBatcher(
                    self._batch_backend,
                    eos_token_ids=self._eos,
                    decode=self.decode,
                    name=self._name,
                )
            return self._batcher
