"""settle.evidence: a gateway's receipt answer parsed into dispute evidence, and checked off-chain
exactly as DisputeManager.open_dispute checks it.

The evidence is built the way a gateway builds it (app/receipts.py StoredReceipt.to_json, with
the extra keys its route adds), so the parser is tested against the real wire format. Every
piece of bad evidence is also sent to a real DisputeManager on the embedded EVM: the contract
must revert with exactly the reason `check` names, so a verifier that trusts `check` never
pays gas and a deposit for a dispute that reverts, nor skips one that would open."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from eth_utils import keccak, to_checksum_address

from infergrid.app.receipts import StoredReceipt
from infergrid.protocol.eip712 import SECP256K1_N, Domain, Signer
from infergrid.protocol.messages import Attestation, Receipt, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.settle.chain import Chain, ContractRevert
from infergrid.settle.disputes import DisputeManager, deploy_disputes
from infergrid.settle.escrow import deploy_escrow
from infergrid.settle.evidence import (
    MINER_IS_PAYER,
    NOT_SIGNED_BY_MINER,
    NOT_THIS_ATTESTATION,
    RECEIPT_NOT_SIGNED,
    SIGNATURE_BAD_V,
    SIGNATURE_INVALID,
    SIGNATURE_MALLEABLE,
    ZERO_PAYER,
    DisputeEvidence,
    EvidenceRejected,
)
from infergrid.settle.registry import Registry, deploy_registry

# Indexes into the dev keys (tests/settle/conftest.py).
ADMIN, MINER, PAYER, CHALLENGER = 0, 1, 2, 3
# The miner's registered signer, apart from its owner key as operators run it; a stranger's
# key; the gateway's signer and one that is not the receipt's gateway.
SIGNER_KEY = "0x" + "42" * 32
SIGNER = Signer(SIGNER_KEY).address
STRANGER_KEY = "0x" + "43" * 32
GATEWAY = Signer("0x" + "21" * 32)
ROGUE_GATEWAY = Signer("0x" + "23" * 32)
ZERO_ADDRESS = "0x" + "00" * 20

OFFER = ModelOffer("SmolLM2-135M-Instruct", "0x" + "11" * 32, 10**12, 2 * 10**12)
# A domain for the pure tests; the contract tests use their deployment's.
DOMAIN = Domain(1337, "0x" + "ab" * 20)
OTHER_DOMAIN = Domain(1338, "0x" + "ab" * 20)


def was_signer(miner_address: str) -> Callable[[str, str], bool]:
    """Registry.was_signer as the registry answers it for a miner whose key is SIGNER."""
    return lambda miner, key: miner == miner_address and key == SIGNER


def high_s_twin(sig: bytes) -> bytes:
    """The other valid signature of the same digest: s -> n - s, with v flipped."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


def serve(
    domain: Domain,
    miner: str,
    payer: str,
    *,
    request: bytes = b"request-1",
    receipt_changes: dict[str, Any] | None = None,
    attestation_key: str = SIGNER_KEY,
    gateway_signer: Signer = GATEWAY,
    receipt_domain: Domain | None = None,
) -> DisputeEvidence:
    """One served request as the gateway stores it: the miner's attestation signed with
    `attestation_key`, the gateway's receipt for it (with `receipt_changes` applied before it
    is signed) signed by `gateway_signer` in `receipt_domain` (default: `domain`)."""
    attestation = Attestation(
        request_hash=keccak(request),
        response_hash=keccak(b"response of " + request),
        model_id=OFFER.model_id,
        miner=miner,
        tokens_in=12,
        tokens_out=5,
    )
    receipt = Receipt(
        request_hash=attestation.request_hash,
        payer=payer,
        miner=miner,
        gateway=GATEWAY.address,
        model_id=attestation.model_id,
        tokens_in=12,
        tokens_out=5,
        value=12 * OFFER.price_in_wei + 5 * OFFER.price_out_wei,
        timestamp=1_700_000_000,
        attestation_hash=attestation.struct_hash(),
    )
    receipt = replace(receipt, **(receipt_changes or {}))
    return DisputeEvidence(
        attestation=attestation,
        attestation_signature=sign_message(domain, attestation, Signer(attestation_key)),
        receipt=receipt,
        receipt_signature=sign_message(receipt_domain or domain, receipt, gateway_signer),
    )


