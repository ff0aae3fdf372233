"""The verifier node's shell: load the reference model(s), register and stake as a verifier,
serve audits (verify.server), do its dispute duties (verify.duties) and send canaries
(verify.canary).

A verifier registers as Role.VERIFIER with its endpoint, its owner key as signer (verdicts are
signed with it) and one zero-price ModelOffer per model it audits, so gateways know which jobs
to send it. Registration is idempotent (`Registry.ensure_registered`): a restarted verifier
updates its record and tops its stake up, never registers twice. Its stake defaults to the
registry's minimum for verifiers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eth_account import Account
from rich.console import Console

from infergrid.protocol.audits import AuditJob
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role

if TYPE_CHECKING:  # the model and chain stacks load only when a verifier starts
    from infergrid.compute.engine import Engine
    from infergrid.settle.registry import Registry
    from infergrid.verify.audit import AuditReport

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".infergrid")
DEFAULT_PORT = 8200
# Disputes open and close on a scale of minutes (DEVNET_PARAMS) to days: a few seconds between
# looks costs a handful of view calls and never makes a vote late.
DEFAULT_DUTY_POLL_S = 3.0
DEFAULT_CANARY_INTERVAL_S = 60.0
DEFAULT_QUALIFICATION_INTERVAL_S = 2.0
# Audits waiting for the one worker thread; more are refused with 429 (the gateway retries
# another verifier or later).
DEFAULT_MAX_QUEUE = 16


def default_evidence_dir(owner: str, state_dir: Path = DEFAULT_STATE_DIR) -> Path:
    """Where a verifier keeps its evidence bundles: one folder per owner, so several verifiers
    started from one directory (the devnet) never mix theirs."""
    return state_dir / f"verifier-{owner.lower()}.evidence"


@dataclass(frozen=True)
class VerifierSettings:
    chain_rpc: str
    registry: str
    escrow: str  # verdicts are signed in its EIP-712 domain
    private_key: str
    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    endpoint: str | None = None  # default http://HOST:PORT
    # None: the registry's minimum for verifiers.
    stake_wei: int | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    evidence_dir: Path | None = None  # default default_evidence_dir(owner, state_dir)
    threads: int | None = None  # torch CPU threads; None: every core this process may use
    duty_poll_s: float = DEFAULT_DUTY_POLL_S
    # Canaries: a gateway's public API and an API key of the verifier's own (both or neither).
    gateway_url: str | None = None
    canary_key: str | None = None
    canary_interval_s: float = DEFAULT_CANARY_INTERVAL_S  # 0: off
    qualification_interval_s: float = DEFAULT_QUALIFICATION_INTERVAL_S
    max_queue: int = DEFAULT_MAX_QUEUE
    canary_seed: int | None = None  # None: a random one
    # The engine that recomputes answers (compute.engine_factory.ENGINE_KINDS); it must be
    # the miners' kind, whose model id it holds (llama.cpp: the GGUF at its quantization).
    engine: str = "transformers"
    # The ScoreBoard it commits and reveals its miner scores on, every epoch, from what the
    # gateway (gateway_url, with canary_key as its API key) observed (verify.score_duty).
    scoreboard: str | None = None

    def public_endpoint(self) -> str:
        return self.endpoint or f"http://{self.host}:{self.port}"

    def check(self) -> None:
        """Refuse settings that would run a verifier that cannot do its job (ValueError)."""
        if not self.models:
            raise ValueError("a verifier audits at least one model: pass --model")
        if (self.gateway_url is None) != (self.canary_key is None):
            raise ValueError("canaries need both --gateway and --canary-key (or neither)")
        if self.canary_interval_s < 0 or self.qualification_interval_s < 0:
            raise ValueError("canary intervals must not be negative")
        if self.duty_poll_s <= 0:
            raise ValueError("the duty poll interval must be positive")
        if self.max_queue < 1:
            raise ValueError("the audit queue holds at least one job")
        if self.scoreboard is not None and self.gateway_url is None:
            raise ValueError(
                "scoring miners needs a gateway to observe them: pass --gateway and --canary-key"
            )


def zero_price_offers(engines: Sequence[Engine]) -> list[ModelOffer]:
    """The registry offers of a verifier: the models it audits, at no price (it sells none)."""
    return [ModelOffer(e.name, e.model_id, 0, 0) for e in engines]


class EngineAuditor:
    """`audit(job)` for a verifier holding several engines: the job goes to the engine whose
    model id is the attestation's (verify.recompute.audit_job); a job for any other model
    raises CannotAudit. Callable from one worker thread at a time."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = {e.model_id.lower(): e for e in engines}

    def model_ids(self) -> list[str]:
        return list(self.engines)

    def engine_for(self, job: AuditJob) -> Engine:
        from infergrid.verify.recompute import CannotAudit

        model_id = job.attestation.get("modelId")
        engine = self.engines.get(model_id.lower()) if isinstance(model_id, str) else None
        if engine is None:
            raise CannotAudit(
                f"this verifier does not audit model {model_id!r} (it audits "
                f"{', '.join(self.engines) or 'nothing'})"
            )
        return engine

    def __call__(self, job: AuditJob) -> AuditReport:
        from infergrid.verify.recompute import audit_job

        return audit_job(self.engine_for(job), job)


