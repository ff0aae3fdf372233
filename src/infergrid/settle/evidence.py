"""The evidence a dispute is opened with, read from a gateway and checked off-chain (pure).

`DisputeManager.open_dispute` takes one served request: the miner's signed Attestation and
the gateway's signed Receipt for it. A gateway serves both, to the API key that made the
request, at GET /v1/receipts/{request_id} (app/receipts.py `StoredReceipt.to_json`, each
message as `protocol.messages.signed_json`). `DisputeEvidence.from_receipt_json` parses that
answer; `check(domain)` makes the contract's checks on it, in the contract's order and with
its revert strings, so a verifier learns before paying gas (and a deposit) why a dispute
would revert.

What `check` cannot see is chain state: whether the attestation's key is one the registry
says the miner holds (pass `was_signer`, e.g. `Registry.was_signer`, to check that too),
whether the miner is registered as one, whether this evidence or request was disputed
already, the open-dispute caps and the deposit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from infergrid.protocol.eip712 import (
    SECP256K1_HALF_N,
    SIGNATURE_LENGTH,
    Domain,
    InvalidSignature,
    signature_bytes,
)
from infergrid.protocol.messages import SIGNATURE_KEY, Attestation, Receipt, recover_signer
from infergrid.verify.receipt import CONTRACT_FIELDS, receipt_mismatches

# The contract's revert strings for the checks `check` makes (DisputeManager.open_dispute).
NOT_SIGNED_BY_MINER = "not signed by the miner"
RECEIPT_NOT_SIGNED = "receipt not signed by its gateway"
NOT_THIS_ATTESTATION = "receipt is not for this attestation"
ZERO_PAYER = "zero payer"
MINER_IS_PAYER = "miner cannot be the payer"
# lib/signatures.vy's, for a signature no key made in the contract's eyes.
SIGNATURE_BAD_V = "signatures: bad v"
SIGNATURE_MALLEABLE = "signatures: malleable"
SIGNATURE_INVALID = "signatures: invalid"


class EvidenceRejected(ValueError):
    """Evidence the DisputeManager would refuse. `reason` is the contract's revert string;
    the message adds what exactly is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _recover(domain: Domain, message: Attestation | Receipt, signature: bytes) -> str:
    """The signer of `message`, or EvidenceRejected with the reason lib/signatures.vy reverts
    with, checked in its order (eip712.recover refuses the same signatures, but its messages
    do not say which of the contract's reasons applies)."""
    what = type(message).__name__.lower()
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if signature[64] not in (27, 28):
        raise EvidenceRejected(SIGNATURE_BAD_V, f"{what} signature v is {signature[64]}")
    if s > SECP256K1_HALF_N:
        raise EvidenceRejected(SIGNATURE_MALLEABLE, f"{what} signature has the high-s form")
    if r == 0 or s == 0:
        raise EvidenceRejected(SIGNATURE_INVALID, f"{what} signature has a zero r or s")
    try:
        return recover_signer(domain, message, signature)
    except InvalidSignature as exc:  # r off the curve order, or no point: ecrecover gives 0
        raise EvidenceRejected(SIGNATURE_INVALID, f"{what} {exc}") from None


def _signature(value: Any, what: str) -> bytes:
    # Shape only: who signed, and whether v and s are acceptable, is check()'s to judge.
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a 0x-hex string, got {type(value).__name__}")
    return signature_bytes(value, what)


def _signed(body: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any], bytes]:
    """The message JSON under `name` and its signature (signed_json's SIGNATURE_KEY)."""
    data = body.get(name)
    if not isinstance(data, Mapping):
        raise ValueError(f"the receipt answer has no {name} object")
    if SIGNATURE_KEY not in data:
        raise ValueError(f"the {name} is not signed (no {SIGNATURE_KEY!r})")
    return data, _signature(data[SIGNATURE_KEY], f"{name} {SIGNATURE_KEY}")


@dataclass(frozen=True)
class DisputeEvidence:
    """One served request as `DisputeManager.open_dispute` takes it."""

    attestation: Attestation
    attestation_signature: bytes  # the miner's signer key's, over the attestation
    receipt: Receipt
    receipt_signature: bytes  # the gateway signer's, over the receipt

    def __post_init__(self) -> None:
        if not isinstance(self.attestation, Attestation):
            raise ValueError("attestation must be a messages.Attestation")
        if not isinstance(self.receipt, Receipt):
            raise ValueError("receipt must be a messages.Receipt")
        for name in ("attestation_signature", "receipt_signature"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != SIGNATURE_LENGTH:
                raise ValueError(f"{name} must be {SIGNATURE_LENGTH} bytes")

    @classmethod
    def from_receipt_json(cls, data: Mapping[str, Any] | str | bytes) -> DisputeEvidence:
        """Parse a gateway's GET /v1/receipts/{request_id} answer, as decoded JSON or as its
        text. Only the shape is checked (fields, hex, lengths, ranges): run `check` before
        disputing. Other keys of the answer (request_id, anchor, trace) are ignored. Raises
        ValueError naming the first malformed part."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes
                raise ValueError(f"the receipt answer is not JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise ValueError("the receipt answer is not a JSON object")
        receipt_json, receipt_signature = _signed(data, "receipt")
        attestation_json, attestation_signature = _signed(data, "attestation")
        try:
            receipt = Receipt.from_json(receipt_json)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed receipt: {exc}") from None
        try:
            attestation = Attestation.from_json(attestation_json)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed attestation: {exc}") from None
        return cls(attestation, attestation_signature, receipt, receipt_signature)

    def check(self, domain: Domain, *, was_signer: Callable[[str, str], bool] | None = None) -> str:
        """Make open_dispute's checks of the evidence itself, in the contract's order; returns
        the address that signed the attestation. Raises EvidenceRejected with the contract's
        revert string for the first that fails:

        - the attestation signature is well formed (lib/signatures.vy's "signatures: ..."
          reasons) and, recovered in `domain` (the deployment's: chain id and escrow), with
          `was_signer(miner, key)` given, is by a key of the attestation's miner;
        - the receipt signature is well formed and recovers to the receipt's own gateway;
        - the receipt is this attestation's: same miner, request hash and model id, and its
          attestation hash is the attestation's struct hash;
        - the payer is not the zero address, nor the miner.
        """
        attestation, receipt = self.attestation, self.receipt
        signer = _recover(domain, attestation, self.attestation_signature)
        if was_signer is not None and not was_signer(attestation.miner, signer):
            raise EvidenceRejected(
                NOT_SIGNED_BY_MINER,
                f"signed by {signer}, not a key of miner {attestation.miner}",
            )
        gateway = _recover(domain, receipt, self.receipt_signature)
        if gateway != receipt.gateway:
            raise EvidenceRejected(
                RECEIPT_NOT_SIGNED, f"signed by {gateway}, the receipt names {receipt.gateway}"
            )
        mismatches = [
            str(mismatch)
            for mismatch in receipt_mismatches(receipt, attestation)
            if mismatch.field in CONTRACT_FIELDS
        ]
        if mismatches:
            raise EvidenceRejected(NOT_THIS_ATTESTATION, "; ".join(mismatches))
        if int(receipt.payer, 16) == 0:
            raise EvidenceRejected(ZERO_PAYER, "the receipt names the zero address as payer")
        if receipt.payer == attestation.miner:
            raise EvidenceRejected(
                MINER_IS_PAYER, f"the receipt's payer {receipt.payer} is the miner"
            )
        return signer
