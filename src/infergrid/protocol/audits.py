"""Audits: which responses are audited, what an audit job carries, and its evidence hash.

**Selection** (the gateway's, after the receipt is committed). A gateway holds a secret only it
knows and audits a response iff `audit_draw(secret, request_hash) < p`, where the draw is the
first 8 bytes of HMAC-SHA256(secret, request hash) read big-endian, divided by 2**64 (a uniform
number in [0, 1)). `audit_probability` gives p: 1.0 while the miner is on probation, 0.25 for
its first `FIRST_REQUESTS` (500) served requests, 0.05 after. The miner never learns the secret,
so it cannot tell which responses are audited; the draw is fixed by the request, so a gateway
that restarts decides the same.

**Audit job.** What a verifier needs to recompute a response, as JSON (`AuditJob.to_json`):

- `request_id`: the gateway's id of the request;
- `endpoint`: `"chat"` (/v1/chat/completions) or `"completions"` (/v1/completions);
- `body`: the exact bytes the gateway sent the miner, base64 (standard alphabet, padded); the
  attestation's request hash is keccak(request id ‖ 0x0a ‖ these bytes) (messages.request_hash);
- `miner`: the miner's registry address; `model`: the served model name;
- `prompt_token_ids`, `output_token_ids`: what the miner reported (ints);
- `output_logprobs`: one float per output token, the miner's reported ln p(token);
- `text`: the completion text the client received; `finish_reason`: `"stop"` or `"length"`;
- `usage`: `{"prompt_tokens": int, "completion_tokens": int}` as the client received it;
- `attestation`: the miner's signed attestation (messages.signed_json form);
- `receipt`: the gateway's signed receipt for it, or null (a canary's job, built by the
  verifier from what the public API returned, may carry it too).

`AuditJob.from_json` refuses any other shape with ValueError naming the field, and bounds the
lists (at most MAX_JOB_TOKENS ids) so a job cannot exhaust a verifier's memory.

**Evidence.** A dispute's evidence bundle is the job's canonical JSON bytes (`evidence_bytes`:
sorted keys, no whitespace, UTF-8); its hash is keccak of those bytes (`evidence_hash`). Anyone
holding the bundle can check it against the hash the DisputeManager stores and re-audit it.

**States** of a request's audit, as `GET /v1/requests/{id}` reports them: see `AuditState`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from eth_utils import is_address, keccak, to_checksum_address

FIRST_REQUESTS = 500
P_FIRST = 0.25
P_AFTER = 0.05
P_PROBATION = 1.0
MAX_JOB_TOKENS = 1 << 17  # ids per list: far above any context a miner serves
MAX_JOB_BODY_BYTES = 8 << 20
ENDPOINTS = ("chat", "completions")


class AuditState(StrEnum):
    """Where a request's verification stands.

    - NOT_SELECTED: the gateway's secret draw did not pick it (or no verifier was reachable);
    - PENDING: picked, sent to a verifier, no verdict yet;
    - PASSED: a verifier's signed verdict passed it (or a dispute about it was rejected);
    - FAILED: a verifier's signed verdict failed it; its receipt is voided if not yet paid;
    - DISPUTED: a dispute about it is open on-chain;
    - SLASHED: the dispute was upheld; the miner was slashed and the payer refunded.
    """

    NOT_SELECTED = "not_selected"
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"
    DISPUTED = "disputed"
    SLASHED = "slashed"


def audit_probability(served_requests: int, *, probation: bool) -> float:
    """p for a miner's next response: 1.0 on probation, 0.25 for its first 500, 0.05 after."""
    if probation:
        return P_PROBATION
    return P_FIRST if served_requests < FIRST_REQUESTS else P_AFTER


