"""Qualification (app.audits): a new miner is on probation and serves only canary requests
until it passed `qualification_audits` audits; canary requests prefer miners on probation; with
no verifier in the registry every miner is active and serves everyone.

Real HTTP and contracts; ScriptedMiners and ScriptedVerifiers stand in for models and
verifier nodes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from audit_harness import chat, get_json, registered_verifiers, wait_state
from settlement_harness import (
    MINER_1,
    PAYER_A,
    Network,
    addr,
    metered_gateway,
    registered_miners,
)
from typer.testing import CliRunner

from infergrid.app.audits import AuditService, MinerRecord
from infergrid.app.config import GatewayConfig
from infergrid.app.keys import KeyStore, hash_secret
from infergrid.app.request_status import RequestLog, status_lines
from infergrid.app.traces import TraceStore
from infergrid.cli import app
from infergrid.protocol.wire import MINER_HEADER


def _canary(keys: KeyStore) -> str:
    return keys.create("canary", payer=addr(PAYER_A), canary=True)[1]


async def test_a_new_miner_serves_developers_only_after_three_passed_canary_audits(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    canary = _canary(keys)
    async with (
        registered_verifiers(net) as (verifier,),
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        for passed in range(3):
            refused = await chat(gw, payer_key)
            assert refused.status == 503
            assert refused.body["error"]["code"] == "no_miner_available"
            _, miners = await get_json(gw, "/v1/miners", payer_key)
            (record,) = miners["data"]
            assert record["state"] == "probation" and record["audits"]["passed"] == passed
            answer = await chat(gw, canary)
            assert answer.status == 200 and answer.headers[MINER_HEADER.lower()] == miner.owner
            await wait_state(gw, answer.status_path, canary, {"passed"})
        _, miners = await get_json(gw, "/v1/miners", payer_key)
        (record,) = miners["data"]
        assert record["state"] == "active" and record["audits"]["passed"] == 3
        assert record["models"] == ["tiny-test"] and record["address"] == miner.owner
        served = await chat(gw, payer_key)
        assert served.status == 200
        assert len(verifier.jobs) >= 3


async def test_canary_requests_prefer_miners_on_probation(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    """Two new miners, one passed audit to qualify: the first canary request qualifies one
    of them, the next goes to the other (still on probation); developers get the active one."""
    canary = _canary(keys)
    async with (
        registered_verifiers(net),
        registered_miners(net, 2) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, qualification_audits=1) as gw,
    ):
        first = await chat(gw, canary)
        await wait_state(gw, first.status_path, canary, {"passed"})
        qualified = first.headers[MINER_HEADER.lower()]
        (other,) = [m.owner for m in miners if m.owner != qualified]
        second = await chat(gw, canary)
        assert second.headers[MINER_HEADER.lower()] == other
        await wait_state(gw, second.status_path, canary, {"passed"})
        _, listed = await get_json(gw, "/v1/miners", payer_key)
        assert {m["state"] for m in listed["data"]} == {"active"}
        # With no miner on probation a canary request goes to an active one.
        third = await chat(gw, canary)
        assert third.status == 200


async def test_without_verifiers_every_miner_is_active(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    """Nobody can qualify miners without a verifier: a new miner serves developers at once,
    shows as active, and nothing is audited."""
    async with (
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        answer = await chat(gw, payer_key)
        assert answer.status == 200
        status, body = await get_json(gw, answer.status_path, payer_key)
        assert status == 200 and body["audit"]["state"] == "not_selected"
        assert body["attestation"] is not None
        _, listed = await get_json(gw, "/v1/miners", payer_key)
        assert [(m["address"], m["state"], m["served"]) for m in listed["data"]] == [
            (miner.owner, "active", 1)
        ]


async def test_a_verifier_joining_later_does_not_take_serving_miners_off_the_network(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    """A miner first seen while no verifier could qualify it stays active when a verifier
    registers (its answers are audited from then on); only miners that join afterwards start on
    probation. Otherwise one verifier registering would cut every developer off with 503s until
    canaries re-qualified each miner, and forever if that verifier is unreachable."""
    async with (
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        assert (await chat(gw, payer_key)).status == 200
        async with registered_verifiers(net):
            for _ in range(500):
                _, health = await get_json(gw, "/health", payer_key)
                if health["audits"]["qualifying"]:
                    break
                await asyncio.sleep(0.02)
            assert health["audits"]["qualifying"]
            answer = await chat(gw, payer_key)
            assert answer.status == 200
            assert answer.headers[MINER_HEADER.lower()] == miner.owner
            _, listed = await get_json(gw, "/v1/miners", payer_key)
            assert [(m["address"], m["state"]) for m in listed["data"]] == [(miner.owner, "active")]


def test_canary_keys_and_the_migration_of_an_old_database(tmp_path: Path) -> None:
    """`keys create --canary` marks the key; a database made before canary keys gains the
    column (every old key is not a canary) and keeps its keys."""
    db = tmp_path / "gateway.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_hash BLOB"
        " NOT NULL UNIQUE, hint TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL,"
        " payer TEXT)"
    )
    conn.execute(
        "INSERT INTO api_keys VALUES ('key_old', 'old', ?, 'ig-…abcd', 1.0, NULL, NULL)",
        (hash_secret("ig-old-secret"),),
    )
    conn.commit()
    conn.close()
    store = KeyStore(db)
    (old,) = store.list()
    assert (old.key_id, old.canary) == ("key_old", False)
    store.close()
    result = CliRunner().invoke(
        app, ["keys", "create", "probe", "--canary", "--db", str(db), "--json"]
    )
    assert result.exit_code == 0, result.output
    created = json.loads(result.output[result.output.index("{") :])
    assert created["canary"] is True
    store = KeyStore(db)
    record = store.verify(created["key"])
    assert record is not None and record.canary and record.name == "probe"
    assert store.get("key_old") is not None and not store.get("key_old").canary  # type: ignore[union-attr]
    store.close()


async def test_miner_states_persist_in_the_gateway_db(tmp_path: Path) -> None:
    """A restarted gateway remembers who qualified, who is on probation and the counts."""
    log = RequestLog(tmp_path / "gateway.requests.db")
    service = AuditService(GatewayConfig(), requests=log, settlement=None)  # type: ignore[arg-type]
    miner = addr(MINER_1)
    service.miners[miner] = MinerRecord(state="active", served=9, passed=3, failed=1)
    await service.close()  # saves every miner's record
    log.close()
    log = RequestLog(tmp_path / "gateway.requests.db")
    again = AuditService(GatewayConfig(), requests=log, settlement=None)  # type: ignore[arg-type]
    assert again.miners[miner] == MinerRecord(state="active", served=9, passed=3, failed=1)
    log.close()


def test_trace_prints_the_audit_state_verdicts_dispute_and_refund() -> None:
    body = {
        "audit": {
            "state": "slashed",
            "note": "",
            "verdicts": [{"passed": False, "verifier": "0xV", "reason": "sampler: step 3"}],
            "dispute": {"id": 4, "status": "upheld", "tx": "0xabc"},
            "refund_wei": "31",
            "refund": "slash",
        }
    }
    assert status_lines(body) == [
        "audit     slashed",
        "  verdict failed by 0xV: sampler: step 3",
        "dispute   #4 upheld tx 0xabc",
        "refund    31 wei (slash)",
    ]


async def test_a_miner_below_the_throughput_floor_stays_on_probation(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    """Passed audits are not enough: a miner slower than --qualification-tokens-per-s stays
    on probation (here the floor is far above what any miner reaches)."""
    canary = _canary(keys)
    async with (
        registered_verifiers(net),
        registered_miners(net, 1) as (miner,),
        metered_gateway(
            net,
            [miner],
            keys,
            traces,
            tmp_path,
            qualification_audits=1,
            qualification_tokens_per_s=1e12,
        ) as gw,
    ):
        answer = await chat(gw, canary)
        await wait_state(gw, answer.status_path, canary, {"passed"})
        _, listed = await get_json(gw, "/v1/miners", payer_key)
        (record,) = listed["data"]
        assert record["state"] == "probation" and record["audits"]["passed"] == 1
        assert (await chat(gw, payer_key)).status == 503
