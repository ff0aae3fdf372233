"""The continuous batcher: rows join and leave one batch, each sampled by its own parameters.

The backend here is a pure function of each slot's token history (a deterministic toy
language model, no weights), so a row's answer must not depend on what else shares the batch,
exactly; the real models' batching is tested in test_compute_batching.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
import torch

from infergrid.compute.batching import ContinuousBatcher, GenerationError
from infergrid.compute.engine import GeneratedToken, SamplingParams, decode_loop

VOCAB = 64
EOS = 0


def _history_logits(history: Sequence[int]) -> torch.Tensor:
    seed = hash(tuple(history)) % (2**31)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0
    logits[EOS] -= 3.0  # answers end on EOS now and then, not at once
    return logits


class HistoryBackend:
    """Logits are a function of each slot's whole sequence so far; `fail_on` breaks a step."""

    def __init__(self, max_slots: int = 4) -> None:
        self._max_slots = max_slots
        self.histories: dict[int, list[int]] = {}
        self.batch_sizes: list[int] = []
        self.fail_on: int | None = None  # a token that makes forward raise
        self.released: list[int] = []
        self.gate: threading.Event | None = None

    @property
    def max_slots(self) -> int:
        return self._max_slots

    def forward(self, work: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.batch_sizes.append(len(work))
        rows = []
        for slot, ids in work:
            if self.fail_on is not None and self.fail_on in ids:
                raise RuntimeError("the toy model broke")
            history = self.histories.setdefault(slot, [])
            history.extend(ids)
            rows.append(_history_logits(history))
        return torch.stack(rows)

    def release(self, slot: int) -> None:
        self.histories.pop(slot, None)
        self.released.append(slot)


def _decode(ids: Sequence[int]) -> str:
    return "".join(chr(97 + (i % 26)) for i in ids if i != EOS)


def _alone(prompt: list[int], params: SamplingParams) -> list[int]:
    history = list(prompt)

    def advance(token: int) -> torch.Tensor:
        history.append(token)
        return _history_logits(history)

    tokens = decode_loop(
        _history_logits(history), advance, params, eos_token_ids=frozenset({EOS}), decode=_decode
    )
    return [t.token_id for t in tokens]


def _batcher(backend: HistoryBackend) -> ContinuousBatcher:
    return ContinuousBatcher(backend, eos_token_ids=frozenset({EOS}), decode=_decode, name="toy")


PARAMS = [
    SamplingParams(max_tokens=12, temperature=0.0),
    SamplingParams(max_tokens=20, temperature=1.0, seed=1),
    SamplingParams(max_tokens=7, temperature=0.7, top_p=0.8, seed=2),
    SamplingParams(max_tokens=15, temperature=1.3, top_k=5, seed=3),
    SamplingParams(max_tokens=9, temperature=None, seed=4, stop=("q",)),
    SamplingParams(max_tokens=30, temperature=0.9, seed=5, top_logprobs=3),
]


def test_concurrent_rows_give_each_rows_answer_alone() -> None:
    """Six generations with different parameters, prompts and lengths, four slots: every
    answer is token for token the one decode_loop gives that request alone."""
    backend = HistoryBackend(max_slots=4)
    batcher = _batcher(backend)
    prompts = [[5 + i] * (i + 1) for i in range(len(PARAMS))]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = [
            t.token_id for t in batcher.generate(prompts[i], PARAMS[i], max_new_tokens=99)
        ]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PARAMS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    for i, params in enumerate(PARAMS):
        assert results[i] == _alone(prompts[i], params), f"row {i} changed in a batch"
    assert batcher.stats.max_rows_seen > 1
    assert batcher.stats.max_rows_seen <= 4
    assert batcher.stats.rows_served == len(PARAMS)


def test_the_last_token_carries_the_finish_reason_and_logprobs_are_reported() -> None:
    batcher = _batcher(HistoryBackend())
    tokens = list(batcher.generate([3, 4], PARAMS[5], max_new_tokens=99))
    batcher.close()
    assert all(t.finish_reason is None for t in tokens[:-1])
    assert tokens[-1].finish_reason in ("stop", "length")
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0.0 for t in tokens)
    logits = _history_logits([3, 4])
    assert tokens[0].logprob == pytest.approx(
        float(torch.log_softmax(logits.double(), -1)[tokens[0].token_id])
    )


