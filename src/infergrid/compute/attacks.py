"""Red-team code: cheating miners, for the audit's tests, bench/detection.py and
`infergrid miner --attack`. Nothing here is used by an honest node.

Every attack is an `Engine` that claims the identity of an honest reference engine (its name,
model id, tokenizer, chat template and EOS ids, so attestations name the real model) while
computing something cheaper or different. Served by the ordinary miner, its answers look
honest on the wire; only an audit can tell.

- `SubstitutedEngine(claimed, actual)`: another model's tokens under the claimed id (also how
  weight noise, int8/int4 weights and bf16-for-fp32 are served: `actual` is a modified copy);
- `PrefillEngine(claimed, cheap)`: tokens from a cheap model, logprobs from the real one;
- `TruncatingEngine`: stops early and reports "length";
- `RandomTokensEngine`: uniformly random non-EOS tokens, real-model logprobs;
- `WrongTemperatureEngine`: samples at another temperature than the request's;
- `FabricatedLogprobsEngine`: honest tokens, made-up logprobs;
- `ReplayingEngine`: answers a prompt it has seen with the cached answer, whatever the seed.

`serve_job` is the miner's serving path without HTTP (protocol.generation's plan, the engine,
the attestor), returning the audit job a gateway would build; tests check it agrees with the
HTTP miner.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import (
    AuditableEngine,
    Engine,
    GeneratedToken,
    SamplingParams,
    decode_loop,
)
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.generation import (
    billable_prompt,
    chat_messages,
    plan_generation,
)
from infergrid.protocol.json_body import decode_request_json
from infergrid.protocol.messages import request_hash
from infergrid.protocol.openai_types import ChatCompletionRequest, CompletionRequest, parse_request
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS

ATTACKS = (
    "substitution",
    "weight-noise",
    "int8",
    "int4",
    "bf16",
    "prefill",
    "truncation",
    "random-tokens",
    "wrong-temperature",
    "fabricated-logprobs",
    "replay",
)


class _Claiming:
    """Identity, tokenizer and prompt building from the claimed engine."""

    def __init__(self, claimed: Engine) -> None:
        self.claimed = claimed

    @property
    def name(self) -> str:
        return self.claimed.name

    @property
    def model_id(self) -> str:
        return self.claimed.model_id

    @property
    def context_length(self) -> int:
        return self.claimed.context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.claimed.eos_token_ids

    @property
    def precision(self) -> str:
        return str(getattr(self.claimed, "precision", "float32"))

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.claimed.chat_prompt_ids(messages)

    def encode(self, text: str) -> list[int]:
        return self.claimed.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.claimed.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.claimed.token_bytes(token_id)


class SubstitutedEngine(_Claiming):
    """`actual`'s generations under `claimed`'s identity, after `honest_first` honest calls
    (a miner that behaves while it is on probation). Both must share a vocabulary."""

    def __init__(self, claimed: Engine, actual: Engine, *, honest_first: int = 0) -> None:
        super().__init__(claimed)
        self.actual = actual
        self._honest_left = honest_first
        self._lock = threading.Lock()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        with self._lock:
            honest = self._honest_left > 0
            self._honest_left -= 1 if honest else 0
        return (self.claimed if honest else self.actual).generate(prompt_ids, params)


# -- modified copies of a model ----------------------------------------------------------------


def _copy_with(engine: TransformersEngine, model: Any) -> TransformersEngine:
    return TransformersEngine(
        model,
        engine.tokenizer,
        name=engine.name,
        weights_digest=engine.weights_digest,
        revision=engine.revision,
        context_length=engine.context_length,
        max_batch=engine.max_batch,
    )


def _weights(model: Any) -> Iterator[torch.Tensor]:
    """The matrices of the linear layers and embeddings (not norms or biases)."""
    for _, param in sorted(model.named_parameters()):
        if param.dim() >= 2:
            yield param


def noisy_copy(
    engine: TransformersEngine, relative_std: float, seed: int = 0
) -> TransformersEngine:
    """A copy with Gaussian noise of `relative_std` × each matrix's std added to its weights."""
    model = copy.deepcopy(engine.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in _weights(model):
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)
            w.add_((noise * float(w.float().std()) * relative_std).to(w.dtype))
    return _copy_with(engine, model)


def fake_quantized_copy(engine: TransformersEngine, bits: int) -> TransformersEngine:
    """A copy whose matrices are rounded to `bits`-bit symmetric integers per output row (the
    error of int8/int4 weight quantization, computed in float)."""
    if not 2 <= bits <= 16:
        raise ValueError("bits must be in [2, 16]")
    levels = 2 ** (bits - 1) - 1
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        for w in _weights(model):
            scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
            w.copy_(torch.round(w / scale).clamp_(-levels, levels) * scale)
    return _copy_with(engine, model)


