"""A verifier's dispute duties (verify.duties) on real contracts (the embedded EVM, every
contract of settle.deploy with DEVNET_PARAMS), with real audits of a tiny model and evidence
fetched over HTTP from the challenger's registered endpoint.

- a substituted model's job fails; its challenger confirms it, waits for nothing (another
  verifier is old enough) and opens the dispute with the job's evidence hash; the other
  verifier fetches the bundle from the challenger's server, re-audits and upholds; after the
  deadline the dispute resolves upheld, the miner loses max_slash_ppm of its stake, the payer
  is credited what the contract computes, votes are settled and credits claimed;
- an honest job disputed by a lying challenger (a scripted auditor that fails everything) is
  voted down by an honest verifier: rejected, the miner keeps its stake;
- the opener waits, logging it once, while the other verifiers are too young to vote; it
  opens once they are old enough, and skips a request that is already disputed;
- a verifier without the job's model abstains;
- a bundle about another request than the disputed one is voted down; a bundle the
  challenger does not serve yet is waited for (said once) and judged once it is served;
- a restarted verifier disputes the failures its evidence store kept, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from verify_helpers import (
    ADDRS,
    KEYS,
    MINER,
    MINER_STAKE,
    PAYER,
    TREASURY,
    V1,
    V2,
    V3,
    Net,
    P,
    add_verifier,
    attesting_miner,
    deploy,
    served_job,
    substituted_engine,
)

from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Signer
from infergrid.protocol.messages import Receipt
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.settle.disputes import PPM
from infergrid.settle.evidence import DisputeEvidence
from infergrid.verify.audit import AuditReport
from infergrid.verify.duties import DisputeDuties, fetch_evidence_http
from infergrid.verify.evidence_store import EvidenceStore
from infergrid.verify.node import EngineAuditor, is_gateway_signer
from infergrid.verify.server import VerifierServerThread, VerifierService, create_verifier_app


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=10))


@pytest.fixture
def net(chain: Chain, tiny: TransformersEngine) -> Net:
    return deploy(chain, tiny)


class LyingScriptedAuditor:
    """SCRIPTED STAND-IN for a dishonest verifier's model pass: every job fails."""

    def __call__(self, job: AuditJob) -> AuditReport:
        return AuditReport(
            passed=False,
            reason="sampler: step 0 lost by 5.0 logits (scripted lie)",
            failed_checks=("sampler",),
            worst_margin=-5.0,
            worst_logprob_error=0.0,
            steps=len(job.output_token_ids),
            seconds=0.0,
        )


@dataclass
class Node:
    service: VerifierService
    duties: DisputeDuties
    server: VerifierServerThread
    lines: list[str]
    fetched: list[str]

    def said(self, fragment: str) -> list[str]:
        return [line for line in self.lines if fragment in line]


@contextlib.contextmanager
def verifier_node(
    net: Net,
    index: int,
    tmp_path: Path,
    audit: Callable[[AuditJob], Any],
    engines: Sequence[TransformersEngine],
) -> Iterator[Node]:
    """A verifier as run_verifier wires one, registered with its server's URL as endpoint and
    `engines`' models as the ones it audits."""
    lines: list[str] = []
    fetched: list[str] = []
    service = VerifierService(
        domain=net.domain,
        signer=Signer(KEYS[index]),
        audit=audit,
        is_gateway=is_gateway_signer(net.registry),
        evidence=EvidenceStore(tmp_path / f"v{index}"),
        log=lines.append,
    )

    def fetch(endpoint: str, digest: bytes) -> bytes:
        fetched.append(endpoint)
        return fetch_evidence_http(endpoint, digest)

    server = VerifierServerThread(create_verifier_app(service))
    add_verifier(net, index, server.url, engines)
    duties = DisputeDuties(
        chain=net.chain,
        registry=net.registry,
        disputes=net.disputes,
        private_key=KEYS[index],
        domain=net.domain,
        audit=service.reaudit,
        evidence=service.evidence,
        fetch=fetch,
        log=lines.append,
    )
    service.on_failed = duties.report_failed
    with server:
        yield Node(service, duties, server, lines, fetched)
    service.close()


