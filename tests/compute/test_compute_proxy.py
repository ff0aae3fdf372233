"""The proxy engine and the protocol sampler as vLLM/SGLang plugins.

The plugins are driven as their engines drive them (vLLM's persistent-batch updates through
FakeBatchUpdate, SGLang's per-row parameter dicts) on real logits of the tiny model, and must
give exactly protocol.sampling.sample_rows' tokens. The proxy engine runs end to end against
FakeVLLMServer (the tiny model behind the real plugin class, answering like vLLM) and must
answer token for token as the built-in engine does, passing the verifier's audit; against a
real OpenAI-compatible server (our own miner) it serves greedy requests and refuses sampled
ones by name.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from compute_helpers import MINER_ADDRESS, post
from proxy_fakes import (
    FakeBatchUpdate,
    FakeLlamaServer,
    FakeOllamaServer,
    FakeSamplingParams,
    FakeSGLangServer,
    FakeVLLMServer,
)

from infergrid.compute import model_store
from infergrid.compute.attacks import serve_job
from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import SamplingParams
from infergrid.compute.engine_factory import load_engine
from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.plugins import (
    ARG_SAMPLER,
    ARG_SEED,
    parse_args,
    protocol_logits,
    sampling_args,
    sglang_sampler,
    vllm_sampler,
)
from infergrid.compute.proxy_engine import (
    ProxyEngine,
    UnsupportedSampling,
    UpstreamError,
)
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.models import DEFAULT_MODEL
from infergrid.protocol.models import model_id as protocol_model_id
from infergrid.protocol.sampling import RowSampling, sample_rows
from infergrid.verify.recompute import audit_job

ATTESTOR = Attestor(Domain(1337, "0x" + "e5" * 20), Signer("0x" + "11" * 32), MINER_ADDRESS)
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 11}


@pytest.fixture(scope="module")
def batch_logits(tiny_engine: TransformersEngine) -> torch.Tensor:
    """Real last-position logits of the tiny model for four prompts: [4, vocab] float32."""
    rows = []
    for text in ("Once upon a time", "The sea is", "日本語で", "1, 2, 3,"):
        ids = tiny_engine.encode(text)
        rows.append(tiny_engine.teacher_forced_logits(ids[:-1], ids[-1:])[0])
    return torch.stack(rows).float()


def _args(seed: int, temperature: float | None, top_p: float | None = None, top_k=None):
    return FakeSamplingParams(extra_args=sampling_args(seed, temperature, top_p, top_k))


def _protocol(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    return sample_rows(logits, rows)


# -- the plugins' logic -------------------------------------------------------------------


def test_protocol_logits_rewrites_each_row_to_its_protocol_token(
    batch_logits: torch.Tensor,
) -> None:
    rows = [
        RowSampling(1, 0, 0.0),
        RowSampling(2, 5, 0.7, 0.9, None),
        None,
        RowSampling(3, 9, 1.3, None, 5),
    ]
    out = protocol_logits(batch_logits.clone(), rows)
    ours = [0, 1, 3]
    expected = _protocol(batch_logits[ours], [rows[b] for b in ours])
    assert torch.argmax(out[ours], dim=-1).tolist() == expected
    for b, token in zip(ours, expected, strict=True):
        assert out[b, token] == 0.0
        assert torch.isinf(out[b]).sum() == out.shape[1] - 1
    assert torch.equal(out[2], batch_logits[2])  # not an InferGrid row: untouched


def test_vllm_plugin_follows_added_removed_and_moved_rows(batch_logits: torch.Tensor) -> None:
    plugin = vllm_sampler.InferGridSampler(None, torch.device("cpu"), False)
    assert plugin.is_argmax_invariant() is False
    outputs = [[], [5, 6, 7], [9] * 7, [1]]
    plugin.update_state(
        FakeBatchUpdate(
            4,
            added=[
                (0, _args(1, 0.0), [3], outputs[0]),
                (1, _args(2, 0.7, 0.9), [3], outputs[1]),
                (2, _args(3, 1.3, None, 5), [3], outputs[2]),
                (3, FakeSamplingParams(extra_args=None), [3], outputs[3]),  # not ours
            ],
        )
    )
    out = plugin.apply(batch_logits.clone())
    expected = _protocol(
        batch_logits[:3],
        [RowSampling(1, 0, 0.0), RowSampling(2, 3, 0.7, 0.9), RowSampling(3, 7, 1.3, None, 5)],
    )
    assert torch.argmax(out[:3], dim=-1).tolist() == expected
    assert torch.equal(out[3], batch_logits[3])

    # vLLM appends each sampled token to the live output lists: the steps advance.
    for lst in outputs:
        lst.append(4)
    plugin.update_state(None)
    out = plugin.apply(batch_logits.clone())
    expected = _protocol(
        batch_logits[:3],
        [RowSampling(1, 1, 0.0), RowSampling(2, 4, 0.7, 0.9), RowSampling(3, 8, 1.3, None, 5)],
    )
    assert torch.argmax(out[:3], dim=-1).tolist() == expected

    # Row 1 leaves and vLLM condenses the batch (row 2 moves into slot 1); then a new
    # request of ours joins in slot 2 and rows 0 and 1 swap.
    plugin.update_state(
        FakeBatchUpdate(
            3, removed=[1], moved=[(2, 1, vllm_sampler.MoveDirectionality.UNIDIRECTIONAL)]
        )
    )
    plugin.update_state(
        FakeBatchUpdate(
            3,
            added=[(2, _args(9, 1.0), [3], [])],
            moved=[(0, 1, vllm_sampler.MoveDirectionality.SWAP)],
        )
    )
    logits = batch_logits[[1, 2, 3]].clone()
    out = plugin.apply(logits.clone())
    # Slot 0 holds the old row 2 (step 8), slot 1 the old row 0 (step 1), slot 2 the new one.
    expected = _protocol(
        logits, [RowSampling(3, 8, 1.3, None, 5), RowSampling(1, 1, 0.0), RowSampling(9, 0, 1.0)]
    )
    assert torch.argmax(out, dim=-1).tolist() == expected
    # A request without our arguments taking a slot leaves that row alone.
    plugin.update_state(FakeBatchUpdate(3, added=[(2, FakeSamplingParams(extra_args={}), [3], [])]))
    out = plugin.apply(logits.clone())
    assert torch.equal(out[2], logits[2])


def test_vllm_plugin_refuses_malformed_or_foreign_arguments() -> None:
    good = sampling_args(7, 0.5, None, None)
    vllm_sampler.InferGridSampler.validate_params(FakeSamplingParams(extra_args=good))
    vllm_sampler.InferGridSampler.validate_params(FakeSamplingParams(extra_args=None))
    with pytest.raises(ValueError, match="gumbel"):
        vllm_sampler.InferGridSampler.validate_params(
            FakeSamplingParams(extra_args={**good, ARG_SAMPLER: "mt19937-v0"})
        )
    with pytest.raises(ValueError, match="decimal string"):
        parse_args({**good, ARG_SEED: "0x12"})
    with pytest.raises(ValueError, match="top_p"):
        parse_args(sampling_args(7, 0.5, 1.5, None))


def test_sampling_args_carry_any_protocol_seed_exactly() -> None:
    for seed in (0, 2**63 - 1, -1, -(2**63)):
        args = parse_args(sampling_args(seed, 1.0, None, None))
        assert args is not None
        assert args.at(3) == RowSampling(seed % 2**64, 3, 1.0, None, None)
        assert sample_rows(torch.ones(1, 8), [args.at(3)]) == sample_rows(
            torch.ones(1, 8), [RowSampling(seed, 3, 1.0)]
        )


@dataclass
class FakeSGLangReq:
    """The part of sglang's Req a custom logit processor reads."""

    output_ids: list[int] = field(default_factory=list)


