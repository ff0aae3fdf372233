"""The transformers engine on a tiny random model: reproducible, seeded, verifiable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from compute_helpers import CHAT, TINY_SEED

from infergrid.compute.engine import Engine, GeneratedToken, SamplingParams
from infergrid.compute.model_store import build_tiny_model, read_metadata, sha256_file
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.models import model_id


def _generate(engine: TransformersEngine, **kwargs: object) -> list[GeneratedToken]:
    params = SamplingParams(**{"max_tokens": 40, "temperature": 1.0, "seed": 1, **kwargs})
    return list(engine.generate(engine.chat_prompt_ids(CHAT), params))


def _teacher_forced_logprobs(
    engine: TransformersEngine, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """What a verifier computes: one forward pass over prompt + output."""
    ids = torch.tensor([prompt + output], device=engine.device)
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0].double().cpu()
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)


def test_tiny_model_builds_byte_for_byte_reproducibly(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=TINY_SEED)
    other = build_tiny_model(tmp_path / "other", seed=TINY_SEED + 1)
    weights = "model.safetensors"
    assert sha256_file(again / weights) == sha256_file(tiny_dir / weights)
    assert sha256_file(other / weights) != sha256_file(tiny_dir / weights)
    for name in ("tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    meta = read_metadata(tiny_dir)
    assert meta is not None
    assert meta.weights_digest == hashlib.sha256((tiny_dir / weights).read_bytes()).hexdigest()
    assert meta.name == f"tiny-llama-s{TINY_SEED}"


def test_engine_identity(tiny_engine: TransformersEngine, tiny_dir: Path) -> None:
    assert isinstance(tiny_engine, Engine)
    meta = read_metadata(tiny_dir)
    assert meta is not None
    assert tiny_engine.name == meta.name
    assert tiny_engine.model_id == model_id(meta.name, meta.weights_digest, "main", "float32")
    assert tiny_engine.context_length == 2048
    assert tiny_engine.eos_token_ids == frozenset({2})
    prompt = tiny_engine.chat_prompt_ids(CHAT)
    assert prompt[0] == 1 and prompt[-1] == 3 + ord("\n")  # <|im_start|> … "assistant\n"
    assert tiny_engine.decode(tiny_engine.encode("héllo")) == "héllo"
    assert tiny_engine.token_bytes(3 + 0xE6) == b"\xe6"
    assert tiny_engine.token_bytes(2) == b"<|im_end|>"


def test_outputs_are_not_near_uniform(tiny_engine: TransformersEngine) -> None:
    tokens = _generate(tiny_engine, max_tokens=30)
    assert sum(t.logprob for t in tokens) / len(tokens) > -4.0  # uniform would be ln(1/259)


def test_max_tokens_is_respected(tiny_engine: TransformersEngine) -> None:
    for n in (1, 7):
        tokens = _generate(tiny_engine, max_tokens=n, seed=3)
        assert len(tokens) == n
        assert tokens[-1].finish_reason == "length"
        assert all(t.finish_reason is None for t in tokens[:-1])


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_engine: TransformersEngine) -> None:
    a = [t.token_id for t in _generate(tiny_engine, seed=11)]
    b = [t.token_id for t in _generate(tiny_engine, seed=11)]
    c = [t.token_id for t in _generate(tiny_engine, seed=12)]
    assert a == b
    assert a != c


def test_text_is_the_decoded_token_ids(tiny_engine: TransformersEngine) -> None:
    for seed in range(5):
        tokens = _generate(tiny_engine, seed=seed, max_tokens=60)
        text = "".join(t.text for t in tokens)
        assert text == tiny_engine.decode([t.token_id for t in tokens])


def test_logprobs_match_a_teacher_forced_pass(tiny_engine: TransformersEngine) -> None:
    prompt = tiny_engine.chat_prompt_ids(CHAT)
    params = SamplingParams(max_tokens=120, temperature=0.8, top_p=0.95, seed=5)
    tokens = list(tiny_engine.generate(prompt, params))
    output = [t.token_id for t in tokens]
    reference = _teacher_forced_logprobs(tiny_engine, prompt, output)
    for step, tok in enumerate(tokens):
        assert tok.logprob == pytest.approx(reference[step, tok.token_id].item(), abs=1e-4)


def test_greedy_equals_the_argmax_of_the_logits(tiny_engine: TransformersEngine) -> None:
    prompt = tiny_engine.chat_prompt_ids(CHAT)
    tokens = list(tiny_engine.generate(prompt, SamplingParams(max_tokens=60, temperature=0.0)))
    output = [t.token_id for t in tokens]
    reference = _teacher_forced_logprobs(tiny_engine, prompt, output)
    assert output == reference.argmax(dim=-1).tolist()
    # And the seed plays no part.
    again = tiny_engine.generate(prompt, SamplingParams(max_tokens=60, temperature=0, seed=99))
    assert [t.token_id for t in again] == output


def test_tokens_replay_with_the_protocol_sampler(tiny_engine: TransformersEngine) -> None:
    """A verifier with the seed re-derives every token from teacher-forced logits."""
    from infergrid.protocol.sampling import sample_token

    prompt = tiny_engine.chat_prompt_ids(CHAT)
    params = SamplingParams(max_tokens=80, temperature=0.9, top_k=50, seed=77)
    output = [t.token_id for t in tiny_engine.generate(prompt, params)]
    ids = torch.tensor([prompt + output])
    with torch.inference_mode():
        logits = tiny_engine.model(input_ids=ids.to(tiny_engine.device)).logits[0].cpu()
    replay = [
        sample_token(logits[len(prompt) - 1 + step], 77, step, 0.9, None, 50)
        for step in range(len(output))
    ]
    assert replay == output


def test_stop_sequence_ends_and_is_removed(tiny_engine: TransformersEngine) -> None:
    free = _generate(tiny_engine, seed=4, max_tokens=60)
    text = "".join(t.text for t in free)
    stop = text[20:23]
    assert stop and stop not in text[:20]
    stopped = _generate(tiny_engine, seed=4, max_tokens=60, stop=(stop,))
    assert stopped[-1].finish_reason == "stop"
    assert "".join(t.text for t in stopped) == text[:20]
    # The tokens are those of the free run, up to the one that completed the stop sequence.
    assert [t.token_id for t in stopped] == [t.token_id for t in free[: len(stopped)]]
    assert stop in tiny_engine.decode([t.token_id for t in stopped])


def test_eos_ends_with_stop_and_is_the_last_token(tiny_engine: TransformersEngine) -> None:
    ended = None
    for seed in range(200):  # a fixed seed list, so this is deterministic
        tokens = _generate(tiny_engine, seed=seed, max_tokens=60)
        if tokens[-1].token_id in tiny_engine.eos_token_ids:
            ended = tokens
            break
    assert ended is not None, "no seed ended on EOS"
    assert ended[-1].finish_reason == "stop"
    # The EOS token adds no text of its own: it only releases what was held back (half of a
    # multi-byte character), so the texts still add up to decode(all ids).
    before = "".join(t.text for t in ended[:-1])
    ids = [t.token_id for t in ended]
    assert ended[-1].text == tiny_engine.decode(ids)[len(before) :]
    assert all(t.token_id not in tiny_engine.eos_token_ids for t in ended[:-1])
    assert len(ended) < 60


def test_generation_stops_at_the_context_length(tiny_engine: TransformersEngine) -> None:
    prompt = [3 + ord("a")] * (tiny_engine.context_length - 3)
    tokens = list(tiny_engine.generate(prompt, SamplingParams(max_tokens=50, seed=2)))
    assert len(tokens) <= 3
    full = [3 + ord("a")] * tiny_engine.context_length
    with pytest.raises(ValueError):
        tiny_engine.generate(full, SamplingParams(max_tokens=1))


def test_top_logprobs_are_sorted_and_include_the_greedy_token(
    tiny_engine: TransformersEngine,
) -> None:
    tokens = _generate(tiny_engine, temperature=0.0, top_logprobs=3, max_tokens=10)
    for tok in tokens:
        assert len(tok.top_logprobs) == 3
        values = [lp for _, lp in tok.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert tok.top_logprobs[0] == (tok.token_id, pytest.approx(tok.logprob))
