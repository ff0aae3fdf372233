"""How a parsed request becomes a generation: the one rule a miner and a verifier share.

A miner samples with the parameters `plan_generation` gives; a verifier auditing the response
calls the same function on the same request body and replays the sampler with them, so the
two can never disagree about the seed, the token budget or the stop sequences.

- **Prompt.** A chat request's prompt is the engine's chat template over `chat_messages(req)`
  (each message's role and its text parts joined); a legacy completion's is the encoding of
  `req.prompt_text()`.
- **Budget.** `token_budget`: the request's limit (`max_completion_tokens`, else `max_tokens`)
  when the context holds prompt + limit, min(default, room) when it states none; APIError(400)
  when the context cannot hold it. `billable_prompt`: an attested prompt may not be longer than
  its body can be billed for (protocol.pricing.max_prompt_tokens).
- **Seed.** The request's `seed` when it has one; else, for an attested request,
  `seed_for(request hash)` (so a replayed request samples the same); else a random one.
- **Sampler.** temperature and top_p as sent; top_k as sent, with <= 0 meaning "off" (None);
  stop sequences as `req.stop_list()`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from infergrid.protocol.openai_types import (
    GENERATED_SEED_BITS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)
from infergrid.protocol.pricing import TEMPLATE_TOKEN_ALLOWANCE, max_prompt_tokens

Request = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """The sampling of one request: the fields of compute.engine.SamplingParams."""

    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int
    stop: tuple[str, ...]
    top_logprobs: int


def seed_for(request_hash: bytes) -> int:
    """A sampling seed derived from the request hash, for attested requests that bring none.

    A random seed would make a replayed request produce a different answer: with the miner's
    memory of signed hashes lost that is equivocation. With the seed fixed by the request hash,
    a replay gives the same tokens on the same hardware, and a verifier knows the seed.
    """
    return int.from_bytes(request_hash[:8], "big") >> (64 - GENERATED_SEED_BITS)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation the chat template is applied to: role and text of each message."""
    return [{"role": m.role, "content": m.text()} for m in req.messages]


def requested_logprobs(req: Request) -> int | None:
    """How many alternatives per token the client asked for; None when it wants no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def token_budget(
    prompt_tokens: int,
    requested: int | None,
    context_length: int,
    default_max_tokens: int,
    *,
    prompt_param: str = "messages",
) -> int:
    """How many tokens may be generated, or APIError(400) when the context cannot hold it."""
    room = context_length - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt is {prompt_tokens} tokens, leaving no room for a completion. Please "
            "shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(default_max_tokens, room)
    if requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def billable_prompt(prompt_tokens: int, body_bytes: int, *, prompt_param: str = "messages") -> None:
    """Raise APIError(400) when a prompt of `prompt_tokens` is more than a request of
    `body_bytes` can be billed for (protocol.pricing.max_prompt_tokens): the gateway would
    refuse the attestation, so an attesting miner refuses the request before generating."""
    bound = max_prompt_tokens(body_bytes)
    if prompt_tokens > bound:
        raise APIError(
            400,
            f"The prompt is {prompt_tokens} tokens under this model's tokenizer and chat"
            f" template, more than the {bound} a {body_bytes}-byte request can be billed for"
            f" (one per byte of the request body plus {TEMPLATE_TOKEN_ALLOWANCE} for the"
            " template), so this miner cannot serve it.",
            param=prompt_param,
            code="prompt_exceeds_billable_tokens",
        )


def plan_generation(
    req: Request,
    prompt_ids: list[int] | tuple[int, ...],
    *,
    request_hash: bytes | None,
    context_length: int,
    default_max_tokens: int,
) -> GenerationPlan:
    """The sampling of `req` over `prompt_ids` (see the module docstring).

    `request_hash` is the attested request's hash, or None for a request served without
    attestation (its seed, when it brings none, is then random). Raises APIError(400) when
    the context cannot hold the prompt and the requested completion.
    """
    max_tokens = token_budget(
        len(prompt_ids),
        req.token_limit(),
        context_length,
        default_max_tokens,
        prompt_param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
    )
    if req.seed is not None:
        seed = req.seed
    elif request_hash is not None:
        seed = seed_for(request_hash)
    else:
        seed = secrets.randbits(GENERATED_SEED_BITS)
    return GenerationPlan(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
        seed=seed,
        stop=tuple(req.stop_list()),
        top_logprobs=requested_logprobs(req) or 0,
    )