def test_sglang_plugin_gives_each_row_its_protocol_token(batch_logits: torch.Tensor) -> None:
    params: list[dict[str, Any] | None] = [
        {**sampling_args(1, 0.8, None, 10), "__req__": FakeSGLangReq([1, 2])},
        None,
        {**sampling_args(5, None, 0.5, None), "__req__": FakeSGLangReq([])},
        {"__req__": FakeSGLangReq([1])},  # another processor's parameters: not ours
    ]
    out = sglang_sampler.InferGridSampler()(batch_logits.clone(), params)
    expected = _protocol(
        batch_logits[[0, 2]], [RowSampling(1, 2, 0.8, None, 10), RowSampling(5, 0, None, 0.5)]
    )
    assert torch.argmax(out[[0, 2]], dim=-1).tolist() == expected
    assert torch.equal(out[1], batch_logits[1])
    assert torch.equal(out[3], batch_logits[3])
    # The request names the processor by module and class, as SGLang's loader resolves it.
    spec = json.loads(sglang_sampler.processor_spec())
    assert pickle.loads(bytes.fromhex(spec["callable"])) is sglang_sampler.InferGridSampler


# -- the proxy against a vLLM-like upstream ---------------------------------------------------


@pytest.fixture(scope="module")
def fake_vllm(tiny_engine: TransformersEngine) -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer(tiny_engine) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_proxy(fake_vllm: FakeVLLMServer, tiny_dir: Path) -> ProxyEngine:
    return ProxyEngine.connect(fake_vllm.url, model=str(tiny_dir), flavor="vllm", timeout=60)


