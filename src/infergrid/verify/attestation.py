"""The gateway's acceptance check of a miner's attestation (pure): does it vouch for exactly
what the gateway sent and relayed, at counts within the request's limits, signed by the
miner's registered signer? `verify_attestation` answers with the receipt's makings
(`Verified`) or raises AttestationRejected with the first reason found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infergrid.protocol.eip712 import Domain, InvalidSignature, recover, to_bytes32
from infergrid.protocol.messages import SIGNATURE_KEY, Attestation, response_hash
from infergrid.protocol.nodes import ModelOffer, NodeRecord
from infergrid.protocol.pricing import over_limit, request_value


class AttestationRejected(Exception):
    """The miner's attestation does not vouch for what the gateway relayed: no receipt."""


@dataclass(frozen=True, slots=True)
class Verified:
    attestation: Attestation
    signature: bytes
    attestation_hash: bytes  # its struct hash: the receipt's attestationHash, hashed once
    value_wei: int  # what the attested tokens cost at the offer's prices: the receipt's value


def offer_for(record: NodeRecord, model: str) -> ModelOffer | None:
    """The miner's registered offer for `model`, named or pinned by protocol id."""
    for offer in record.models:
        if offer.name == model:
            return offer
    wanted = model.lower()
    for offer in record.models:
        if offer.model_id.lower() == wanted:
            return offer
    return None


def _same_address(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def verify_attestation(
    domain: Domain,
    *,
    record: NodeRecord,
    offer: ModelOffer,
    request_hash: bytes,
    signed: Any,
    output_token_ids: Any,
    prompt_token_ids: Any,
    usage: Any,
    body_bytes: int,
    max_tokens: int,
) -> Verified:
    """Check a miner's signed attestation against what the gateway itself sent and relayed.

    `signed` is the extension's attestation object (Attestation JSON plus "signature");
    `output_token_ids` the ids the gateway relayed (all of them, the ending token included);
    `prompt_token_ids` and `usage` as the miner reported them; `body_bytes` the length of the
    body the gateway forwarded and `max_tokens` the completion limit it stated there. The
    miner's counts only have to agree with each other, but never bill past those limits
    (protocol.pricing.over_limit): a prompt longer than the body can tokenize to or more
    output than max_tokens is refused, so the value is within the request's reservation.
    Raises AttestationRejected with the first reason found. Cheap checks run first (integer
    comparisons before hashing the output); signature recovery (~40 µs) last.
    """
    if not isinstance(signed, Mapping):
        raise AttestationRejected("no attestation")
    try:
        attestation = Attestation.from_json(signed)
    except (TypeError, ValueError) as exc:
        raise AttestationRejected(f"malformed attestation: {exc}") from None
    signature = signed.get(SIGNATURE_KEY)
    if not isinstance(signature, str):
        raise AttestationRejected("attestation is not signed")
    if not _same_address(attestation.miner, record.owner):
        raise AttestationRejected(f"attestation names miner {attestation.miner}")
    if attestation.request_hash != request_hash:
        raise AttestationRejected("request hash does not match the request sent")
    if attestation.model_id != to_bytes32(offer.model_id):
        raise AttestationRejected(
            f"model id {attestation.model_id.hex()} is not the registered {offer.model_id}"
        )
    beyond = over_limit(
        attestation.tokens_in, attestation.tokens_out, body_bytes=body_bytes, max_tokens=max_tokens
    )
    if beyond is not None:
        raise AttestationRejected(f"bills beyond the request: {beyond}")
    if not isinstance(output_token_ids, list):
        raise AttestationRejected("no output token ids")
    try:
        relayed = response_hash(output_token_ids)
    except ValueError:
        raise AttestationRejected("output token ids are not uint32") from None
    if attestation.response_hash != relayed:
        raise AttestationRejected("response hash does not match the tokens relayed")
    prompt_usage = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    completion_usage = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    prompt_len = len(prompt_token_ids) if isinstance(prompt_token_ids, list) else None
    if not attestation.tokens_in == prompt_usage == prompt_len:
        raise AttestationRejected(
            f"tokens in {attestation.tokens_in}, usage {prompt_usage}, prompt ids {prompt_len}"
        )
    if not attestation.tokens_out == completion_usage == len(output_token_ids):
        raise AttestationRejected(
            f"tokens out {attestation.tokens_out}, usage {completion_usage},"
            f" output ids {len(output_token_ids)}"
        )
    attestation_hash = attestation.struct_hash()
    try:
        signer = recover(domain.digest(attestation_hash), signature)
    except InvalidSignature as exc:
        raise AttestationRejected(f"bad signature: {exc}") from None
    if not _same_address(signer, record.signer):
        raise AttestationRejected(f"signed by {signer}, not the registered signer {record.signer}")
    return Verified(
        attestation,
        bytes.fromhex(signature.removeprefix("0x")),
        attestation_hash,
        request_value(attestation.tokens_in, attestation.tokens_out, offer),
    )
