"""The engine interface every miner backend implements, and the decode loop they share.

An engine turns token ids into token ids and logprobs. The text a client sees is derived
from the token ids alone: the concatenated text deltas of a generation equal
`engine.decode(output_ids)` (special tokens skipped), truncated before the first stop
sequence when one ended the generation. That is what a verifier checks.

Output token ids include the token that ended the generation: the EOS token (which adds no
text) or the token that completed a stop sequence. They all count as completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from infergrid.protocol import sampling

FinishReason = Literal["stop", "length"]

# What a decoder yields for an incomplete UTF-8 sequence.
_REPLACEMENT = "\ufffd"


class UnsupportedRequest(ValueError):
    """A request this engine cannot serve exactly as asked; `param` names the request
    parameter, and the miner answers 400 naming it (never a silently different answer).

    An engine that serves only some requests has `check_params(params)`, which raises this.
    """

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one generation. temperature 0 is greedy; None means 1.0 (OpenAI)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    # How many alternatives to report per step (OpenAI top_logprobs); 0 keeps the loop lean.
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """One sampled token.

    `text` is the text released with this token: it may be empty when the token ends in the
    middle of a UTF-8 character or might be the start of a stop sequence, and later tokens
    then release it. `finish_reason` is set on the last token only.
    """

    token_id: int
    logprob: float  # ln p(token) under log_softmax of the raw logits (no temperature)
    text: str
    finish_reason: FinishReason | None = None
    top_logprobs: tuple[tuple[int, float], ...] = field(default=())


@runtime_checkable
class Engine(Protocol):
    """What a miner needs from a model backend. `generate` runs in the calling thread."""

    @property
    def name(self) -> str: ...

    @property
    def model_id(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt ids from the model's chat template, ready for the assistant's turn."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids with special tokens skipped; equal to a generation's text."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (for OpenAI logprobs' `bytes`)."""
        ...

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        """Sample up to params.max_tokens tokens; the last one carries the finish reason."""
        ...


@runtime_checkable
class AuditableEngine(Engine, Protocol):
    """An engine a verifier can recompute answers with (the built-in engines are ones)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def precision(self) -> str:
        """The precision the model id names: "float32", "bfloat16", "gguf-q4_1", ..."""
        ...

    def teacher_forced_logits(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> torch.Tensor:
        """The raw logits before each output token, [len(output_ids), vocab] float64 on the
        CPU, from one pass over prompt + output[:-1]."""
        ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting characters.

    It decodes a short window of recent tokens twice (with and without the newest ones) and
    releases only the difference, holding back text that ends in U+FFFD: that is a multi-byte
    character whose remaining bytes are still to come. `flush` releases whatever is held at
    the end, so the deltas always add up to decode(all ids).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this have been released as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(window)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Finds stop sequences in streamed text and holds back what could start one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(stop)
        self._max_len = max((len(s) for s in self._stop), default=0)
        self._text = ""  # everything seen so far
        self._released = 0  # length of the prefix of _text already returned

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop sequence was found)."""
        if not self._stop:
            return delta, False
        search_from = max(0, len(self._text) - self._max_len + 1)
        self._text += delta
        hit = -1
        for s in self._stop:
            i = self._text.find(s, search_from)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            out = self._text[self._released : hit]
            self._released = len(self._text)
            return out, True
        safe_end = len(self._text) - self._held_suffix()
        out = self._text[self._released : max(safe_end, self._released)]
        self._released = max(safe_end, self._released)
        # Only the tail can still hold a stop sequence; drop the rest now and then so long
        # generations do not copy an ever longer string on every token.
        cut = min(self._released, len(self._text) - self._max_len)
        if cut > 4096:
            self._text = self._text[cut:]
            self._released -= cut
        return out, False

    def flush(self) -> str:
        out = self._text[self._released :]
        self._released = len(self._text)
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        text = self._text
        for n in range(min(self._max_len - 1, len(text) - self._released), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0


TopLogprobs = tuple[tuple[int, float], ...]


def step_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top_n: Sequence[int]
) -> list[tuple[float, TopLogprobs]]:
    """Per row of a step's raw logits [N, V]: ln p(tokens[n]) under log_softmax (float64) and
    the top_n[n] most likely alternatives (empty when 0). One device-to-host copy of N
    numbers (plus the alternatives asked for), whatever the vocabulary size."""
    if logits.device.type == "cpu":  # row by row stays in cache
        return [
            _row_logprobs(logits[n].detach().to(dtype=torch.float64), tokens[n], top_n[n])
            for n in range(len(tokens))
        ]
    x = logits.detach().to(dtype=torch.float64)
    lse = torch.logsumexp(x, dim=-1)
    index = torch.tensor(list(tokens), dtype=torch.int64, device=x.device).unsqueeze(1)
    chosen = (x.gather(1, index).squeeze(1) - lse).tolist()
    out: list[tuple[float, TopLogprobs]] = []
    for n, k in enumerate(top_n):
        top: TopLogprobs = ()
        if k:
            values, indices = torch.topk(x[n], min(k, x.shape[1]))
            top = tuple(zip(indices.tolist(), (values - lse[n]).tolist(), strict=True))
        out.append((float(chosen[n]), top))
    return out


