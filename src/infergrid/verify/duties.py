"""A verifier's dispute duties, one round at a time (`DisputeDuties.tick`), on a thread of
their own (`DutyLoop`).

1. **Confirm.** A failed audit (`report_failed`, from the audit worker) is re-run once; only a
   failure that fails again is disputed (a flaky machine must not accuse anyone). At the first
   round, the failures kept in the evidence store that no dispute names yet are confirmed
   again, so a restarted verifier still disputes them.
2. **Open.** A confirmed failure is disputed in the DisputeManager (the registry's slasher)
   with the job's signed attestation and receipt and its evidence hash, depositing
   `dispute_deposit`, once enough *other* verifiers could vote on it: those neither the miner
   nor the payer, whose registry record lists the job's model (verifiers register the models
   they audit), registered `min_verifier_age` before now, whose stake as the contract weighs
   it (min of the stake bonded `min_verifier_age` ago and now, at least the verifier minimum)
   sums to `min_quorum_stake`. Until then it waits (logged once); a dispute nobody can judge
   would only forfeit part of the deposit. A request already disputed is skipped; evidence
   the contract would refuse (settle.evidence.DisputeEvidence.check) is dropped, logged.
3. **Watch and vote.** Every dispute (from id 1, so a restarted verifier catches up) that is
   open and that this verifier may vote on (not its challenger, miner or payer; registered
   `min_verifier_age` before it opened; before its deadline): fetch the evidence bundle from
   the challenger's registered endpoint (GET /v1/evidence/0x<hash>), check its hash
   (protocol.audits.parse_evidence), check that it is the disputed request (its attestation
   names the dispute's miner and request hash and is signed by a key of that miner), re-audit
   it, and vote uphold iff the audit fails. Evidence that does not match is voted down. A
   model this verifier does not hold, or evidence that cannot be fetched yet, is an
   abstention (logged once; the fetch is retried every round until the deadline).
4. **Resolve** open disputes whose deadline has passed (chain time), **settle** this
   verifier's votes on resolved ones, and **claim** its credits in the registry (slashed
   stake) and the dispute manager (deposits).

Every chain or HTTP error is logged and retried next round; none stops the loop.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from eth_account import Account

from infergrid.protocol.audits import AuditJob, parse_evidence
from infergrid.protocol.eip712 import Domain, InvalidSignature
from infergrid.protocol.messages import SIGNATURE_KEY, Attestation, recover_signer
from infergrid.protocol.nodes import Role
from infergrid.settle.chain import Chain, ChainError, ContractRevert
from infergrid.settle.disputes import DisputeManager, DisputeRecord
from infergrid.settle.evidence import DisputeEvidence, EvidenceRejected
from infergrid.settle.registry import Registry
from infergrid.verify.evidence_store import EvidenceStore

if TYPE_CHECKING:
    from infergrid.verify.audit import AuditReport

logger = logging.getLogger(__name__)

AuditFn = Callable[[AuditJob], "AuditReport"]
FetchFn = Callable[[str, bytes], bytes]  # (endpoint, evidence hash) -> bundle bytes
EVIDENCE_TIMEOUT_S = 10.0
# Evidence bundles are an audit job's JSON: far below this.
MAX_EVIDENCE_BYTES = 48 * 1024 * 1024


class EvidenceUnavailable(Exception):
    """The challenger's endpoint did not hand out the bundle (yet)."""