def is_gateway_signer(registry: Registry, *, refresh_s: float = 10.0) -> Callable[[str], bool]:
    """Whether an address signs receipts for a registered, active gateway (its signer key or
    its owner), from a view of the registry refreshed at most every `refresh_s` seconds; an
    unknown address forces one refresh, so a gateway that registered a moment ago is known."""
    return _GatewaySigners(registry, refresh_s)


class _GatewaySigners:
    # An unknown address refreshes at most once a second: a stream of forged receipts must not
    # turn into a stream of registry reads.
    _MISS_REFRESH_S = 1.0

    def __init__(self, registry: Registry, refresh_s: float) -> None:
        self._registry = registry
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._known: frozenset[str] = frozenset()

    def _load(self, now: float) -> None:
        records = self._registry.nodes(active_only=True, role=Role.GATEWAY)
        self._known = frozenset(a.lower() for r in records for a in (r.signer, r.owner))
        self._at = now

    def __call__(self, address: str) -> bool:
        import time

        with self._lock:
            now = time.monotonic()
            age = now - self._at
            if age > self._refresh_s or (
                address.lower() not in self._known and age > self._MISS_REFRESH_S
            ):
                self._load(now)
            return address.lower() in self._known


def register_verifier(
    registry: Registry, settings: VerifierSettings, offers: Sequence[ModelOffer]
) -> int:
    """Register (or update) this verifier and keep its stake bonded; returns the stake."""
    owner = Account.from_key(settings.private_key).address
    stake = settings.stake_wei
    if stake is None:
        stake = registry.min_stake(Role.VERIFIER)
    record = registry.ensure_registered(
        settings.private_key, Role.VERIFIER, settings.public_endpoint(), owner, offers, stake
    )
    return record.stake_wei