def _row_logprobs(x: torch.Tensor, token: int, k: int) -> tuple[float, TopLogprobs]:
    lse = torch.logsumexp(x, dim=0)
    top: TopLogprobs = ()
    if k:
        values, indices = torch.topk(x, min(k, x.numel()))
        top = tuple(zip(indices.tolist(), (values - lse).tolist(), strict=True))
    return float(x[token] - lse), top


class RowDecoder:
    """The per-request half of the protocol decode loop: the step counter, the detokenizer,
    stop sequences and the finish reason. `decode_loop` (one sequence) and the continuous
    batcher (many) both drive it, so every engine releases text by the same rule.

    `sampling` says how to sample the step about to be taken; `emit(token, logprob, top)`
    records the sampled token and returns what to send; `finished` is then True after the
    EOS token, a completed stop sequence or the `limit`-th token.
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        eos_token_ids: frozenset[int],
        decode: Callable[[Sequence[int]], str],
        limit: int,
    ) -> None:
        if limit < 1:
            raise ValueError("a generation needs room for at least one token")
        self.params = params
        self.limit = limit
        self._eos = eos_token_ids
        self._detok = IncrementalDetokenizer(decode)
        self._stops = StopMatcher(params.stop)
        self._step = 0
        self._finished = False

    @property
    def step(self) -> int:
        return self._step

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def sampling(self) -> sampling.RowSampling:
        p = self.params
        return sampling.RowSampling(p.seed, self._step, p.temperature, p.top_p, p.top_k)

    def emit(self, token: int, logprob: float, top: TopLogprobs = ()) -> GeneratedToken:
        if self._finished:
            raise RuntimeError("the generation has already finished")
        stops, detok = self._stops, self._detok
        finish: FinishReason | None = None
        if token in self._eos:
            text = stops.feed(detok.flush())[0] + stops.flush()
            finish = "stop"
        else:
            text, stopped = stops.feed(detok.push(token))
            if stopped:
                finish = "stop"
            elif self._step == self.limit - 1:
                tail, stopped = stops.feed(detok.flush())
                text += tail
                if stopped:
                    finish = "stop"
                else:
                    text += stops.flush()
                    finish = "length"
        self._step += 1
        self._finished = finish is not None
        return GeneratedToken(token, logprob, text, finish, top)


def decode_loop(
    first_logits: torch.Tensor,
    advance: Callable[[int], torch.Tensor],
    params: SamplingParams,
    *,
    eos_token_ids: frozenset[int],
    decode: Callable[[Sequence[int]], str],
    max_new_tokens: int | None = None,
) -> Iterator[GeneratedToken]:
    """The protocol decode loop over one sequence: sample, score, detokenize, stop.

    `first_logits` are the last-position logits after the prompt; `advance(token)` feeds one
    token and returns the next logits. The loop never calls `advance` after the last token,
    and a consumer that stops iterating stops the model.
    """
    limit = params.max_tokens if max_new_tokens is None else min(params.max_tokens, max_new_tokens)
    if limit < 1:
        return
    row = RowDecoder(params, eos_token_ids=eos_token_ids, decode=decode, limit=limit)
    logits = first_logits
    while True:
        x = logits.detach().unsqueeze(0)
        token = sampling.sample_rows(x, [row.sampling])[0]
        ((logprob, top),) = step_logprobs(x, [token], [params.top_logprobs])
        generated = row.emit(token, logprob, top)
        yield generated
        if row.finished:
            return
        logits = advance(token)
