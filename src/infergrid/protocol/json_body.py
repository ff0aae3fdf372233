"""Decoding JSON bodies from untrusted peers: clients and permissionless miners alike.

Shared by the gateway and the miner so both refuse the same hostile bodies with the same 400.
"""

from __future__ import annotations

import json
import re
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes, *, strict: bool = True) -> Any:
    """json.loads for untrusted bytes, with bounded nesting; `strict` also refuses NaN and
    Infinity (clients must send real JSON; a miner's -Infinity logprob passes through).

    Raises ValueError (UnicodeDecodeError included) on anything else.
    """
    if too_deep(raw):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if strict:
        return json.loads(raw, parse_constant=_reject_constant)
    return json.loads(raw)


def decode_request_json(raw: bytes) -> Any:
    """Decode a client's body; anything that is not strict JSON is a 400, never a 500."""
    try:
        return loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The API expects a JSON payload,"
            f" but what was sent was not valid JSON ({type(exc).__name__}).",
            code="invalid_json",
        ) from None