def test_a_substituted_model_is_disputed_upheld_and_slashed_and_the_payer_refunded(
    net: Net, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    with (
        attesting_miner(substituted_engine(tiny, tiny1), net.domain) as cheater,
        verifier_node(net, V1, tmp_path, EngineAuditor([tiny]), [tiny]) as v1,
        verifier_node(net, V2, tmp_path, EngineAuditor([tiny]), [tiny]) as v2,
        verifier_node(net, V3, tmp_path, EngineAuditor([tiny1]), [tiny1]) as v3,
    ):
        net.chain.increase_time(P.min_verifier_age_s)
        job = served_job(cheater, net, model=tiny.name, max_tokens=12)
        assert job.receipt is not None
        receipt = Receipt.from_json(job.receipt)

        assert v1.service.audit_now(job).report.passed is False
        v1.duties.tick()
        assert v1.said("confirmed") and v1.duties.opened == [1]
        record = net.disputes.dispute(1)
        assert (record.challenger, record.miner, record.payer) == (
            ADDRS[V1],
            ADDRS[MINER],
            ADDRS[PAYER],
        )
        assert record.evidence_hash == job.evidence_hash()
        assert record.request_hash == receipt.request_hash
        assert net.registry.is_frozen(ADDRS[MINER])

        v2.duties.tick()
        assert v2.fetched == [v1.server.url]  # over HTTP, from the challenger's endpoint
        vote = net.disputes.vote_of(1, ADDRS[V2])
        assert vote is not None and vote.uphold is True
        assert v2.said("voted UPHOLD on dispute 1: re-audit failed")
        v3.duties.tick()  # it does not hold tiny: abstains, says so once
        v3.duties.tick()
        assert net.disputes.vote_of(1, ADDRS[V3]) is None
        assert len(v3.said("dispute 1: abstaining")) == 1

        net.chain.increase_time(P.voting_period_s)
        collected = net.escrow.collected(ADDRS[PAYER], receipt.gateway, ADDRS[MINER])
        v2.duties.tick()  # resolves, then settles its own vote
        final = net.disputes.dispute(1)
        assert final.status == "upheld"
        assert v2.said("dispute 1 resolved: upheld")
        target = MINER_STAKE * P.max_slash_ppm // PPM
        refund = min(receipt.value, collected, target)
        assert refund == receipt.value > 0
        assert net.registry.total_stake_of(ADDRS[MINER]) == MINER_STAKE - target
        assert net.registry.credits(ADDRS[PAYER]) == refund
        assert net.disputes.vote_of(1, ADDRS[V2]).settled  # type: ignore[union-attr]
        assert not net.registry.is_frozen(ADDRS[V2])

        challenger_share = (target - refund) * P.challenger_share_ppm // PPM
        before = net.chain.balance(ADDRS[V1])
        v1.duties.tick()  # claims its share of the slash and its deposit back
        assert net.registry.credits(ADDRS[V1]) == 0 and net.disputes.credits(ADDRS[V1]) == 0
        assert v1.said(f"claimed {challenger_share} wei of slashed stake")
        assert v1.said(f"claimed {P.dispute_deposit_wei} wei of deposits")
        assert net.chain.balance(ADDRS[V1]) > before


def test_an_honest_job_disputed_by_a_lying_challenger_is_voted_down(
    net: Net, tiny: TransformersEngine, tmp_path: Path
) -> None:
    with (
        attesting_miner(tiny, net.domain) as miner,
        verifier_node(net, V1, tmp_path, LyingScriptedAuditor(), [tiny]) as liar,
        verifier_node(net, V2, tmp_path, EngineAuditor([tiny]), [tiny]) as honest,
    ):
        net.chain.increase_time(P.min_verifier_age_s)
        job = served_job(miner, net, model=tiny.name, temperature=0.8, seed=5)
        assert liar.service.audit_now(job).report.passed is False
        liar.duties.tick()
        assert liar.duties.opened == [1]

        honest.duties.tick()
        vote = net.disputes.vote_of(1, ADDRS[V2])
        assert vote is not None and vote.uphold is False
        assert honest.said("voted REJECT on dispute 1: re-audit passed")

        net.chain.increase_time(P.voting_period_s)
        honest.duties.tick()
        assert net.disputes.dispute(1).status == "rejected"
        assert net.registry.total_stake_of(ADDRS[MINER]) == MINER_STAKE
        assert not net.registry.is_frozen(ADDRS[MINER])
        assert net.disputes.credits(ADDRS[TREASURY]) == P.dispute_deposit_wei  # the liar's


def test_the_opener_waits_while_the_other_verifiers_are_too_young_to_vote(
    net: Net, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    with (
        attesting_miner(substituted_engine(tiny, tiny1), net.domain) as cheater,
        verifier_node(net, V1, tmp_path, EngineAuditor([tiny]), [tiny]) as v1,
        verifier_node(net, V2, tmp_path, EngineAuditor([tiny]), [tiny]),
    ):
        job = served_job(cheater, net, model=tiny.name, max_tokens=12)
        assert v1.service.audit_now(job).report.passed is False
        v1.duties.tick()
        v1.duties.tick()
        assert net.disputes.dispute_count() == 0
        waiting = v1.said("waits for voters")
        assert len(waiting) == 1  # logged once
        assert (
            f"0 other verifier(s) old enough to vote weigh 0 wei of the"
            f" {P.min_quorum_stake_wei} wei quorum" in waiting[0]
        )
        assert "(1 registered less than 60 s ago, 0 without the model)" in waiting[0]

        net.chain.increase_time(P.min_verifier_age_s)
        v1.duties.tick()
        assert v1.duties.opened == [1]

        # The same failure again (a second gateway sent it): already disputed, skipped.
        v1.duties.report_failed(job, v1.service.reaudit(job))
        v1.duties.tick()
        assert v1.said(f"request {job.request_id} is already disputed: skipped")
        assert net.disputes.dispute_count() == 1


def test_verifiers_without_the_model_do_not_count_towards_the_quorum(
    net: Net, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    """They would abstain: a dispute only they could judge would end without quorum."""
    with (
        attesting_miner(substituted_engine(tiny, tiny1), net.domain) as cheater,
        verifier_node(net, V1, tmp_path, EngineAuditor([tiny]), [tiny]) as v1,
        verifier_node(net, V3, tmp_path, EngineAuditor([tiny1]), [tiny1]),
    ):
        net.chain.increase_time(P.min_verifier_age_s)
        job = served_job(cheater, net, model=tiny.name, max_tokens=12)
        assert v1.service.audit_now(job).report.passed is False
        v1.duties.tick()
    assert net.disputes.dispute_count() == 0
    [waiting] = v1.said("waits for voters")
    assert waiting.endswith(
        f"0 other verifier(s) old enough to vote weigh 0 wei of the {P.min_quorum_stake_wei} wei"
        " quorum (0 registered less than 60 s ago, 1 without the model)"
    )


def open_directly(net: Net, challenger: int, disputed: AuditJob, evidence_hash: bytes) -> int:
    """A challenger opening a dispute about `disputed` with whatever evidence hash it likes."""
    evidence = DisputeEvidence.from_receipt_json(
        {"attestation": disputed.attestation, "receipt": disputed.receipt}
    )
    return net.disputes.open_dispute(
        KEYS[challenger],
        evidence.attestation,
        evidence.attestation_signature,
        evidence.receipt,
        evidence.receipt_signature,
        evidence_hash,
    )


def test_evidence_about_another_request_is_voted_down(
    net: Net, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    """A challenger disputes an honest answer but names the bundle of a really bad answer of
    the same miner to another request: the voter checks the bundle is the disputed request."""
    with (
        attesting_miner(tiny, net.domain) as miner,
        attesting_miner(substituted_engine(tiny, tiny1), net.domain) as cheater,
        verifier_node(net, V1, tmp_path, EngineAuditor([tiny]), [tiny]) as challenger,
        verifier_node(net, V2, tmp_path, EngineAuditor([tiny]), [tiny]) as voter,
    ):
        net.chain.increase_time(P.min_verifier_age_s)
        honest = served_job(miner, net, model=tiny.name)
        bad = served_job(cheater, net, model=tiny.name, max_tokens=12)
        challenger.service.evidence.put(bad)
        dispute_id = open_directly(net, V1, honest, bad.evidence_hash())
        voter.duties.tick()
    vote = net.disputes.vote_of(dispute_id, ADDRS[V2])
    assert vote is not None and vote.uphold is False
    assert voter.said(
        f"voted REJECT on dispute {dispute_id}: evidence refused: the evidence is about another"
        " request than the dispute's"
    )


def test_evidence_not_served_yet_is_waited_for_then_judged(
    net: Net, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    with (
        attesting_miner(substituted_engine(tiny, tiny1), net.domain) as cheater,
        verifier_node(net, V1, tmp_path, EngineAuditor([tiny]), [tiny]) as challenger,
        verifier_node(net, V2, tmp_path, EngineAuditor([tiny]), [tiny]) as voter,
    ):
        net.chain.increase_time(P.min_verifier_age_s)
        bad = served_job(cheater, net, model=tiny.name, max_tokens=12)
        dispute_id = open_directly(net, V1, bad, bad.evidence_hash())
        voter.duties.tick()
        voter.duties.tick()
        assert net.disputes.vote_of(dispute_id, ADDRS[V2]) is None
        unavailable = voter.said(f"dispute {dispute_id}: evidence not available yet")
        assert len(unavailable) == 1 and "answered 404" in unavailable[0]

        challenger.service.evidence.put(bad)
        voter.duties.tick()
    vote = net.disputes.vote_of(dispute_id, ADDRS[V2])
    assert vote is not None and vote.uphold is True


def test_a_restarted_verifier_disputes_the_failures_it_kept(
    net: Net, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    """The failure was audited (its evidence kept) but the verifier stopped before disputing
    it; the next run finds it in the evidence store, confirms it and opens the dispute."""
    with (
        attesting_miner(substituted_engine(tiny, tiny1), net.domain) as cheater,
        verifier_node(net, V1, tmp_path, EngineAuditor([tiny]), [tiny]) as before,
        verifier_node(net, V2, tmp_path, EngineAuditor([tiny]), [tiny]),
    ):
        net.chain.increase_time(P.min_verifier_age_s)
        job = served_job(cheater, net, model=tiny.name, max_tokens=12)
        assert before.service.audit_now(job).report.passed is False  # ... and no tick
        lines: list[str] = []
        restarted = DisputeDuties(
            chain=net.chain,
            registry=net.registry,
            disputes=net.disputes,
            private_key=KEYS[V1],
            domain=net.domain,
            audit=EngineAuditor([tiny]),
            evidence=EvidenceStore(before.service.evidence.directory),
            log=lines.append,
        )
        restarted.tick()
        assert lines[0] == "1 failed audit(s) kept from before are confirmed again"
        assert restarted.opened == [1]
        assert net.disputes.dispute(1).evidence_hash == job.evidence_hash()
        restarted2 = DisputeDuties(
            chain=net.chain,
            registry=net.registry,
            disputes=net.disputes,
            private_key=KEYS[V1],
            domain=net.domain,
            audit=EngineAuditor([tiny]),
            evidence=EvidenceStore(before.service.evidence.directory),
            log=lines.append,
        )
        restarted2.tick()  # disputed already: nothing to confirm again
        assert restarted2.opened == [] and lines.count(lines[0]) == 1
