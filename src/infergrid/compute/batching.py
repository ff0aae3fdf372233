"""Continuous batching: many generations share one forward pass per decode step.

A `BatchBackend` runs a model over several sequences ("slots") at once. The
`ContinuousBatcher` owns one worker thread that steps every active generation together:
requests join the batch between steps (their prompt is fed in the same step as the others'
next tokens, or separately: the backend decides) and leave it as soon as they finish or
their consumer goes away. Each row keeps its own sampling parameters and protocol seed:
the protocol sampler (protocol.sampling.sample_rows) picks every row's token from the
batch's logits, and a compute.engine.RowDecoder per row applies the text rule every engine
shares. A row's tokens do not depend on which other rows share its batch, up to the
backend's floating-point batch variance, which the audit's tolerance absorbs.

`generate` is called from any thread (the miner's worker threads each consume one
iterator); it blocks on its own queue while the worker steps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from infergrid.compute.engine import GeneratedToken, RowDecoder, SamplingParams, step_logprobs
from infergrid.protocol import sampling

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The model failed while this generation was in its batch."""


class BatchBackend(Protocol):
    """A model that runs many sequences, each in its own slot, in one forward pass."""

    @property
    def max_slots(self) -> int: ...

    def forward(self, work: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Feed each (slot, new token ids) and return [len(work), vocab] raw logits after the
        last token of each entry, in `work`'s order (any float dtype, any device).

        A slot's first entry after `release` (or ever) carries its whole prompt; later
        entries carry the one token just sampled for it.
        """
        ...

    def release(self, slot: int) -> None:
        """Forget the slot's sequence (its KV cache); the slot may then be reused."""
        ...


@dataclass
class BatcherStats:
    """Counters for /health and benchmarks; written by the worker thread only."""

    steps: int = 0
    rows_served: int = 0
    max_rows_seen: int = 0
    tokens: int = 0


_FINISHED = object()


class _Row:
    def __init__(self, prompt_ids: list[int], decoder: RowDecoder, top_logprobs: int) -> None:
        self.prompt_ids = prompt_ids
        self.decoder = decoder
        self.top_logprobs = top_logprobs
        self.out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.slot: int | None = None
        self.next_input: list[int] = prompt_ids
        self.cancelled = False


class ContinuousBatcher:
    """Steps every active generation of one backend together in a worker thread."""

    def __init__(
        self,
        backend: BatchBackend,
        *,
        eos_token_ids: frozenset[int],
        decode: Callable[[Sequence[int]], str],
        name: str = "engine",
    ) -> None:
        if backend.max_slots < 1:
            raise ValueError("a batch backend needs at least one slot")
        self.backend = backend
        self.stats = BatcherStats()
        self._eos = eos_token_ids
        self._decode = decode
        self._free = list(range(backend.max_slots - 1, -1, -1))
        self._waiting: deque[_Row] = deque()
        self._active: list[_Row] = []
        self._wake = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"{name}-batcher", daemon=True)
        self._worker.start()

    @property
    def active_rows(self) -> int:
        return len(self._active)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, max_new_tokens: int
    ) -> Iterator[GeneratedToken]:
        """Queue one generation and yield its tokens; the last carries the finish reason.

        Closing the iterator early cancels the generation: its row leaves the batch before
        the next step. A backend failure raises GenerationError here.
        """
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        limit = min(params.max_tokens, max_new_tokens)
        decoder = RowDecoder(params, eos_token_ids=self._eos, decode=self._decode, limit=limit)
        row = _Row(list(prompt_ids), decoder, params.top_logprobs)
        with self._wake:
            if self._closed:
                raise GenerationError("the engine is shut down")
            self._waiting.append(row)
            self._wake.notify()
        return self._consume(row)

    def _consume(self, row: _Row) -> Iterator[GeneratedToken]:
        try:
            while True:
                item = row.out.get()
                if item is _FINISHED:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, GeneratedToken)
                yield item
        finally:
            if not row.decoder.finished:
                with self._wake:
                    row.cancelled = True
                    self._wake.notify()

    def close(self) -> None:
        """Stop the worker; generations still running end with GenerationError."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=10)

    # -- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active:
                    self._wake.wait()
                if self._closed:
                    self._fail_all(GenerationError("the engine is shut down"))
                    return
                self._admit()
            self._drop_cancelled()
            if self._active:
                self._step()

    def _admit(self) -> None:
        """Move waiting rows into free slots (caller holds the lock)."""
        while self._waiting and self._free:
            row = self._waiting.popleft()
            if row.cancelled:
                continue
            row.slot = self._free.pop()
            self._active.append(row)
            self.stats.rows_served += 1
        # Rows cancelled while still waiting for a slot leave the queue here too.
        if self._waiting and any(r.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        if self._waiting and not self._free and not self._active:
            # Every slot was retired (the backend could not free them): nothing can run.
            while self._waiting:
                self._waiting.popleft().out.put(GenerationError("the engine has no usable slot"))

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._active if r.cancelled]:
            self._leave(row)

    def _leave(self, row: _Row) -> None:
        self._active.remove(row)
        slot, row.slot = row.slot, None
        if slot is None:
            return
        try:
            self.backend.release(slot)
        except Exception:  # a slot the backend cannot free is not reused
            logger.exception("releasing slot %d failed; it is retired", slot)
            return
        with self._wake:
            self._free.append(slot)

    def _step(self) -> None:
        rows = list(self._active)
        work = [(row.slot, row.next_input) for row in rows]
        try:
            logits = self.backend.forward(work)  # type: ignore[arg-type]
            if logits.dim() != 2 or logits.shape[0] != len(rows):
                raise RuntimeError(
                    f"backend returned logits of shape {tuple(logits.shape)} for {len(rows)} rows"
                )
            tokens = sampling.sample_rows(logits, [row.decoder.sampling for row in rows])
            scored = step_logprobs(logits, tokens, [row.top_logprobs for row in rows])
        except Exception as exc:
            logger.exception("a batch step of %d rows failed", len(rows))
            for row in rows:
                row.out.put(GenerationError(f"the model failed: {exc}"))
                self._leave(row)
            return
        self.stats.steps += 1
        self.stats.tokens += len(rows)
        self.stats.max_rows_seen = max(self.stats.max_rows_seen, len(rows))
        for row, token, (logprob, top) in zip(rows, tokens, scored, strict=True):
            if row.cancelled:
                self._leave(row)
                continue
            try:
                generated = row.decoder.emit(token, logprob, top)
            except Exception as exc:  # a detokenizer failure fails its own row only
                logger.exception("emitting a token failed")
                row.out.put(GenerationError(f"the answer could not be decoded: {exc}"))
                self._leave(row)
                continue
            row.out.put(generated)
            if row.decoder.finished:
                row.out.put(_FINISHED)
                self._leave(row)
            else:
                row.next_input = [token]

    def _fail_all(self, error: GenerationError) -> None:
        for row in list(self._active) + list(self._waiting):
            row.out.put(error)
        self._active.clear()
        self._waiting.clear()
