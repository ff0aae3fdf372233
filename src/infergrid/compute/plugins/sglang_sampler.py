"""The protocol sampler as an SGLang custom logit processor.

Start the upstream with `--enable-custom-logit-processor` (and infergrid installed in its
environment, so the class can be found by name). A request opts in with
`custom_logit_processor: processor_spec()` and `custom_params`
(compute.plugins.sampling_args) at temperature 0; SGLang calls the processor with the logits
of the rows that chose it and one parameter dict per row, to which it adds the request
(`__req__`), whose `output_ids` give the step.

SGLang computes the logprobs it returns from the logits AFTER custom processors, so they are
not the model's; the proxy engine gets the raw logprobs of an SGLang answer with a second,
teacher-forced scoring request (compute.proxy_engine). SGLang is imported only when installed.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from infergrid.compute.plugins import parse_args, protocol_logits
from infergrid.protocol.sampling import RowSampling

try:  # pragma: no cover - exercised only where SGLang is installed
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

    SGLANG_AVAILABLE = True
except ImportError:
    SGLANG_AVAILABLE = False

    class CustomLogitProcessor:  # type: ignore[no-redef]
        """Stand-in for sglang.srt.sampling.custom_logit_processor.CustomLogitProcessor."""


class InferGridSampler(CustomLogitProcessor):
    """SGLang custom logit processor: each row whose parameters carry InferGrid arguments
    gets the protocol token of (seed, number of output tokens so far)."""

    def __call__(
        self,
        logits: torch.Tensor,
        custom_param_list: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> torch.Tensor:
        params = list(custom_param_list or [])
        if not params:
            return logits
        if len(params) != logits.shape[0]:
            raise ValueError(f"{len(params)} parameter dicts for {logits.shape[0]} rows of logits")
        rows: list[RowSampling | None] = []
        for entry in params:
            args = parse_args(entry)
            if args is None or entry is None:
                rows.append(None)
                continue
            request = entry.get("__req__")
            if request is None:
                raise ValueError("SGLang passed no '__req__': cannot tell the step")
            rows.append(args.at(len(request.output_ids)))
        return protocol_logits(logits, rows)


def processor_spec() -> str:
    """The `custom_logit_processor` string of a request: SGLang's serialized-callable JSON,
    here a by-name pickle of InferGridSampler (dill, which SGLang loads it with, reads plain
    pickles). It names the class only, so the upstream must have infergrid installed."""
    return json.dumps({"callable": pickle.dumps(InferGridSampler).hex()})
