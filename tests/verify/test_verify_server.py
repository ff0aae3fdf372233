"""The verifier's HTTP API (verify.server) as gateways and voters meet it: a real server on
127.0.0.1 over the real audit (verify.recompute.audit_job) of a tiny model, jobs answered by
a real attesting miner and receipted by a gateway registered on the embedded EVM.

An honest job passes and a substituted model's job fails, each with a verdict signed in the
escrow's domain that recovers to the verifier; a failed job's evidence is served as the exact
bytes whose keccak is its hash. Every refusal answers with its own status and code.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from eth_utils import keccak
from verify_helpers import (
    ADDRS,
    KEYS,
    OTHER,
    V1,
    Net,
    attesting_miner,
    deploy,
    get,
    post,
    served_job,
    substituted_engine,
)

from infergrid.compute.miner_server import MinerServerThread
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Signer
from infergrid.protocol.messages import Receipt, sign_message, signed_json
from infergrid.protocol.verdicts import SignedVerdict
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.verify.audit import AuditReport
from infergrid.verify.evidence_store import EvidenceStore
from infergrid.verify.node import EngineAuditor, is_gateway_signer, zero_price_offers
from infergrid.verify.server import (
    VerifierServerThread,
    VerifierService,
    create_verifier_app,
)


@pytest.fixture(scope="module")
def net(tiny: TransformersEngine) -> Net:
    return deploy(Chain.embedded(EmbeddedEVM(accounts=10)), tiny)


@pytest.fixture(scope="module")
def miner(tiny: TransformersEngine, net: Net) -> Iterator[MinerServerThread]:
    with attesting_miner(tiny, net.domain) as server:
        yield server


@pytest.fixture(scope="module")
def cheater(tiny: TransformersEngine, tiny1: TransformersEngine, net: Net) -> Iterator[Any]:
    """The same miner, now serving tiny:1's tokens under tiny's id."""
    with attesting_miner(substituted_engine(tiny, tiny1), net.domain) as server:
        yield server


@pytest.fixture(scope="module")
def honest_job(miner: MinerServerThread, net: Net, tiny: TransformersEngine) -> AuditJob:
    return served_job(miner, net, model=tiny.name, collect=False)


def service_for(net: Net, tmp_path: Path, audit: Any) -> VerifierService:
    return VerifierService(
        domain=net.domain,
        signer=Signer(KEYS[V1]),
        audit=audit,
        is_gateway=is_gateway_signer(net.registry),
        evidence=EvidenceStore(tmp_path / "evidence"),
    )


@pytest.fixture
def verifier(net: Net, tiny: TransformersEngine, tmp_path: Path) -> Iterator[VerifierServerThread]:
    service = service_for(net, tmp_path, EngineAuditor([tiny]))
    service.models = zero_price_offers([tiny])
    with VerifierServerThread(create_verifier_app(service)) as server:
        yield server
    service.close()


def audit(server: VerifierServerThread, job: AuditJob | dict[str, Any] | bytes) -> tuple[int, Any]:
    if isinstance(job, AuditJob):
        raw = json.dumps(job.to_json()).encode()
    elif isinstance(job, dict):
        raw = json.dumps(job).encode()
    else:
        raw = job
    status, _, body = post(server.url + "/v1/audits", raw)
    return status, json.loads(body)


def error_of(answer: dict[str, Any]) -> tuple[str, str]:
    return answer["error"]["code"], answer["error"]["message"]


# -- real audits ---------------------------------------------------------------------------


def test_an_honest_job_passes_with_a_verdict_signed_by_the_verifier(
    verifier: VerifierServerThread, honest_job: AuditJob, net: Net
) -> None:
    status, answer = audit(verifier, honest_job)
    assert status == 200, answer
    assert answer["report"]["passed"] is True and answer["report"]["reason"] == ""
    signed = SignedVerdict.from_json(answer["verdict"])
    assert signed.signer(net.domain) == ADDRS[V1] == signed.verdict.verifier
    assert signed.verdict.passed is True
    assert signed.verdict.miner == honest_job.miner
    assert signed.verdict.evidence_hash == honest_job.evidence_hash()
    # Passed jobs are not kept: evidence is for disputes.
    assert get(f"{verifier.url}/v1/evidence/0x{honest_job.evidence_hash().hex()}")[0] == 404
    health = json.loads(get(verifier.url + "/health")[2])
    assert (health["status"], health["address"], health["audits"], health["failed"]) == (
        "ok",
        ADDRS[V1],
        1,
        0,
    )


def test_a_substituted_model_fails_and_its_evidence_is_served_byte_exact(
    verifier: VerifierServerThread, cheater: MinerServerThread, net: Net, tiny: TransformersEngine
) -> None:
    job = served_job(cheater, net, model=tiny.name, collect=False, max_tokens=12)
    status, answer = audit(verifier, job)
    assert status == 200, answer
    report = answer["report"]
    assert report["passed"] is False and report["reason"]
    signed = SignedVerdict.from_json(answer["verdict"])
    assert signed.signer(net.domain) == ADDRS[V1]
    assert signed.verdict.passed is False
    assert signed.verdict.reason == report["reason"]
    digest = job.evidence_hash()
    assert signed.verdict.evidence_hash == digest
    status, headers, bundle = get(f"{verifier.url}/v1/evidence/0x{digest.hex()}")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert keccak(bundle) == digest
    assert bundle == job.evidence_bytes()
    assert AuditJob.from_json(json.loads(bundle)) == job


# -- refusals ------------------------------------------------------------------------------


def test_a_job_without_a_receipt_is_refused(
    verifier: VerifierServerThread, honest_job: AuditJob
) -> None:
    status, answer = audit(verifier, replace(honest_job, receipt=None))
    assert status == 403
    assert error_of(answer) == (
        "missing_receipt",
        "The audit job carries no receipt; a verifier audits receipted responses only.",
    )


def test_a_receipt_signed_by_another_key_is_refused(
    verifier: VerifierServerThread, honest_job: AuditJob, net: Net
) -> None:
    assert honest_job.receipt is not None
    receipt = Receipt.from_json(honest_job.receipt)
    forged = signed_json(receipt, sign_message(net.domain, receipt, Signer(KEYS[OTHER])))
    status, answer = audit(verifier, replace(honest_job, receipt=forged))
    assert status == 403
    assert error_of(answer) == (
        "bad_receipt_signature",
        f"The receipt is signed by {ADDRS[OTHER]}, not by the gateway it names"
        f" ({receipt.gateway}).",
    )


def test_a_receipt_of_an_unregistered_gateway_is_refused(
    verifier: VerifierServerThread, honest_job: AuditJob, net: Net
) -> None:
    assert honest_job.receipt is not None
    receipt = replace(Receipt.from_json(honest_job.receipt), gateway=ADDRS[OTHER])
    signed = signed_json(receipt, sign_message(net.domain, receipt, Signer(KEYS[OTHER])))
    status, answer = audit(verifier, replace(honest_job, receipt=signed))
    assert status == 403
    assert error_of(answer) == (
        "unknown_gateway",
        f"The receipt's gateway {ADDRS[OTHER]} is not a registered gateway.",
    )


def test_a_receipt_for_another_request_is_refused(
    verifier: VerifierServerThread, honest_job: AuditJob, net: Net
) -> None:
    assert honest_job.receipt is not None
    receipt = replace(Receipt.from_json(honest_job.receipt), request_hash=b"\x01" * 32)
    signed = signed_json(receipt, sign_message(net.domain, receipt, Signer(KEYS[1])))
    status, answer = audit(verifier, replace(honest_job, receipt=signed))
    assert status == 400
    code, message = error_of(answer)
    assert code == "invalid_audit_job"
    assert message.startswith("audit job: the receipt is not for this attestation: ")
    assert "request" in message


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda j: {k: v for k, v in j.items() if k != "usage"},
            "audit job: missing field 'usage'",
        ),
        (lambda j: {**j, "endpoint": "embeddings"}, "audit job: 'endpoint' must be one of"),
        (lambda j: {**j, "body": "%%%"}, "audit job: 'body' is not base64"),
        (lambda j: {**j, "output_token_ids": [1, -2]}, "audit job: output_token_ids[1] is not a"),
        (lambda j: {**j, "attestation": {"miner": "0x1"}}, "audit job: malformed attestation:"),
        (
            lambda j: {**j, "receipt": {**j["receipt"], "signature": "0x12"}},
            "audit job: malformed receipt:",
        ),
        (lambda j: [j], "audit job: expected a JSON object"),
    ],
    ids=["no-usage", "endpoint", "body", "token-id", "attestation", "receipt-signature", "list"],
)
def test_a_malformed_job_is_refused_naming_what_is_wrong(
    verifier: VerifierServerThread, honest_job: AuditJob, mutate: Any, message: str
) -> None:
    status, answer = audit(verifier, json.dumps(mutate(honest_job.to_json())).encode())
    assert status == 400
    code, text = error_of(answer)
    assert code == "invalid_audit_job"
    assert text.startswith(message), text


def test_a_body_that_is_not_json_is_refused(verifier: VerifierServerThread) -> None:
    status, answer = audit(verifier, b"{not json")
    assert status == 400 and answer["error"]["code"] == "invalid_json"


def test_a_body_over_the_limit_is_refused(
    net: Net, tiny: TransformersEngine, tmp_path: Path
) -> None:
    service = service_for(net, tmp_path, EngineAuditor([tiny]))
    app = create_verifier_app(service, max_body_bytes=1000)
    with VerifierServerThread(app) as server:
        status, _, body = post(server.url + "/v1/audits", b" " * 5000)
    service.close()
    assert status == 413
    assert error_of(json.loads(body)) == (
        "too_large",
        "The request body is larger than 1000 bytes.",
    )


def test_a_job_for_a_model_the_verifier_does_not_hold_is_refused(
    verifier: VerifierServerThread, net: Net, tiny1: TransformersEngine
) -> None:
    with attesting_miner(tiny1, net.domain) as other:
        job = served_job(other, net, model=tiny1.name, collect=False)
    status, answer = audit(verifier, job)
    assert status == 422
    code, message = error_of(answer)
    assert code == "cannot_audit"
    assert message.startswith(
        f"Cannot audit this job: this verifier does not audit model '{tiny1.model_id}'"
    )


class BlockingScriptedAuditor:
    """SCRIPTED STAND-IN for the model pass: holds every audit until released, then passes."""

    def __init__(self, report: AuditReport) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.report = report

    def __call__(self, job: AuditJob) -> AuditReport:
        self.started.set()
        self.release.wait(30)
        return self.report


def test_a_full_queue_answers_429(
    net: Net, honest_job: AuditJob, tmp_path: Path, tiny: TransformersEngine
) -> None:
    real = EngineAuditor([tiny])(honest_job)
    blocking = BlockingScriptedAuditor(real)
    service = service_for(net, tmp_path, blocking)
    app = create_verifier_app(service, max_queue=1)
    results: list[tuple[int, Any]] = []
    with VerifierServerThread(app) as server:
        first = threading.Thread(target=lambda: results.append(audit(server, honest_job)))
        first.start()
        assert blocking.started.wait(30)
        status, answer = audit(server, honest_job)
        blocking.release.set()
        first.join(30)
    service.close()
    assert status == 429
    assert error_of(answer) == (
        "queue_full",
        "This verifier has 1 audits queued (at most 1); try another verifier or later.",
    )
    assert results[0][0] == 200


def test_evidence_lookups_that_find_nothing(verifier: VerifierServerThread) -> None:
    status, _, body = get(f"{verifier.url}/v1/evidence/0x{'ab' * 32}")
    assert status == 404
    assert error_of(json.loads(body)) == (
        "evidence_not_found",
        f"No evidence bundle 0x{'ab' * 32} here.",
    )
    status, _, body = get(f"{verifier.url}/v1/evidence/0x1234")
    assert status == 400
    assert error_of(json.loads(body)) == (
        "invalid_hash",
        "'0x1234' is not an evidence hash (0x and 64 hex)",
    )


def test_the_evidence_store_keeps_bundles_across_instances(
    honest_job: AuditJob, tmp_path: Path
) -> None:
    digest = EvidenceStore(tmp_path / "ev").put(honest_job)
    again = EvidenceStore(tmp_path / "ev")
    assert digest in again and len(again) == 1
    assert again.get(digest) == honest_job.evidence_bytes()
    assert base64.b64decode(json.loads(again.get(digest) or b"")["body"]) == honest_job.body