def gateway_answer(evidence: DisputeEvidence, request_id: str = "req-1") -> dict[str, Any]:
    """What GET /v1/receipts/{request_id} returns for it, as decoded JSON."""
    stored = StoredReceipt(
        seq=1,
        request_id=request_id,
        receipt=evidence.receipt,
        signature=evidence.receipt_signature,
        attestation=evidence.attestation,
        attestation_signature=evidence.attestation_signature,
        anchor_index=None,
    )
    # The route adds the anchor proof and the trace; the parser ignores both.
    return json.loads(json.dumps({**stored.to_json(), "anchor": None, "trace": {"route": "x"}}))


# --- bad evidence: each attack, and the reason the contract reverts with -----------------------


@dataclass(frozen=True)
class Bad:
    """One piece of bad evidence: `make(domain, miner, payer, request)` builds it."""

    make: Callable[[Domain, str, str, bytes], DisputeEvidence]
    reason: str


def _tampered(field: str, change: Callable[[bytes], bytes]) -> Callable[..., DisputeEvidence]:
    def make(domain: Domain, miner: str, payer: str, request: bytes) -> DisputeEvidence:
        good = serve(domain, miner, payer, request=request)
        return replace(good, **{field: change(getattr(good, field))})

    return make


def _other_attestation(domain: Domain, miner: str, payer: str, request: bytes) -> DisputeEvidence:
    # The receipt of another response to the same request (its attestation hash differs).
    other = Attestation(
        request_hash=keccak(request),
        response_hash=keccak(b"another response"),
        model_id=OFFER.model_id,
        miner=miner,
        tokens_in=12,
        tokens_out=5,
    )
    return serve(
        domain,
        miner,
        payer,
        request=request,
        receipt_changes={"attestation_hash": other.struct_hash()},
    )


BAD: dict[str, Bad] = {
    # Anyone can sign an attestation naming a miner: only a key of the miner's counts.
    "attestation_forged_by_a_stranger": Bad(
        lambda d, m, p, r: serve(d, m, p, request=r, attestation_key=STRANGER_KEY),
        NOT_SIGNED_BY_MINER,
    ),
    "attestation_signature_high_s_twin": Bad(
        _tampered("attestation_signature", high_s_twin), SIGNATURE_MALLEABLE
    ),
    "attestation_signature_bad_v": Bad(
        _tampered("attestation_signature", lambda s: s[:64] + b"\x01"), SIGNATURE_BAD_V
    ),
    "attestation_signature_zero_r": Bad(
        _tampered("attestation_signature", lambda s: b"\x00" * 32 + s[32:]), SIGNATURE_INVALID
    ),
    "attestation_signature_r_off_the_curve_order": Bad(
        _tampered(
            "attestation_signature", lambda s: (SECP256K1_N + 1).to_bytes(32, "big") + s[32:]
        ),
        SIGNATURE_INVALID,
    ),
    # A challenger-made receipt naming the honest gateway, signed with its own key.
    "receipt_forged_by_another_gateway": Bad(
        lambda d, m, p, r: serve(d, m, p, request=r, gateway_signer=ROGUE_GATEWAY),
        RECEIPT_NOT_SIGNED,
    ),
    # A receipt signed by the gateway on another deployment or chain.
    "receipt_replayed_from_another_domain": Bad(
        lambda d, m, p, r: serve(d, m, p, request=r, receipt_domain=OTHER_DOMAIN),
        RECEIPT_NOT_SIGNED,
    ),
    "receipt_signature_high_s_twin": Bad(
        _tampered("receipt_signature", high_s_twin), SIGNATURE_MALLEABLE
    ),
    # A real receipt of one request, paired with the attestation of another.
    "receipt_of_another_miner": Bad(
        lambda d, m, p, r: serve(d, m, p, request=r, receipt_changes={"miner": "0x" + "77" * 20}),
        NOT_THIS_ATTESTATION,
    ),
    "receipt_of_another_request": Bad(
        lambda d, m, p, r: serve(
            d, m, p, request=r, receipt_changes={"request_hash": keccak(b"another request")}
        ),
        NOT_THIS_ATTESTATION,
    ),
    "receipt_of_another_model": Bad(
        lambda d, m, p, r: serve(d, m, p, request=r, receipt_changes={"model_id": b"\x22" * 32}),
        NOT_THIS_ATTESTATION,
    ),
    "receipt_of_another_response": Bad(_other_attestation, NOT_THIS_ATTESTATION),
    "receipt_with_the_zero_payer": Bad(
        lambda d, m, p, r: serve(d, m, ZERO_ADDRESS, request=r), ZERO_PAYER
    ),
    # The miner refunded with its own slashed stake.
    "receipt_naming_the_miner_as_payer": Bad(
        lambda d, m, p, r: serve(d, m, m, request=r), MINER_IS_PAYER
    ),
}