def _body(model: str, content: str, **params: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], **params}
    ).encode()


def _serve(engine: Any, body: bytes, request_id: str = "req-1") -> AuditJob:
    return serve_job(engine, body, chat=True, request_id=request_id, attestor=ATTESTOR)


def test_proxy_has_the_built_in_engines_identity(
    vllm_proxy: ProxyEngine, tiny_engine: TransformersEngine, fake_vllm: FakeVLLMServer
) -> None:
    assert vllm_proxy.model_id == tiny_engine.model_id
    assert vllm_proxy.name == tiny_engine.name
    assert vllm_proxy.eos_token_ids == tiny_engine.eos_token_ids
    assert vllm_proxy.context_length == tiny_engine.context_length
    assert vllm_proxy.upstream_model == fake_vllm.served_model
    chat = [{"role": "user", "content": "héllo ✓"}]
    assert vllm_proxy.chat_prompt_ids(chat) == tiny_engine.chat_prompt_ids(chat)


@pytest.mark.parametrize(
    ("content", "params"),
    [
        ("Tell me a story about a dragon.", {"max_tokens": 24, "temperature": 0}),
        ("Tell me a story about a dragon.", {"max_tokens": 24, **SAMPLED}),
        ("日本語 ✓ é", {"max_tokens": 20, "temperature": 1.2, "seed": 3}),
        ("Stop me", {"max_tokens": 30, "temperature": 0.7, "seed": 5, "stop": ["e", "a"]}),
        ("Logprobs", {"max_tokens": 8, "logprobs": True, "top_logprobs": 3, "seed": 1}),
    ],
)
def test_proxy_over_vllm_answers_as_the_built_in_engine_and_passes_the_audit(
    vllm_proxy: ProxyEngine,
    tiny_engine: TransformersEngine,
    fake_vllm: FakeVLLMServer,
    content: str,
    params: dict[str, Any],
) -> None:
    body = _body(tiny_engine.name, content, **params)
    proxied = _serve(vllm_proxy, body)
    built_in = _serve(tiny_engine, body)
    assert proxied.output_token_ids == built_in.output_token_ids
    assert proxied.prompt_token_ids == built_in.prompt_token_ids
    assert proxied.text == built_in.text
    assert proxied.finish_reason == built_in.finish_reason
    assert proxied.output_logprobs == pytest.approx(built_in.output_logprobs, abs=1e-4)
    report = audit_job(tiny_engine, proxied)
    assert report.passed, report.reason
    # What went upstream: the prompt as ids, greedy, the protocol's sampling for the plugin.
    sent = fake_vllm.stats.requests_seen[-1]
    assert sent["prompt"] == list(built_in.prompt_token_ids)
    assert sent["temperature"] == 0.0
    if "seed" in params:
        assert sent["vllm_xargs"][ARG_SEED] == str(params["seed"])


