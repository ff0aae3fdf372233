"""One client request on its way through the gateway (`Call`), shared by its modules, and
what its routing needs to know of it (`route_request`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from infergrid.app.billing import Reservation
from infergrid.app.traces import Trace
from infergrid.compute.routing import RoutePreferences, RouteRequest, prefix_key
from infergrid.protocol.nodes import ModelOffer
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS
from infergrid.protocol.wire import EXTENSION_KEY

__all__ = ["Call", "route_request"]

# What a request's `infergrid` extension may hold (compute.routing.RoutePreferences).
REQUEST_EXTENSION_FIELDS = ("route",)
# A prompt of this many bytes is about one token (an estimate: it only weighs prices).
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class Call:
    """One client request on its way through the gateway."""

    request_id: str
    path: str
    model: str
    stream: bool
    wants_logprobs: bool
    include_usage: bool
    payload: bytes
    started: float  # perf_counter at arrival
    trace: Trace
    # The completion tokens the request may take (its limit; else, metered, the default the
    # gateway states in the forwarded body, unmetered the default a miner applies): the most
    # it may cost, what its attestation may claim, and how long its answer may take.
    max_tokens: int = DEFAULT_MAX_TOKENS
    # Settlement only: who pays, the hold on the payer's headroom, and the chosen miner's
    # offer for the model.
    payer: str | None = None
    reservation: Reservation | None = None
    offer: ModelOffer | None = None
    request_hash: bytes | None = None  # computed once, on the first attempt
    # Sent with a verifier's canary key: goes to miners on probation first (app.audits).
    canary: bool = False
    key_id: str = ""
    # Set by Metering.commit once the receipt is stored: the receipt, the gateway's signature
    # of it, and the attestation it pays for with the miner's signature.
    receipt: Any = None
    receipt_signature: bytes = b""
    attestation: Any = None
    attestation_signature: bytes = b""
    route: RouteRequest | None = None  # for the scheduler (route_request)


def route_request(
    body: dict[str, Any], *, model: str, max_tokens: int | None, payload_bytes: int
) -> RouteRequest:
    """What the scheduler needs of a validated request body: the model, a prompt-size
    estimate, the completion limit, the prompt's prefix key (the first chat message or the
    prompt's start: a system prompt or a shared document a miner's KV cache may still hold)
    and the developer's `infergrid.route` preferences.

    Raises APIError 400 naming the field: an `infergrid` extension that is not an object, a
    field of it the network does not know, a malformed `route`."""
    ext = body.get(EXTENSION_KEY)
    prefs = RoutePreferences()
    if ext is not None:
        if not isinstance(ext, dict):
            raise APIError(
                400, f"'{EXTENSION_KEY}' must be an object.", param=EXTENSION_KEY,
                code="invalid_type",
            )  # fmt: skip
        unknown = sorted(str(name) for name in ext if name not in REQUEST_EXTENSION_FIELDS)
        if unknown:
            name = f"{EXTENSION_KEY}.{unknown[0]}"
            raise APIError(
                400,
                f"Unsupported parameter '{name}': a request's '{EXTENSION_KEY}' extension takes"
                f" {', '.join(REQUEST_EXTENSION_FIELDS)}.",
                param=name,
                code="unsupported_parameter",
            )
        try:
            prefs = RoutePreferences.parse(ext.get("route"), field_name=f"{EXTENSION_KEY}.route")
        except ValueError as exc:
            raise APIError(
                400, str(exc), param=f"{EXTENSION_KEY}.route", code="invalid_value"
            ) from None
    return RouteRequest(
        model=model,
        prompt_tokens=payload_bytes // BYTES_PER_TOKEN,
        max_tokens=max_tokens,
        prefix=_prefix(body),
        prefs=prefs,
    )


def _prefix(body: dict[str, Any]) -> int | None:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return prefix_key(json.dumps(messages[0], separators=(",", ":")).encode())
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prefix_key(prompt.encode("utf-8", "replace"))
    return None
