"""What a request costs and how a collected payment splits; the contracts do the same maths.

Fractions are parts per million (ppm) and round down; the miner's share is what is left, so
the three shares always add up to the amount exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer

PPM = 1_000_000

# Completion tokens a request that sets no limit may generate: the gateway reserves them, tells
# the miner so in the body it forwards, and bills no more.
DEFAULT_MAX_TOKENS = 1024
# Prompt tokens a chat template may add that no byte of the request body accounts for: role
# markers, special tokens, a model's default system prompt (Llama 3.1 adds about 25, Qwen2.5
# about 20).
TEMPLATE_TOKEN_ALLOWANCE = 256


def max_prompt_tokens(body_bytes: int) -> int:
    """The most prompt tokens a request whose forwarded body is `body_bytes` long can be billed
    for: one per body byte (a token is at least one byte of text, and the JSON around the text
    only adds bytes) plus the template allowance. The gateway refuses an attestation above it,
    and an honest miner refuses such a prompt before generating."""
    if body_bytes < 0:
        raise ValueError("a body length is non-negative")
    return body_bytes + TEMPLATE_TOKEN_ALLOWANCE


def max_request_value(body_bytes: int, max_tokens: int, offer: ModelOffer) -> int:
    """The most one request can cost at `offer`'s prices: what the gateway reserves before
    forwarding it, and what its receipt can never exceed."""
    return request_value(max_prompt_tokens(body_bytes), max_tokens, offer)


def over_limit(tokens_in: int, tokens_out: int, *, body_bytes: int, max_tokens: int) -> str | None:
    """Why a response attested with these token counts bills more than its request allowed,
    or None when it does not. Within both limits its value is at most max_request_value, so a
    receipt never exceeds the reservation made for it."""
    bound = max_prompt_tokens(body_bytes)
    if tokens_in > bound:
        return (
            f"{tokens_in} prompt tokens attested for a {body_bytes}-byte request, which can"
            f" hold at most {bound}"
        )
    if tokens_out > max_tokens:
        return f"{tokens_out} completion tokens attested, above the request's limit {max_tokens}"
    return None


def request_value(tokens_in: int, tokens_out: int, offer: ModelOffer) -> int:
    """Wei a payer owes for one response at a miner's registered prices."""
    if tokens_in < 0 or tokens_out < 0:
        raise ValueError("token counts are non-negative")
    return tokens_in * offer.price_in_wei + tokens_out * offer.price_out_wei


@dataclass(frozen=True)
class FeeSplit:
    miner: int
    protocol: int  # to the treasury
    verifier_pool: int


def split_payment(amount: int, protocol_fee_ppm: int, verifier_pool_ppm: int) -> FeeSplit:
    if amount < 0:
        raise ValueError("amount is non-negative")
    if protocol_fee_ppm < 0 or verifier_pool_ppm < 0 or protocol_fee_ppm + verifier_pool_ppm > PPM:
        raise ValueError("fees must be non-negative and add up to at most 1,000,000 ppm")
    protocol = amount * protocol_fee_ppm // PPM
    pool = amount * verifier_pool_ppm // PPM
    return FeeSplit(miner=amount - protocol - pool, protocol=protocol, verifier_pool=pool)


def wei_to_btt(wei: int) -> float:
    """For display and the `cost` field of usage; exact figures stay in wei."""
    return wei / WEI_PER_BTT


def btt_to_wei(text: str) -> int:
    """Parse an amount of BTT written by a person ("1", "0.25", "1e-6") into exact wei."""
    from decimal import Decimal, InvalidOperation

    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not an amount of BTT") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{text!r} is not a non-negative amount of BTT")
    wei = amount * WEI_PER_BTT
    if wei != wei.to_integral_value():
        raise ValueError(f"{text!r} has more than 18 decimal places")
    return int(wei)


def format_btt(wei: int) -> str:
    """Exact decimal BTT for people: 1500000000000000000 → "1.5"."""
    whole, frac = divmod(wei, WEI_PER_BTT)
    return f"{whole}.{frac:018d}".rstrip("0").rstrip(".") if frac else str(whole)
