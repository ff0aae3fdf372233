"""The protocol sampler as a vLLM (v1 engine) logits processor.

Load it into the upstream server::

    vllm serve <model dir> --logits-processors \
        infergrid.compute.plugins.vllm_sampler:InferGridSampler --logprobs-mode raw_logprobs

A request opts in with `vllm_xargs` (compute.plugins.sampling_args) and `temperature: 0`;
each step the plugin rewrites its row so vLLM's greedy argmax is the protocol token of
(seed, step), where the step is the number of output tokens the request has so far. vLLM
hands the plugin a reference to each request's growing output list when the request joins
the persistent batch, so the count is always current, across preemption too.

vLLM is imported only when it is installed (it is CUDA-only and large); without it the
module still imports, with stand-ins for the two names it needs, so the logic can be tested.
Speculative decoding is not supported (its logits have more rows than the batch).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch

from infergrid.compute.plugins import RowArgs, parse_args, protocol_logits
from infergrid.protocol.sampling import RowSampling

try:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

    VLLM_AVAILABLE = True
except ImportError:
    VLLM_AVAILABLE = False

    class LogitsProcessor:  # type: ignore[no-redef]
        """Stand-in for vllm.v1.sample.logits_processor.LogitsProcessor."""

    class MoveDirectionality(enum.Enum):  # type: ignore[no-redef]
        """Stand-in for vLLM's enum of the same name."""

        UNIDIRECTIONAL = enum.auto()
        SWAP = enum.auto()


class InferGridSampler(LogitsProcessor):
    """vLLM logits processor: rows whose request carries InferGrid arguments get the
    protocol token; every other row is left as it is."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # batch index -> (the request's sampling, its live list of output token ids)
        self._rows: dict[int, tuple[RowArgs, Sequence[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse (ValueError) a request whose InferGrid arguments are malformed."""
        parse_args(getattr(sampling_params, "extra_args", None))

    def is_argmax_invariant(self) -> bool:
        # It changes the argmax: that is the point. vLLM then applies it to greedy rows too.
        return False

    def update_state(self, batch_update: Any | None) -> None:
        """Follow the persistent batch: removed, then added, then moved (vLLM's order)."""
        if batch_update is None:
            return
        rows = self._rows
        for index in batch_update.removed:
            rows.pop(index, None)
        for added in batch_update.added:
            # (index, params, prompt ids, output ids); older vLLMs had no prompt ids.
            index, params, output_ids = added[0], added[1], added[-1]
            args = parse_args(getattr(params, "extra_args", None))
            if args is None:
                rows.pop(index, None)  # a request without our arguments took the slot
            else:
                rows[index] = (args, output_ids)
        for a, b, direction in batch_update.moved:
            entry_a = rows.pop(a, None)
            entry_b = rows.pop(b, None)
            if entry_a is not None:
                rows[b] = entry_a
            if direction == MoveDirectionality.SWAP and entry_b is not None:
                rows[a] = entry_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        batch: list[RowSampling | None] = [None] * logits.shape[0]
        for index, (args, output_ids) in self._rows.items():
            if index < len(batch):
                batch[index] = args.at(len(output_ids))
        return protocol_logits(logits, batch)
