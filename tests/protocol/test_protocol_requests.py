"""The request rules both the gateway and the miner apply (protocol.openai_types.parse_request,
protocol.params, protocol.json_body): ranges, refused parameters, readable errors, and bodies
whose strings cannot be encoded. The HTTP tests of each side prove they apply them."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from infergrid.protocol import json_body
from infergrid.protocol.openai_types import (
    SEED_MAX,
    SEED_MIN,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)
from infergrid.protocol.params import IGNORED, REFUSED

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MESSAGES}
LEGACY = {"model": "m", "prompt": "hi"}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"

# A value each refused parameter might really be sent with, asking for something.
ASKING: dict[str, Any] = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": {"name": "f"},
    "response_format": {"type": "json_object"},
    "logit_bias": {"50256": -100},
    "presence_penalty": 0.5,
    "frequency_penalty": -1,
    "n": 2,
    "best_of": 3,
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "service_tier": "flex",
    "store": True,
    "metadata": {"k": "v"},
    "suffix": "tail",
    "echo": True,
    "min_p": 0.1,
    "typical_p": 0.5,
    "top_a": 0.2,
    "tfs_z": 0.9,
    "mirostat": 2,
    "repetition_penalty": 1.2,
    "repeat_penalty": 1.1,
    "length_penalty": 0.5,
    "use_beam_search": True,
    "min_tokens": 5,
    "ignore_eos": True,
    "stop_token_ids": [7],
    "bad_words": ["x"],
    "allowed_token_ids": [1, 2],
    "logits_processors": ["p"],
    "guided_json": {"type": "object"},
    "guided_regex": "a+",
    "guided_choice": ["a", "b"],
    "guided_grammar": "root ::= x",
    "structured_outputs": {"json": {}},
    "grammar": "root ::= x",
    "json_schema": {"type": "object"},
    "prompt_logprobs": 1,
    "include_stop_str_in_output": True,
    "skip_special_tokens": False,
    "chat_template": "{{ x }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "add_generation_prompt": False,
    "continue_final_message": True,
}

# What client libraries send by default, or to say "off": all accepted.
NEUTRAL: dict[str, Any] = {
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "response_format": {"type": "text"},
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "n": 1,
    "best_of": 1,
    "modalities": ["text"],
    "service_tier": "auto",
    "store": False,
    "metadata": {},
    "echo": False,
    "suffix": "",
    "skip_special_tokens": True,
    "user": "someone",
    "safety_identifier": "abc",
    "prompt_cache_key": "k",
    "some_extension_nobody_knows": {"deep": [1, 2]},
}


def refused(model: type[Any], body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(model, body)
    error = info.value
    assert error.status == 400 and error.type == "invalid_request_error"
    return error


def test_every_refused_parameter_has_an_asking_value() -> None:
    assert {r.name for r in REFUSED} == set(ASKING)


@pytest.mark.parametrize("name", sorted(ASKING))
@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_unsupported_parameters_are_refused_by_name(name: str, model: type[Any]) -> None:
    base = CHAT if model is ChatCompletionRequest else LEGACY
    error = refused(model, {**base, name: ASKING[name]})
    assert error.code == "unsupported_parameter"
    assert error.param == name
    assert f"'{name}'" in error.message and "not supported" in error.message


def test_neutral_values_are_accepted() -> None:
    parse_request(ChatCompletionRequest, {**CHAT, **NEUTRAL})
    parse_request(CompletionRequest, {**LEGACY, **NEUTRAL})
    # tool_choice "auto" asks for nothing without tools.
    parse_request(ChatCompletionRequest, {**CHAT, "tool_choice": "auto"})
    parse_request(ChatCompletionRequest, {**CHAT, "stream_options": {"include_obfuscation": True}})


# The bodies LangChain's ChatOpenAI sends (langchain-openai 0.3): bind_tools, and the three
# methods of with_structured_output. Each must be a 400, not a 200 without tool calls.
_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather.", "parameters": _SCHEMA},
}
LANGCHAIN: list[tuple[str, dict[str, Any], str]] = [
    ("bind_tools", {"tools": [_TOOL]}, "tools"),
    ("bind_tools any", {"tools": [_TOOL], "tool_choice": "required"}, "tools"),
    (
        "structured function_calling",
        {
            "tools": [_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        },
        "tools",
    ),
    (
        "structured json_schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "Weather", "strict": True, "schema": _SCHEMA},
            }
        },
        "response_format",
    ),
    ("structured json_mode", {"response_format": {"type": "json_object"}}, "response_format"),
    ("tool_choice alone", {"tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("case", LANGCHAIN, ids=[c[0] for c in LANGCHAIN])
def test_langchain_tools_and_structured_output_are_refused(
    case: tuple[str, dict[str, Any], str],
) -> None:
    _, extra, param = case
    body = {**CHAT, "n": 1, "stream": False, "temperature": 0.7, **extra}
    error = refused(ChatCompletionRequest, body)
    assert (error.code, error.param) == ("unsupported_parameter", param)


@pytest.mark.parametrize(
    ("part", "says"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}, "images"),
        ({"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "f"}}, "files"),
        ({"type": "refusal", "refusal": "no"}, "'refusal'"),
    ],
)
def test_non_text_content_parts_are_refused_by_position(part: dict[str, Any], says: str) -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, part]},
    ]
    error = refused(ChatCompletionRequest, {**CHAT, "messages": messages})
    assert error.code == "unsupported_parameter"
    assert error.param == "messages[1].content[1]"
    assert says in error.message


def test_tool_call_history_is_refused() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    error = refused(ChatCompletionRequest, {**CHAT, "messages": messages})
    assert (error.code, error.param) == ("unsupported_parameter", "messages[1].tool_calls")
    messages[1] = {"role": "assistant", "content": "x", "tool_calls": []}
    parse_request(ChatCompletionRequest, {**CHAT, "messages": messages})


def test_prompt_as_token_ids_is_refused() -> None:
    error = refused(CompletionRequest, {**LEGACY, "prompt": [1, 2, 3]})
    assert (error.code, error.param) == ("unsupported_parameter", "prompt")


# -- ranges -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [SEED_MAX + 1, 2**64, 10**40, SEED_MIN - 1, -(10**30)])
def test_seed_outside_signed_64_bits_is_refused(seed: int) -> None:
    for model, base in ((ChatCompletionRequest, CHAT), (CompletionRequest, LEGACY)):
        error = refused(model, {**base, "seed": seed})
        assert (error.code, error.param) == ("invalid_value", "seed")
        assert str(SEED_MIN) in error.message and str(SEED_MAX) in error.message


def test_seed_range_ends_are_accepted() -> None:
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        assert parse_request(ChatCompletionRequest, {**CHAT, "seed": seed}).seed == seed


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"max_tokens": 10**20}, "max_tokens", "131072"),
        ({"max_tokens": 0}, "max_tokens", "from 1"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "131072"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"top_k": 2**40}, "top_k", "-1"),
        ({"top_k": -2}, "top_k", "-1"),
        ({"temperature": 1e300}, "temperature", "0 to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
    ],
)
def test_integer_and_number_ranges(extra: dict[str, Any], param: str, says: str) -> None:
    error = refused(ChatCompletionRequest, {**CHAT, **extra})
    assert error.param == param and says in error.message


def test_legacy_logprobs_range() -> None:
    error = refused(CompletionRequest, {**LEGACY, "logprobs": 6})
    assert error.param == "logprobs" and "0 to 5" in error.message
    assert parse_request(CompletionRequest, {**LEGACY, "logprobs": 5}).logprobs == 5


# -- errors name the parameter as written, and say the limit ---------------------------------

_INTERNALS = re.compile(r"constrained-str|list\[|\.str\b|function-|\.\d|TextPart")


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
        ({"stop": 5}, "stop", "at most 4 stop sequences"),
        ({"stop": ["ok", ""]}, "stop[1]", "1 to 256 characters"),
        ({"stop": "x" * 300}, "stop", "1 to 256 characters"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0]", "text"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "'wizard'"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing"),
        ({"messages": ["hi"]}, "messages[0]", "a message"),
        ({"messages": []}, "messages", "1 to 1024"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "bool"),
        ({"model": ""}, "model", "1 to 256"),
    ],
)
def test_errors_name_the_parameter_as_written(extra: dict[str, Any], param: str, says: str) -> None:
    error = refused(ChatCompletionRequest, {**CHAT, **extra})
    assert error.param is not None and error.param.startswith(param), error.param
    assert says in error.message, error.message
    assert not _INTERNALS.search(error.message), error.message
    assert not _INTERNALS.search(error.param), error.param


def test_missing_parameter_is_named() -> None:
    error = refused(ChatCompletionRequest, {"messages": MESSAGES})
    assert error.code == "missing_required_parameter" and error.param == "model"
    error = refused(CompletionRequest, {"model": "m"})
    assert error.param == "prompt"


# -- the decoder -----------------------------------------------------------------------------


def decode_error(raw: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        json_body.decode_request_json(raw)
    assert info.value.status == 400
    return info.value


SURROGATE_BODIES: list[tuple[str, bytes, str | None]] = [
    (
        "content",
        rb'{"model":"m","messages":[{"role":"user","content":"a\ud800b"}]}',
        "messages[0].content",
    ),
    (
        "name",
        rb'{"model":"m","messages":[{"role":"user","content":"x","name":"\udc00"}]}',
        "messages[0].name",
    ),
    ("user", rb'{"model":"m","messages":[],"user":"\uDBFF"}', "user"),
    (
        "content part",
        rb'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"\ud83d"}]}]}',
        "messages[0].content[0].text",
    ),
    ("unknown field", rb'{"model":"m","extra":{"deep":["ok","\ude00"]}}', "extra.deep[1]"),
    ("key", rb'{"model":"m","\ud800":1}', None),
    ("nested key", rb'{"model":"m","metadata":{"\ud800":1}}', "metadata"),
    ("reversed pair", rb'{"model":"\ude00\ud83d"}', "model"),
]


@pytest.mark.parametrize("case", SURROGATE_BODIES, ids=[c[0] for c in SURROGATE_BODIES])
def test_unencodable_strings_anywhere_are_400(case: tuple[str, bytes, str | None]) -> None:
    _, raw, param = case
    error = decode_error(raw)
    assert error.code == "invalid_unicode" and error.param == param
    assert "UTF-8" in error.message


def test_encodable_escapes_pass() -> None:
    # A surrogate pair is one character; an escaped backslash before "ud800" is text.
    body = json_body.decode_request_json(rb'{"a":"\ud83d\ude00","b":"\\ud800"}')
    assert body == {"a": "\U0001f600", "b": "\\ud800"}
    json.dumps(body, ensure_ascii=False).encode()


def test_raw_surrogate_bytes_and_other_encodings_are_400() -> None:
    assert decode_error(b'{"a":"\xed\xa0\x80"}').code == "invalid_json"  # CESU-style bytes
    assert decode_error('{"a":1}'.encode("utf-16")).code == "invalid_json"
    assert json_body.decode_request_json(b'\xef\xbb\xbf{"a":1}') == {"a": 1}  # a BOM is fine


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": Infinity}', "Infinity"),
        (b'{"temperature": -Infinity}', "Infinity"),
        (b'{"temperature": 1e999}', "out of range"),
        (b'{"x": -1E400}', "out of range"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "digits"),
    ],
)
def test_non_finite_and_huge_numbers_are_400(raw: bytes, says: str) -> None:
    error = decode_error(raw)
    assert error.code == "invalid_json" and says in error.message
    assert "set_int_max_str_digits" not in error.message


def test_long_but_convertible_integers_reach_validation() -> None:
    body = json_body.decode_request_json(b'{"seed": ' + b"9" * 4000 + b"}")
    error = refused(ChatCompletionRequest, {**CHAT, **body})
    assert error.param == "seed"


async def _trickle(parts: list[bytes], then_stall: bool) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then_stall:
        await asyncio.sleep(3600)


async def test_read_body_times_out_a_stalled_body() -> None:
    with pytest.raises(APIError) as info:
        await json_body.read_body(_trickle([b'{"mo'], True), max_bytes=100, timeout_s=0.2)
    assert info.value.status == 408 and info.value.code == "request_timeout"
    assert info.value.headers == {"connection": "close"}


async def test_read_body_stops_at_the_limit() -> None:
    with pytest.raises(APIError) as info:
        await json_body.read_body(_trickle([b"x" * 60] * 3, True), max_bytes=100, timeout_s=5)
    assert info.value.status == 413 and info.value.headers == {"connection": "close"}
    got = await json_body.read_body(_trickle([b"ab", b"", b"c"], False), max_bytes=3, timeout_s=5)
    assert got == b"abc"


# -- the docs say what the code does ---------------------------------------------------------


def test_docs_list_every_refused_and_ignored_parameter() -> None:
    docs = DOCS.read_text()
    for name in [r.name for r in REFUSED] + list(IGNORED):
        assert f"`{name}`" in docs, f"docs/api.md does not mention `{name}`"
