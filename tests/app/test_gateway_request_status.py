"""`GET /v1/requests/{id}` and the `x-infergrid-request` header (app.request_status): only the
key that made a request may read its status (anyone else, and any unknown id, get the same
OpenAI-shaped 404); an unmetered gateway answers not_selected without an attestation; every
completion response, errors included, points to its status; records are bounded."""

from __future__ import annotations

import time
from pathlib import Path

from audit_harness import chat, get_json
from gateway_harness import miners_running, running_gateway
from settlement_harness import Network, metered_gateway, registered_miners

from infergrid.app.keys import KeyStore
from infergrid.app.request_status import RequestLog, RequestRecord
from infergrid.app.traces import TraceStore


async def test_only_the_key_that_made_the_request_sees_it(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, payer_key: str
) -> None:
    other = keys.create("other", payer=None)[1]
    async with (
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        answer = await chat(gw, payer_key)
        assert answer.status == 200
        status, body = await get_json(gw, answer.status_path, payer_key)
        assert status == 200 and body["id"] == answer.request_id
        for key, path in ((other, answer.status_path), (payer_key, "/v1/requests/nope")):
            status, body = await get_json(gw, path, key)
            assert status == 404
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == "request_not_found"
        status, body = await get_json(gw, answer.status_path, "ig-not-a-key")
        assert status == 401


async def test_an_unmetered_gateway_answers_not_selected(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        answer = await chat(gw, api_key)
        assert answer.status == 200
        status, body = await get_json(gw, answer.status_path, api_key)
        assert status == 200
        assert body["audit"] == {
            "state": "not_selected",
            "verdicts": [],
            "dispute": None,
            "refund_wei": "0",
            "refund": None,
            "note": "",
        }
        assert body["attestation"] is None and body["receipt"] is None and body["job"] is None
        assert body["model"] == "tiny-test" and body["object"] == "infergrid.request"
        # Refusals point to their status too, once the request has an id.
        refused = await chat(gw, api_key, model="no-such-model")
        assert refused.status == 404
        assert refused.status_path == f"/v1/requests/{refused.request_id}"
        _, listed = await get_json(gw, "/v1/miners", api_key)
        assert [m["state"] for m in listed["data"]] == ["active"]


def test_records_are_bounded_oldest_first(tmp_path: Path) -> None:
    """At most max_records, none older than retention_s; pending and disputed ones stay."""
    log = RequestLog(tmp_path / "requests.db", max_records=3, retention_s=3600, prune_every=10**6)

    def add(rid: str, created: float, state: str = "not_selected") -> None:
        record = RequestRecord(rid, "key", created, "m", "0x" + "00" * 20, rid.encode(), {}, state)
        log.add(lambda: record)

    now = time.time()
    add("ancient", now - 7200)
    add("old-but-disputed", now - 7200, "disputed")
    for i in range(4):
        add(f"r{i}", now + i)
    log.prune()
    assert log.get("ancient") is None
    assert log.get("old-but-disputed") is not None
    assert log.get("r0") is None and log.get("r1") is None
    assert [log.get(f"r{i}") is not None for i in (2, 3)] == [True, True]
    assert log.count() == 3
    log.close()
