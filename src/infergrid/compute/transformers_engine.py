"""The built-in engine: HuggingFace transformers, a manual KV-cache decode loop, CPU or CUDA.

The loop is ours rather than `model.generate` because every token must come from the
protocol sampler (infergrid.protocol.sampling) for verifiers to replay it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from infergrid.compute import model_store
from infergrid.compute.engine import GeneratedToken, SamplingParams, decode_loop
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


class TransformersEngine:
    """One causal LM and its tokenizer. Thread-safe for concurrent `generate` calls."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        weights_digest: str,
        revision: str = model_store.DEFAULT_REVISION,
        context_length: int | None = None,
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
    ) -> TransformersEngine:
        """Load a safetensors directory (its infergrid.json names it, if present).

        `num_threads` sizes torch's CPU thread pools, process-wide (set_torch_threads); None
        leaves them as they are. On a small CPU one thread is as fast for small models (they
        are bound by memory or by Python, not by arithmetic) and leaves a core to the HTTP
        server.
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
        return self._generate(list(prompt_ids), params, room)

    def _generate(
        self, prompt_ids: list[int], params: SamplingParams, room: int
    ) -> Iterator[GeneratedToken]:
        model, device = self.model, self.device
        # inference_mode is entered per forward pass, not around the loop: grad mode is
        # thread-local state, and a suspended generator must not leave it switched on for
        # whoever consumes it.
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([prompt_ids], device=device),
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.past_key_values
        first_logits = out.logits[0, -1]
        del out

        def advance(token: int) -> torch.Tensor:
            nonlocal cache
            with torch.inference_mode():
                step = model(
                    input_ids=torch.tensor([[token]], device=device),
                    past_key_values=cache,
                    use_cache=True,
                )
            cache = step.past_key_values
            return step.logits[0, -1]

        yield from decode_loop(
            first_logits,
            advance,
            params,
            eos_token_ids=self._eos,
            decode=self.decode,
            max_new_tokens=room,
        )
