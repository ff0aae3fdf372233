"""`infergrid trace <request-id>`: fetch a request's receipt from its gateway and prove it.

The gateway's answer is not trusted: every claim in it is checked here — the receipt's
signature by the gateway signer, the attestation's by the miner's registered signer, the
receipt's link to that attestation, its Merkle proof against the anchored root, and that root
against the one the gateway committed on-chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infergrid.gateway_client import get_gateway_json, quoted
from infergrid.protocol.eip712 import Domain, InvalidSignature, to_bytes32
from infergrid.protocol.merkle import verify_proof
from infergrid.protocol.messages import SIGNATURE_KEY, Attestation, Receipt, recover_signer
from infergrid.verify.receipt import receipt_mismatches


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def fetch_receipt(base_url: str, api_key: str, request_id: str, timeout_s: float = 10.0) -> Any:
    """GET {base_url}/receipts/{request_id}; raises RuntimeError with the gateway's message."""
    return get_gateway_json(
        base_url, f"/receipts/{quoted(request_id)}", api_key, timeout_s=timeout_s
    )


def _signed(data: Any, what: str) -> tuple[dict[str, Any], str]:
    if not isinstance(data, dict) or not isinstance(data.get(SIGNATURE_KEY), str):
        raise ValueError(f"the gateway's answer has no signed {what}")
    return data, data[SIGNATURE_KEY]


def check_receipt(
    body: Any,
    domain: Domain,
    *,
    miner_signer: str | None = None,
    anchored_root: bytes | None = None,
) -> tuple[Receipt, list[Check]]:
    """Check a gateway's /v1/receipts answer. `miner_signer` is the miner's signer as the
    registry records it; `anchored_root` the root the chain holds for the receipt's anchor."""
    receipt_json, receipt_sig = _signed(
        body.get("receipt") if isinstance(body, dict) else None, "receipt"
    )
    attestation_json, attestation_sig = _signed(body.get("attestation"), "attestation")
    receipt = Receipt.from_json(receipt_json)
    attestation = Attestation.from_json(attestation_json)
    checks = []

    def signature(name: str, message: Receipt | Attestation, sig: str, expected: str) -> None:
        try:
            signer = recover_signer(domain, message, sig)
        except InvalidSignature as exc:
            checks.append(Check(name, False, str(exc)))
            return
        checks.append(Check(name, signer == expected, f"signed by {signer}"))

    signature("receipt signed by the gateway", receipt, receipt_sig, receipt.gateway)
    if miner_signer is not None:
        signature("attestation signed by the miner", attestation, attestation_sig, miner_signer)
    checks.append(
        Check(
            "receipt matches the attestation",
            not receipt_mismatches(receipt, attestation),
            f"{receipt.tokens_in} tokens in, {receipt.tokens_out} out",
        )
    )
    anchor = body.get("anchor")
    if isinstance(anchor, dict):
        leaf = to_bytes32(anchor["leaf"], "leaf")
        root = to_bytes32(anchor["root"], "root")
        proof = [to_bytes32(node, "proof node") for node in anchor["proof"]]
        checks.append(
            Check(
                "Merkle proof against the anchor root",
                leaf == receipt.struct_hash() and verify_proof(leaf, proof, root),
                f"anchor {anchor['anchor_index']}: receipt {anchor['position'] + 1} of"
                f" {anchor['count']}, {len(proof)} proof nodes",
            )
        )
        if anchored_root is not None:
            checks.append(
                Check(
                    "anchor root on-chain",
                    anchored_root == root,
                    "0x" + anchored_root.hex(),
                )
            )
    return receipt, checks
