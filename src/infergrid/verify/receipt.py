"""The link between a gateway's receipt and the miner's attestation it was signed for (pure).

A receipt is the attestation's when both name the same miner, request hash, model id and
token counts, and the receipt's attestation hash is the attestation's struct hash.
`receipt_mismatches` names every field where they disagree; `infergrid trace`
(receipt_proof.check_receipt) wants none of them, and a dispute (settle.evidence) checks the
subset DisputeManager.open_dispute checks, `CONTRACT_FIELDS`, with the contract's reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergrid.protocol.eip712 import hex32
from infergrid.protocol.messages import Attestation, Receipt

MINER = "miner"
REQUEST_HASH = "request hash"
MODEL_ID = "model id"
ATTESTATION_HASH = "attestation hash"
TOKENS_IN = "tokens in"
TOKENS_OUT = "tokens out"
# What open_dispute compares (its "receipt is not for this attestation"): not the token
# counts, which the contract takes from the attestation alone.
CONTRACT_FIELDS = frozenset({MINER, REQUEST_HASH, MODEL_ID, ATTESTATION_HASH})


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One field on which a receipt and an attestation disagree, each value as text (an
    address as the message holds it, 32 bytes as 0x-hex, a count in decimal)."""

    field: str  # one of MINER, REQUEST_HASH, MODEL_ID, ATTESTATION_HASH, TOKENS_IN, TOKENS_OUT
    in_receipt: str
    in_attestation: str

    def __str__(self) -> str:
        return (
            f"{self.field} {self.in_receipt} in the receipt,"
            f" {self.in_attestation} in the attestation"
        )


def receipt_mismatches(receipt: Receipt, attestation: Attestation) -> list[Mismatch]:
    """Every field on which `receipt` is not `attestation`'s, in the order miner, request
    hash, model id, attestation hash, tokens in, tokens out; empty when the receipt is the
    attestation's. Addresses compare exactly as the messages hold them (from_json
    checksums them)."""
    pairs = (
        (MINER, receipt.miner, attestation.miner),
        (REQUEST_HASH, hex32(receipt.request_hash), hex32(attestation.request_hash)),
        (MODEL_ID, hex32(receipt.model_id), hex32(attestation.model_id)),
        (ATTESTATION_HASH, hex32(receipt.attestation_hash), hex32(attestation.struct_hash())),
        (TOKENS_IN, str(receipt.tokens_in), str(attestation.tokens_in)),
        (TOKENS_OUT, str(receipt.tokens_out), str(attestation.tokens_out)),
    )
    return [Mismatch(field, mine, theirs) for field, mine, theirs in pairs if mine != theirs]