def cast_copy(engine: TransformersEngine, dtype: torch.dtype) -> TransformersEngine:
    """A copy running at another precision (bf16 served where fp32 is claimed)."""
    return _copy_with(engine, copy.deepcopy(engine.model).to(dtype))


def layer_dropped_copy(engine: TransformersEngine, keep: int) -> TransformersEngine:
    """A cheaper model with the same vocabulary: only the first `keep` decoder layers."""
    model = copy.deepcopy(engine.model)
    layers = model.model.layers
    if not 1 <= keep <= len(layers):
        raise ValueError(f"keep must be in [1, {len(layers)}]")
    model.model.layers = layers[:keep]
    model.config.num_hidden_layers = keep
    if hasattr(model.config, "layer_types") and model.config.layer_types is not None:
        model.config.layer_types = model.config.layer_types[:keep]
    return _copy_with(engine, model)


# -- token-level attacks -----------------------------------------------------------------------


def _logprobs_of(engine: Engine, prompt_ids: Sequence[int], ids: Sequence[int]) -> list[float]:
    """The real model's logprobs of `ids` (one teacher-forced pass), as a prover would fake."""
    if not isinstance(engine, AuditableEngine):
        raise TypeError(f"real logprobs need an engine with teacher forcing, not {engine.name}")
    logits = engine.teacher_forced_logits(prompt_ids, ids)
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i, t]) for i, t in enumerate(ids)]


def forced_tokens(
    ids: Sequence[int], params: SamplingParams, engine: Engine
) -> list[GeneratedToken]:
    """GeneratedTokens (text, finish reasons) for chosen ids, by the protocol's decode loop
    driven with one-hot logits; it stops where the loop would (EOS, stop, budget)."""
    ids = list(ids)
    size = max(ids) + 1
    position = 0

    def one_hot(token: int) -> torch.Tensor:
        x = torch.zeros(size, dtype=torch.float64)
        x[token] = 1.0
        return x

    def advance(_: int) -> torch.Tensor:
        return one_hot(ids[position])

    greedy = replace(params, temperature=0.0, max_tokens=min(params.max_tokens, len(ids)))
    out: list[GeneratedToken] = []
    for token in decode_loop(
        one_hot(ids[0]), advance, greedy, eos_token_ids=engine.eos_token_ids, decode=engine.decode
    ):
        out.append(token)
        position += 1
    return out


class PrefillEngine(_Claiming):
    """Tokens from `cheap` (its own protocol sampling), logprobs from `claimed`: the attack
    that makes the cheap model's work look like the real one's to a logprob check."""

    def __init__(self, claimed: TransformersEngine, cheap: Engine) -> None:
        super().__init__(claimed)
        self.cheap = cheap

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        tokens = list(self.cheap.generate(prompt_ids, params))
        real = _logprobs_of(self.claimed, prompt_ids, [t.token_id for t in tokens])
        return iter([replace(t, logprob=lp) for t, lp in zip(tokens, real, strict=True)])


class TruncatingEngine(_Claiming):
    """Generates honestly but stops after `fraction` of the budget, reporting "length"."""

    def __init__(self, claimed: Engine, fraction: float = 0.5) -> None:
        super().__init__(claimed)
        self.fraction = fraction

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        keep = max(1, int(params.max_tokens * self.fraction))
        tokens = list(self.claimed.generate(prompt_ids, params))
        if len(tokens) > keep:
            tokens = tokens[:keep]
            tokens[-1] = replace(tokens[-1], finish_reason="length")
        return iter(tokens)


class RandomTokensEngine(_Claiming):
    """Uniformly random non-EOS tokens up to the budget, with the real model's logprobs."""

    def __init__(self, claimed: TransformersEngine, vocab_size: int, seed: int = 0) -> None:
        super().__init__(claimed)
        self.vocab_size = vocab_size
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        with self._lock:
            ids: list[int] = []
            while len(ids) < params.max_tokens:
                token = self._random.randrange(self.vocab_size)
                if token not in self.eos_token_ids:
                    ids.append(token)
        tokens = forced_tokens(ids, params, self.claimed)
        real = _logprobs_of(self.claimed, prompt_ids, [t.token_id for t in tokens])
        return iter([replace(t, logprob=lp) for t, lp in zip(tokens, real, strict=True)])


