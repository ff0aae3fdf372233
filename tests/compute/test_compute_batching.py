"""Continuous batching in the transformers engine.

The backend (TransformersBatchBackend): a batched forward gives each row the logits a
single-row forward gives it, however rows join, leave and interleave. The engine's batcher
(compute.batching.ContinuousBatcher over that backend): concurrent generations give each
request token for token what it gets alone.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
import torch

from infergrid.compute.batching import ContinuousBatcher, GenerationError
from infergrid.compute.engine import GeneratedToken, SamplingParams
from infergrid.compute.transformers_engine import TransformersBatchBackend, TransformersEngine

# Measured: batched and single-row fp32 logits of the tiny model (logits up to ~13 in
# magnitude) differ by at most 7.7e-5, from reassociated sums over padded rows; exact ties
# when no row is padded. The audit's fp32 logprob threshold is 0.01.
LOGIT_TOLERANCE = 5e-4
# ln p of a token moves by at most about twice its logits' error.
LOGPROB_TOLERANCE = 2 * LOGIT_TOLERANCE


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


# -- the engine: continuous batching over the backend -----------------------------------------

PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.0),
    SamplingParams(max_tokens=30, temperature=1.0, seed=1),
    SamplingParams(max_tokens=12, temperature=0.7, top_p=0.8, seed=2),
    SamplingParams(max_tokens=20, temperature=1.3, top_k=5, seed=3),
    SamplingParams(max_tokens=30, temperature=None, seed=-4, top_logprobs=3),
    SamplingParams(max_tokens=5, temperature=0.9, top_p=0.5, top_k=20, seed=5),
    SamplingParams(max_tokens=40, temperature=0.0, seed=6),
    SamplingParams(max_tokens=40, temperature=1.1, seed=7),
]


def _prompts(engine: TransformersEngine) -> list[list[int]]:
    """One prompt per PARAMS entry, of different lengths."""
    return [
        engine.encode(f"Request {i}: " + "a dragon é ✓ " * (1 + 3 * i)) for i in range(len(PARAMS))
    ]


def _stop_from(text: str) -> str:
    """A two-character stop sequence from the middle of an answer (no U+FFFD in it)."""
    for start in range(len(text) // 3, len(text) - 2):
        piece = text[start : start + 2]
        if "\ufffd" not in piece and piece.strip():
            return piece
    raise AssertionError(f"no stop sequence in {text!r}")


def _with_stops(engine: TransformersEngine) -> list[SamplingParams]:
    """PARAMS, two of them with a stop sequence taken from their own answer alone."""
    params = list(PARAMS)
    prompts = _prompts(engine)
    for i in (1, 7):
        text = "".join(t.text for t in engine.generate(prompts[i], params[i]))
        params[i] = replace(params[i], stop=(_stop_from(text),))
    return params


def _same(got: Sequence[GeneratedToken], alone: Sequence[GeneratedToken]) -> None:
    assert [t.token_id for t in got] == [t.token_id for t in alone]
    assert [t.text for t in got] == [t.text for t in alone]
    assert [t.finish_reason for t in got] == [t.finish_reason for t in alone]
    for a, b in zip(got, alone, strict=True):
        assert abs(a.logprob - b.logprob) <= LOGPROB_TOLERANCE
        assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]


def test_concurrent_generations_equal_each_one_alone(tiny_engine: TransformersEngine) -> None:
    """Eight requests in eight threads (greedy and sampled, their own seeds, temperatures,
    top-p and top-k, stop sequences, budgets and prompt lengths) each get token for token
    what they get alone, with the same text and finish reason."""
    params = _with_stops(tiny_engine)
    prompts = _prompts(tiny_engine)
    alone = [list(tiny_engine.generate(p, q)) for p, q in zip(prompts, params, strict=True)]
    assert any(t[-1].finish_reason == "stop" for t in alone)  # a stop sequence ended one
    assert {t[-1].finish_reason for t in alone} >= {"length"}

    start = threading.Barrier(len(prompts))
    got: dict[int, list[GeneratedToken]] = {}

    def run(i: int) -> None:
        start.wait(timeout=30)
        got[i] = list(tiny_engine.generate(prompts[i], params[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(len(prompts)):
        _same(got[i], alone[i])


class _Stepped:
    """A batch backend that runs one forward each time the test allows one (so the test
    decides who is in which step); the model work is the real backend's."""

    def __init__(self, backend: TransformersBatchBackend) -> None:
        self.backend = backend
        self.allowed = threading.Semaphore(0)
        self.widths: list[int] = []
        self.released: list[int] = []

    @property
    def max_slots(self) -> int:
        return self.backend.max_slots

    def forward(self, work: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        assert self.allowed.acquire(timeout=30), "the test stopped allowing steps"
        self.widths.append(len(work))
        return self.backend.forward(work)

    def release(self, slot: int) -> None:
        self.released.append(slot)
        self.backend.release(slot)


def _stepped_batcher(
    engine: TransformersEngine, max_slots: int
) -> tuple[ContinuousBatcher, _Stepped]:
    stepped = _Stepped(TransformersBatchBackend(engine.model, max_slots=max_slots))
    batcher = ContinuousBatcher(
        stepped, eos_token_ids=engine.eos_token_ids, decode=engine.decode, name="test"
    )
    return batcher, stepped


def _take(tokens: Iterator[GeneratedToken], n: int) -> list[GeneratedToken]:
    return [next(tokens) for _ in range(n)]


def test_rows_join_a_running_batch(tiny_engine: TransformersEngine) -> None:
    """A first row decodes alone for three steps; three more join it; the batch then runs
    four wide, and every answer is the one each request gets alone."""
    prompts, params = _prompts(tiny_engine)[:4], [PARAMS[6], PARAMS[1], PARAMS[2], PARAMS[3]]
    alone = [list(tiny_engine.generate(p, q)) for p, q in zip(prompts, params, strict=True)]
    assert len(alone[0]) > 4
    batcher, stepped = _stepped_batcher(tiny_engine, max_slots=4)
    try:
        first = batcher.generate(prompts[0], params[0], max_new_tokens=99)
        stepped.allowed.release(3)
        head = _take(first, 3)
        others = [
            batcher.generate(p, q, max_new_tokens=99)
            for p, q in zip(prompts[1:], params[1:], strict=True)
        ]
        stepped.allowed.release(1000)
        got = [head + list(first)] + [list(tokens) for tokens in others]
    finally:
        batcher.close()
    for answer, expected in zip(got, alone, strict=True):
        _same(answer, expected)
    assert stepped.widths[:3] == [1, 1, 1]
    assert max(stepped.widths) == 4 == batcher.stats.max_rows_seen
    assert batcher.stats.rows_served == 4
    assert stepped.backend.active_slots == frozenset()


def test_closing_an_iterator_cancels_its_row_and_the_others_go_on(
    tiny_engine: TransformersEngine,
) -> None:
    """A consumer that goes away after two tokens (a client disconnecting) takes its row out
    of the batch, its cache released, while the other rows continue unchanged."""
    prompts = _prompts(tiny_engine)[:3]
    params = [PARAMS[7], PARAMS[6], PARAMS[1]]
    alone = [list(tiny_engine.generate(p, q)) for p, q in zip(prompts, params, strict=True)]
    assert all(len(a) > 6 for a in alone)
    batcher, stepped = _stepped_batcher(tiny_engine, max_slots=3)
    try:
        rows = [
            batcher.generate(p, q, max_new_tokens=99) for p, q in zip(prompts, params, strict=True)
        ]
        # The first row is in step 1, the others by step 2 (they are queued before it runs).
        stepped.allowed.release(3)
        heads = [_take(rows[0], 2), _take(rows[1], 2), _take(rows[2], 2)]
        rows[0].close()
        stepped.allowed.release(2)
        more = [_take(rows[1], 2), _take(rows[2], 2)]
        # Step 4 saw the cancellation; neither other row has finished.
        assert len(stepped.released) == 1
        stepped.allowed.release(1000)
        rest = [list(rows[1]), list(rows[2])]
    finally:
        batcher.close()
    _same(heads[0], alone[0][:2])
    _same(heads[1] + more[0] + rest[0], alone[1])
    _same(heads[2] + more[1] + rest[1], alone[2])
    assert len(stepped.released) == 3
    assert stepped.backend.active_slots == frozenset()


def test_a_failed_step_fails_its_rows_and_the_batch_serves_on(
    tiny_engine: TransformersEngine,
) -> None:
    """A forward that raises (here a token id past the embedding, which the engine itself
    refuses up front) ends the rows of that step with GenerationError; their caches are
    released and later requests get exactly their answers alone."""
    prompts = _prompts(tiny_engine)[:2]
    assert len(list(tiny_engine.generate(prompts[0], PARAMS[6]))) > 2
    batcher, stepped = _stepped_batcher(tiny_engine, max_slots=2)
    try:
        running = batcher.generate(prompts[0], PARAMS[6], max_new_tokens=99)
        stepped.allowed.release(1)
        _take(running, 1)
        broken = batcher.generate([tiny_engine.vocab_size + 5], PARAMS[0], max_new_tokens=9)
        stepped.allowed.release(1000)
        for tokens in (running, broken):
            with pytest.raises(GenerationError, match="the model failed"):
                list(tokens)
        again = [list(batcher.generate(p, PARAMS[1], max_new_tokens=99)) for p in prompts]
    finally:
        batcher.close()
    assert stepped.backend.active_slots == frozenset()
    for answer, prompt in zip(again, prompts, strict=True):
        _same(answer, list(tiny_engine.generate(prompt, PARAMS[1])))


def test_bad_requests_are_refused_up_front_and_the_batch_goes_on(
    tiny_engine: TransformersEngine,
) -> None:
    prompt = _prompts(tiny_engine)[0]
    alone = list(tiny_engine.generate(prompt, PARAMS[7]))
    running = tiny_engine.generate(prompt, PARAMS[7])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_engine.generate([5, tiny_engine.vocab_size], PARAMS[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_engine.generate([-1], PARAMS[0])
    with pytest.raises(ValueError, match="at least one token"):
        tiny_engine.generate([], PARAMS[0])
    with pytest.raises(ValueError, match="no room"):
        tiny_engine.generate([5] * tiny_engine.context_length, PARAMS[0])
    _same(list(running), alone)


def test_max_batch_bounds_the_batch_and_a_closed_engine_restarts(
    tiny_engine: TransformersEngine,
) -> None:
    engine = TransformersEngine(
        tiny_engine.model,
        tiny_engine.tokenizer,
        name=tiny_engine.name,
        weights_digest=tiny_engine.weights_digest,
        max_batch=2,
    )
    assert engine.max_batch == 2 and engine.model_id == tiny_engine.model_id
    prompts = _prompts(engine)[:4]
    rows = [engine.generate(p, PARAMS[6]) for p in prompts]
    answers = [list(tokens) for tokens in rows]
    assert engine.batch_stats.max_rows_seen <= 2
    assert engine.batch_stats.rows_served == 4
    engine.close()
    assert engine.batch_stats.rows_served == 0  # the next batcher counts afresh
    again = list(engine.generate(prompts[0], PARAMS[6]))
    engine.close()
    _same(again, answers[0])
    for answer, prompt in zip(answers, prompts, strict=True):
        _same(answer, list(tiny_engine.generate(prompt, PARAMS[6])))
