"""The verifier's HTTP API: audit jobs from gateways, evidence for anyone, and /health.

`POST /v1/audits`, body = an AuditJob's JSON (protocol.audits). Refusals, in this order, each
in OpenAI's error shape (protocol.openai_types.error_body):

- 413 `too_large` / 408 `request_timeout`: the body is larger than `max_body_bytes` or slower
  than `body_timeout_s` (protocol.json_body.read_body, as the miner and the gateway refuse);
- 400 `invalid_json` (or `invalid_unicode`): not strict JSON (protocol.json_body);
- 400 `invalid_audit_job`: not an AuditJob (AuditJob.from_json's reason), an attestation or
  receipt that does not parse, or a receipt that is not this attestation's;
- 403 `missing_receipt`: no receipt; only paid, receipted responses are audited for gateways
  (a canary's job the verifier builds itself);
- 403 `bad_receipt_signature`: the receipt's signature does not recover to `receipt.gateway`;
- 403 `unknown_gateway`: `receipt.gateway` is not the signer of a registered, active gateway;
- 429 `queue_full`: `max_queue` audits are already waiting for the worker;
- 422 `cannot_audit`: this verifier does not hold the job's model (verify.recompute.CannotAudit).

200: `{"verdict": <SignedVerdict JSON>, "report": <AuditReport JSON>}`, the verdict signed by the
verifier's key in the escrow's EIP-712 domain (protocol.verdicts.sign_verdict). Audits run one
at a time on one worker thread (torch uses every core for one forward pass; two at once only
thrash). Every failed job's evidence bundle is kept on disk (verify.evidence_store) and handed
to `on_failed` (the dispute duties), off the request's path.

`GET /v1/evidence/0x<64 hex>`: the exact evidence bytes (application/json) whose keccak is the
hash; 404 `evidence_not_found` if this verifier has none, 400 `invalid_hash` for a malformed one.

`GET /health`: `{"status": "ok", "address", "models": [{"name", "model_id"}], "audits",
"failed", "queued", "max_queue", "evidence"}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infergrid.http_serving import ERROR_HANDLERS, ServerThread, serve
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, InvalidSignature, Signer, signature_bytes
from infergrid.protocol.json_body import decode_request_json, read_body
from infergrid.protocol.messages import SIGNATURE_KEY, Attestation, Receipt, recover_signer
from infergrid.protocol.nodes import ModelOffer
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.verdicts import SignedVerdict, sign_verdict
from infergrid.verify.evidence_store import EvidenceStore, parse_hash
from infergrid.verify.receipt import CONTRACT_FIELDS, receipt_mismatches

if TYPE_CHECKING:
    from infergrid.verify.audit import AuditReport

logger = logging.getLogger(__name__)

AuditFn = Callable[[AuditJob], "AuditReport"]
# Jobs carry the request body (at most protocol.audits.MAX_JOB_BODY_BYTES, base64) and token
# id lists; the gateway sends nothing larger.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_QUEUE = 16


class JobRefused(APIError):
    """An audit job this verifier will not audit (the HTTP refusal it answers with)."""


def _refuse(status: int, code: str, message: str) -> JobRefused:
    return JobRefused(status, message, code=code)


def parse_signed(job: AuditJob) -> tuple[Attestation, Receipt | None, bytes | None]:
    """The job's attestation and (if any) receipt as messages, and the receipt's signature;
    JobRefused 400 invalid_audit_job when either does not parse."""
    try:
        attestation = Attestation.from_json(job.attestation)
    except (TypeError, ValueError) as exc:
        message = f"audit job: malformed attestation: {exc}"
        raise _refuse(400, "invalid_audit_job", message) from None
    if job.receipt is None:
        return attestation, None, None
    try:
        receipt = Receipt.from_json(job.receipt)
        signature = signature_bytes(job.receipt.get(SIGNATURE_KEY), "receipt signature")
    except (TypeError, ValueError) as exc:
        raise _refuse(400, "invalid_audit_job", f"audit job: malformed receipt: {exc}") from None
    return attestation, receipt, signature


def check_receipt(job: AuditJob, domain: Domain, is_gateway: Callable[[str], bool]) -> Receipt:
    """Why a gateway's job must be refused (JobRefused), else its receipt: a receipt must be
    there, signed by the gateway it names, that gateway registered, and be the receipt of the
    job's attestation (as the DisputeManager requires of a dispute's evidence)."""
    attestation, receipt, signature = parse_signed(job)
    if receipt is None or signature is None:
        raise _refuse(
            403,
            "missing_receipt",
            "The audit job carries no receipt; a verifier audits receipted responses only.",
        )
    try:
        signer = recover_signer(domain, receipt, signature)
    except InvalidSignature as exc:
        signer = f"nobody ({exc})"
    if signer != receipt.gateway:
        raise _refuse(
            403,
            "bad_receipt_signature",
            f"The receipt is signed by {signer}, not by the gateway it names ({receipt.gateway}).",
        )
    if not is_gateway(receipt.gateway):
        raise _refuse(
            403,
            "unknown_gateway",
            f"The receipt's gateway {receipt.gateway} is not a registered gateway.",
        )
    mismatches = [
        str(m) for m in receipt_mismatches(receipt, attestation) if m.field in CONTRACT_FIELDS
    ]
    if mismatches:
        raise _refuse(
            400,
            "invalid_audit_job",
            "audit job: the receipt is not for this attestation: " + "; ".join(mismatches),
        )
    return receipt


@dataclass
class AuditOutcome:
    verdict: SignedVerdict
    report: AuditReport

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict.to_json(), "report": self.report.to_json()}


@dataclass
class VerifierService:
    """What a verifier does with a job, whoever hands it over (a gateway over HTTP, a canary,
    a dispute to vote on): audit it on the one worker thread, sign the verdict, keep the
    evidence of a failure and report it.

    `audit` is the model pass (node.EngineAuditor over verify.recompute.audit_job in a real
    node); it raises CannotAudit for a model this verifier does not hold. `on_failed(job,
    report)` is called for every failed audit, from the worker thread: it must not block
    (the duties queue the job and confirm it on their own thread).
    """

    domain: Domain
    signer: Signer
    audit: AuditFn
    is_gateway: Callable[[str], bool]
    evidence: EvidenceStore
    models: Sequence[ModelOffer] = ()
    on_failed: Callable[[AuditJob, AuditReport], None] | None = None
    log: Callable[[str], None] = logger.info
    clock: Callable[[], float] = time.time
    audits: int = 0
    failed: int = 0
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
    )

    @property
    def address(self) -> str:
        return self.signer.address

    def _run(self, job: AuditJob, *, report_failure: bool) -> AuditOutcome:
        # On the worker thread.
        report = self.audit(job)  # CannotAudit first: nothing to sign
        from infergrid.verify.verdict import make_verdict

        verdict = make_verdict(job, report, verifier=self.address, timestamp=int(self.clock()))
        signed = sign_verdict(self.domain, verdict, self.signer)
        self.audits += 1
        if not report.passed:
            self.failed += 1
            digest = self.evidence.put(job)
            self.log(
                f"audit FAILED: request {job.request_id} miner {job.miner}: {report.reason}"
                f" (evidence 0x{digest.hex()})"
            )
            if report_failure and self.on_failed is not None:
                try:
                    self.on_failed(job, report)
                except Exception:  # the duties' problem; the verdict still goes out
                    logger.exception("reporting a failed audit")
        return AuditOutcome(signed, report)

    def audit_now(self, job: AuditJob, *, report_failure: bool = True) -> AuditOutcome:
        """Audit `job` on the worker thread and wait for it (from any thread but the worker
        itself); CannotAudit and the audit's other errors propagate."""
        return self.executor.submit(self._run, job, report_failure=report_failure).result()

    def reaudit(self, job: AuditJob) -> AuditReport:
        """Only the model pass, on the worker thread (a confirmation or a vote's re-audit:
        no verdict, no evidence kept, nothing reported); CannotAudit propagates."""
        return self.executor.submit(self.audit, job).result()

    async def audit_async(self, job: AuditJob) -> AuditOutcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_reporting, job)

    def _run_reporting(self, job: AuditJob) -> AuditOutcome:
        return self._run(job, report_failure=True)

    def health(self, queued: int, max_queue: int) -> dict[str, Any]:
        return {
            "status": "ok",
            "address": self.address,
            "models": [{"name": m.name, "model_id": m.model_id} for m in self.models],
            "audits": self.audits,
            "failed": self.failed,
            "queued": queued,
            "max_queue": max_queue,
            "evidence": len(self.evidence),
        }

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _ServerState:
    service: VerifierService
    max_queue: int
    max_body_bytes: int
    body_timeout_s: float
    queued: int = 0  # audits accepted and not finished (waiting or running)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def post_audit(request: Request) -> Response:
    from infergrid.verify.recompute import CannotAudit

    state: _ServerState = request.app.state.verifier
    service = state.service
    try:
        raw = await read_body(
            request.stream(), max_bytes=state.max_body_bytes, timeout_s=state.body_timeout_s
        )
        data = decode_request_json(raw)
        try:
            job = AuditJob.from_json(data)
        except ValueError as exc:
            raise _refuse(400, "invalid_audit_job", str(exc)) from None
        check_receipt(job, service.domain, service.is_gateway)
        if state.queued >= state.max_queue:
            raise APIError(
                429,
                f"This verifier has {state.queued} audits queued (at most {state.max_queue});"
                " try another verifier or later.",
                type="rate_limit_error",
                code="queue_full",
                headers={"retry-after": "1"},
            )
    except APIError as exc:
        return _error(exc)
    state.queued += 1
    try:
        outcome = await service.audit_async(job)
    except CannotAudit as exc:
        return _error(APIError(422, f"Cannot audit this job: {exc}", code="cannot_audit"))
    except Exception as exc:
        logger.exception("audit of %s failed", job.request_id)
        return _error(
            APIError(500, f"The audit failed: {exc}", type="server_error", code="audit_error")
        )
    finally:
        state.queued -= 1
    return JSONResponse(outcome.to_json())


