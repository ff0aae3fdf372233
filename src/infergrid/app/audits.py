"""Audits at the gateway: which responses are audited, sending them to verifiers, what their
verdicts do, and each miner's standing (probation, active, frozen, slashed).

After a metered response's receipt is stored, `AuditService.record` keeps the request
(app.request_status) and draws, with the gateway's secret, whether it is audited
(protocol.audits.selected_for_audit at audit_probability of the miner's record). A selected
one is PENDING and its job goes to a random active verifier (`POST {endpoint}/v1/audits`) in a
background task, so the response never waits for it; a verifier that fails or answers with a
verdict that does not check out (verify.verdict.check_verdict) is logged and one other verifier
is tried. A passing verdict makes it PASSED; a failing one FAILED: its receipt is voided if
the escrow has not collected it (ReceiptStore.void; the payer's headroom gets the value back,
refund "voided_receipt") and the miner goes on probation.

Miners: a miner first seen is on probation until `qualification_audits` passed audits and a
throughput of `qualification_tokens_per_s`; a failed audit puts it back until its disputes end
(app.dispute_watch), unless they slash it. Probation miners get only canary traffic (requests
made with a canary key) and canary requests prefer them (`route`). With no active verifier in
the registry nobody can qualify miners, so every miner counts as active and nothing is sent;
a miner first seen then stays active when verifiers come (it is audited from then on).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import aiohttp

from infergrid.app.calls import Call
from infergrid.app.config import GatewayConfig
from infergrid.app.miners import MinerState
from infergrid.app.request_status import RequestLog, RequestRecord
from infergrid.app.settlement import Settlement
from infergrid.protocol.audits import AuditJob, AuditState, audit_probability, selected_for_audit
from infergrid.protocol.messages import signed_json
from infergrid.protocol.nodes import NodeRecord, Role
from infergrid.protocol.verdicts import SignedVerdict
from infergrid.verify.verdict import check_verdict

__all__ = ["AuditService", "MinerRecord"]

log = logging.getLogger("infergrid.app.gateway")

PROBATION, ACTIVE, FROZEN, SLASHED = "probation", "active", "frozen", "slashed"
THROUGHPUT_ALPHA = 0.3


@dataclass
class MinerRecord:
    """The gateway's view of one miner's audits (persisted in the request log)."""

    state: str = PROBATION
    served: int = 0  # metered responses, for audit_probability
    passed: int = 0
    failed: int = 0
    pending: int = 0
    open_disputes: int = 0
    failed_open: bool = False  # a failed audit keeps it on probation until disputes end
    tokens_per_s: float = 0.0  # EWMA of its responses' completion tokens per second

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _MINER_FIELDS}


_MINER_FIELDS = tuple(f.name for f in fields(MinerRecord))
# Served counts are saved every this many responses (and with every state change), not on each.
SAVE_EVERY = 256


class AuditService:
    """Selection, dispatch and verdicts for one metered gateway; also its miners' states."""

    def __init__(
        self, config: GatewayConfig, *, requests: RequestLog, settlement: Settlement
    ) -> None:
        self.config = config
        self.requests = requests
        self.settlement = settlement
        self.secret = requests.secret
        self.session: aiohttp.ClientSession | None = None  # the gateway's, for its lifespan
        self.verifiers: list[NodeRecord] = []
        self._verifier_addresses: frozenset[str] = frozenset()
        self.miners: dict[str, MinerRecord] = {
            owner: MinerRecord(**data) for owner, data in requests.miners().items()
        }
        self.known: dict[str, NodeRecord] = {}  # registered miners, frozen ones too
        self._tasks: set[asyncio.Task[None]] = set()
        # Records of audits in flight, so a dispute event meanwhile changes the same object.
        self._live: dict[str, RequestRecord] = {}
        self._said_no_verifiers = False
        self._unsaved = 0  # responses counted since the miners' records were last saved
        # Told (owner, audits passed, failed) whenever a miner's record is saved: the routing
        # weighs audit failures (MinerPool.set_audit_record).
        self.on_record: Callable[[str, int, int], None] | None = None
        self.rng = random.SystemRandom()

    # -- the registry ----------------------------------------------------------------------

    @property
    def qualifying(self) -> bool:
        """Whether miners must qualify: some verifier is active to audit them."""
        return bool(self.verifiers)

    def observe_nodes(self, records: Iterable[NodeRecord]) -> None:
        """Take the registry's records (discovery calls this with every read)."""
        active = [record for record in records if record.active]
        # A frozen verifier still audits: voting freezes it until its vote is settled, and
        # audits (and qualification) must not stop whenever every verifier voted.
        verifiers = [r for r in active if r.role == Role.VERIFIER and r.endpoint]
        self.verifiers = verifiers
        known = {}
        for record in active:
            if record.role == Role.MINER:
                known[record.owner] = record
                if record.owner not in self.miners:
                    # Seen while no verifier could qualify it, a miner starts active (and is
                    # still audited once verifiers come): a verifier joining later must not
                    # take every serving miner off the network until canaries re-qualify it.
                    self.miners[record.owner] = self._new_miner()
                    self._save(record.owner)
        self.known = known
        self._verifier_addresses = frozenset(a for v in verifiers for a in (v.owner, v.signer) if a)
        if not verifiers and not self._said_no_verifiers:
            self._said_no_verifiers = True
            log.warning(
                "the registry lists no active verifier: no audits, and every miner counts as"
                " active (nobody can qualify new ones)"
            )
        elif verifiers:
            self._said_no_verifiers = False

    def is_verifier(self, address: str) -> bool:
        return address in self._verifier_addresses

    def state(self, owner: str) -> str:
        """probation, active, frozen or slashed, as routing and /v1/miners see it."""
        record = self.known.get(owner)
        mine = self.miners.get(owner)
        if mine is not None and mine.state == SLASHED:
            return SLASHED
        if record is not None and record.frozen:
            return FROZEN
        if not self.qualifying or mine is None:
            return ACTIVE
        return mine.state

    def route(self, serving: list[MinerState], canary: bool) -> list[MinerState]:
        """The miners a request may go to (MinerPool.route_filter): active ones; a canary
        request goes to healthy miners on probation first."""
        if not self.qualifying:
            return [s for s in serving if self.state(s.owner) != SLASHED]
        states = [(s, self.state(s.owner)) for s in serving]
        if canary:
            probation = [s for s, st in states if st == PROBATION and s.healthy is True]
            if probation:
                return probation
        return [s for s, st in states if st == ACTIVE]

    def _new_miner(self) -> MinerRecord:
        mine = MinerRecord()
        if not self.qualifying:
            mine.state = ACTIVE
        self._maybe_qualify(mine)  # nothing to pass when qualification asks for no audits
        return mine

    def selects(self, owner: str, request_hash: bytes) -> bool:
        """Whether the miner's next response, of this request, is audited: the secret draw
        at audit_probability of its record; counts the response as served."""
        mine = self.miners.get(owner)
        if mine is None:
            mine = self.miners[owner] = self._new_miner()
        p = audit_probability(mine.served, probation=self.state(owner) == PROBATION)
        mine.served += 1
        return selected_for_audit(self.secret, request_hash, p)

    def _save(self, owner: str) -> None:
        record = self.miners[owner]
        self.requests.save_miner(owner, record.to_json())
        if self.on_record is not None:
            self.on_record(owner, record.passed, record.failed)

    def miners_json(self) -> list[dict[str, Any]]:
        out = []
        for owner in sorted(set(self.known) | set(self.miners)):
            record = self.known.get(owner)
            mine = self.miners.get(owner) or MinerRecord()
            if record is None and mine.state != SLASHED:
                continue  # deregistered
            out.append(
                {
                    "address": owner,
                    "models": [o.name for o in record.models] if record else [],
                    "state": self.state(owner),
                    "served": mine.served,
                    "audits": {
                        "passed": mine.passed,
                        "failed": mine.failed,
                        "pending": mine.pending,
                    },
                }
            )
        return out

    # -- after a receipt is stored ---------------------------------------------------------

    def record(
        self,
        call: Call,
        miner: MinerState,
        *,
        prompt_token_ids: Any,
        output_token_ids: Any,
        output_logprobs: Any,
        text: str,
        finish_reason: Any,
        usage: dict[str, Any],
    ) -> None:
        """Keep a metered request and decide whether it is audited; never waits for I/O."""
        if call.receipt is None or call.request_hash is None:
            return
        owner = miner.owner
        selected = self.selects(owner, call.request_hash) and self.qualifying
        mine = self.miners[owner]
        elapsed = time.perf_counter() - call.started
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(tokens, int) and tokens > 0 and elapsed > 0:
            rate = tokens / elapsed
            prev = mine.tokens_per_s
            mine.tokens_per_s = rate if prev == 0 else prev + THROUGHPUT_ALPHA * (rate - prev)
        record = RequestRecord(
            request_id=call.request_id,
            key_id=call.key_id,
            created=time.time(),
            model=call.model,
            miner=owner,
            request_hash=call.request_hash,
            job={},
            state=AuditState.PENDING.value if selected else AuditState.NOT_SELECTED.value,
        )
        endpoint = "chat" if call.path.endswith("/chat/completions") else "completions"

        def build() -> RequestRecord:
            # In the request log's writer thread: the base64 and lists cost microseconds.
            if not record.job:
                record.job = AuditJob(
                    request_id=call.request_id,
                    endpoint=endpoint,
                    body=call.payload,
                    miner=owner,
                    model=call.model,
                    prompt_token_ids=tuple(_ints(prompt_token_ids)),
                    output_token_ids=tuple(_ints(output_token_ids)),
                    output_logprobs=tuple(_floats(output_logprobs)),
                    text=text,
                    finish_reason=finish_reason if isinstance(finish_reason, str) else "stop",
                    usage={
                        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                        "completion_tokens": int(usage.get("completion_tokens") or 0),
                    },
                    attestation=signed_json(call.attestation, call.attestation_signature),
                    receipt=signed_json(call.receipt, call.receipt_signature),
                ).to_json()
            return record

        self.requests.add(build)
        self._unsaved += 1
        if self._unsaved >= SAVE_EVERY:
            self._unsaved = 0
            for known in list(self.miners):
                self._save(known)
        if selected:
            mine.pending += 1
            self._live[record.request_id] = record
            task = asyncio.ensure_future(self._audit(record, build))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- dispatch --------------------------------------------------------------------------

    async def _audit(self, record: RequestRecord, build: Callable[[], RequestRecord]) -> None:
        try:
            await asyncio.to_thread(self.requests.flush)  # the writer built the job
            job = build().job
            tried: list[NodeRecord] = []
            for _ in range(2):  # one verifier, and one other if it fails
                choices = [v for v in self.verifiers if v not in tried]
                if not choices:
                    break
                verifier = self.rng.choice(choices)
                tried.append(verifier)
                signed = await self._send(verifier, job, record)
                if signed is not None:
                    await self._judged(record, signed)
                    return
            if record.dispute is None:
                record.state = AuditState.NOT_SELECTED.value
                record.note = "no verifier could audit it"
            self._finish_pending(record.miner)
            self.requests.update(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s: auditing failed", record.request_id)
        finally:
            self._live.pop(record.request_id, None)

    async def _send(
        self, verifier: NodeRecord, job: dict[str, Any], record: RequestRecord
    ) -> SignedVerdict | None:
        """One verifier's checked verdict on the job, or None (logged) if there is none."""
        session = self.session
        if session is None:
            return None
        url = verifier.endpoint.rstrip("/") + "/v1/audits"
        timeout = aiohttp.ClientTimeout(total=self.config.audit_timeout_s)
        try:
            async with session.post(url, json=job, timeout=timeout) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    log.warning(
                        "request %s: verifier %s refused the audit (%d): %s",
                        record.request_id,
                        verifier.owner,
                        resp.status,
                        str(body)[:300],
                    )
                    return None
            signed = SignedVerdict.from_json(
                body.get("verdict") if isinstance(body, dict) else None
            )
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError) as exc:
            log.warning(
                "request %s: no verdict from verifier %s: %s: %s",
                record.request_id,
                verifier.owner,
                type(exc).__name__,
                exc,
            )
            return None
        why = check_verdict(
            self.settlement.domain,
            signed,
            is_verifier=self.is_verifier,
            request_hash=record.request_hash,
        )
        if why is not None:
            log.warning(
                "request %s: ignoring a verdict from verifier %s: %s",
                record.request_id,
                verifier.owner,
                why,
            )
            return None
        return signed

    def _finish_pending(self, owner: str) -> MinerRecord:
        mine = self.miners.setdefault(owner, MinerRecord())
        mine.pending = max(0, mine.pending - 1)
        return mine

    async def _judged(self, record: RequestRecord, signed: SignedVerdict) -> None:
        verdict = signed.verdict
        record.verdicts.append(signed.to_json())
        mine = self._finish_pending(record.miner)
        if record.dispute is not None:
            # The chain's word outranks one verifier's: an open or ended dispute decides.
            log.info("request %s: a verdict after its dispute opened", record.request_id)
        elif verdict.passed:
            record.state = AuditState.PASSED.value
            mine.passed += 1
            self._maybe_qualify(mine)
        else:
            record.state = AuditState.FAILED.value
            record.note = verdict.reason
            mine.failed += 1
            mine.failed_open = True
            if mine.state != SLASHED:
                mine.state = PROBATION
            log.warning(
                "request %s: miner %s failed its audit: %s",
                record.request_id,
                record.miner,
                verdict.reason,
            )
            await self._void(record)
        self._save(record.miner)
        self.requests.update(record)

    def _maybe_qualify(self, mine: MinerRecord) -> None:
        config = self.config
        if (
            mine.state == PROBATION
            and not mine.failed_open
            and mine.passed >= config.qualification_audits
            and mine.tokens_per_s >= config.qualification_tokens_per_s
        ):
            mine.state = ACTIVE

    async def _void(self, record: RequestRecord) -> None:
        """Refund a failed response by voiding its receipt, unless the escrow collected it."""
        from infergrid.app.receipts import ReceiptCollected

        settlement = self.settlement
        receipt = record.job.get("receipt") or {}
        payer, miner = receipt.get("payer"), receipt.get("miner")
        if not payer or not miner:
            return
        escrow = settlement.escrow
        try:
            collected_of = getattr(escrow, "collected", None)
            if collected_of is not None:
                collected = await asyncio.to_thread(collected_of, payer, settlement.gateway, miner)
            else:  # an escrow reader without per-miner figures: the gateway's total bounds it
                collected = await asyncio.to_thread(
                    escrow.gateway_collected, payer, settlement.gateway
                )
            value = await asyncio.to_thread(
                settlement.store.void, record.request_id, int(collected)
            )
        except ReceiptCollected as exc:
            record.note = f"{record.note} (not voided: {exc})".strip()
            return
        except Exception as exc:
            log.warning("request %s: voiding its receipt failed: %r", record.request_id, exc)
            record.note = f"{record.note} (not voided: {exc})".strip()
            return
        settlement.ledger.refund(payer, value)
        record.refund_wei += value
        record.refund = "voided_receipt"

    # -- disputes (app.dispute_watch calls these) --------------------------------------------

    def dispute_opened(self, record: RequestRecord, dispute_id: int, tx: str | None) -> None:
        record = self._live.get(record.request_id, record)
        record.state = AuditState.DISPUTED.value
        record.dispute = {"id": dispute_id, "tx": tx, "status": "open"}
        mine = self.miners.setdefault(record.miner, MinerRecord())
        mine.open_disputes += 1
        if mine.state != SLASHED:
            mine.state = PROBATION
        self._save(record.miner)
        self.requests.update(record)

    def dispute_resolved(
        self, record: RequestRecord, dispute_id: int, status: str, to_payer: int, tx: str | None
    ) -> None:
        record = self._live.get(record.request_id, record)
        record.dispute = {**(record.dispute or {"id": dispute_id}), "status": status}
        if tx:
            record.dispute["resolved_tx"] = tx
        mine = self.miners.setdefault(record.miner, MinerRecord())
        mine.open_disputes = max(0, mine.open_disputes - 1)
        if status == "upheld":
            record.state = AuditState.SLASHED.value
            if to_payer > 0:
                record.refund_wei += to_payer
                record.refund = "slash"
            mine.state = SLASHED
        else:
            if status == "rejected":
                record.state = AuditState.PASSED.value
                record.note = "dispute rejected"
            else:
                record.state = AuditState.FAILED.value
                record.note = f"dispute ended without a verdict ({status})"
            if mine.open_disputes == 0 and mine.state == PROBATION:
                mine.failed_open = False
                mine.state = ACTIVE
        self._save(record.miner)
        self.requests.update(record)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for owner in list(self.miners):
            self._save(owner)


def _ints(value: Any) -> list[int]:
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _floats(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
