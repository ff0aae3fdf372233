"""OpenAI response bodies and stream chunks built from generated tokens (pure, no I/O).

Shapes follow OpenAI's chat and legacy completion APIs; every body also carries the
InferGrid extension described in infergrid.protocol.wire. End-of-sequence tokens are part
of the extension's token ids (a verifier checks them) but, as with OpenAI, never appear in
the visible `logprobs`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infergrid.compute.engine import GeneratedToken
from infergrid.protocol.sampling import SAMPLER_VERSION
from infergrid.protocol.wire import ATTESTATION_KEY, EXTENSION_KEY, SSE_DONE

# OpenAI reports impossible tokens as -9999.0 rather than -Infinity, which JSON cannot carry.
LOGPROB_FLOOR = -9999.0

TokenBytes = Callable[[int], bytes]
# Signs a finished response: given every output token id (the ending token included), the
# attestation JSON for the extension. Called once, when the response's last part is built.
AttestFn = Callable[[Sequence[int]], dict[str, Any]]


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def token_string(raw: bytes) -> str:
    """OpenAI's `token` text: the token's characters, or `bytes:\\xNN…` for a partial one."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


@dataclass(frozen=True)
class ResponseContext:
    """What every body and chunk of one response shares."""

    completion_id: str
    created: int
    model: str  # the model's name, as OpenAI echoes it
    model_id: str
    chat: bool
    seed: int
    prompt_token_ids: Sequence[int]
    eos_token_ids: frozenset[int]
    token_bytes: TokenBytes
    # The engine's decode (special tokens skipped), for text offsets inside a character.
    decode: Callable[[Sequence[int]], str]
    # None: the client asked for no logprobs; else how many alternatives per token.
    logprobs: int | None = None
    include_usage: bool = False
    # With settlement on: the attestation of the finished response (see AttestFn).
    attest: AttestFn | None = None

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = len(self.prompt_token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def visible(self, tokens: Sequence[GeneratedToken]) -> list[GeneratedToken]:
        return [t for t in tokens if t.token_id not in self.eos_token_ids]


def _alternative(ctx: ResponseContext, token_id: int, logprob: float) -> dict[str, Any]:
    raw = ctx.token_bytes(token_id)
    return {"token": token_string(raw), "logprob": finite(logprob), "bytes": list(raw)}


def chat_logprobs(ctx: ResponseContext, tokens: Sequence[GeneratedToken]) -> dict[str, Any] | None:
    """choices[i].logprobs of a chat response, or None when not asked or nothing to show."""
    if ctx.logprobs is None:
        return None
    content = []
    for tok in ctx.visible(tokens):
        entry = _alternative(ctx, tok.token_id, tok.logprob)
        entry["top_logprobs"] = [
            _alternative(ctx, tid, lp) for tid, lp in tok.top_logprobs[: ctx.logprobs]
        ]
        content.append(entry)
    return {"content": content, "refusal": None} if content else None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def text_offsets(ctx: ResponseContext, tokens: Sequence[GeneratedToken], start: int) -> list[int]:
    """The legacy `text_offset` of each visible token: the character of the output text where
    it starts, counted from `start` (the characters sent before these tokens).

    A token starts after the text its predecessors decode to, as far as that agrees with the
    output: a token that continues a character cut by the previous one (byte-fallback
    tokens, partial UTF-8) starts where that character does, while bytes that turned out
    invalid count as the U+FFFD the output holds for them. The engine releases text only once
    characters are whole, so such tokens release nothing and a later one releases the text of
    the group; offsets inside a group come from decoding its first tokens, not from each
    token's own released text. A group of one token needs no decoding.
    """
    offsets: list[int] = []
    group: list[int] = []
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        group.append(tok.token_id)
        if not tok.text and i != last:
            continue
        offsets.append(start)
        for k in range(1, len(group)):
            decoded = ctx.decode(group[:k])
            offsets.append(start + _common_prefix(decoded, tok.text))
        start += len(tok.text)
        group = []
    return [
        offset
        for offset, tok in zip(offsets, tokens, strict=True)
        if tok.token_id not in ctx.eos_token_ids
    ]


def legacy_logprobs(
    ctx: ResponseContext, tokens: Sequence[GeneratedToken], text_offset: int
) -> dict[str, Any] | None:
    """choices[i].logprobs of a legacy completion; offsets count characters of the output."""
    if ctx.logprobs is None:
        return None
    visible = ctx.visible(tokens)
    if not visible:
        return None
    offsets = text_offsets(ctx, tokens, text_offset)
    return {
        "tokens": [token_string(ctx.token_bytes(t.token_id)) for t in visible],
        "token_logprobs": [finite(t.logprob) for t in visible],
        "top_logprobs": [
            {
                token_string(ctx.token_bytes(tid)): finite(lp)
                for tid, lp in t.top_logprobs[: ctx.logprobs]
            }
            for t in visible
        ],
        "text_offset": offsets,
    }


def completion_body(ctx: ResponseContext, tokens: Sequence[GeneratedToken]) -> dict[str, Any]:
    """The whole non-streamed response for a finished generation."""
    text = "".join(t.text for t in tokens)
    finish = tokens[-1].finish_reason if tokens else "length"
    output_ids = [t.token_id for t in tokens]
    extension: dict[str, Any] = {
        "model_id": ctx.model_id,
        "sampler": SAMPLER_VERSION,
        "seed": ctx.seed,
        "prompt_token_ids": list(ctx.prompt_token_ids),
        "output_token_ids": output_ids,
        "output_logprobs": [t.logprob for t in tokens],
    }
    if ctx.attest is not None:
        extension[ATTESTATION_KEY] = ctx.attest(output_ids)
    choice: dict[str, Any]
    if ctx.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": chat_logprobs(ctx, tokens),
            "finish_reason": finish,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": legacy_logprobs(ctx, tokens, 0),
            "finish_reason": finish,
        }
    return {
        "id": ctx.completion_id,
        "object": ctx.object,
        "created": ctx.created,
        "model": ctx.model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": ctx.usage(len(tokens)),
        EXTENSION_KEY: extension,
    }


