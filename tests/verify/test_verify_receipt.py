"""verify.receipt: every field on which a receipt is not its attestation's, named once for
`infergrid trace` (receipt_proof) and the dispute evidence check (settle.evidence), which keeps
the contract's subset and reason string."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from eth_utils import keccak

from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import Attestation, Receipt, sign_message
from infergrid.settle.evidence import NOT_THIS_ATTESTATION, DisputeEvidence, EvidenceRejected
from infergrid.verify.receipt import (
    ATTESTATION_HASH,
    CONTRACT_FIELDS,
    MINER,
    MODEL_ID,
    REQUEST_HASH,
    TOKENS_IN,
    TOKENS_OUT,
    Mismatch,
    receipt_mismatches,
)

DOMAIN = Domain(1337, "0x" + "ab" * 20)
MINER_SIGNER = Signer("0x" + "42" * 32)
GATEWAY = Signer("0x" + "21" * 32)
MINER_ADDRESS = "0x" + "11" * 20
PAYER_ADDRESS = "0x" + "22" * 20
OTHER_ADDRESS = "0x" + "77" * 20

ATTESTATION = Attestation(
    request_hash=keccak(b"request"),
    response_hash=keccak(b"response"),
    model_id=b"\x11" * 32,
    miner=MINER_ADDRESS,
    tokens_in=12,
    tokens_out=5,
)


def receipt_for(attestation: Attestation = ATTESTATION, **changes: Any) -> Receipt:
    """The gateway's receipt for `attestation`, with `changes` applied."""
    receipt = Receipt(
        request_hash=attestation.request_hash,
        payer=PAYER_ADDRESS,
        miner=attestation.miner,
        gateway=GATEWAY.address,
        model_id=attestation.model_id,
        tokens_in=attestation.tokens_in,
        tokens_out=attestation.tokens_out,
        value=1000,
        timestamp=1_700_000_000,
        attestation_hash=attestation.struct_hash(),
    )
    return replace(receipt, **changes)


def evidence(receipt: Receipt) -> DisputeEvidence:
    return DisputeEvidence(
        attestation=ATTESTATION,
        attestation_signature=sign_message(DOMAIN, ATTESTATION, MINER_SIGNER),
        receipt=receipt,
        receipt_signature=sign_message(DOMAIN, receipt, GATEWAY),
    )


def test_the_attestations_own_receipt_has_no_mismatch() -> None:
    assert receipt_mismatches(receipt_for(), ATTESTATION) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"miner": OTHER_ADDRESS}, MINER),
        ({"request_hash": b"\x33" * 32}, REQUEST_HASH),
        ({"model_id": b"\x22" * 32}, MODEL_ID),
        ({"attestation_hash": b"\x44" * 32}, ATTESTATION_HASH),
        ({"tokens_in": 13}, TOKENS_IN),
        ({"tokens_out": 4}, TOKENS_OUT),
    ],
)
def test_each_field_that_differs_is_named(changes: dict[str, Any], field: str) -> None:
    """A receipt that differs from its attestation in one field yields exactly that field,
    with both values as text."""
    receipt = receipt_for(**changes)
    (mismatch,) = receipt_mismatches(receipt, ATTESTATION)
    assert mismatch.field == field
    assert mismatch.in_receipt != mismatch.in_attestation


def test_all_mismatches_in_order_with_values_as_text() -> None:
    """Every mismatch is reported, not just the first, in the order miner, request hash, model
    id, attestation hash, tokens in, tokens out; bytes as 0x-hex, counts in decimal."""
    receipt = receipt_for(
        miner=OTHER_ADDRESS,
        request_hash=b"\x33" * 32,
        model_id=b"\x22" * 32,
        attestation_hash=b"\x44" * 32,
        tokens_in=13,
        tokens_out=4,
    )
    assert receipt_mismatches(receipt, ATTESTATION) == [
        Mismatch(MINER, OTHER_ADDRESS, MINER_ADDRESS),
        Mismatch(REQUEST_HASH, "0x" + "33" * 32, "0x" + ATTESTATION.request_hash.hex()),
        Mismatch(MODEL_ID, "0x" + "22" * 32, "0x" + "11" * 32),
        Mismatch(ATTESTATION_HASH, "0x" + "44" * 32, "0x" + ATTESTATION.struct_hash().hex()),
        Mismatch(TOKENS_IN, "13", "12"),
        Mismatch(TOKENS_OUT, "4", "5"),
    ]


def test_a_mismatch_reads_as_the_dispute_detail() -> None:
    text = "tokens in 13 in the receipt, 12 in the attestation"
    assert str(Mismatch(TOKENS_IN, "13", "12")) == text


def test_the_contract_checks_the_link_not_the_token_counts() -> None:
    assert {MINER, REQUEST_HASH, MODEL_ID, ATTESTATION_HASH} == CONTRACT_FIELDS


def test_evidence_names_the_contracts_mismatches_with_its_reason() -> None:
    """settle.evidence keeps the contract's subset: the link fields, joined with "; ", under
    the contract's reason; the token counts, which open_dispute does not compare, are left
    out of the detail."""
    receipt = receipt_for(miner=OTHER_ADDRESS, model_id=b"\x22" * 32, tokens_out=4)
    with pytest.raises(EvidenceRejected) as raised:
        evidence(receipt).check(DOMAIN)
    assert raised.value.reason == NOT_THIS_ATTESTATION
    assert raised.value.detail == (
        f"miner {OTHER_ADDRESS} in the receipt, {MINER_ADDRESS} in the attestation;"
        f" model id 0x{'22' * 32} in the receipt, 0x{'11' * 32} in the attestation"
    )


def test_token_counts_alone_do_not_stop_a_dispute_but_fail_trace() -> None:
    """A receipt billing other token counts than attested is still the attestation's to the
    contract (it disputes the attestation), but `infergrid trace` flags it."""
    from infergrid.receipt_proof import check_receipt

    case = evidence(receipt_for(tokens_in=13))
    assert case.check(DOMAIN) == MINER_SIGNER.address
    body = {
        "receipt": {**case.receipt.to_json(), "signature": "0x" + case.receipt_signature.hex()},
        "attestation": {
            **case.attestation.to_json(),
            "signature": "0x" + case.attestation_signature.hex(),
        },
    }
    _, checks = check_receipt(body, DOMAIN, miner_signer=MINER_SIGNER.address)
    assert [check.name for check in checks if not check.ok] == ["receipt matches the attestation"]
