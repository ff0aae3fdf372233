"""Which request parameters the network refuses: the one rule the gateway and the miner apply.

A parameter the network cannot honour is refused by name (400 `unsupported_parameter`, `param`
the field's name) rather than accepted and ignored: a client that asked for tool calls, a JSON
schema or a logit bias and got plain text would not know its request was not served. Each
refused parameter has *neutral* values, the ones that ask for nothing (what client libraries
send by default: `tool_choice: "none"`, `response_format: {"type": "text"}`, `n: 1`,
`logit_bias: {}`, ...); those pass. The rule reads the decoded body as the client sent it,
before the typed validation of openai_types, so the refusal names the field whatever its type.

In chat requests, message fields that would be dropped from the prompt are refused the same
way: non-text content parts (images, audio, files), and an assistant's `tool_calls` or
`function_call`.

Accepted and ignored by design (docs/api.md lists them): `user`, `safety_identifier`,
`prompt_cache_key`, `prompt_cache_retention`, `stream_options.include_obfuscation`,
`messages[].name`, and fields this module and openai_types do not know (extensions for other
servers pass through to the miner, which ignores them too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Neutral = Callable[[Any], bool]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, list | dict) and not value)


def _false(value: Any) -> bool:
    return value is None or value is False


def _true(value: Any) -> bool:
    return value is None or value is True


def _number(neutral: float) -> Neutral:
    def check(value: Any) -> bool:
        return value is None or (_is_number(value) and value == neutral)

    return check


def _one_of(*neutral: str) -> Neutral:
    def check(value: Any) -> bool:
        return value is None or (isinstance(value, str) and value in neutral)

    return check


def _text_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


def _text_modality(value: Any) -> bool:
    return value is None or value == ["text"]


@dataclass(frozen=True)
class Refused:
    """A parameter the network does not serve: its name, the values that ask for nothing, and
    what to tell the client (`why`: what is not supported; `neutral_hint`: what may be sent)."""

    name: str
    neutral: Neutral
    why: str
    neutral_hint: str = ""


_NO_TOOLS = "InferGrid models do not call tools"
_NO_STRUCTURED = "InferGrid miners do not constrain output to a format or schema"
_SAMPLER = "the protocol sampler (temperature, top_p, top_k) is all a miner may apply"

# Everything in OpenAI's chat and legacy completion request bodies that the network cannot
# honour, then the sampling and decoding extensions of other servers (vLLM, llama.cpp, Ollama)
# that would change the output. Both endpoints apply the whole list: a chat-only field sent to
# /v1/completions is no more served there.
REFUSED: tuple[Refused, ...] = (
    Refused("tools", _empty, _NO_TOOLS, "an empty list"),
    Refused("tool_choice", _one_of("none", "auto"), _NO_TOOLS, '"none"'),
    Refused("parallel_tool_calls", _absent, _NO_TOOLS),
    Refused("functions", _empty, _NO_TOOLS, "an empty list"),
    Refused("function_call", _one_of("none", "auto"), _NO_TOOLS, '"none"'),
    Refused("response_format", _text_format, _NO_STRUCTURED, '{"type": "text"}'),
    Refused("logit_bias", _empty, _SAMPLER, "{}"),
    Refused("presence_penalty", _number(0), _SAMPLER, "0"),
    Refused("frequency_penalty", _number(0), _SAMPLER, "0"),
    Refused("n", _number(1), "each request has exactly one choice", "1"),
    Refused("best_of", _number(1), "each request has exactly one choice", "1"),
    Refused("modalities", _text_modality, "InferGrid models produce text only", '["text"]'),
    Refused("audio", _absent, "InferGrid models produce text only"),
    Refused("prediction", _absent, "predicted outputs are not supported"),
    Refused("reasoning_effort", _absent, "InferGrid models have no reasoning settings"),
    Refused("verbosity", _absent, "InferGrid models have no verbosity setting"),
    Refused("web_search_options", _absent, "InferGrid miners do not search the web"),
    Refused("service_tier", _one_of("auto", "default"), "the network has one tier", '"auto"'),
    Refused("store", _false, "completions are not stored for later retrieval", "false"),
    Refused("metadata", _empty, "completions are not stored, so they carry no metadata", "{}"),
    Refused("suffix", lambda v: v is None or v == "", "insertion (suffix) is not supported"),
    Refused("echo", _false, "echoing the prompt is not supported", "false"),
    # Extensions of other servers.
    Refused("min_p", _number(0), _SAMPLER, "0"),
    Refused("typical_p", _number(1), _SAMPLER, "1"),
    Refused("top_a", _number(0), _SAMPLER, "0"),
    Refused("tfs_z", _number(1), _SAMPLER, "1"),
    Refused("mirostat", _number(0), _SAMPLER, "0"),
    Refused("repetition_penalty", _number(1), _SAMPLER, "1"),
    Refused("repeat_penalty", _number(1), _SAMPLER, "1"),
    Refused("length_penalty", _number(1), _SAMPLER, "1"),
    Refused("use_beam_search", _false, _SAMPLER, "false"),
    Refused("min_tokens", _number(0), "generation stops where the sampler stops", "0"),
    Refused("ignore_eos", _false, "generation stops where the sampler stops", "false"),
    Refused("stop_token_ids", _empty, "stop sequences are text (`stop`)", "an empty list"),
    Refused("bad_words", _empty, _SAMPLER, "an empty list"),
    Refused("allowed_token_ids", _empty, _SAMPLER),
    Refused("logits_processors", _empty, _SAMPLER),
    Refused("guided_json", _absent, _NO_STRUCTURED),
    Refused("guided_regex", _absent, _NO_STRUCTURED),
    Refused("guided_choice", _absent, _NO_STRUCTURED),
    Refused("guided_grammar", _absent, _NO_STRUCTURED),
    Refused("structured_outputs", _absent, _NO_STRUCTURED),
    Refused("grammar", _absent, _NO_STRUCTURED),
    Refused("json_schema", _absent, _NO_STRUCTURED),
    Refused("prompt_logprobs", _absent, "logprobs cover the completion, not the prompt"),
    Refused("include_stop_str_in_output", _false, "stop sequences are never included", "false"),
    Refused("skip_special_tokens", _true, "special tokens are always skipped", "true"),
    Refused("chat_template", _absent, "each model's own chat template is used"),
    Refused("chat_template_kwargs", _empty, "each model's own chat template is used", "{}"),
    Refused("add_generation_prompt", _true, "each model's own chat template is used", "true"),
    Refused("continue_final_message", _false, "each model's own chat template is used", "false"),
)

# Accepted and ignored by design; docs/api.md says why.
IGNORED: tuple[str, ...] = (
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "stream_options.include_obfuscation",
    "messages[].name",
)

_PART_KINDS = {
    "image_url": "images are not supported",
    "input_image": "images are not supported",
    "image": "images are not supported",
    "input_audio": "audio input is not supported",
    "audio": "audio input is not supported",
    "file": "files are not supported",
    "input_file": "files are not supported",
}


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the parameter as the client wrote it, and the message."""

    param: str
    message: str