def fetch_evidence_http(endpoint: str, digest: bytes) -> bytes:
    """GET {endpoint}/v1/evidence/0x<hash>; EvidenceUnavailable on any failure."""
    url = f"{endpoint.rstrip('/')}/v1/evidence/0x{digest.hex()}"
    if not url.startswith(("http://", "https://")):
        raise EvidenceUnavailable(f"{url} is not an HTTP URL")
    try:
        with urllib.request.urlopen(url, timeout=EVIDENCE_TIMEOUT_S) as response:
            bundle = response.read(MAX_EVIDENCE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise EvidenceUnavailable(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EvidenceUnavailable(f"{url}: {exc}") from None
    if len(bundle) > MAX_EVIDENCE_BYTES:
        raise EvidenceUnavailable(f"{url} sent more than {MAX_EVIDENCE_BYTES} bytes")
    return bundle


@dataclass
class _Pending:
    """A confirmed failure waiting to be disputed."""

    job: AuditJob
    evidence: DisputeEvidence
    waiting_logged: bool = False
    last_error: str = ""  # logged once until it changes


class DisputeDuties:
    """One verifier's duties. `audit` runs the model pass (VerifierService.reaudit in a node:
    on the one audit worker thread) and raises CannotAudit for a model it does not hold;
    `evidence` is the store the verifier's server serves bundles from; `fetch` gets a bundle
    from another verifier's endpoint; `log` gets one line per thing that happened."""

    def __init__(
        self,
        *,
        chain: Chain,
        registry: Registry,
        disputes: DisputeManager,
        private_key: str,
        domain: Domain,
        audit: AuditFn,
        evidence: EvidenceStore | None = None,
        fetch: FetchFn = fetch_evidence_http,
        log: Callable[[str], None] = logger.info,
    ) -> None:
        self.chain = chain
        self.registry = registry
        self.disputes = disputes
        self.key = private_key
        self.address = Account.from_key(private_key).address
        self.domain = domain
        self.audit = audit
        self.evidence = evidence
        self.fetch = fetch
        self.log = log
        self._failed: deque[AuditJob] = deque()
        self._pending: list[_Pending] = []
        # Disputes this verifier has nothing more to do for.
        self._done: set[int] = set()
        self._abstained: set[int] = set()  # logged once
        self._unavailable: set[int] = set()  # logged once
        self._errors: dict[int, str] = {}  # dispute id -> the last error logged
        self._recovered = False
        self.opened: list[int] = []  # dispute ids this verifier opened
        self.voted: dict[int, bool] = {}  # dispute id -> uphold

    # -- inputs --------------------------------------------------------------------------

    def report_failed(self, job: AuditJob, report: AuditReport) -> None:
        """A failed audit to confirm and dispute; returns at once (thread-safe)."""
        self._failed.append(job)

    # -- one round -----------------------------------------------------------------------

    def tick(self) -> None:
        """Do everything due now; errors are logged, never raised."""
        for step in (
            self._recover,
            self._confirm_failures,
            self._open_pending,
            self._watch_disputes,
            self._claim,
        ):
            name = step.__name__.strip("_").replace("_", " ")
            try:
                step()
            except (ChainError, OSError, ValueError) as exc:  # chain and HTTP errors among them
                self.log(f"duties: {name}: {exc}")
            except Exception as exc:  # never fatal: the next round tries again
                logger.exception("duty step %s", name)
                self.log(f"duties: {name}: {type(exc).__name__}: {exc}")

    def _recover(self) -> None:
        """Once, at the first round: the failures a previous run kept as evidence and did not
        get disputed go back to be confirmed (a restart must not forget a cheater)."""
        if self._recovered or self.evidence is None:
            return
        store = self.evidence
        queued = {job.evidence_hash() for job in self._failed}
        again = 0
        for digest in store.hashes():
            if digest in queued:
                continue
            bundle = store.get(digest)
            if bundle is None:
                continue
            try:
                job = parse_evidence(bundle, digest)
                attestation = Attestation.from_json(job.attestation)
            except (TypeError, ValueError) as exc:
                self.log(f"evidence 0x{digest.hex()} is unreadable: {exc}")
                continue
            if self.disputes.evidence_disputed(digest) or self.disputes.request_disputed(
                attestation.miner, attestation.request_hash
            ):
                continue
            self._failed.append(job)
            again += 1
        self._recovered = True
        if again:
            self.log(f"{again} failed audit(s) kept from before are confirmed again")

    def _confirm_failures(self) -> None:
        from infergrid.verify.recompute import CannotAudit

        while self._failed:
            job = self._failed.popleft()
            try:
                again = self.audit(job)
            except CannotAudit as exc:
                self.log(f"cannot confirm the failure of {job.request_id}: {exc}")
                continue
            if again.passed:
                self.log(f"failure of {job.request_id} not confirmed on re-run: not disputed")
                continue
            self.log(f"failure of {job.request_id} confirmed: {again.reason}")
            self._queue_dispute(job)

    def _queue_dispute(self, job: AuditJob) -> None:
        if job.receipt is None:
            self.log(f"request {job.request_id} has no receipt: it cannot be disputed")
            return
        try:
            evidence = DisputeEvidence.from_receipt_json(
                {"attestation": job.attestation, "receipt": job.receipt}
            )
            evidence.check(self.domain, was_signer=self.registry.was_signer)
        except (EvidenceRejected, ValueError) as exc:
            self.log(f"request {job.request_id} cannot be disputed: {exc}")
            return
        if any(p.job.evidence_hash() == job.evidence_hash() for p in self._pending):
            return
        self._pending.append(_Pending(job, evidence))

    def quorum_ready(
        self, *, miner: str, payer: str, model_id: bytes | str | None = None
    ) -> tuple[bool, str]:
        """Whether verifiers other than this one, the miner and the payer could together
        reach the quorum on a dispute opened now (with `model_id`, only those whose registry
        record lists that model: a verifier without it abstains); and a line saying where it
        stands."""
        now = self.chain.timestamp()
        age = self.disputes.min_verifier_age()
        needed = self.disputes.min_quorum_stake()
        minimum = self.registry.min_stake(Role.VERIFIER)
        excluded = {self.address.lower(), miner.lower(), payer.lower()}
        wanted = _model_key(model_id) if model_id is not None else None
        weight = 0
        voters = 0
        too_young = 0
        without_model = 0
        for record in self.registry.nodes(active_only=True, role=Role.VERIFIER):
            if record.owner.lower() in excluded:
                continue
            if wanted is not None and wanted not in {_model_key(o.model_id) for o in record.models}:
                without_model += 1
                continue
            registered = self.registry.registered_at(record.owner)
            if registered == 0 or registered + age > now:
                too_young += 1
                continue
            stake = min(self.registry.stake_at(record.owner, now - age), record.stake_wei)
            if stake < minimum:
                continue
            weight += stake
            voters += 1
        line = (
            f"{voters} other verifier(s) old enough to vote weigh {weight} wei of the"
            f" {needed} wei quorum ({too_young} registered less than {age} s ago"
            + (f", {without_model} without the model" if wanted is not None else "")
            + ")"
        )
        return weight >= needed, line

    def _open_pending(self) -> None:
        still: list[_Pending] = []
        for pending in self._pending:
            try:
                done = self._try_open(pending)
            except (ChainError, ValueError) as exc:  # a cap reached, a chain hiccup: retry
                done = False
                line = f"dispute of {pending.job.request_id} not opened yet: {exc}"
                if line != pending.last_error:
                    pending.last_error = line
                    self.log(line)
            if not done:
                still.append(pending)
        self._pending = still

    def _try_open(self, pending: _Pending) -> bool:
        """True when the pending dispute is done with (opened or skipped)."""
        job, evidence = pending.job, pending.evidence
        attestation, receipt = evidence.attestation, evidence.receipt
        digest = job.evidence_hash()
        if self.disputes.request_disputed(attestation.miner, attestation.request_hash):
            self.log(f"request {job.request_id} is already disputed: skipped")
            return True
        if self.disputes.evidence_disputed(digest):
            self.log(f"evidence 0x{digest.hex()} is already disputed: skipped")
            return True
        ready, line = self.quorum_ready(
            miner=attestation.miner, payer=receipt.payer, model_id=attestation.model_id
        )
        if not ready:
            if not pending.waiting_logged:
                self.log(f"dispute of {job.request_id} waits for voters: {line}")
                pending.waiting_logged = True
            return False
        if self.evidence is not None:
            self.evidence.put(job)  # served to the voters from now on
        try:
            dispute_id = self.disputes.open_dispute(
                self.key,
                attestation,
                evidence.attestation_signature,
                receipt,
                evidence.receipt_signature,
                digest,
            )
        except ContractRevert as exc:
            if exc.reason in ("request already disputed", "evidence already disputed"):
                self.log(f"request {job.request_id}: {exc.reason}: skipped")
                return True
            raise
        self.opened.append(dispute_id)
        self.log(
            f"dispute {dispute_id} opened: miner {attestation.miner} request {job.request_id}"
            f" evidence 0x{digest.hex()}"
        )
        return True

    # -- other verifiers' disputes ------------------------------------------------------

    def _watch_disputes(self) -> None:
        count = self.disputes.dispute_count()
        now = self.chain.timestamp()
        for dispute_id in range(1, count + 1):
            if dispute_id in self._done:
                continue
            try:
                self._watch_one(dispute_id, now)
            except (ChainError, ValueError) as exc:  # this dispute only; the others go on
                line = f"dispute {dispute_id}: {exc}"
                if self._errors.get(dispute_id) != line:
                    self._errors[dispute_id] = line
                    self.log(line)

    def _watch_one(self, dispute_id: int, now: int) -> None:
        record = self.disputes.dispute(dispute_id)
        if record.status == "open":
            if now < record.deadline:
                if dispute_id not in self.voted:
                    self._maybe_vote(record)
                return
            self._resolve(record)
            record = self.disputes.dispute(dispute_id)
            if record.status == "open":
                return
        self._settle(record)
        self._done.add(dispute_id)

    def _resolve(self, record: DisputeRecord) -> None:
        try:
            final = self.disputes.resolve(self.key, record.id)
        except ContractRevert as exc:
            if exc.reason == "already resolved":  # another verifier was first
                return
            raise
        self.log(
            f"dispute {record.id} resolved: {final.status} ({final.votes_for_wei} wei for,"
            f" {final.votes_against_wei} wei against)"
        )

    def _settle(self, record: DisputeRecord) -> None:
        """Settle this verifier's vote on a resolved dispute, if it has one not settled."""
        vote = self.disputes.vote_of(record.id, self.address)
        if vote is None or vote.settled:
            return
        slashed = self.disputes.settle_vote(self.key, record.id, self.address)
        self.log(
            f"vote on dispute {record.id} settled"
            + (f": {slashed} wei slashed for voting against the verdict" if slashed else "")
        )

    def may_vote(self, record: DisputeRecord) -> bool:
        """Whether the contract would take this verifier's vote on `record` (apart from the
        deadline, which the caller checks against chain time)."""
        me = self.address.lower()
        if me in (record.challenger.lower(), record.miner.lower(), record.payer.lower()):
            return False
        node = self.registry.node(self.address)
        if node is None or node.role != Role.VERIFIER or not node.active:
            return False
        registered = self.registry.registered_at(self.address)
        age = self.disputes.min_verifier_age()
        if registered == 0 or registered + age > record.opened_at:
            return False
        return not self.disputes.has_voted(record.id, self.address)

    def _maybe_vote(self, record: DisputeRecord) -> None:
        from infergrid.verify.recompute import CannotAudit

        if not self.may_vote(record):
            return  # still watched: whoever may not vote may resolve it after the deadline
        try:
            job = self._fetch_job(record)
        except EvidenceUnavailable as exc:
            if record.id not in self._unavailable:
                self._unavailable.add(record.id)
                self.log(f"dispute {record.id}: evidence not available yet: {exc}")
            return
        except ValueError as exc:  # the bundle is not the dispute's, or not a job
            self._vote(record, False, f"evidence refused: {exc}")
            return
        try:
            report = self.audit(job)
        except CannotAudit as exc:
            if record.id not in self._abstained:
                self._abstained.add(record.id)
                self.log(f"dispute {record.id}: abstaining: {exc}")
            return
        self._vote(
            record,
            not report.passed,
            f"re-audit {'failed: ' + report.reason if not report.passed else 'passed'}",
        )

    def _vote(self, record: DisputeRecord, uphold: bool, why: str) -> None:
        try:
            self.disputes.vote(self.key, record.id, uphold)
        except ContractRevert as exc:
            if exc.reason in ("already voted", "voting closed", "dispute not open"):
                self.voted[record.id] = uphold
                return
            raise
        self.voted[record.id] = uphold
        self.log(f"voted {'UPHOLD' if uphold else 'REJECT'} on dispute {record.id}: {why}")

    def _fetch_job(self, record: DisputeRecord) -> AuditJob:
        """The dispute's job from its evidence bundle (ours if we hold it, else fetched from
        the challenger's endpoint), checked to be the disputed request; ValueError when the
        bundle is not, EvidenceUnavailable when there is none to be had."""
        bundle = self.evidence.get(record.evidence_hash) if self.evidence is not None else None
        if bundle is None:
            challenger = self.registry.node(record.challenger)
            if challenger is None or not challenger.endpoint:
                raise EvidenceUnavailable(f"challenger {record.challenger} has no endpoint")
            bundle = self.fetch(challenger.endpoint, record.evidence_hash)
        job = parse_evidence(bundle, record.evidence_hash)
        check_job_is_disputed(job, record, self.domain, self.registry.was_signer)
        return job

    # -- credits --------------------------------------------------------------------------

    def _claim(self) -> None:
        if self.registry.credits(self.address) > 0:
            amount = self.registry.credits(self.address)
            self.registry.claim(self.key)
            self.log(f"claimed {amount} wei of slashed stake from the registry")
        if self.disputes.credits(self.address) > 0:
            amount = self.disputes.credits(self.address)
            self.disputes.claim(self.key)
            self.log(f"claimed {amount} wei of deposits from the dispute manager")


def _model_key(model_id: bytes | str) -> str:
    if isinstance(model_id, bytes):
        return model_id.hex()
    return model_id.lower().removeprefix("0x")


def check_job_is_disputed(
    job: AuditJob,
    record: DisputeRecord,
    domain: Domain,
    was_signer: Callable[[str, str], bool],
) -> None:
    """ValueError unless `job` is the response `record` disputes: its attestation names the
    dispute's miner and request hash and is signed by a key the registry says that miner
    holds (or held within the unbonding delay). Without this, a challenger could attach a
    bad job of another miner to an honest miner's request."""
    try:
        attestation = Attestation.from_json(job.attestation)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the evidence's attestation is malformed: {exc}") from None
    if attestation.miner != record.miner or job.miner != record.miner:
        raise ValueError(f"the evidence is about miner {attestation.miner}, not {record.miner}")
    if attestation.request_hash != record.request_hash:
        raise ValueError("the evidence is about another request than the dispute's")
    try:
        signer = recover_signer(domain, attestation, job.attestation.get(SIGNATURE_KEY, ""))
    except (InvalidSignature, ValueError) as exc:
        raise ValueError(f"the evidence's attestation signature is invalid: {exc}") from None
    if not was_signer(record.miner, signer):
        raise ValueError(f"the evidence's attestation is signed by {signer}, not the miner")


class Ticking(Protocol):
    def tick(self) -> None: ...


class DutyLoop:
    """`duties.tick()` every `interval_s` seconds on a daemon thread, until stop()."""

    def __init__(self, duties: Ticking, interval_s: float) -> None:
        self.duties = duties
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verifier-duties", daemon=True)

    def start(self) -> DutyLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.duties.tick()
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