def test_proxy_top_logprobs_are_the_upstreams_most_likely_first(
    vllm_proxy: ProxyEngine, tiny_engine: TransformersEngine
) -> None:
    prompt = tiny_engine.encode("The sea")
    params = SamplingParams(max_tokens=4, temperature=0.0, top_logprobs=3)
    proxied = list(vllm_proxy.generate(prompt, params))
    built_in = list(tiny_engine.generate(prompt, params))
    for mine, theirs in zip(proxied, built_in, strict=True):
        assert [t for t, _ in mine.top_logprobs] == [t for t, _ in theirs.top_logprobs]
        assert [lp for _, lp in mine.top_logprobs] == pytest.approx(
            [lp for _, lp in theirs.top_logprobs], abs=1e-4
        )


def test_proxy_over_sglang_answers_as_the_built_in_engine_with_raw_logprobs(
    tiny_engine: TransformersEngine, tiny_dir: Path
) -> None:
    with FakeSGLangServer(tiny_engine) as server:
        proxy = ProxyEngine.connect(server.url, model=str(tiny_dir), flavor="sglang", timeout=60)
        for params in ({"max_tokens": 20, **SAMPLED}, {"max_tokens": 6, "temperature": 0}):
            body = _body(
                tiny_engine.name, "Tell me a story.", logprobs=True, top_logprobs=2, **params
            )
            proxied, built_in = _serve(proxy, body), _serve(tiny_engine, body)
            assert proxied.output_token_ids == built_in.output_token_ids
            assert proxied.text == built_in.text
            assert proxied.output_logprobs == pytest.approx(built_in.output_logprobs, abs=1e-4)
            assert audit_job(tiny_engine, proxied).passed
        generated, scored = server.requests_seen[-2:]
        assert generated["input_ids"] == list(built_in.prompt_token_ids)
        assert generated["sampling_params"]["temperature"] == 0.0
        assert scored["input_ids"] == list(built_in.prompt_token_ids + built_in.output_token_ids)


@pytest.mark.parametrize("flavor", ["llamacpp", "ollama"])
def test_greedy_proxy_over_llama_server_and_ollama_answers_as_the_built_in_engine(
    tiny_engine: TransformersEngine, tiny_dir: Path, flavor: str
) -> None:
    fake = FakeLlamaServer(tiny_engine) if flavor == "llamacpp" else FakeOllamaServer(tiny_engine)
    with fake as server:
        proxy = ProxyEngine.connect(server.url, model=str(tiny_dir), flavor=flavor, timeout=60)
        body = _body(
            tiny_engine.name, "Sea?", max_tokens=40, temperature=0, logprobs=True, top_logprobs=2
        )
        proxied, built_in = _serve(proxy, body), _serve(tiny_engine, body)
        sent = server.requests_seen[-1]
    assert proxied.output_token_ids == built_in.output_token_ids
    assert proxied.text == built_in.text
    assert proxied.output_logprobs == pytest.approx(built_in.output_logprobs, abs=1e-4)
    assert audit_job(tiny_engine, proxied).passed
    if flavor == "llamacpp":  # ids in; Ollama takes the templated prompt as raw text
        assert sent["prompt"] == list(built_in.prompt_token_ids)
    else:
        assert sent["raw"] is True
        assert tiny_engine.encode(sent["prompt"]) == list(built_in.prompt_token_ids)
        assert sent["options"]["repeat_penalty"] == 1.0


