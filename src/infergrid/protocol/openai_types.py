"""OpenAI-compatible request bodies, validated strictly, and OpenAI's error shape.

Both the gateway and the miner validate with `parse_request`, so a bad request gets the same
400 wherever it lands: first the parameters the network refuses by name (protocol.params),
then strict types and ranges. Unknown fields are ignored (clients send extras), but known
fields have strict types: "5" is not a valid max_tokens. Every number has a range the whole
system can hold (a seed is stored in SQLite and signed over; it is a signed 64-bit integer).
A validation error names the parameter as the client wrote it (`messages[0].content`) and says
what is expected, limits included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infergrid.protocol.params import unsupported

# No served model has a longer context; anything above is a client bug, not a request.
MAX_TOKENS_LIMIT = 131_072
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 1024
MAX_TOP_LOGPROBS = 20  # chat: alternatives per token
MAX_LEGACY_LOGPROBS = 5  # legacy completions, as OpenAI allows
# The seed: a signed 64-bit integer, as OpenAI documents it and as SQLite stores integers. The
# protocol sampler reduces it modulo 2**64 (protocol.sampling), so every seed in the range is a
# distinct stream. Seeds the network picks itself (the gateway's, a miner's) are non-negative
# GENERATED_SEED_BITS-bit integers, inside the range.
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
GENERATED_SEED_BITS = 63
# vLLM's top_k extension; any k at or above the vocabulary size keeps every token.
TOP_K_MAX = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


StopField = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class _SamplingRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField | Annotated[list[StopField], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    # vLLM-style extension: absent, 0 or -1 disable it.
    top_k: Annotated[int, Field(ge=-1, le=TOP_K_MAX)] | None = None
    user: str | None = None

    KIND: ClassVar[str] = "request"

    def check_combination(self) -> None:
        """Rules across fields, checked after the types (raises APIError)."""

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    KIND: ClassVar[str] = "chat"
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def check_combination(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(
                400,
                "Invalid value for 'top_logprobs': it requires 'logprobs' to be true.",
                param="top_logprobs",
                code="invalid_value",
            )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


class CompletionRequest(_SamplingRequest):
    KIND: ClassVar[str] = "completion"
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    )
    # In the legacy API, logprobs is an integer: how many alternatives per token.
    logprobs: Annotated[int, Field(ge=0, le=MAX_LEGACY_LOGPROBS)] | None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


RequestT = TypeVar("RequestT", bound=_SamplingRequest)


class APIError(Exception):
    """An error that becomes an OpenAI-shaped JSON body with the given HTTP status.

    `headers` go out with the response (`connection: close` when the rest of the request
    cannot be read, say)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_STOP = (
    f"a string or a list of at most {MAX_STOP_SEQUENCES} stop sequences, each of 1 to"
    f" {MAX_STOP_LENGTH} characters"
)
_TOKENS = f"an integer from 1 to {MAX_TOKENS_LIMIT}"
# What each parameter must be, limits included, keyed by its path with list indices as [].
_EXPECTED: dict[str, str] = {
    "model": "a model name of 1 to 256 characters",
    "messages": f"a list of 1 to {MAX_MESSAGES} messages",
    "messages[]": "a message: an object with a 'role' and a 'content'",
    "messages[].role": "one of 'system', 'developer', 'user', 'assistant', 'tool'",
    "messages[].content": "a string, a list of text parts, or null",
    "messages[].content[]": 'a text part: {"type": "text", "text": "..."}',
    "messages[].content[].type": "'text'",
    "messages[].content[].text": "a string",
    "messages[].name": "a string",
    "prompt": "a non-empty string, or a list of exactly one such string",
    "prompt[]": "a string",
    "max_tokens": _TOKENS,
    "max_completion_tokens": _TOKENS,
    "temperature": "a number from 0 to 2",
    "top_p": "a number greater than 0 and at most 1",
    "top_k": f"an integer from -1 to {TOP_K_MAX} (0 or -1 disable it)",
    "n": "1",
    "stream": "a boolean",
    "stream_options": 'an object such as {"include_usage": true}',
    "stream_options.include_usage": "a boolean",
    "stop": _STOP,
    "stop[]": f"a stop sequence of 1 to {MAX_STOP_LENGTH} characters",
    "seed": f"a signed 64-bit integer, from {SEED_MIN} to {SEED_MAX}",
    "user": "a string",
    "chat:logprobs": "a boolean",
    "completion:logprobs": f"an integer from 0 to {MAX_LEGACY_LOGPROBS}",
    "top_logprobs": f"an integer from 0 to {MAX_TOP_LOGPROBS}",
}
_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _client_path(loc: tuple[int | str, ...], body: Any, missing: bool) -> tuple[str, str]:
    """The parameter at pydantic's `loc`, as the client wrote it (`messages[0].content`), and
    its generic form (`messages[].content`).

    pydantic's location also names union members (`str`, `list[TextPart]`,
    `constrained-str`); those do not navigate the body, so they are left out.
    """
    path, generic = "", ""
    node = body
    for n, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            path, generic, node = f"{path}[{part}]", f"{generic}[]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            sep = "." if path else ""
            path, generic, node = f"{path}{sep}{part}", f"{generic}{sep}{part}", node[part]
        elif missing and n == len(loc) - 1 and isinstance(part, str):
            sep = "." if path else ""
            path, generic = f"{path}{sep}{part}", f"{generic}{sep}{part}"
    return path, generic


def _is_type_error(error: Mapping[str, Any]) -> bool:
    kind = str(error["type"])
    return kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid")


def validation_error(exc: ValidationError, body: Any = None, kind: str = "request") -> APIError:
    """One readable 400 for a failed validation: the parameter as the client wrote it, what it
    must be (limits included) and what was wrong.

    pydantic reports one error per union member; the one that got deepest into the body, and
    among those one about the value rather than its type, says best what went wrong.
    """
    errors = exc.errors()
    located = [(e, *_client_path(e["loc"], body, e["type"] == "missing")) for e in errors]
    top = located[0][1].partition(".")[0].partition("[")[0]
    candidates = [item for item in located if item[1].startswith(top)] or located
    error, param, generic = max(
        candidates,
        key=lambda item: (item[1].count(".") + item[1].count("["), not _is_type_error(item[0])),
    )
    if error["type"] == "missing":
        return APIError(
            400,
            f"Missing required parameter: '{param}'.",
            param=param or None,
            code="missing_required_parameter",
        )
    expected = _EXPECTED.get(f"{kind}:{generic}") or _EXPECTED.get(generic)
    value = error.get("input")
    if error["type"] == "literal_error" and isinstance(value, str):
        detail = f"got {value[:64]!r}"
    elif _is_type_error(error):
        detail = f"got {_TYPE_NAMES.get(type(value), 'another type')}"
    else:
        detail = str(error["msg"])
        detail = detail[:1].lower() + detail[1:]
    if not param:
        return APIError(400, f"Invalid request: {detail}.", code="invalid_value")
    if expected:
        message = f"Invalid value for '{param}': expected {expected} ({detail})."
    else:
        message = f"Invalid value for '{param}': {detail}."
    return APIError(400, message, param=param, code="invalid_value")


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body, raising APIError(400) on any problem: a parameter the
    network refuses (protocol.params), then types and ranges, then rules across fields."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    refusal = unsupported(body)
    if refusal is not None:
        raise APIError(400, refusal.message, param=refusal.param, code="unsupported_parameter")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, body, model.KIND) from None
    request.check_combination()
    return request