async def get_evidence(request: Request) -> Response:
    state: _ServerState = request.app.state.verifier
    text = request.path_params["digest"]
    digest = parse_hash(text)
    if digest is None:
        return _error(
            APIError(400, f"{text!r} is not an evidence hash (0x and 64 hex)", code="invalid_hash")
        )
    bundle = state.service.evidence.get(digest)
    if bundle is None:
        return _error(
            APIError(
                404,
                f"No evidence bundle 0x{digest.hex()} here.",
                type="not_found_error",
                code="evidence_not_found",
            )
        )
    return Response(bundle, media_type="application/json")


async def health(request: Request) -> Response:
    state: _ServerState = request.app.state.verifier
    return JSONResponse(state.service.health(state.queued, state.max_queue))


def create_verifier_app(
    service: VerifierService,
    *,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> Starlette:
    """The verifier's ASGI app over `service`; `app.state.verifier` holds its state."""
    if max_queue < 1:
        raise ValueError("max_queue must be >= 1")
    state = _ServerState(service, max_queue, max_body_bytes, body_timeout_s)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/audits", post_audit, methods=["POST"]),
            Route("/v1/evidence/{digest}", get_evidence, methods=["GET"]),
        ],
        exception_handlers=ERROR_HANDLERS,
    )
    app.state.verifier = state
    return app


# -- running it ------------------------------------------------------------------------------


def run_verifier_server(
    app: Starlette, host: str = "127.0.0.1", port: int = 8200, *, log_level: str = "warning"
) -> None:
    """Serve until interrupted (uvicorn with uvloop and httptools)."""
    serve(app, host, port, log_level=log_level)


class VerifierServerThread(ServerThread):
    """The verifier server on a background thread (http_serving.ServerThread), for tests and the
    devnet."""

    what = "verifier server"