@dataclass
class StreamWriter:
    """Turns batches of tokens into SSE bytes: role chunk, content chunks, finish, usage, DONE.

    Each batch of tokens the engine has ready becomes one content chunk (one token per chunk
    when the client reads as fast as the model writes), whose extension lists the ids of
    every token since the previous chunk: tokens that released no text yet, such as the
    first half of a split character, ride along with the next one. The finish chunk carries
    whatever is left, typically the EOS token.
    """

    ctx: ResponseContext
    _pending: list[GeneratedToken] = field(default_factory=list)
    # Every id sent so far, for the attestation's response hash (only kept when attesting).
    _output_ids: list[int] = field(default_factory=list)
    _completion_tokens: int = 0
    _text_offset: int = 0
    _started: bool = False
    done: bool = False

    def _chunk(self, choice: dict[str, Any], tokens: Sequence[GeneratedToken]) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.ctx.completion_id,
            "object": self.ctx.chunk_object,
            "created": self.ctx.created,
            "model": self.ctx.model,
            "system_fingerprint": None,
            "choices": [choice],
        }
        if self.ctx.include_usage:
            chunk["usage"] = None
        if tokens:
            chunk[EXTENSION_KEY] = {
                "token_ids": [t.token_id for t in tokens],
                "logprobs": [t.logprob for t in tokens],
            }
        return sse(chunk)

    def _choice(
        self, tokens: Sequence[GeneratedToken], text: str, finish: str | None
    ) -> dict[str, Any]:
        if self.ctx.chat:
            delta: dict[str, Any] = {"content": text} if finish is None else {}
            return {
                "index": 0,
                "delta": delta,
                "logprobs": chat_logprobs(self.ctx, tokens),
                "finish_reason": finish,
            }
        choice = {
            "index": 0,
            "text": text,
            "logprobs": legacy_logprobs(self.ctx, tokens, self._text_offset),
            "finish_reason": finish,
        }
        return choice

    def start(self) -> bytes:
        """The opening chunk: chat streams announce the assistant role first, as OpenAI does."""
        self._started = True
        if not self.ctx.chat:
            return b""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._chunk(choice, ())

    def feed(self, batch: Sequence[GeneratedToken]) -> bytes:
        out = [] if self._started else [self.start()]
        finish: str | None = None
        for tok in batch:
            self._completion_tokens += 1
            self._pending.append(tok)
            if self.ctx.attest is not None:
                self._output_ids.append(tok.token_id)
            if tok.finish_reason is not None:
                finish = tok.finish_reason
                break
        # One chunk for all the text of the batch; tokens after the last text wait for more.
        last_text = max((i for i, t in enumerate(self._pending) if t.text), default=-1)
        if last_text >= 0:
            tokens = self._pending[: last_text + 1]
            del self._pending[: last_text + 1]
            text = "".join(t.text for t in tokens)
            out.append(self._chunk(self._choice(tokens, text, None), tokens))
            self._text_offset += len(text)
        if finish is not None:
            out.append(self._finish(finish))
        return b"".join(out)

    def _finish(self, reason: str) -> bytes:
        tokens, self._pending = self._pending, []
        finish = self._chunk(self._choice(tokens, "", reason), tokens)
        extension: dict[str, Any] = {
            "model_id": self.ctx.model_id,
            "sampler": SAMPLER_VERSION,
            "seed": self.ctx.seed,
            "prompt_token_ids": list(self.ctx.prompt_token_ids),
        }
        if self.ctx.attest is not None:
            extension[ATTESTATION_KEY] = self.ctx.attest(self._output_ids)
        usage = {
            "id": self.ctx.completion_id,
            "object": self.ctx.chunk_object,
            "created": self.ctx.created,
            "model": self.ctx.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": self.ctx.usage(self._completion_tokens),
            EXTENSION_KEY: extension,
        }
        self.done = True
        return finish + sse(usage) + SSE_DONE
