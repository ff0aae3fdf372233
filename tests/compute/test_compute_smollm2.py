"""The default model, SmolLM2-135M-Instruct, dequantized from the GGUF in its wheel."""

from __future__ import annotations

import pytest
import torch

from infergrid.compute.engine import SamplingParams
from infergrid.compute.model_store import read_metadata, sha256_file, smollm2_gguf_path
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.models import DEFAULT_MODEL, model_id

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_knows_the_capital_of_france(smollm2: TransformersEngine) -> None:
    prompt = smollm2.chat_prompt_ids(QUESTION)
    tokens = list(smollm2.generate(prompt, SamplingParams(max_tokens=40, temperature=0.0)))
    text = "".join(t.text for t in tokens)
    assert "Paris" in text
    assert tokens[-1].finish_reason == "stop"
    assert tokens[-1].token_id in smollm2.eos_token_ids


def test_smollm2_identity_comes_from_the_gguf(smollm2: TransformersEngine) -> None:
    assert smollm2.name == DEFAULT_MODEL
    assert smollm2.context_length == 8192
    digest = sha256_file(smollm2_gguf_path())
    assert smollm2.weights_digest == digest
    assert smollm2.model_id == model_id(DEFAULT_MODEL, digest, "main", "float32")


def test_smollm2_logprobs_match_a_teacher_forced_pass(smollm2: TransformersEngine) -> None:
    prompt = smollm2.chat_prompt_ids(QUESTION)
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
    tokens = list(smollm2.generate(prompt, params))
    output = [t.token_id for t in tokens]
    with torch.inference_mode():
        ids = torch.tensor([prompt + output], device=smollm2.device)
        logits = smollm2.model(input_ids=ids).logits[0].double().cpu()
    reference = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    for step, tok in enumerate(tokens):
        assert tok.logprob == pytest.approx(reference[step, tok.token_id].item(), abs=1e-4)
    assert "".join(t.text for t in tokens) == smollm2.decode(output)


def test_cached_copy_records_its_source(smollm2: TransformersEngine) -> None:
    from infergrid.compute.model_store import default_model_dir

    meta = read_metadata(default_model_dir(quiet=True))
    assert meta is not None and meta.source.startswith("gguf:")
