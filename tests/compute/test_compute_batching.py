"""Continuous batching in the transformers engine.

The backend (TransformersBatchBackend): a batched forward gives each row the logits a
single-row forward gives it, however rows join, leave and interleave. The engine's batcher
(compute.batching.ContinuousBatcher over that backend): concurrent generations give each
request token for token what it gets alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from infergrid.compute.transformers_engine import TransformersBatchBackend, TransformersEngine

# Measured: batched and single-row fp32 logits of the tiny model (logits up to ~13 in
# magnitude) differ by at most 7.7e-5, from reassociated sums over padded rows; exact ties
# when no row is padded. The audit's fp32 logprob threshold is 0.01.
LOGIT_TOLERANCE = 5e-4


def _alone(
    engine: TransformersEngine, prompt: Sequence[int], fed: Sequence[int]
) -> list[torch.Tensor]:
    """Logits of one sequence decoded alone: after the prompt, then after each fed token."""
    backend = TransformersBatchBackend(engine.model, max_slots=1)
    out = [backend.forward([(0, prompt)])[0]]
    out += [backend.forward([(0, [token])])[0] for token in fed]
    return out


def _random_ids(rng: random.Random, engine: TransformersEngine, n: int) -> list[int]:
    return [rng.randrange(3, engine.vocab_size) for _ in range(n)]


def test_batched_logits_equal_each_rows_logits_alone(tiny_engine: TransformersEngine) -> None:
    """Rows of different prompt lengths join at different steps, are stepped in shuffled
    order and leave (released) at different steps; every row's logits at every step match
    the ones it gets alone."""
    rng = random.Random(0)
    prompts = [_random_ids(rng, tiny_engine, n) for n in (1, 7, 3, 11, 2, 5)]
    fed = [_random_ids(rng, tiny_engine, n) for n in (6, 3, 9, 4, 8, 2)]
    joins_at = [0, 0, 2, 3, 3, 7]
    expected = [_alone(tiny_engine, p, f) for p, f in zip(prompts, fed, strict=True)]

    backend = TransformersBatchBackend(tiny_engine.model, max_slots=8)
    position = [0] * len(prompts)
    widest, worst, step = 0, 0.0, 0
    while any(position[i] <= len(fed[i]) for i in range(len(prompts))):
        work = [
            (i, prompts[i] if position[i] == 0 else [fed[i][position[i] - 1]])
            for i in range(len(prompts))
            if step >= joins_at[i] and position[i] <= len(fed[i])
        ]
        rng.shuffle(work)
        if work:
            logits = backend.forward(work)
            assert logits.shape == (len(work), tiny_engine.vocab_size)
            widest = max(widest, len(work))
            for (slot, _), row in zip(work, logits, strict=True):
                worst = max(worst, float((row - expected[slot][position[slot]]).abs().max()))
                position[slot] += 1
                if position[slot] > len(fed[slot]):
                    backend.release(slot)
        step += 1
    assert widest >= 4
    assert worst <= LOGIT_TOLERANCE
    assert backend.active_slots == frozenset()


def test_a_row_skipped_for_a_step_waits_with_its_cache(tiny_engine: TransformersEngine) -> None:
    """A slot left out of a step keeps its cache and continues where it stopped."""
    rng = random.Random(1)
    a, b = _random_ids(rng, tiny_engine, 4), _random_ids(rng, tiny_engine, 6)
    fa, fb = _random_ids(rng, tiny_engine, 3), _random_ids(rng, tiny_engine, 3)
    backend = TransformersBatchBackend(tiny_engine.model, max_slots=2)
    backend.forward([(0, a), (1, b)])
    backend.forward([(0, [fa[0]]), (1, [fb[0]])])
    backend.forward([(1, [fb[1]])])  # slot 0 sits this step out
    last = backend.forward([(0, [fa[1]]), (1, [fb[2]])])
    assert float((last[0] - _alone(tiny_engine, a, fa[:2])[2]).abs().max()) <= LOGIT_TOLERANCE
    assert float((last[1] - _alone(tiny_engine, b, fb)[3]).abs().max()) <= LOGIT_TOLERANCE


def test_a_released_slot_takes_a_new_prompt(tiny_engine: TransformersEngine) -> None:
    rng = random.Random(2)
    first, second, other = (_random_ids(rng, tiny_engine, n) for n in (9, 2, 5))
    backend = TransformersBatchBackend(tiny_engine.model, max_slots=2)
    backend.forward([(0, first), (1, other)])
    backend.forward([(0, [5]), (1, [6])])
    backend.release(0)
    backend.release(0)  # releasing a slot without a cache is a no-op
    assert backend.active_slots == frozenset({1})
    logits = backend.forward([(0, second), (1, [7])])
    assert float((logits[0] - _alone(tiny_engine, second, [])[0]).abs().max()) <= LOGIT_TOLERANCE
    assert float((logits[1] - _alone(tiny_engine, other, [6, 7])[2]).abs().max()) <= (
        LOGIT_TOLERANCE
    )


def test_bad_work_is_refused(tiny_engine: TransformersEngine) -> None:
    backend = TransformersBatchBackend(tiny_engine.model, max_slots=2)
    with pytest.raises(ValueError, match="outside"):
        backend.forward([(2, [5])])
    with pytest.raises(ValueError, match="at least one token"):
        backend.forward([(0, [])])
    with pytest.raises(ValueError, match="once per forward"):
        backend.forward([(0, [5]), (0, [6])])
    backend.forward([(0, [5, 6])])
    with pytest.raises(ValueError, match="one token per step"):
        backend.forward([(0, [7, 8])])
    with pytest.raises(ValueError, match="max_slots"):
        TransformersBatchBackend(tiny_engine.model, max_slots=0)


def test_a_sliding_window_model_runs_one_slot_with_its_own_cache() -> None:
    """Left padding would shift a sliding window, so such a model is not batched: one slot,
    the model's own cache, logits equal to a full forward's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=0,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    backend = TransformersBatchBackend(model, max_slots=8)
    assert backend.max_slots == 1 and not backend.batchable
    ids = [1, 2, 3, 4, 5, 6, 7]
    stepped = [backend.forward([(0, ids[:2])])[0]]
    stepped += [backend.forward([(0, [token])])[0] for token in ids[2:]]
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0]
    for position, logits in enumerate(stepped, start=1):
        assert float((logits - full[position]).abs().max()) <= LOGIT_TOLERANCE
