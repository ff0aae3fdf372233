"""Audits at a metered gateway (app.audits): the secret selection, the job a verifier gets,
the response never waiting for it, what a failing verdict does (the uncollected receipt voided,
the payer's headroom back, the miner on probation), verdicts that must be ignored, and the
DisputeManager watch turning an on-chain dispute into disputed and then slashed with a refund.

Real HTTP on 127.0.0.1, real contracts on the embedded EVM; ScriptedMiners stand in for the
model and ScriptedVerifiers (tests/app/scripted_verifier.py) for the verifier nodes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from pathlib import Path

import pytest
from audit_harness import chat, get_json, registered_verifiers, wait_state
from scripted_miner import DEFAULT_REPLY
from scripted_verifier import FAIL_REASON
from settlement_harness import (
    ADMIN,
    KEYS,
    MIN_STAKE,
    MINER_1,
    PAYER_A,
    Network,
    addr,
    metered_gateway,
    registered_miners,
)

from infergrid.app.audits import AuditService
from infergrid.app.config import GatewayConfig
from infergrid.app.keys import KeyStore
from infergrid.app.receipts import ReceiptCollected
from infergrid.app.request_status import RequestLog
from infergrid.app.traces import TraceStore
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.messages import request_hash
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.protocol.verdicts import SignedVerdict
from infergrid.settle.disputes import DisputeManager, deploy_disputes

REPLY_TOKENS = DEFAULT_REPLY.split()


@pytest.fixture
def canary_key(keys: KeyStore, payer_key: str) -> str:
    """A canary API key of payer A (funded by payer_key): its requests go to miners on
    probation first, so a new miner's responses are audited at p = 1.0."""
    return keys.create("canary", payer=addr(PAYER_A), canary=True)[1]


# -- selection ---------------------------------------------------------------------------------


def _service(tmp_path: Path, name: str = "requests.db") -> tuple[AuditService, RequestLog]:
    log = RequestLog(tmp_path / name)
    service = AuditService(GatewayConfig(), requests=log, settlement=None)  # type: ignore[arg-type]
    return service, log


def test_selection_is_secret_and_follows_p(tmp_path: Path) -> None:
    """With a fixed secret: on probation every response is audited; an active miner's first
    500 at p = 0.25, then at 0.05 (counted over many request hashes, not timed); the secret
    is kept in the gateway DB (the same after reopening) and another gateway's differs."""
    service, log = _service(tmp_path)
    service.secret = b"\x01" * 32
    miner = addr(MINER_1)
    offer = ModelOffer("tiny-test", "0x" + "00" * 32, 1, 2)
    verifier = NodeRecord(addr(6), Role.VERIFIER, "http://127.0.0.1:9", addr(6), ())
    service.observe_nodes([NodeRecord(miner, Role.MINER, "http://m", miner, (offer,)), verifier])
    assert service.state(miner) == "probation"
    hashes = [os.urandom(32) for _ in range(4000)]
    assert all(service.selects(miner, h) for h in hashes[:200])
    service.miners[miner].state = "active"
    service.miners[miner].served = 0
    first = sum(service.selects(miner, h) for h in hashes[:500])
    after = sum(service.selects(miner, h) for h in hashes[500:4000])
    assert 0.20 < first / 500 < 0.30
    assert 0.035 < after / 3500 < 0.065
    # Fixed by the request and the secret: the same hash draws the same again.
    service.miners[miner].served = 0
    again = [service.selects(miner, h) for h in hashes[:500]]
    service.miners[miner].served = 0
    assert again == [service.selects(miner, h) for h in hashes[:500]]
    secret = log.secret
    assert len(secret) == 32
    log.close()
    reopened = RequestLog(tmp_path / "requests.db")
    other = RequestLog(tmp_path / "other.db")
    assert reopened.secret == secret and other.secret != secret
    reopened.close()
    other.close()