def run_verifier(settings: VerifierSettings, console: Console) -> None:
    """Start everything and serve until interrupted."""
    from infergrid.compute.engine_factory import load_engine
    from infergrid.compute.transformers_engine import available_cores
    from infergrid.protocol.eip712 import Signer
    from infergrid.settle.chain import Chain
    from infergrid.settle.disputes import DisputeManager
    from infergrid.settle.escrow import PaymentEscrow
    from infergrid.settle.registry import Registry
    from infergrid.verify.canary import CanaryLoop, CanarySender
    from infergrid.verify.duties import DisputeDuties, DutyLoop
    from infergrid.verify.evidence_store import EvidenceStore
    from infergrid.verify.server import VerifierService, create_verifier_app, run_verifier_server

    settings.check()
    owner = Account.from_key(settings.private_key).address
    # The chain first: an unreachable one fails in a second, not after a model has loaded.
    chain = Chain.connect(settings.chain_rpc)
    registry = Registry(chain, settings.registry)
    escrow = PaymentEscrow(chain, settings.escrow)
    domain = escrow.domain()
    threads = settings.threads or available_cores()
    engines = []
    for spec in settings.models:
        # soft_wrap: one line per event in the log, however narrow the terminal.
        console.print(
            f"verifier {owner}: loading {spec} on {settings.engine} ({threads} CPU threads)",
            soft_wrap=True,
        )
        # Audits are single teacher-forced passes; a batch of one is all they need.
        engines.append(load_engine(settings.engine, spec, num_threads=threads, max_batch=1))
    offers = zero_price_offers(engines)
    for offer in offers:
        console.print(f"auditing {offer.name} id {offer.model_id}", soft_wrap=True)
    stake = register_verifier(registry, settings, offers)
    console.print(
        f"registered as verifier at {settings.public_endpoint()} with "
        f"{stake / WEI_PER_BTT:,.2f} BTT staked"
    )
    disputes = DisputeManager(chain, registry.slasher())
    evidence_dir = settings.evidence_dir or default_evidence_dir(owner, settings.state_dir)
    evidence = EvidenceStore(evidence_dir)

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    service = VerifierService(
        domain=domain,
        signer=Signer(settings.private_key),
        audit=EngineAuditor(engines),
        is_gateway=is_gateway_signer(registry),
        evidence=evidence,
        models=offers,
        log=say,
    )
    # Re-audits (confirmations, votes) share the one worker thread with the gateways' jobs.
    duties = DisputeDuties(
        chain=chain,
        registry=registry,
        disputes=disputes,
        private_key=settings.private_key,
        domain=domain,
        audit=service.reaudit,
        evidence=evidence,
        log=say,
    )
    service.on_failed = duties.report_failed
    say(f"evidence bundles in {evidence_dir}")
    duty_loop = DutyLoop(duties, settings.duty_poll_s).start()
    score_loop: DutyLoop | None = None
    if settings.scoreboard is not None and settings.gateway_url and settings.canary_key:
        from infergrid.settle.scores import ScoreBoard
        from infergrid.verify.score_duty import ScoreDuty, fetch_miner_epoch, score_state_path

        gateway_url, api_key = settings.gateway_url, settings.canary_key
        scoring = ScoreDuty(
            board=ScoreBoard(chain, settings.scoreboard),
            registry=registry,
            private_key=settings.private_key,
            miner_epoch=lambda since, until: fetch_miner_epoch(gateway_url, api_key, since, until),
            state_path=score_state_path(settings.state_dir, owner),
            log=say,
        )
        score_loop = DutyLoop(scoring, settings.duty_poll_s).start()
        say(f"scoring miners every epoch on the ScoreBoard at {settings.scoreboard}")
    canary_loop: CanaryLoop | None = None
    app = create_verifier_app(service, max_queue=settings.max_queue)
    try:
        if settings.gateway_url is not None and settings.canary_key is not None:
            sender = CanarySender(
                settings.gateway_url,
                settings.canary_key,
                service=service,
                models=[o.name for o in offers],
                seed=settings.canary_seed,
                log=say,
            )
            canary_loop = CanaryLoop(
                sender, settings.canary_interval_s, settings.qualification_interval_s
            ).start()
            if settings.canary_interval_s > 0:
                say(
                    f"canaries through {settings.gateway_url} every"
                    f" {settings.canary_interval_s:g} s"
                )
        say(f"serving audits on {settings.host}:{settings.port}")
        run_verifier_server(app, settings.host, settings.port)
    finally:
        if canary_loop is not None:
            canary_loop.stop()
        if score_loop is not None:
            score_loop.stop()
        duty_loop.stop()
        service.close()