@pytest.mark.slow  # SmolLM2's tokenizer and GGUF header
def test_proxy_in_front_of_llama_cpp_has_the_llama_cpp_engines_model_id(
    tiny_engine: TransformersEngine, smollm2_tokenizer_dir: str
) -> None:
    """A GGUF served by llama.cpp is audited by llama.cpp verifiers: the id's precision is the
    file's quantization, as compute.llamacpp_engine names it."""
    gguf_path = model_store.smollm2_gguf_path()
    with FakeLlamaServer(tiny_engine) as server:  # only its /v1/models is asked here
        proxy = ProxyEngine.connect(server.url, model="smollm2", flavor="llamacpp")
        vllm = ProxyEngine.connect(server.url, model="smollm2", flavor="vllm")
    digest = model_store.cached_sha256(gguf_path)
    assert proxy.precision == "gguf-q4_1"
    assert proxy.model_id == protocol_model_id(DEFAULT_MODEL, digest, "main", "gguf-q4_1")
    assert vllm.model_id == protocol_model_id(DEFAULT_MODEL, digest, "main", "float32")
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        from infergrid.compute.llamacpp_engine import gguf_precision

        assert proxy.precision == gguf_precision(int(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1))


# -- greedy-only upstreams and failures -----------------------------------------------------


@pytest.fixture(scope="module")
def openai_proxy(miner: MinerServerThread, tiny_dir: Path) -> ProxyEngine:
    """The proxy in front of a real OpenAI-compatible server: our own miner app."""
    return ProxyEngine.connect(miner.url, model=str(tiny_dir), flavor="openai", timeout=60)


def test_greedy_proxy_serves_greedy_requests_as_the_built_in_engine(
    openai_proxy: ProxyEngine, tiny_engine: TransformersEngine
) -> None:
    body = _body(tiny_engine.name, "Tell me about the sea.", max_tokens=16, temperature=0)
    proxied = _serve(openai_proxy, body, "greedy-1")
    built_in = _serve(tiny_engine, body, "greedy-1")
    assert proxied.output_token_ids == built_in.output_token_ids
    assert proxied.text == built_in.text
    assert proxied.output_logprobs == pytest.approx(built_in.output_logprobs, abs=1e-6)
    assert audit_job(tiny_engine, proxied).passed


def test_greedy_proxy_refuses_a_sampled_request_by_name(
    openai_proxy: ProxyEngine, tiny_engine: TransformersEngine
) -> None:
    prompt = tiny_engine.encode("hi")
    for temperature in (0.7, None):  # None is OpenAI's default, 1.0
        with pytest.raises(UnsupportedSampling, match="only greedy") as refused:
            openai_proxy.generate(prompt, SamplingParams(max_tokens=4, temperature=temperature))
        assert refused.value.param == "temperature"