def test_max_new_tokens_caps_the_answer() -> None:
    batcher = _batcher(HistoryBackend())
    params = SamplingParams(max_tokens=50, temperature=1.0, seed=9)
    tokens = list(batcher.generate([7], params, max_new_tokens=3))
    batcher.close()
    assert len(tokens) <= 3


def test_a_consumer_that_goes_away_frees_its_slot_and_the_others_go_on() -> None:
    backend = HistoryBackend(max_slots=1)
    batcher = _batcher(backend)
    long = SamplingParams(max_tokens=200, temperature=1.0, seed=11)
    first = batcher.generate([9], long, max_new_tokens=200)
    next(first)
    first.close()  # the client disconnected
    # With one slot, a second request can only run once the first left the batch.
    second = [t.token_id for t in batcher.generate([9], PARAMS[0], max_new_tokens=99)]
    batcher.close()
    assert second == _alone([9], PARAMS[0])
    assert backend.released  # the cancelled row's slot was released


def test_a_failing_step_fails_its_rows_and_the_engine_keeps_serving() -> None:
    backend = HistoryBackend()
    backend.fail_on = 63
    batcher = _batcher(backend)
    with pytest.raises(GenerationError, match="the toy model broke"):
        list(batcher.generate([63], PARAMS[0], max_new_tokens=99))
    backend.fail_on = None
    assert [t.token_id for t in batcher.generate([8], PARAMS[0], max_new_tokens=99)] == _alone(
        [8], PARAMS[0]
    )
    batcher.close()


def test_an_empty_prompt_and_a_closed_engine_are_refused() -> None:
    batcher = _batcher(HistoryBackend())
    with pytest.raises(ValueError, match="at least one token"):
        batcher.generate([], PARAMS[0], max_new_tokens=5)
    batcher.close()
    with pytest.raises(GenerationError, match="shut down"):
        batcher.generate([1], PARAMS[0], max_new_tokens=5)


def test_a_row_whose_text_cannot_be_decoded_fails_alone() -> None:
    """A detokenizer error in one row ends that row with GenerationError; the worker lives on
    and the other row of the same batch is served."""
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    poison = _alone([1], params)[0]  # the broken row's first token cannot be decoded
    fine_prompt = next(p for p in ([2], [3], [4], [6], [7]) if poison not in _alone(p, PARAMS[0]))

    def fragile_decode(ids: Sequence[int]) -> str:
        if poison in ids:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "broken token")
        return _decode(ids)

    backend = HistoryBackend(max_slots=4)
    batcher = ContinuousBatcher(
        backend, eos_token_ids=frozenset({EOS}), decode=fragile_decode, name="toy"
    )
    with batcher._wake:  # the worker cannot admit either row before both are queued
        broken = batcher.generate([1], params, max_new_tokens=99)
        fine = batcher.generate(fine_prompt, PARAMS[0], max_new_tokens=99)
    results: dict[str, object] = {}

    def consume(name: str, tokens: Iterator[GeneratedToken]) -> None:
        try:
            results[name] = [t.token_id for t in tokens]
        except GenerationError as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=consume, args=("broken", broken)),
        threading.Thread(target=consume, args=("fine", fine)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    assert isinstance(results["broken"], GenerationError)
    assert "could not be decoded" in str(results["broken"])
    assert results["fine"] == _alone(fine_prompt, PARAMS[0])
    assert max(backend.batch_sizes) == 2  # they shared a batch, so the worker outlived the error