def _refusal(param: str, why: str, hint: str) -> Refusal:
    tail = f"omit it or send {hint}" if hint else "omit it"
    return Refusal(param, f"'{param}' is not supported: {why}; {tail}.")


def _message_refusal(index: int, message: Any) -> Refusal | None:
    if not isinstance(message, Mapping):
        return None  # a type error, which validation names
    for name in ("tool_calls", "function_call"):
        if not _empty(message.get(name)):
            return _refusal(f"messages[{index}].{name}", _NO_TOOLS, "")
    if message.get("audio") is not None:
        return _refusal(f"messages[{index}].audio", "audio is not supported", "")
    content = message.get("content")
    if not isinstance(content, list):
        return None
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if not isinstance(kind, str) or kind == "text":
            continue
        why = _PART_KINDS.get(kind, f"content parts of type '{kind[:64]}' are not supported")
        return Refusal(
            f"messages[{index}].content[{j}]",
            f"'messages[{index}].content[{j}]' is not supported: {why}; InferGrid models read"
            " text only (send parts of type 'text').",
        )
    return None


def unsupported(body: Mapping[str, Any]) -> Refusal | None:
    """The first parameter of a decoded request body the network cannot honour, or None.

    Top-level fields come first, in the order of REFUSED (so `tools` is named before the
    `tool_choice` that goes with it), then the messages of a chat request, in order.
    """
    for rule in REFUSED:
        if rule.name in body and not rule.neutral(body[rule.name]):
            return _refusal(rule.name, rule.why, rule.neutral_hint)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and any(
        isinstance(p, int | list) and not isinstance(p, bool) for p in prompt
    ):
        return Refusal(
            "prompt",
            "'prompt' as token ids is not supported: miners tokenize the prompt themselves;"
            " send it as text.",
        )
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            refusal = _message_refusal(i, message)
            if refusal is not None:
                return refusal
    return None