PURE_MINER = to_checksum_address("0x" + "aa" * 20)
PURE_PAYER = to_checksum_address("0x" + "bb" * 20)


# --- pure: parsing ------------------------------------------------------------------------------


def test_a_gateway_receipt_answer_parses_into_the_evidence_it_carries() -> None:
    evidence = serve(DOMAIN, PURE_MINER, PURE_PAYER)
    answer = gateway_answer(evidence)
    assert DisputeEvidence.from_receipt_json(answer) == evidence
    # As the answer's text, str or bytes, too.
    assert DisputeEvidence.from_receipt_json(json.dumps(answer)) == evidence
    assert DisputeEvidence.from_receipt_json(json.dumps(answer).encode()) == evidence


def test_good_evidence_passes_and_names_the_attestation_signer() -> None:
    evidence = DisputeEvidence.from_receipt_json(
        gateway_answer(serve(DOMAIN, PURE_MINER, PURE_PAYER))
    )
    assert evidence.check(DOMAIN) == SIGNER
    assert evidence.check(DOMAIN, was_signer=was_signer(PURE_MINER)) == SIGNER


def _without(data: dict[str, Any], *path: str) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def _with(data: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


GOOD_ANSWER = gateway_answer(serve(DOMAIN, PURE_MINER, PURE_PAYER))
MALFORMED: dict[str, tuple[Any, str]] = {
    "not_json": ("{not json", "not JSON"),
    "not_utf8": (b"\xff\xfe{", "not JSON"),
    "a_json_array": ("[]", "not a JSON object"),
    "a_json_string": (json.dumps("receipt"), "not a JSON object"),
    "no_receipt": (_without(GOOD_ANSWER, "receipt"), "no receipt object"),
    "receipt_not_an_object": (_with(GOOD_ANSWER, "0x12", "receipt"), "no receipt object"),
    "no_attestation": (_without(GOOD_ANSWER, "attestation"), "no attestation object"),
    "receipt_unsigned": (_without(GOOD_ANSWER, "receipt", "signature"), "receipt is not signed"),
    "attestation_unsigned": (
        _without(GOOD_ANSWER, "attestation", "signature"),
        "attestation is not signed",
    ),
    "signature_not_a_string": (
        _with(GOOD_ANSWER, 12, "receipt", "signature"),
        "receipt signature must be a 0x-hex string",
    ),
    "signature_not_hex": (
        _with(GOOD_ANSWER, "0x" + "zz" * 65, "attestation", "signature"),
        "attestation signature is not hex",
    ),
    "signature_too_short": (
        _with(GOOD_ANSWER, "0x" + "11" * 64, "receipt", "signature"),
        "receipt signature must be 65 bytes, got 64",
    ),
    "receipt_field_missing": (
        _without(GOOD_ANSWER, "receipt", "value"),
        "malformed receipt: missing field 'value'",
    ),
    "receipt_value_negative": (
        _with(GOOD_ANSWER, -1, "receipt", "value"),
        "malformed receipt: value must be a non-negative integer",
    ),
    "receipt_value_a_decimal_string": (
        _with(GOOD_ANSWER, "1000", "receipt", "value"),
        "malformed receipt: value must be a non-negative integer",
    ),
    "receipt_payer_not_an_address": (
        _with(GOOD_ANSWER, "0x1234", "receipt", "payer"),
        "malformed receipt: payer '0x1234' is not an address",
    ),
    "attestation_request_hash_short": (
        _with(GOOD_ANSWER, "0x" + "11" * 31, "attestation", "requestHash"),
        "malformed attestation: requestHash must be 32 bytes, got 31",
    ),
    "attestation_tokens_a_bool": (
        _with(GOOD_ANSWER, True, "attestation", "tokensOut"),
        "malformed attestation: tokensOut must be a non-negative integer",
    ),
    "attestation_model_id_null": (
        _with(GOOD_ANSWER, None, "attestation", "modelId"),
        "malformed attestation: modelId None is not hex",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_receipt_answers_are_refused_naming_what_is_wrong(case: str) -> None:
    data, message = MALFORMED[case]
    with pytest.raises(ValueError) as raised:
        DisputeEvidence.from_receipt_json(data)
    assert message in str(raised.value)


def test_evidence_built_by_hand_must_be_messages_and_65_byte_signatures() -> None:
    good = serve(DOMAIN, PURE_MINER, PURE_PAYER)
    with pytest.raises(ValueError, match=r"attestation must be a messages\.Attestation"):
        replace(good, attestation=good.attestation.to_json())
    with pytest.raises(ValueError, match=r"receipt must be a messages\.Receipt"):
        replace(good, receipt=None)
    with pytest.raises(ValueError, match="receipt_signature must be 65 bytes"):
        replace(good, receipt_signature=good.receipt_signature[:64])
    with pytest.raises(ValueError, match="attestation_signature must be 65 bytes"):
        replace(good, attestation_signature="0x" + good.attestation_signature.hex())


# --- pure: checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", BAD, ids=list(BAD))
def test_bad_evidence_is_rejected_with_the_contracts_reason(attack: str) -> None:
    bad = BAD[attack]
    evidence = DisputeEvidence.from_receipt_json(
        gateway_answer(bad.make(DOMAIN, PURE_MINER, PURE_PAYER, b"request-1"))
    )
    with pytest.raises(EvidenceRejected) as raised:
        evidence.check(DOMAIN, was_signer=was_signer(PURE_MINER))
    assert raised.value.reason == bad.reason
    assert isinstance(raised.value, ValueError)
    assert str(raised.value).startswith(bad.reason + ": ")


def test_without_the_registry_a_strangers_attestation_is_only_attributed() -> None:
    """Off-chain without `was_signer`, check cannot know the miner's keys: it names who signed,
    and the caller compares it with the registry."""
    evidence = serve(DOMAIN, PURE_MINER, PURE_PAYER, attestation_key=STRANGER_KEY)
    assert evidence.check(DOMAIN) == Signer(STRANGER_KEY).address


def test_evidence_checked_in_another_domain_is_rejected() -> None:
    evidence = serve(DOMAIN, PURE_MINER, PURE_PAYER)
    with pytest.raises(EvidenceRejected) as raised:
        evidence.check(OTHER_DOMAIN, was_signer=was_signer(PURE_MINER))
    assert raised.value.reason == NOT_SIGNED_BY_MINER
    # Without the registry the attestation recovers to some key, and the receipt's is caught.
    with pytest.raises(EvidenceRejected) as raised:
        evidence.check(OTHER_DOMAIN)
    assert raised.value.reason == RECEIPT_NOT_SIGNED


def test_every_mismatch_between_receipt_and_attestation_is_named() -> None:
    evidence = serve(
        DOMAIN,
        PURE_MINER,
        PURE_PAYER,
        receipt_changes={"miner": "0x" + "77" * 20, "model_id": b"\x22" * 32},
    )
    with pytest.raises(EvidenceRejected) as raised:
        evidence.check(DOMAIN)
    assert raised.value.reason == NOT_THIS_ATTESTATION
    assert "miner 0x7777" in raised.value.detail and "model id 0x2222" in raised.value.detail
    assert "request hash" not in raised.value.detail


def test_infergrid_trace_flags_a_receipt_for_another_model_as_the_contract_would() -> None:
    """`infergrid trace` (receipt_proof.check_receipt) and a dispute agree on what makes a
    receipt the attestation's: a receipt naming another model than the one attested fails
    "receipt matches the attestation", although both signatures hold."""
    from infergrid.receipt_proof import check_receipt

    good = gateway_answer(serve(DOMAIN, PURE_MINER, PURE_PAYER))
    _, checks = check_receipt(good, DOMAIN)
    assert all(check.ok for check in checks), checks
    other_model = serve(DOMAIN, PURE_MINER, PURE_PAYER, receipt_changes={"model_id": b"\x22" * 32})
    _, checks = check_receipt(gateway_answer(other_model), DOMAIN)
    failed = [check.name for check in checks if not check.ok]
    assert failed == ["receipt matches the attestation"], checks


# --- against the contract -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dm(chain: Chain, keys: list[str], addrs: list[str]) -> DisputeManager:
    """A DisputeManager that is its registry's slasher, with the miner registered (signer
    SIGNER): the contract's checks before the evidence's pass, so its revert names the
    evidence's fault."""
    registry = Registry(
        chain,
        deploy_registry(
            chain,
            keys[ADMIN],
            {Role.MINER: WEI_PER_BTT, Role.VERIFIER: WEI_PER_BTT, Role.GATEWAY: WEI_PER_BTT},
            3600,
        ),
    )
    escrow = deploy_escrow(
        chain,
        keys[ADMIN],
        treasury=addrs[ADMIN],
        verifier_pool=addrs[ADMIN],
        protocol_fee_ppm=20_000,
        verifier_pool_ppm=30_000,
        thaw_period_s=300,
        fee_delay_s=600,
    )
    address = deploy_disputes(
        chain,
        keys[ADMIN],
        registry=registry.address,
        escrow=escrow,
        treasury=addrs[ADMIN],
        dispute_deposit_wei=WEI_PER_BTT // 100,
        voting_period_s=600,
        max_slash_ppm=500_000,
        challenger_share_ppm=100_000,
        equivocation_slash_ppm=500_000,
        min_quorum_stake_wei=WEI_PER_BTT,
        min_verifier_age_s=60,
        wrong_vote_slash_ppm=50_000,
        no_quorum_forfeit_ppm=250_000,
        max_open_per_miner=4,
        max_open_per_challenger=4,
    )
    registry.set_slasher(keys[ADMIN], address)
    registry.register(keys[MINER], Role.MINER, "http://miner", SIGNER, [OFFER], WEI_PER_BTT)
    return DisputeManager(chain, address)


def _open(dm: DisputeManager, key: str, evidence: DisputeEvidence, request: bytes) -> int:
    return dm.open_dispute(
        key,
        evidence.attestation,
        evidence.attestation_signature,
        evidence.receipt,
        evidence.receipt_signature,
        keccak(b"audit of " + request),
    )


@pytest.mark.parametrize("attack", BAD, ids=list(BAD))
def test_the_contract_reverts_with_the_reason_check_names(
    attack: str, dm: DisputeManager, keys: list[str], addrs: list[str]
) -> None:
    request = attack.encode()
    bad = BAD[attack].make(dm.domain(), addrs[MINER], addrs[PAYER], request)
    registry = Registry(dm.chain, dm.registry())
    with pytest.raises(EvidenceRejected) as predicted:
        bad.check(dm.domain(), was_signer=registry.was_signer)
    with pytest.raises(ContractRevert) as reverted:
        _open(dm, keys[CHALLENGER], bad, request)
    assert reverted.value.reason == predicted.value.reason == BAD[attack].reason


def test_evidence_that_passes_check_opens_a_dispute_on_the_contract(
    dm: DisputeManager, keys: list[str], addrs: list[str]
) -> None:
    request = b"a request served and disputed"
    evidence = DisputeEvidence.from_receipt_json(
        gateway_answer(serve(dm.domain(), addrs[MINER], addrs[PAYER], request=request))
    )
    registry = Registry(dm.chain, dm.registry())
    assert evidence.check(dm.domain(), was_signer=registry.was_signer) == SIGNER
    dispute_id = _open(dm, keys[CHALLENGER], evidence, request)
    record = dm.dispute(dispute_id)
    assert (record.miner, record.payer, record.gateway) == (
        addrs[MINER],
        addrs[PAYER],
        GATEWAY.address,
    )
    assert record.refund_wei == evidence.receipt.value
    assert record.request_hash == evidence.attestation.request_hash