# -- the job -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_selected_job_reaches_the_verifier_exactly(
    net: Network,
    keys: KeyStore,
    traces: TraceStore,
    tmp_path: Path,
    canary_key: str,
    stream: bool,
) -> None:
    """A new miner is on probation, so its canary response is audited: the verifier gets the
    exact bytes the miner was sent (their hash is the attestation's request hash), the token
    ids, the per-token logprobs, the text the client got, usage, the attestation and the
    receipt; the passing verdict shows on GET /v1/requests/{id}."""
    async with (
        registered_verifiers(net) as (verifier,),
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        answer = await chat(gw, canary_key, stream=stream)
        assert answer.status == 200
        assert answer.status_path == f"/v1/requests/{answer.request_id}"
        body = await wait_state(gw, answer.status_path, canary_key, {"passed"})
        (job_json,) = verifier.jobs
        job = AuditJob.from_json(job_json)
        raw = base64.b64decode(job_json["body"])
        assert request_hash(answer.request_id, raw).hex() == job.attestation["requestHash"][2:]
        assert json.loads(raw) == miner.seen[-1][1]
        assert job.request_id == answer.request_id and job.endpoint == "chat"
        assert job.miner == miner.owner and job.model == "tiny-test"
        assert job.output_token_ids == tuple(100 + i for i in range(len(REPLY_TOKENS)))
        assert len(job.output_logprobs) == len(REPLY_TOKENS)
        assert all(lp <= 0 for lp in job.output_logprobs)
        assert job.prompt_token_ids == tuple(range(miner.prompt_len))
        assert job.text == answer.text
        assert job.finish_reason == "stop"
        assert job.usage == {
            "prompt_tokens": miner.prompt_len,
            "completion_tokens": len(REPLY_TOKENS),
        }
        assert job.receipt is not None and job.receipt["miner"] == miner.owner
        assert body["job"] == job_json
        assert body["attestation"] == job_json["attestation"]
        assert body["receipt"] == job_json["receipt"]
        (verdict,) = body["audit"]["verdicts"]
        assert SignedVerdict.from_json(verdict).verdict.passed
        assert body["audit"]["refund_wei"] == "0" and body["audit"]["refund"] is None
        assert body["miner"] == miner.owner and body["object"] == "infergrid.request"


async def test_the_response_does_not_wait_for_the_verifier(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, canary_key: str
) -> None:
    """A verifier that holds the audit until released: the client has its whole answer while
    the audit is still pending, and the verdict lands after the release."""
    async with (
        registered_verifiers(net, hold=True) as (verifier,),
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        answer = await chat(gw, canary_key)
        assert answer.status == 200 and answer.text.strip() == DEFAULT_REPLY
        await asyncio.wait_for(verifier.received.wait(), 10)
        status, body = await get_json(gw, answer.status_path, canary_key)
        assert status == 200 and body["audit"]["state"] == "pending"
        verifier.release()
        await wait_state(gw, answer.status_path, canary_key, {"passed"})


# -- a failing verdict -------------------------------------------------------------------------


async def test_a_failing_verdict_voids_the_receipt_and_puts_the_miner_on_probation(
    net: Network,
    keys: KeyStore,
    traces: TraceStore,
    tmp_path: Path,
    payer_key: str,
    canary_key: str,
) -> None:
    """The miner qualifies on one passed canary audit; then a developer response of its fails
    its audit: the receipt (not collected yet) leaves the voucher's value, the payer's
    headroom gets it back, the request says failed with refund_wei, and the miner is back on
    probation with the failure in its record."""
    async with (
        registered_verifiers(net) as (verifier,),
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path, qualification_audits=1) as gw,
    ):
        first = await chat(gw, canary_key)
        await wait_state(gw, first.status_path, canary_key, {"passed"})
        _, miners = await get_json(gw, "/v1/miners", payer_key)
        assert [m["state"] for m in miners["data"]] == ["active"]
        verifier.mode = "fail"
        settlement = gw.gateway.settlement
        assert settlement is not None
        account = settlement.ledger.account(addr(PAYER_A))
        failed = None
        for _ in range(80):  # p = 0.25 per response: one is selected long before 80
            before = settlement.store.vouchers_for(miner.owner)[0].voucher.value_aggregate
            answer = await chat(gw, payer_key)
            assert answer.status == 200
            body = await wait_state(gw, answer.status_path, payer_key, {"not_selected", "failed"})
            if body["audit"]["state"] == "failed":
                failed = (answer, body)
                break
        assert failed is not None, "no response was selected for audit"
        answer, body = failed
        value = int(body["receipt"]["value"])
        assert value > 0
        assert body["audit"]["refund_wei"] == str(value)
        assert body["audit"]["refund"] == "voided_receipt"
        assert body["audit"]["note"] == FAIL_REASON
        (verdict,) = body["audit"]["verdicts"]
        assert verdict["passed"] is False
        voucher = settlement.store.vouchers_for(miner.owner)[0].voucher
        # Every receipt so far minus the voided one; the voided one is still in the count.
        assert voucher.value_aggregate == before
        assert settlement.store.payer_total(addr(PAYER_A)) == voucher.value_aggregate
        assert account.receipts_wei == voucher.value_aggregate
        assert settlement.store.is_voided(answer.request_id)
        _, miners = await get_json(gw, "/v1/miners", payer_key)
        (record,) = miners["data"]
        assert record["state"] == "probation"
        assert record["audits"]["failed"] == 1 and record["audits"]["passed"] >= 1
        # On probation: developers' requests no longer reach it.
        refused = await chat(gw, payer_key)
        assert refused.status == 503
        assert refused.body["error"]["code"] == "no_miner_available"
        assert refused.status_path == f"/v1/requests/{refused.request_id}"


@pytest.mark.parametrize("mode", ["garbage", "wrong_hash", "impostor", "http_500"])
async def test_verdicts_that_do_not_check_out_are_ignored_and_logged(
    net: Network,
    keys: KeyStore,
    traces: TraceStore,
    tmp_path: Path,
    canary_key: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A verdict that is no verdict, is about another request, is signed by a key that is no
    registered verifier's, or an error: nothing is trusted, the receipt stays, and with no
    other verifier to try the request is not_selected with the reason logged."""
    caplog.set_level(logging.WARNING, logger="infergrid.app.gateway")
    async with (
        registered_verifiers(net, mode=mode) as (verifier,),  # type: ignore[arg-type]
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        answer = await chat(gw, canary_key)
        body = await wait_state(gw, answer.status_path, canary_key, {"not_selected", "failed"})
        assert body["audit"]["state"] == "not_selected"
        assert body["audit"]["note"] == "no verifier could audit it"
        assert body["audit"]["verdicts"] == [] and body["audit"]["refund_wei"] == "0"
        assert len(verifier.jobs) == 1
        settlement = gw.gateway.settlement
        assert settlement is not None and not settlement.store.is_voided(answer.request_id)
    expected = {
        "garbage": "no verdict from verifier",
        "wrong_hash": "the verdict is about request 0x",
        "impostor": "is not a registered, active verifier",
        "http_500": "refused the audit (500)",
    }[mode]
    assert any(expected in r.getMessage() for r in caplog.records), caplog.text


# -- disputes ----------------------------------------------------------------------------------

VOTING_PERIOD, MIN_AGE = 600, 60
CHALLENGER = 8


def _deploy_disputes(net: Network) -> DisputeManager:
    address = deploy_disputes(
        net.chain,
        KEYS[ADMIN],
        registry=net.registry.address,
        escrow=net.escrow.address,
        treasury=addr(ADMIN),
        dispute_deposit_wei=10**15,
        voting_period_s=VOTING_PERIOD,
        max_slash_ppm=500_000,
        challenger_share_ppm=100_000,
        equivocation_slash_ppm=500_000,
        min_quorum_stake_wei=MIN_STAKE,
        min_verifier_age_s=MIN_AGE,
        wrong_vote_slash_ppm=100_000,
        no_quorum_forfeit_ppm=100_000,
        max_open_per_miner=5,
        max_open_per_challenger=5,
    )
    net.registry.set_slasher(KEYS[ADMIN], address)
    return DisputeManager(net.chain, address)


async def test_an_upheld_dispute_shows_as_disputed_then_slashed_with_the_refund(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    """A collected response is disputed on-chain (open_dispute with its attestation and
    receipt); the gateway's watch shows it disputed with the dispute id and transaction, and,
    once the verifiers' quorum upholds it, slashed with the payer's refund (to_payer)."""
    manager = _deploy_disputes(net)
    # The challenger: a verifier of its own (a challenger cannot vote on its dispute).
    net.registry.register(
        KEYS[CHALLENGER], Role.VERIFIER, "http://127.0.0.1:9", addr(CHALLENGER), [], MIN_STAKE
    )
    async with (
        registered_verifiers(net, 2) as verifiers,
        registered_miners(net, 1) as (miner,),
        metered_gateway(
            net,
            [miner],
            keys,
            traces,
            tmp_path,
            disputes=manager,
            qualification_audits=0,
            qualification_tokens_per_s=0.0,
        ) as gw,
    ):
        for verifier in verifiers:
            verifier.hold = True  # audits stay pending: the dispute is what this is about
        answer = await chat(gw, payer_key)
        assert answer.status == 200
        settlement = gw.gateway.settlement
        assert settlement is not None
        stored = settlement.store.get(answer.request_id)
        assert stored is not None
        (signed,) = settlement.store.vouchers_for(miner.owner)
        net.escrow.collect(KEYS[MINER_1], signed.voucher, signed.signature)
        net.chain.increase_time(MIN_AGE)
        dispute_id = await asyncio.to_thread(
            manager.open_dispute,
            KEYS[CHALLENGER],
            stored.attestation,
            stored.attestation_signature,
            stored.receipt,
            stored.signature,
            b"\x05" * 32,
        )
        body = await wait_state(gw, answer.status_path, payer_key, {"disputed"})
        dispute = body["audit"]["dispute"]
        assert dispute["id"] == dispute_id and dispute["status"] == "open"
        assert dispute["tx"].startswith("0x") and len(dispute["tx"]) == 66
        for index in (6, 7):
            await asyncio.to_thread(manager.vote, KEYS[index], dispute_id, True)
        net.chain.increase_time(VOTING_PERIOD)
        resolved = await asyncio.to_thread(manager.resolve, KEYS[ADMIN], dispute_id)
        assert resolved.status == "upheld"
        body = await wait_state(gw, answer.status_path, payer_key, {"slashed"})
        assert body["audit"]["refund"] == "slash"
        assert body["audit"]["refund_wei"] == str(stored.receipt.value)
        assert body["audit"]["dispute"]["status"] == "upheld"
        _, miners = await get_json(gw, "/v1/miners", payer_key)
        assert [m["state"] for m in miners["data"]] == ["slashed"]


async def test_a_failed_response_already_collected_is_not_voided(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, canary_key: str
) -> None:
    """The miner collects its voucher while the audit runs: the failing verdict still makes
    the request failed, but its receipt is paid, so it stays (refund 0, the note says why);
    ReceiptStore.void refuses it with ReceiptCollected, and an unknown id with ValueError."""
    async with (
        registered_verifiers(net, mode="fail", hold=True) as (verifier,),
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        answer = await chat(gw, canary_key)
        await asyncio.wait_for(verifier.received.wait(), 10)
        settlement = gw.gateway.settlement
        assert settlement is not None
        (signed,) = settlement.store.vouchers_for(miner.owner)
        net.escrow.collect(KEYS[MINER_1], signed.voucher, signed.signature)
        verifier.release()
        body = await wait_state(gw, answer.status_path, canary_key, {"failed"})
        assert body["audit"]["refund_wei"] == "0" and body["audit"]["refund"] is None
        assert "not voided" in body["audit"]["note"]
        assert not settlement.store.is_voided(answer.request_id)
        collected = net.escrow.collected(addr(PAYER_A), settlement.gateway, miner.owner)
        with pytest.raises(ReceiptCollected, match="the escrow collected"):
            settlement.store.void(answer.request_id, collected)
        with pytest.raises(ValueError, match="no receipt of request 'nope'"):
            settlement.store.void("nope", 0)
        assert settlement.store.payer_total(addr(PAYER_A)) == signed.voucher.value_aggregate
