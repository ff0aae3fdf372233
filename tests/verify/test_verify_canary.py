"""Canaries (verify.canary) through a real metered gateway (app.gateway with its settlement
and audits, served on 127.0.0.1) in front of a real attesting miner, on the embedded EVM.

The verifier is an ordinary developer with a canary API key of its own: it sees the new miner
on probation (GET /v1/miners), sends a prompt through /v1/chat/completions, follows the
x-infergrid-request header to GET /v1/requests/{id}, checks the job's text is the answer it
got, and audits the job itself. An honest miner's canary passes; a substituted model's fails
and goes to the duties like any failed audit (confirmed, then waiting for voters). Plus the
pure parts: the prompts vary and mix greedy with sampled, and the loop's pacing. And, against
a scripted lying gateway stand-in, a job whose text is not the answer the verifier got, or an
answer without the status header, is reported and not audited.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from verify_helpers import (
    ADDRS,
    GATEWAY,
    KEYS,
    MINER,
    MINER_SIGNER,
    PAYER,
    V1,
    Net,
    add_verifier,
    attesting_miner,
    deploy,
    offer,
    served_job,
    substituted_engine,
)

from infergrid.app.config import GatewayConfig
from infergrid.app.gateway import create_gateway_app
from infergrid.app.keys import KeyStore
from infergrid.app.node import build_settlement
from infergrid.app.traces import TraceStore
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Signer
from infergrid.protocol.wire import REQUEST_STATUS_HEADER
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.verify.canary import CanaryLoop, CanarySender, canary_request
from infergrid.verify.duties import DisputeDuties
from infergrid.verify.evidence_store import EvidenceStore
from infergrid.verify.node import EngineAuditor, is_gateway_signer
from infergrid.verify.server import VerifierServerThread, VerifierService, create_verifier_app


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=10))


@dataclass
class Setup:
    net: Net
    gateway_url: str
    canary_key: str
    service: VerifierService
    duties: DisputeDuties
    lines: list[str]


@contextlib.contextmanager
def network(chain: Chain, tiny: TransformersEngine, engine: Any, tmp_path: Path) -> Iterator[Setup]:
    """Contracts, the miner (serving `engine`) registered at its real URL, verifier V1 serving
    audits at its registered endpoint, and a metered gateway with a canary key for the payer
    account, discovering all of them from the registry."""
    net = deploy(chain, tiny)
    lines: list[str] = []
    keys = KeyStore(tmp_path / "gateway.db", refresh_s=0.1)
    traces = TraceStore(tmp_path / "gateway.db", flush_interval_s=0.05)
    _, canary_key = keys.create("verifier canaries", payer=ADDRS[PAYER], canary=True)
    service = VerifierService(
        domain=net.domain,
        signer=Signer(KEYS[V1]),
        audit=EngineAuditor([tiny]),
        is_gateway=is_gateway_signer(net.registry),
        evidence=EvidenceStore(tmp_path / "evidence"),
        log=lines.append,
    )
    duties = DisputeDuties(
        chain=chain,
        registry=net.registry,
        disputes=net.disputes,
        private_key=KEYS[V1],
        domain=net.domain,
        audit=service.reaudit,
        evidence=service.evidence,
        log=lines.append,
    )
    service.on_failed = duties.report_failed
    settlement = build_settlement(
        chain,
        escrow=net.escrow.address,
        private_key=KEYS[GATEWAY],
        receipts_db=tmp_path / "gateway.receipts.db",
        escrow_poll_s=0.2,
    )
    config = GatewayConfig(
        db_path=tmp_path / "gateway.db",
        discovery_interval_s=0.3,
        health_interval_s=0.3,
        health_timeout_s=1.0,
        connect_timeout_s=2.0,
        read_timeout_s=30.0,
    )
    app = create_gateway_app(
        config,
        discover=lambda: net.registry.nodes(active_only=True),
        keys=keys,
        traces=traces,
        settlement=settlement,
        disputes=net.disputes,
    )
    with (
        attesting_miner(engine, net.domain) as miner,
        VerifierServerThread(create_verifier_app(service)) as verifier,
    ):
        net.registry.update(KEYS[MINER], miner.url, MINER_SIGNER.address, [offer(tiny)])
        # The verifier first: a miner the gateway sees while no verifier exists starts active.
        add_verifier(net, V1, verifier.url, [tiny])
        with VerifierServerThread(app) as gateway:
            yield Setup(net, gateway.url, canary_key, service, duties, lines)
    service.close()
    settlement.close()
    traces.close()
    keys.close()


def sender_for(setup: Setup, tiny: TransformersEngine) -> CanarySender:
    return CanarySender(
        setup.gateway_url,
        setup.canary_key,
        service=setup.service,
        models=[tiny.name],
        seed=3,
        log=setup.lines.append,
    )


def wait_for_probation(sender: CanarySender, miner: str) -> None:
    """Until the gateway has discovered and health-checked the miner (it starts on probation)."""
    for _ in range(300):
        if miner in sender.probation_miners():
            return
        time.sleep(0.05)
    raise AssertionError(f"the gateway never listed {miner} on probation")


def test_an_honest_miners_canary_passes(
    chain: Chain, tiny: TransformersEngine, tmp_path: Path
) -> None:
    with network(chain, tiny, tiny, tmp_path) as setup:
        sender = sender_for(setup, tiny)
        wait_for_probation(sender, ADDRS[MINER])
        results = [sender.send_one() for _ in range(3)]
    assert [r.outcome for r in results] == ["passed"] * 3, results
    assert {r.miner for r in results} == {ADDRS[MINER]}
    assert all(r.request_id for r in results)
    assert [line for line in setup.lines if line.startswith("canary ")] == [
        r.line() for r in results
    ]
    assert setup.service.failed == 0


def test_a_substituted_models_canary_fails_and_goes_to_the_duties(
    chain: Chain, tiny: TransformersEngine, tiny1: TransformersEngine, tmp_path: Path
) -> None:
    with network(chain, tiny, substituted_engine(tiny, tiny1), tmp_path) as setup:
        sender = sender_for(setup, tiny)
        wait_for_probation(sender, ADDRS[MINER])
        sender.max_tokens = 16
        result = sender.send_one()
        assert result.outcome == "failed", result
        assert result.detail  # the audit's reason
        setup.duties.tick()
    assert any(f"failure of {result.request_id} confirmed" in line for line in setup.lines)
    # Nobody else could vote yet (V1 is the only verifier): the dispute waits, said once.
    assert len([line for line in setup.lines if "waits for voters" in line]) == 1
    bundle_names = list((tmp_path / "evidence").glob("*.json"))
    assert bundle_names  # the failed job's evidence is kept


def test_canary_prompts_vary_and_mix_greedy_with_sampled() -> None:
    rng = random.Random(11)
    bodies = [canary_request(rng, "tiny", 12) for _ in range(200)]
    prompts = {b["messages"][0]["content"] for b in bodies}
    assert len(prompts) > 40
    greedy = [b for b in bodies if b["temperature"] == 0.0]
    sampled = [b for b in bodies if b["temperature"] > 0.0]
    assert 60 < len(greedy) < 140 and len(sampled) == 200 - len(greedy)
    assert all(0.5 <= b["temperature"] <= 1.2 for b in sampled)
    assert all(6 <= b["max_tokens"] <= 12 for b in bodies)
    again = [canary_request(random.Random(11), "tiny", 12)]
    assert again[0] == bodies[0]  # seeded: the same sequence
    json.dumps(bodies)  # plain JSON


@pytest.mark.parametrize(
    ("probation", "since", "expected"),
    [
        (True, 0.0, (False, 2.0)),
        (True, 2.5, (True, 2.0)),
        (False, 10.0, (False, 5.0)),  # next regular one in 50 s: look for probation in 5 s
        (False, 61.0, (True, 5.0)),
    ],
)
def test_the_loop_sends_faster_while_a_miner_is_on_probation(
    probation: bool, since: float, expected: tuple[bool, float]
) -> None:
    loop = CanaryLoop(object(), 60.0, 2.0)  # type: ignore[arg-type]
    assert loop.next_wait(probation, since) == expected


def test_with_canaries_off_the_loop_only_qualifies() -> None:
    loop = CanaryLoop(object(), 0.0, 2.0)  # type: ignore[arg-type]
    assert loop.next_wait(False, 1e6) == (False, 5.0)
    assert loop.next_wait(True, 3.0) == (True, 2.0)


def scripted_lying_gateway(job: AuditJob, answer_text: str, *, header: bool = True) -> Starlette:
    """SCRIPTED STAND-IN for a dishonest gateway: it answers `answer_text` but records `job`
    (whose text differs) as the request's audit job; or it leaves out the status header."""

    async def chat(request: Request) -> Response:
        body = {"choices": [{"message": {"role": "assistant", "content": answer_text}}]}
        headers = {REQUEST_STATUS_HEADER: "/v1/requests/lie-1"} if header else {}
        return JSONResponse(body, headers=headers)

    async def status(request: Request) -> Response:
        return JSONResponse({"id": "lie-1", "miner": job.miner, "job": job.to_json()})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/requests/{request_id}", status, methods=["GET"]),
        ]
    )