class WrongTemperatureEngine(_Claiming):
    """Samples at `temperature` whatever the request asked (0.0: greedy)."""

    def __init__(self, claimed: Engine, temperature: float) -> None:
        super().__init__(claimed)
        self.temperature = temperature

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        return self.claimed.generate(prompt_ids, replace(params, temperature=self.temperature))


class FabricatedLogprobsEngine(_Claiming):
    """Honest tokens; every reported logprob is `value` (a miner skipping the softmax)."""

    def __init__(self, claimed: Engine, value: float = -0.5) -> None:
        super().__init__(claimed)
        self.value = value

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        return (replace(t, logprob=self.value) for t in self.claimed.generate(prompt_ids, params))


class ReplayingEngine(_Claiming):
    """Answers a prompt it has answered before with the cached tokens, whatever the seed."""

    def __init__(self, claimed: Engine) -> None:
        super().__init__(claimed)
        self._cache: dict[tuple[Any, ...], list[GeneratedToken]] = {}
        self._lock = threading.Lock()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[GeneratedToken]:
        key = (tuple(prompt_ids), replace(params, seed=0))
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = list(self.claimed.generate(prompt_ids, params))
            with self._lock:
                self._cache.setdefault(key, cached)
        return iter(cached)


# -- the miner's serving path, without HTTP -----------------------------------------------------


def serve_job(
    engine: Engine,
    body: bytes,
    *,
    chat: bool,
    request_id: str,
    attestor: Attestor,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> AuditJob:
    """Serve `body` as compute.miner_server does (same parse, prompt, plan, sampler and
    attestation) and return the audit job a gateway would build from the answer."""
    req = parse_request(
        ChatCompletionRequest if chat else CompletionRequest, decode_request_json(body)
    )
    if isinstance(req, ChatCompletionRequest):
        prompt_ids = engine.chat_prompt_ids(chat_messages(req))
    else:
        prompt_ids = engine.encode(req.prompt_text())
    billable_prompt(len(prompt_ids), len(body), prompt_param="messages" if chat else "prompt")
    hashed = request_hash(request_id, body)
    plan = plan_generation(
        req,
        prompt_ids,
        request_hash=hashed,
        context_length=engine.context_length,
        default_max_tokens=default_max_tokens,
    )
    params = SamplingParams(
        max_tokens=plan.max_tokens,
        temperature=plan.temperature,
        top_p=plan.top_p,
        top_k=plan.top_k,
        seed=plan.seed,
        stop=plan.stop,
        top_logprobs=plan.top_logprobs,
    )
    tokens = list(engine.generate(prompt_ids, params))
    output_ids = [t.token_id for t in tokens]
    return AuditJob(
        request_id=request_id,
        endpoint="chat" if chat else "completions",
        body=body,
        miner=attestor.miner,
        model=engine.name,
        prompt_token_ids=tuple(prompt_ids),
        output_token_ids=tuple(output_ids),
        output_logprobs=tuple(t.logprob for t in tokens),
        text="".join(t.text for t in tokens),
        finish_reason=tokens[-1].finish_reason or "length",
        usage={"prompt_tokens": len(prompt_ids), "completion_tokens": len(output_ids)},
        attestation=attestor.attestation_json(hashed, output_ids, engine.model_id, len(prompt_ids)),
    )


def make_attack(
    name: str,
    engine: TransformersEngine,
    *,
    cheap: Engine | None = None,
    seed: int = 0,
) -> Engine:
    """The attack `name` (one of ATTACKS) against the reference `engine`. `cheap` is the other
    model for "substitution" and "prefill" (same vocabulary); by default the reference with
    only its first decoder layer."""
    other = cheap if cheap is not None else layer_dropped_copy(engine, 1)
    if name == "substitution":
        return SubstitutedEngine(engine, other)
    if name == "weight-noise":
        return SubstitutedEngine(engine, noisy_copy(engine, 0.01, seed))
    if name == "int8":
        return SubstitutedEngine(engine, fake_quantized_copy(engine, 8))
    if name == "int4":
        return SubstitutedEngine(engine, fake_quantized_copy(engine, 4))
    if name == "bf16":
        return SubstitutedEngine(engine, cast_copy(engine, torch.bfloat16))
    if name == "prefill":
        return PrefillEngine(engine, other)
    if name == "truncation":
        return TruncatingEngine(engine, 0.5)
    if name == "random-tokens":
        return RandomTokensEngine(engine, int(engine.model.config.vocab_size), seed)
    if name == "wrong-temperature":
        return WrongTemperatureEngine(engine, 1.5)
    if name == "fabricated-logprobs":
        return FabricatedLogprobsEngine(engine)
    if name == "replay":
        return ReplayingEngine(engine)
    raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
