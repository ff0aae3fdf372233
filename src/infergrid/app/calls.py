"""One client request on its way through the gateway (`Call`), shared by its modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infergrid.app.billing import Reservation
from infergrid.app.traces import Trace
from infergrid.protocol.nodes import ModelOffer
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS

__all__ = ["Call"]


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