def audit_draw(secret: bytes, request_hash: bytes) -> float:
    """A uniform number in [0, 1) that only the holder of `secret` can compute."""
    if len(secret) < 16:
        raise ValueError("the audit secret must be at least 16 bytes")
    digest = hmac.new(secret, request_hash, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def selected_for_audit(secret: bytes, request_hash: bytes, p: float) -> bool:
    return audit_draw(secret, request_hash) < p


# -- the job ---------------------------------------------------------------------------------


def _get(data: Mapping[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"audit job: missing field {name!r}")
    return data[name]


def _str(data: Mapping[str, Any], name: str) -> str:
    value = _get(data, name)
    if not isinstance(value, str):
        raise ValueError(f"audit job: {name!r} must be a string")
    return value


def _ids(data: Mapping[str, Any], name: str) -> tuple[int, ...]:
    value = _get(data, name)
    if not isinstance(value, list):
        raise ValueError(f"audit job: {name!r} must be a list of token ids")
    if len(value) > MAX_JOB_TOKENS:
        raise ValueError(f"audit job: {name!r} has more than {MAX_JOB_TOKENS} ids")
    for index, item in enumerate(value):
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < 2**32:
            raise ValueError(f"audit job: {name}[{index}] is not a token id: {item!r}")
    return tuple(value)


def _floats(data: Mapping[str, Any], name: str) -> tuple[float, ...]:
    value = _get(data, name)
    if not isinstance(value, list):
        raise ValueError(f"audit job: {name!r} must be a list of numbers")
    if len(value) > MAX_JOB_TOKENS:
        raise ValueError(f"audit job: {name!r} has more than {MAX_JOB_TOKENS} entries")
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, int | float) or isinstance(item, bool):
            raise ValueError(f"audit job: {name}[{index}] is not a number: {item!r}")
        number = float(item)
        # Miners report a floor (-9999), never -inf: a non-finite number has no JSON form, so
        # a job holding one could not be hashed as evidence.
        if not math.isfinite(number) or number > 0.0:
            raise ValueError(
                f"audit job: {name}[{index}] is not a finite log-probability: {item!r}"
            )
        out.append(number)
    return tuple(out)


def _signed(data: Mapping[str, Any], name: str, *, optional: bool = False) -> dict[str, Any] | None:
    value = data.get(name) if optional else _get(data, name)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"audit job: {name!r} must be a signed message object")
    return dict(value)


@dataclass(frozen=True)
class AuditJob:
    request_id: str
    endpoint: str
    body: bytes
    miner: str
    model: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    text: str
    finish_reason: str
    usage: Mapping[str, int]
    attestation: Mapping[str, Any]
    receipt: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown fields, kept for the hash

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat"

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "body": base64.b64encode(self.body).decode(),
            "miner": self.miner,
            "model": self.model,
            "prompt_token_ids": list(self.prompt_token_ids),
            "output_token_ids": list(self.output_token_ids),
            "output_logprobs": list(self.output_logprobs),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": dict(self.usage),
            "attestation": dict(self.attestation),
            "receipt": None if self.receipt is None else dict(self.receipt),
        }

    @classmethod
    def from_json(cls, data: Any) -> AuditJob:
        if not isinstance(data, Mapping):
            raise ValueError("audit job: expected a JSON object")
        endpoint = _str(data, "endpoint")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"audit job: 'endpoint' must be one of {ENDPOINTS}, got {endpoint!r}")
        encoded = _str(data, "body")
        if len(encoded) > MAX_JOB_BODY_BYTES * 4 // 3 + 4:
            raise ValueError(f"audit job: 'body' is larger than {MAX_JOB_BODY_BYTES} bytes")
        try:
            body = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("audit job: 'body' is not base64") from None
        miner = _str(data, "miner")
        if not is_address(miner):
            raise ValueError(f"audit job: 'miner' {miner!r} is not an address")
        finish = _str(data, "finish_reason")
        if finish not in ("stop", "length"):
            raise ValueError(
                f"audit job: 'finish_reason' must be 'stop' or 'length', got {finish!r}"
            )
        usage = _get(data, "usage")
        if not isinstance(usage, Mapping):
            raise ValueError("audit job: 'usage' must be an object")
        counts: dict[str, int] = {}
        for name in ("prompt_tokens", "completion_tokens"):
            value = usage.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"audit job: usage.{name} must be a non-negative integer")
            counts[name] = value
        known = {
            "request_id", "endpoint", "body", "miner", "model", "prompt_token_ids",
            "output_token_ids", "output_logprobs", "text", "finish_reason", "usage",
            "attestation", "receipt",
        }  # fmt: skip
        attestation = _signed(data, "attestation")
        assert attestation is not None
        return cls(
            request_id=_str(data, "request_id"),
            endpoint=endpoint,
            body=body,
            miner=to_checksum_address(miner),
            model=_str(data, "model"),
            prompt_token_ids=_ids(data, "prompt_token_ids"),
            output_token_ids=_ids(data, "output_token_ids"),
            output_logprobs=_floats(data, "output_logprobs"),
            text=_str(data, "text"),
            finish_reason=finish,
            usage=counts,
            attestation=attestation,
            receipt=_signed(data, "receipt", optional=True),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def evidence_bytes(self) -> bytes:
        return evidence_bytes(self.to_json())

    def evidence_hash(self) -> bytes:
        return keccak(self.evidence_bytes())


def evidence_bytes(job_json: Mapping[str, Any]) -> bytes:
    """The canonical bytes of an evidence bundle: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        job_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def evidence_hash(bundle: bytes) -> bytes:
    return keccak(bundle)


def parse_evidence(bundle: bytes, expected_hash: bytes) -> AuditJob:
    """The job in an evidence bundle fetched from anyone, after checking it is the bundle the
    dispute names; ValueError otherwise."""
    if keccak(bundle) != expected_hash:
        raise ValueError("evidence bundle does not match the dispute's evidence hash")
    try:
        data = json.loads(bundle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"evidence bundle is not JSON: {exc}") from None
    return AuditJob.from_json(data)