@pytest.mark.parametrize("header", [True, False], ids=["other-text", "no-header"])
def test_a_gateway_that_shows_another_answer_or_no_status_is_caught(
    chain: Chain, tiny: TransformersEngine, tmp_path: Path, header: bool
) -> None:
    net = deploy(chain, tiny)
    with attesting_miner(tiny, net.domain) as miner:
        job = served_job(miner, net, model=tiny.name, collect=False)
    lines: list[str] = []
    service = VerifierService(
        domain=net.domain,
        signer=Signer(KEYS[V1]),
        audit=EngineAuditor([tiny]),
        is_gateway=is_gateway_signer(net.registry),
        evidence=EvidenceStore(tmp_path / "evidence"),
        log=lines.append,
    )
    app = scripted_lying_gateway(job, job.text + " (edited)", header=header)
    with VerifierServerThread(app) as gateway:
        sender = CanarySender(
            gateway.url, "sk-test", service=service, models=[tiny.name], seed=1, log=lines.append
        )
        result = sender.send_one()
    service.close()
    if header:
        assert (result.outcome, result.request_id) == ("mismatch", "lie-1")
        assert result.detail == (
            f"the gateway's job text {job.text!r} is not the answer received"
            f" {job.text + ' (edited)'!r}"
        )
    else:
        assert result.outcome == "error"
        assert result.detail == "ValueError: the gateway's answer has no x-infergrid-request header"
    assert service.audits == 0  # nothing was audited on a job that is not the answer
    assert lines == [result.line()]
