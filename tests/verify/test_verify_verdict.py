"""verify.verdict: the verdict a verifier signs for a report, and who may be trusted."""

from __future__ import annotations

import dataclasses
import math

from audit_helpers import MINER, make_job
from eth_utils import keccak

from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import Attestation
from infergrid.protocol.verdicts import MAX_REASON_CHARS, SignedVerdict, sign_verdict
from infergrid.verify.audit import Finding, make_report
from infergrid.verify.verdict import check_verdict, make_verdict

DOMAIN = Domain(1337, "0x" + "e5" * 20)
VERIFIER = Signer("0x" + "22" * 32)
STRANGER = Signer("0x" + "33" * 32)


def _registered(address: str) -> bool:
    return address == VERIFIER.address


def test_a_passed_report_becomes_a_passing_verdict() -> None:
    job = make_job()
    verdict = make_verdict(
        job,
        make_report([], worst_margin=0.25, worst_logprob_error=1.5e-6, steps=3),
        verifier=VERIFIER.address,
        timestamp=1_700_000_000,
    )
    attestation = Attestation.from_json(job.attestation)
    assert verdict.passed and verdict.reason == ""
    assert verdict.request_hash == attestation.request_hash
    assert verdict.attestation_hash == attestation.struct_hash()
    assert verdict.miner == MINER and verdict.verifier == VERIFIER.address
    assert verdict.worst_margin_deficit == 0  # every token won its step
    assert verdict.worst_logprob_error == 2  # millionths, rounded up
    assert verdict.evidence_hash == job.evidence_hash()
    assert verdict.timestamp == 1_700_000_000


def test_a_failed_report_carries_its_deficit_and_reason() -> None:
    report = make_report(
        [Finding("sampler", "sampler: step 4: the emitted token loses its step by 2.5 logits")],
        worst_margin=-2.5,
        worst_logprob_error=0.75,
    )
    verdict = make_verdict(make_job(), report, verifier=VERIFIER.address, timestamp=1)
    assert not verdict.passed
    assert verdict.worst_margin_deficit == 2_500_000
    assert verdict.worst_logprob_error == 750_000
    assert verdict.reason_hash == keccak(report.reason.encode())


def test_a_token_outside_the_kept_set_is_the_largest_deficit_a_report_holds() -> None:
    report = make_report([Finding("sampler", "outside")], worst_margin=-math.inf)
    verdict = make_verdict(make_job(), report, verifier=VERIFIER.address, timestamp=1)
    assert verdict.worst_margin_deficit == 10**15  # MARGIN_CLAMP logits in millionths


def test_a_long_reason_is_cut_to_what_a_verdict_holds() -> None:
    report = make_report([Finding("prompt", "x" * 5000)])
    verdict = make_verdict(make_job(), report, verifier=VERIFIER.address, timestamp=1)
    assert len(verdict.reason) == MAX_REASON_CHARS and verdict.reason.endswith("…")


def _signed() -> SignedVerdict:
    verdict = make_verdict(make_job(), make_report([]), verifier=VERIFIER.address, timestamp=1)
    return sign_verdict(DOMAIN, verdict, VERIFIER)


def test_a_registered_verifiers_verdict_is_trusted() -> None:
    signed = _signed()
    assert check_verdict(DOMAIN, signed, is_verifier=_registered) is None
    request = signed.verdict.request_hash
    assert check_verdict(DOMAIN, signed, is_verifier=_registered, request_hash=request) is None


def test_a_verdict_signed_by_a_non_verifier_is_not_trusted() -> None:
    verdict = dataclasses.replace(_signed().verdict, verifier=STRANGER.address)
    signed = sign_verdict(DOMAIN, verdict, STRANGER)
    assert (
        check_verdict(DOMAIN, signed, is_verifier=_registered)
        == f"{STRANGER.address} is not a registered, active verifier"
    )


def test_a_verdict_signed_by_someone_else_than_it_names_is_not_trusted() -> None:
    signed = _signed()
    forged = SignedVerdict(
        signed.verdict, STRANGER.sign(DOMAIN.digest(signed.verdict.struct_hash()))
    )
    assert (
        check_verdict(DOMAIN, forged, is_verifier=_registered)
        == f"the verdict names verifier {VERIFIER.address} but is signed by {STRANGER.address}"
    )


def test_a_verdict_from_another_deployment_is_not_trusted() -> None:
    other = Domain(1337, "0x" + "e6" * 20)
    reason = check_verdict(other, _signed(), is_verifier=_registered)
    assert reason is not None and reason.startswith("the verdict names verifier")


def test_an_unrecoverable_signature_is_not_trusted() -> None:
    signed = SignedVerdict(_signed().verdict, b"\x00" * 64 + b"\x1b")
    reason = check_verdict(DOMAIN, signed, is_verifier=_registered)
    assert reason is not None and reason.startswith("the verdict's signature is invalid: ")


def test_a_verdict_about_another_request_is_not_trusted() -> None:
    other = b"\x01" * 32
    assert check_verdict(DOMAIN, _signed(), is_verifier=_registered, request_hash=other) == (
        f"the verdict is about request 0x{_signed().verdict.request_hash.hex()}, not 0x" + "01" * 32
    )
