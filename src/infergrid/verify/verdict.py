"""Verdicts (pure): the one a verifier signs for an audit report, and whether to trust one.

`make_verdict` turns an AuditReport on a job into the protocol.verdicts.Verdict the verifier
signs: the job's attestation's request hash, struct hash and miner, the verifier, pass/fail,
the worst margin deficit (how far the emitted token lost at the worst step, 0 if every token
won) and the worst logprob error in millionths (protocol.verdicts.to_micro rounds up), the
report's reason, the job's evidence hash and the time.

`check_verdict` is what a gateway (or anyone) checks before acting on a signed verdict: it must
recover to the verifier it names, that verifier must be a registered, active verifier, and it
must be about the request the caller asked about.
"""

from __future__ import annotations

from collections.abc import Callable

from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, InvalidSignature, hex32
from infergrid.protocol.messages import Attestation
from infergrid.protocol.verdicts import MAX_REASON_CHARS, SignedVerdict, Verdict, to_micro
from infergrid.verify.audit import AuditReport


def make_verdict(job: AuditJob, report: AuditReport, *, verifier: str, timestamp: int) -> Verdict:
    """The verdict on `job` for `report`; ValueError if the job's attestation is unreadable
    (there is then no request hash to judge: such a job is refused before it is audited)."""
    attestation = Attestation.from_json(job.attestation)
    reason = report.reason
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    return Verdict(
        request_hash=attestation.request_hash,
        attestation_hash=attestation.struct_hash(),
        miner=attestation.miner,
        verifier=verifier,
        passed=report.passed,
        worst_margin_deficit=to_micro(max(0.0, -report.worst_margin)),
        worst_logprob_error=to_micro(max(0.0, report.worst_logprob_error)),
        reason=reason,
        evidence_hash=job.evidence_hash(),
        timestamp=timestamp,
    )


def check_verdict(
    domain: Domain,
    signed: SignedVerdict,
    *,
    is_verifier: Callable[[str], bool],
    request_hash: bytes | None = None,
) -> str | None:
    """Why `signed` must not be trusted, or None. `is_verifier(address)` answers whether the
    address is a registered, active verifier (the caller reads the registry); `request_hash`,
    when given, is the request the verdict must be about."""
    verdict = signed.verdict
    if request_hash is not None and verdict.request_hash != request_hash:
        return (
            f"the verdict is about request 0x{verdict.request_hash.hex()}, not "
            f"{hex32(request_hash)}"
        )
    try:
        signer = signed.signer(domain)
    except InvalidSignature as exc:
        return f"the verdict's signature is invalid: {exc}"
    if signer.lower() != verdict.verifier.lower():
        return f"the verdict names verifier {verdict.verifier} but is signed by {signer}"
    if not is_verifier(verdict.verifier):
        return f"{verdict.verifier} is not a registered, active verifier"
    return None
