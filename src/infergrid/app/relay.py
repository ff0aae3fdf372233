"""Pure transformations between what a client sends/gets and what a miner sends/gets.

No I/O here, so every rule the gateway applies to a body is testable on plain dicts: the seed and
usage it adds on the way in, the `infergrid` extension and unrequested logprobs it removes on the
way out.
"""

from __future__ import annotations

import json
from typing import Any

from infergrid.protocol.json_body import loads
from infergrid.protocol.openai_types import GENERATED_SEED_BITS, error_body
from infergrid.protocol.pricing import wei_to_btt
from infergrid.protocol.wire import EXTENSION_KEY

# One encoder, built once: json.dumps with non-default options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# The seeds the gateway picks for requests that bring none (protocol.openai_types says what a
# seed is; a client's own passes through as sent, already checked to be in range).
SEED_BITS = GENERATED_SEED_BITS


def encode(obj: Any) -> bytes:
    return _encode(obj).encode()


def upstream_body(
    body: dict[str, Any], *, stream: bool, seed: int, max_tokens: int | None = None
) -> tuple[bytes, int]:
    """The body to send the miner, and the seed it will sample with.

    The client's own fields pass through untouched (the miner validates them the same way);
    the gateway only fills in a seed when none was given and, when streaming, always asks for
    the usage chunk, because metering needs it whether or not the client does. `max_tokens`,
    when given, becomes the body's max_tokens: a metered gateway states the completion limit
    it reserved for on a request that set none, so an honest miner generates no more than
    the payer's reservation covers.
    """
    if body.get("seed") is None:
        body["seed"] = seed
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        options = body.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        body["stream_options"] = options
    return encode(body), body["seed"]


def usage_of(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def _clean_choices(obj: dict[str, Any], wants_logprobs: bool) -> None:
    if wants_logprobs:
        return
    # The miner already omits logprobs nobody asked for; this keeps a miner that does not
    # from leaking them (and their cost on the wire) to clients.
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("logprobs") is not None:
                choice["logprobs"] = None


def client_view(
    obj: dict[str, Any], *, wants_logprobs: bool, drop_usage: bool = False
) -> dict[str, Any]:
    """A miner's answer or streamed chunk as the client may see it (mutates and returns obj).

    `drop_usage` is for the chunks of a stream whose client did not ask for usage: the gateway
    asked on its behalf, which makes a miner add `"usage": null` to every chunk as OpenAI does,
    and that client would not have seen it.
    """
    obj.pop(EXTENSION_KEY, None)
    if drop_usage:
        obj.pop("usage", None)
    _clean_choices(obj, wants_logprobs)
    return obj


def is_usage_chunk(obj: dict[str, Any]) -> bool:
    return obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def carries_output(obj: dict[str, Any]) -> bool:
    """Whether a chunk commits the stream: content, a finish, usage or an error.

    Until one arrives the gateway holds the stream back, so a miner that dies after only a
    role-announcing chunk can still be replaced without the client noticing.
    """
    if "error" in obj or is_usage_chunk(obj):
        return True
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return True  # not a shape we understand: do not hold it back
    for choice in choices:
        if not isinstance(choice, dict):
            return True
        if choice.get("finish_reason") is not None or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
    return False


def finishes(obj: dict[str, Any]) -> bool:
    """Whether a chunk carries a finish_reason: the last chunk with choices in a stream."""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)


def add_cost(usage: dict[str, Any], value_wei: int) -> dict[str, Any]:
    """Usage as a metered gateway returns it: plus what the request cost, in BTT (a float,
    for display) and in exact wei (a decimal string: JSON numbers lose precision above 2**53).
    """
    usage["cost"] = wei_to_btt(value_wei)
    usage["cost_wei"] = str(value_wei)
    return usage


def error_message(raw: bytes) -> str | None:
    """The message of an OpenAI-shaped error body, or None if `raw` is not one."""
    try:
        body = loads(raw, strict=False)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


def stream_error_event(message: str, *, code: str = "miner_failed") -> bytes:
    """The event that ends a stream the gateway cannot finish; OpenAI clients raise on it."""
    return sse_event(error_body(message, type="server_error", code=code))


def parse_sse_data(line: bytes) -> bytes | None:
    """The payload of an SSE `data:` line, or None for any other line (comments, blanks)."""
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()