def test_a_miner_over_a_greedy_proxy_answers_400_naming_temperature(
    openai_proxy: ProxyEngine, tiny_engine: TransformersEngine
) -> None:
    """A sampled request to a greedy-only upstream is refused before anything is sent or
    signed, in OpenAI's error shape, and a greedy one is served."""
    app = create_miner_app(openai_proxy, node_address=MINER_ADDRESS, attestor=ATTESTOR)
    with MinerServerThread(app) as miner:
        body = _body(tiny_engine.name, "hi", max_tokens=4, temperature=0.7)
        status, _, answer = post(miner.host, miner.port, "/v1/chat/completions", body)
        greedy = _body(tiny_engine.name, "hi", max_tokens=4, temperature=0)
        ok, _, _ = post(miner.host, miner.port, "/v1/chat/completions", greedy)
    assert status == 400
    error = json.loads(answer)["error"]
    assert error["param"] == "temperature"
    assert error["code"] == "unsupported_parameter"
    assert "only greedy" in error["message"]
    assert ok == 200


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_proxy_says_so_when_the_upstream_is_down(
    tiny_engine: TransformersEngine, tiny_dir: Path
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(UpstreamError, match="unreachable"):
        ProxyEngine.connect(url, model=str(tiny_dir), flavor="vllm")
    # Down after connecting: the generation fails before it yields anything.
    with FakeVLLMServer(tiny_engine) as server:
        proxy = ProxyEngine.connect(server.url, model=str(tiny_dir), flavor="vllm", timeout=10)
    with pytest.raises(UpstreamError, match="unreachable"):
        next(iter(proxy.generate(tiny_engine.encode("hi"), SamplingParams(max_tokens=2))))


def test_proxy_reports_an_upstream_refusal(
    vllm_proxy: ProxyEngine, tiny_engine: TransformersEngine
) -> None:
    wrong = ProxyEngine(
        vllm_proxy.upstream,
        flavor="vllm",
        local=vllm_proxy._local,
        precision="float32",
        upstream_model="no-such-model",
    )
    with pytest.raises(UpstreamError, match=r"404.*no-such-model"):
        list(wrong.generate(tiny_engine.encode("hi"), SamplingParams(max_tokens=2)))


def test_a_broken_off_upstream_answer_is_never_attested(
    fake_vllm: FakeVLLMServer, vllm_proxy: ProxyEngine, tiny_engine: TransformersEngine
) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0)
    fake_vllm.cut_after = 3
    try:
        tokens = vllm_proxy.generate(tiny_engine.encode("Once"), params)
        with pytest.raises(UpstreamError, match="without its end"):
            list(tokens)
        # Through the miner: an error, and no signed answer.
        app = create_miner_app(vllm_proxy, node_address=MINER_ADDRESS, attestor=ATTESTOR)
        with MinerServerThread(app) as miner:
            body = _body(tiny_engine.name, "Once", max_tokens=8, temperature=0)
            status, _, answer = post(miner.host, miner.port, "/v1/chat/completions", body)
    finally:
        fake_vllm.cut_after = None
    assert status == 500
    assert b"without its end" in answer
    assert b"attestation" not in answer


def test_engine_factory_builds_the_proxy_for_the_openai_kind(
    fake_vllm: FakeVLLMServer, tiny_engine: TransformersEngine, tiny_dir: Path
) -> None:
    engine = load_engine("openai", str(tiny_dir), upstream=fake_vllm.url, upstream_flavor="vllm")
    assert isinstance(engine, ProxyEngine)
    assert engine.model_id == tiny_engine.model_id
    assert load_engine("openai", str(tiny_dir), upstream=fake_vllm.url).flavor == "vllm"
    with pytest.raises(ValueError, match="needs --upstream"):
        load_engine("openai", str(tiny_dir))
    with pytest.raises(ValueError, match=r"unknown --upstream-flavor 'tgi'.*ollama"):
        load_engine("openai", str(tiny_dir), upstream=fake_vllm.url, upstream_flavor="tgi")
    with pytest.raises(ValueError, match="--max-batch"):
        load_engine("openai", str(tiny_dir), upstream=fake_vllm.url, max_batch=4)
    named = load_engine(
        "openai", str(tiny_dir), upstream=fake_vllm.url, upstream_model=fake_vllm.served_model
    )
    assert isinstance(named, ProxyEngine) and named.upstream_model == fake_vllm.served_model
    with pytest.raises(ValueError, match="are for --engine openai, not transformers"):
        load_engine("transformers", str(tiny_dir), upstream_model="x")


def test_proxy_refuses_bad_configuration(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown upstream flavour"):
        ProxyEngine.connect("http://127.0.0.1:1", model=str(tiny_dir), flavor="tgi")
    with pytest.raises(ValueError, match="http"):
        ProxyEngine.connect("127.0.0.1:8000", model=str(tiny_dir), flavor="vllm")
