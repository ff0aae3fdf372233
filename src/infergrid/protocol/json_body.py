"""Reading and decoding JSON bodies from untrusted peers: clients and permissionless miners.

Shared by the gateway and the miner so both refuse the same hostile bodies with the same 4xx:
a body too large (413) or too slow to arrive (408), bytes that are not UTF-8, JSON nested too
deep, non-finite numbers, and strings that cannot be encoded.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterable
from typing import Any

from infergrid.protocol.openai_types import APIError

# Deeper than any real request or answer. The limit is not about cost: json's C decoder recurses
# on the C stack, and eth_account (via py_ecc) raises Python's recursion limit to 100000 in any
# process that imports it, so a ~100 KB body of "[[[[…" would crash the process instead of
# raising RecursionError. Bodies come from clients and from permissionless miners alike.
MAX_JSON_DEPTH = 128
# One token per string or bracket. Strings are matched possessively with an optional closing
# quote, so every quote starts at most one scan: linear time even on hostile input.
_JSON_STRUCTURE = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit`."""
    # Fast path, two C-speed scans: fewer openers than the limit cannot nest deeper than it.
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for match in _JSON_STRUCTURE.finditer(raw):
        first = match.group()[0]
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif first != 0x22:  # a closing bracket, not a string
            depth -= 1
    return False


# Longer integers than Python converts by default (sys.get_int_max_str_digits); refused with a
# plain message instead of the interpreter's.
MAX_INT_DIGITS = 4300
# A JSON escape of a UTF-16 surrogate (D800-DFFF). Paired ones make one character; a lone one
# makes a str that cannot be encoded, and would fail whatever later writes it out (the gateway's
# re-encoding for the miner, a tokenizer, a log). Raw bytes of a surrogate are not valid UTF-8
# and fail the strict decode instead. The escape is rare in real bodies (clients that escape
# non-ASCII write emoji as pairs), so only a body that has one pays for the walk that checks.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_BOM = b"\xef\xbb\xbf"


class UnencodableString(ValueError):
    """A JSON string (a value, or a key when `key`) that is not valid Unicode: a lone surrogate
    escape. `path` is where it is (`messages[0].content`; for a key, the object holding it)."""

    def __init__(self, path: str, *, key: bool = False) -> None:
        if key:
            where = f"a key of '{path}'" if path else "a key of the body"
        else:
            where = f"the string at '{path}'" if path else "the body"
        super().__init__(
            f"{where} is not valid Unicode (a lone surrogate escape such as \\ud800); every"
            " string must be encodable as UTF-8"
        )
        self.path = path
        self.key = key


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def unencodable(obj: Any, path: str = "") -> UnencodableString | None:
    """The first string of a decoded JSON value (key or value, in document order) that does
    not encode as UTF-8, as the error that names where it is; None when there is none."""
    if isinstance(obj, str):
        return None if _encodable(obj) else UnencodableString(path)
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not _encodable(key):
                return UnencodableString(path, key=True)
            found = unencodable(value, _join(path, key))
            if found is not None:
                return found
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found = unencodable(value, _join(path, i))
            if found is not None:
                return found
    return None


def loads(raw: bytes, *, strict: bool = True) -> Any:
    """json.loads for untrusted bytes: UTF-8 only, bounded nesting, and every string encodable
    (UnencodableString otherwise). `strict` also refuses NaN, Infinity, numbers that overflow
    to them (1e999) and integers of more than MAX_INT_DIGITS digits: clients must send real
    JSON; a miner's -Infinity logprob passes through.

    Raises ValueError (UnicodeDecodeError and UnencodableString included) on anything else.
    """
    if too_deep(raw):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    # Strict UTF-8: json.loads(bytes) would let encoded surrogates through ("surrogatepass").
    text = raw.removeprefix(_BOM).decode("utf-8")
    if strict:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    else:
        value = json.loads(text)
    if _SURROGATE_ESCAPE.search(raw) is not None:
        error = unencodable(value)
        if error is not None:
            raise error
    return value


def decode_request_json(raw: bytes) -> Any:
    """Decode a client's body; anything that is not strict JSON is a 400, never a 500."""
    try:
        return loads(raw)
    except UnencodableString as exc:
        raise APIError(
            400, f"Invalid request: {exc}.", param=exc.path or None, code="invalid_unicode"
        ) from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        reason = str(exc)[:200] or type(exc).__name__
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The API expects a JSON payload"
            f" in UTF-8, but what was sent was not valid JSON: {reason}.",
            code="invalid_json",
        ) from None


# The rest of a body that was refused half-way cannot be read, so the connection cannot serve
# another request.
_CLOSE = {"connection": "close"}


async def read_body(chunks: AsyncIterable[bytes], *, max_bytes: int, timeout_s: float) -> bytes:
    """A request body from its chunks, refused with 413 as soon as it passes `max_bytes` and
    with 408 when it has not all arrived within `timeout_s` (a stalled or trickling client
    would otherwise hold a connection and its memory for ever: the HTTP server has no body
    timeout). Both errors close the connection.
    """
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(
                        413,
                        f"The request body is larger than {max_bytes} bytes.",
                        code="too_large",
                        headers=_CLOSE,
                    )
                parts.append(chunk)
    except TimeoutError:
        raise APIError(
            408,
            f"The request body did not arrive within {timeout_s:g} s.",
            code="request_timeout",
            headers=_CLOSE,
        ) from None
    return b"".join(parts)
