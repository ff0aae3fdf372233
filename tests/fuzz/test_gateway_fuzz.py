"""Hostile request bodies, as raw bytes on one keep-alive connection, against a real metered
gateway and, directly, the real miner behind it.

A valid chat or completions body is mutated at any position (known fields, unknown fields,
keys, nested messages and parts, the whole body) with what broke or could break the network:
lone surrogate escapes, invalid UTF-8, integers no column or RNG holds (2^63, 2^64, 10^30, -1),
NaN/Infinity/1e999, deep nesting, wrong types, huge strings within the body limit. Every
response must be below 500, a 4xx must be OpenAI's error object naming the parameter as the
client wrote it, a 200 must be a whole answer, and the connection must still serve the next
request. Afterwards the writers (traces, receipts, the miner's receipt log) must be healthy
and agree (fuzz_stack.assert_healthy). Bounded and derandomized, so CI is reproducible.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
from fuzz_stack import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MAX_BODY_BYTES,
    MODEL,
    KeepAlive,
    Stack,
    assert_healthy,
    check_error_shape,
)
from hypothesis import HealthCheck, example, given, settings

from infergrid.protocol import json_body
from infergrid.protocol.openai_types import ChatCompletionRequest, CompletionRequest
from infergrid.protocol.params import REFUSED
from infergrid.protocol.wire import EXTENSION_KEY

EXAMPLES = 150


def _settings() -> Any:
    return settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


# -- a JSON tree that can hold bytes no encoder would write -----------------------------------


@dataclass(frozen=True)
class Raw:
    """Literal bytes in the body, written as they are."""

    data: bytes


@dataclass
class Obj:
    """A JSON object as its pairs, in order: keys may be Raw and may repeat."""

    pairs: list[tuple[str | Raw, Any]]


def dump(node: Any) -> bytes:
    if isinstance(node, Raw):
        return node.data
    if isinstance(node, Obj):
        return b"{" + b",".join(dump(k) + b":" + dump(v) for k, v in node.pairs) + b"}"
    if isinstance(node, list):
        return b"[" + b",".join(dump(item) for item in node) + b"]"
    if isinstance(node, str):
        return json.dumps(node, ensure_ascii=False).encode()
    return json.dumps(node).encode()  # None, bools, ints of any size, finite floats


def tree(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj([(k, tree(v)) for k, v in value.items()])
    if isinstance(value, list):
        return [tree(item) for item in value]
    return value


def containers(node: Any) -> list[Any]:
    """Every object and array in the tree, the root first."""
    found = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, Obj):
            found.append(item)
            stack.extend(v for _, v in item.pairs)
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


# -- what goes in --------------------------------------------------------------------------

SURROGATES = [
    Raw(b'"\\ud800"'),
    Raw(b'"\\udfff"'),
    Raw(b'"a\\ud83d"'),  # a high surrogate at the end
    Raw(b'"\\ude00b"'),  # a low surrogate first
    Raw(b'"\\udc00\\ud800"'),  # a pair the wrong way round
    Raw(b'"x\\ud800\\u0041"'),
]
VALID_ESCAPES = [Raw(b'"\\ud83d\\ude00"'), Raw(b'"\\u0000"'), Raw(b'"\\u00e9\\n\\t"')]
INVALID_UTF8 = [
    Raw(b'"\xff"'),
    Raw(b'"\xc3"'),  # a truncated two-byte sequence
    Raw(b'"\xed\xa0\x80"'),  # a surrogate encoded as UTF-8 (CESU-8)
    Raw(b'"\xc0\xaf"'),  # overlong
    Raw(b'"ok\xf4\x90\x80\x80"'),  # above U+10FFFF
]
NON_FINITE = [Raw(v) for v in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1E400")]
ODD_NUMBERS = [Raw(v) for v in (b"-0", b"1e-400", b"0.0", b"1.0", b"2E0", b"-1.5")]
BIG_INTS = [
    2**63,
    2**63 - 1,
    -(2**63),
    -(2**63) - 1,
    2**64,
    2**64 - 1,
    10**30,
    -(10**30),
    2**31,
    -1,
    0,
    2**53 + 1,
]
WRONG_TYPES = [None, True, False, [], {}, "", "5", "null", 5.5, -1.0, [None], {"": None}]


def _nested(depth: int, kind: str) -> Raw:
    if kind == "array":
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


def _huge_string(size: int) -> Raw:
    return Raw(b'"' + b"\xc3\xa9" * (size // 2) + b'"')


hostile_values = st.one_of(
    st.sampled_from(SURROGATES + INVALID_UTF8 + NON_FINITE + ODD_NUMBERS + VALID_ESCAPES),
    st.sampled_from(BIG_INTS),
    st.sampled_from(WRONG_TYPES).map(tree),
    st.builds(
        _nested,
        st.sampled_from([2, 100, 127, 128, 129, 1000, 60_000]),
        st.sampled_from(["array", "object"]),
    ),
    st.builds(_huge_string, st.sampled_from([70_000, 400_000])),
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)

KNOWN_FIELDS = sorted(
    {*ChatCompletionRequest.model_fields, *CompletionRequest.model_fields}
    | {rule.name for rule in REFUSED}
    | {"role", "content", "name", "type", "text", "include_usage", "tool_calls", "image_url"}
)
hostile_keys = st.one_of(
    st.sampled_from(KNOWN_FIELDS),
    st.text(max_size=8),
    st.sampled_from(SURROGATES + INVALID_UTF8 + VALID_ESCAPES),
)

_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text})
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"])},
    optional={"content": st.one_of(_text, st.lists(_part, min_size=1, max_size=2))},
)
_sampling = {
    "stream": st.booleans(),
    "temperature": st.sampled_from([0.0, 0.7, 1.5]),
    "seed": st.integers(-5, 5),
    "stop": st.one_of(_text, st.lists(_text, max_size=2)),
    "user": _text,
    "top_k": st.integers(0, 5),
}
chat_bodies = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "messages": st.lists(_message, min_size=1, max_size=3),
        "max_tokens": st.integers(1, 3),
    },
    optional={**_sampling, "logprobs": st.booleans()},
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": _text, "max_tokens": st.integers(1, 3)},
    optional={**_sampling, "logprobs": st.integers(0, 2)},
)


def _chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        **fields,
    }


def _raw(body: dict[str, Any], old: bytes = b"", new: bytes = b"") -> bytes:
    return json.dumps(body).encode().replace(old, new)


# The bodies that broke the network when it was tried from outside (issue 7), run first on
# every run, then what the strategies find.
KNOWN_CHAT = [
    _raw(_chat(seed=2**63)),
    _raw(_chat(seed=2**64)),
    _raw(_chat(seed=-(2**63) - 1)),
    _raw(_chat(top_k=2**63)),
    _raw(_chat(max_tokens=10**30)),
    _raw(_chat(), b'"hi"', b'"\\ud800"'),  # messages[0].content
    _raw(_chat(user="U"), b'"U"', b'"\\udfff"'),
    _raw(_chat(messages=[{"role": "user", "content": "hi", "name": "N"}]), b'"N"', b'"\\ud800"'),
    _raw(
        _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "P"}]}]),
        b'"P"',
        b'"\\ud800"',
    ),
    _raw(_chat(extension="E"), b'"E"', b'"\\ud800"'),  # an unknown field
    _raw(_chat(), b'"hi"', b'"\xff"'),
    _raw(_chat(stop=["a", "b", "c", "d", "e"])),
    _raw(_chat(temperature=1.0), b"1.0", b"NaN"),
    _raw(_chat(temperature=1.0), b"1.0", b"1e999"),
    _raw(_chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")),
    _raw(_chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}})),
    _raw(_chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
    b"[" * 100_000 + b"]" * 100_000,
]
KNOWN_COMPLETION = [
    _raw({"model": MODEL, "prompt": "P", "max_tokens": 2, "seed": 2**63}),
    _raw({"model": MODEL, "prompt": "P", "max_tokens": 2}, b'"P"', b'"\\ud800"'),
    _raw({"model": MODEL, "prompt": ["P"], "max_tokens": 2}, b'"P"', b'"a\\udc00"'),
    _raw({"model": MODEL, "prompt": [1, 2], "max_tokens": 2}),
    _raw({"model": MODEL, "prompt": "P", "max_tokens": 2, "logprobs": 2**64}),
]


def _examples(bodies: list[bytes]) -> Any:
    def decorate(test: Any) -> Any:
        for raw in reversed(bodies):
            test = example(raw=raw)(test)
        return test

    return decorate


def _target_examples() -> Any:
    known = [(CHAT_PATH, raw) for raw in KNOWN_CHAT]
    known += [(COMPLETIONS_PATH, raw) for raw in KNOWN_COMPLETION]

    def decorate(test: Any) -> Any:
        for target in reversed(known):
            test = example(target=target)(test)
        return test

    return decorate


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> bytes:
    """A valid body, changed at up to three drawn positions (none in about one case in
    five, so that the miner is reached too), or broken as a whole."""
    root = tree(draw(bodies))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        node = draw(st.sampled_from(containers(root)))
        how = draw(st.sampled_from(["replace", "insert", "rename"]))
        if isinstance(node, list):
            if how == "insert" or not node:
                node.insert(draw(st.integers(0, len(node))), draw(hostile_values))
            else:
                node[draw(st.integers(0, len(node) - 1))] = draw(hostile_values)
        elif how == "insert" or not node.pairs:
            node.pairs.insert(
                draw(st.integers(0, len(node.pairs))), (draw(hostile_keys), draw(hostile_values))
            )
        else:
            i = draw(st.integers(0, len(node.pairs) - 1))
            key, value = node.pairs[i]
            node.pairs[i] = (
                (draw(hostile_keys), value) if how == "rename" else (key, draw(hostile_values))
            )
    raw = dump(root)
    whole = draw(st.sampled_from(["as is"] * 6 + ["bom", "truncated", "trailing", "scalar"]))
    if whole == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif whole == "truncated":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif whole == "trailing":
        raw = raw + draw(st.sampled_from([b" x", b"}", b"\x00", b"\xff"]))
    elif whole == "scalar":
        raw = draw(st.sampled_from([b"", b"null", b"[]", b'"x"', b"1", b"NaN", b"[" + raw + b"]"]))
    return raw


# -- what must come out --------------------------------------------------------------------

# How OpenAI names a parameter: `stop`, `messages[0].content`, `stream_options.include_usage`;
# in a body that is not an object, a position starts at an index (`[0].model`).
_PARAM = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|\[\d+\])(?:\[\d+\]|\.[A-Za-z_][A-Za-z0-9_]*)*")
# Fields a body may lack that an error can name: required ones, at any level.
_REQUIRED = {"model", "messages", "prompt", "role", "type", "text"}


def _paths(node: Any, prefix: str = "") -> Any:
    """Every position in a decoded body, written as a client would name it."""
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _paths(item, f"{prefix}[{i}]")


def check_param(param: str, raw: bytes) -> None:
    """`error.param` names a position of the body as the client wrote it (`messages[0].content`,
    not pydantic's `messages.0.content.str`), or a required field missing there."""
    try:
        doc = None if json_body.too_deep(raw) else json.loads(raw)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        assert _PARAM.fullmatch(param), (param, raw[:300])
        return
    paths = set(_paths(doc))
    if param in paths:
        return
    parent, _, last = param.rpartition(".")
    assert last in _REQUIRED and (not parent or parent in paths), (param, raw[:300])


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _strings(node: Any) -> Any:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from _strings(value)


def must_refuse(raw: bytes) -> bool:
    """Whether any server must answer this body 400, whatever its fields: it is not strict
    JSON in UTF-8 (NaN and Infinity are not JSON), nests deeper than the protocol allows, is
    not an object, or holds a string or key that UTF-8 cannot encode (a lone surrogate, from
    an escape or from CESU-8 bytes, which Python's decoder lets through)."""
    # Decoding a 100000-deep body here could overflow the C stack (see protocol.json_body).
    if json_body.too_deep(raw):
        return True
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return True
    if not isinstance(doc, dict):
        return True
    for text in _strings(doc):
        try:
            text.encode()
        except UnicodeEncodeError:
            return True
    return False


def check_answer(status: int, headers: Any, body: bytes, *, raw: bytes, gateway: bool) -> None:
    """Below 500; a 4xx is OpenAI's error naming the parameter as the client wrote it; a 200
    is a whole answer (from a gateway, without the miner's extension)."""
    assert status < 500, (status, body[:500], raw[:300])
    if must_refuse(raw):
        assert status == 400, (status, body[:300], raw[:300])
    if status >= 400:
        error = check_error_shape(status, body)
        param = error["param"]
        if param is not None:
            check_param(param, raw)
        return
    assert status == 200, (status, body[:300])
    if headers.get("content-type", "").startswith("text/event-stream"):
        assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                assert not gateway or EXTENSION_KEY not in event, event
        return
    answer = json.loads(body)
    assert answer["choices"], answer
    assert not gateway or EXTENSION_KEY not in answer, answer


def _fuzz(stack: Stack, conn: KeepAlive, path: str, raw: bytes, *, direct: bool) -> None:
    assert len(raw) <= MAX_BODY_BYTES
    headers = {} if direct else stack.auth()
    status, response_headers, body = conn.request("POST", path, raw, headers)
    stack.counts.saw(status, direct=direct)
    check_answer(status, response_headers, body, raw=raw, gateway=not direct)
    conn.still_usable()


@pytest.fixture
def gateway_conn(stack: Stack) -> Any:
    conn = KeepAlive(stack.gateway_url)
    yield conn
    conn.close()


@pytest.fixture
def miner_conn(stack: Stack) -> Any:
    conn = KeepAlive(stack.miner_url)
    yield conn
    conn.close()


def test_fuzz_gateway_chat(stack: Stack, gateway_conn: KeepAlive) -> None:
    @_settings()
    @given(raw=mutated(chat_bodies))
    @_examples(KNOWN_CHAT)
    def run(raw: bytes) -> None:
        _fuzz(stack, gateway_conn, CHAT_PATH, raw, direct=False)

    run()


def test_fuzz_gateway_completions(stack: Stack, gateway_conn: KeepAlive) -> None:
    @_settings()
    @given(raw=mutated(completion_bodies))
    @_examples(KNOWN_COMPLETION)
    def run(raw: bytes) -> None:
        _fuzz(stack, gateway_conn, COMPLETIONS_PATH, raw, direct=False)

    run()


def test_fuzz_miner_directly(stack: Stack, miner_conn: KeepAlive) -> None:
    """The miner is permissionless to call: it must hold up on its own, not only behind a
    gateway that has already refused the worst."""

    @_settings()
    @given(
        target=st.one_of(
            st.tuples(st.just(CHAT_PATH), mutated(chat_bodies)),
            st.tuples(st.just(COMPLETIONS_PATH), mutated(completion_bodies)),
        )
    )
    @_target_examples()
    def run(target: tuple[str, bytes]) -> None:
        path, raw = target
        _fuzz(stack, miner_conn, path, raw, direct=True)

    run()


def test_network_healthy_after_fuzzing(stack: Stack) -> None:
    """Last in the module: what the fuzzing left behind."""
    print("statuses:", dict(sorted(stack.counts.by_status.items())))
    assert_healthy(stack)
    assert stack.counts.gateway_ok > 0 and stack.counts.miner_ok > 0  # the fuzz reached both
