"""`GET /v1/verifiers` (app.lookups): per verifier, the verdicts this gateway recorded (passed,
failed) for the requests it received in [since, until); what verifier pay counts as audits.

The count itself (RequestLog.verdict_counts) on records written as the gateway writes them;
the endpoint end to end on a metered gateway whose canary traffic is audited by two
ScriptedVerifiers (tests/app/scripted_verifier.py, stand-ins for the verifier nodes): every
verdict shown on a request's status is counted for the verifier that signed it, registered
verifiers that audited nothing are listed with zeros, and bad windows are refused by name.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from audit_harness import chat, get_json, registered_verifiers, wait_state
from settlement_harness import PAYER_A, Network, addr, metered_gateway, registered_miners

from infergrid.app.keys import KeyStore
from infergrid.app.request_status import RequestLog, RequestRecord
from infergrid.app.traces import TraceStore
from infergrid.verify.pay_epoch import fetch_verifier_audits

V1 = "0x" + "a1" * 20
V2 = "0x" + "b2" * 20


def _verdict(verifier: str, passed: bool) -> dict[str, Any]:
    # The fields the count reads, as SignedVerdict.to_json writes them.
    return {"verifier": verifier, "passed": passed, "reason": "" if passed else "bad"}


def test_counts_verdicts_per_verifier_in_the_window(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "requests.db")

    def add(rid: str, created: float, *verdicts: dict[str, Any]) -> None:
        record = RequestRecord(
            rid, "key", created, "m", "0x" + "00" * 20, rid.encode(), {}, verdicts=list(verdicts)
        )
        log.add(lambda: record)

    add("r1", 100.0, _verdict(V1, True))
    add("r2", 150.5, _verdict(V1, False), _verdict(V2, True))  # a re-audit: both count
    add("r3", 200.0, _verdict(V2, True))
    add("r4", 250.0)  # not audited
    add("r5", 300.0, _verdict(V1, True))
    try:
        assert log.verdict_counts() == {V1: (2, 1), V2: (2, 0)}
        # [since, until): the start is in, the end is out.
        assert log.verdict_counts(100, 200) == {V1: (1, 1), V2: (1, 0)}
        assert log.verdict_counts(200, 300) == {V2: (1, 0)}
        assert log.verdict_counts(since=200) == {V1: (1, 0), V2: (1, 0)}
        assert log.verdict_counts(until=150.5) == {V1: (1, 0)}
        assert log.verdict_counts(301, None) == {}
        assert log.verdict_counts(300, 100) == {}
        # Bounds past SQLite's 64-bit integers (a query string can hold any number).
        assert log.verdict_counts(0, 10**30) == log.verdict_counts()
        assert log.verdict_counts(10**30, None) == {}
    finally:
        log.close()


@pytest.fixture
def canary_key(keys: KeyStore, payer_key: str) -> str:
    """A canary key of payer A: its requests go to the new miner, on probation, so every
    response is audited."""
    return keys.create("canary", payer=addr(PAYER_A), canary=True)[1]


async def test_the_endpoint_counts_what_the_request_statuses_show(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path, canary_key: str
) -> None:
    async with (
        registered_verifiers(net, 2) as verifiers,
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        start = int(time.time())
        expected: dict[str, int] = {v.address: 0 for v in verifiers}
        # Three: the miner is on probation (every response audited) until three passed.
        for _ in range(3):
            answer = await chat(gw, canary_key)
            assert answer.status == 200
            body = await wait_state(gw, answer.status_path, canary_key, {"passed"})
            (verdict,) = body["audit"]["verdicts"]
            expected[verdict["verifier"]] += 1
        status, listed = await get_json(gw, "/v1/verifiers", canary_key)
        assert status == 200
        assert listed["object"] == "list"
        assert listed["since"] is None and listed["until"] is None
        assert listed["data"] == [
            {"address": a, "audits": {"passed": n, "failed": 0, "total": n}}
            for a, n in sorted(expected.items())
        ]
        # What verifier pay reads (verify.pay_epoch's client), by the base URL clients use.
        counts = await asyncio.to_thread(fetch_verifier_audits, gw.v1, canary_key)
        assert counts == expected
        with pytest.raises(RuntimeError) as exc:
            await asyncio.to_thread(fetch_verifier_audits, gw.url, "ig-not-a-key")
        assert str(exc.value).startswith("the gateway answered: Incorrect API key provided")
        # A window after every request: the registered verifiers, with nothing counted.
        later = start + 3600
        status, listed = await get_json(gw, f"/v1/verifiers?since={later}", canary_key)
        assert status == 200 and listed["since"] == later
        assert [entry["audits"]["total"] for entry in listed["data"]] == [0, 0]
        status, listed = await get_json(
            gw, f"/v1/verifiers?since={start - 60}&until={later}", canary_key
        )
        assert status == 200
        assert sum(entry["audits"]["passed"] for entry in listed["data"]) == 3


@pytest.mark.parametrize(
    ("query", "param", "message"),
    [
        ("since=yesterday", "since", "`since` must be a unix time in seconds, got 'yesterday'."),
        ("until=-5", "until", "`until` must be a unix time in seconds, got '-5'."),
        ("since=nan", "since", "`since` must be a unix time in seconds, got 'nan'."),
        ("until=inf", "until", "`until` must be a unix time in seconds, got 'inf'."),
    ],
)
async def test_bad_windows_are_refused_by_name(
    net: Network,
    keys: KeyStore,
    traces: TraceStore,
    tmp_path: Path,
    api_key: str,
    query: str,
    param: str,
    message: str,
) -> None:
    async with (
        registered_miners(net, 1) as (miner,),
        metered_gateway(net, [miner], keys, traces, tmp_path) as gw,
    ):
        status, body = await get_json(gw, f"/v1/verifiers?{query}", api_key)
        assert status == 400
        assert body["error"]["code"] == "invalid_value"
        assert body["error"]["param"] == param
        assert body["error"]["message"] == message
        status, body = await get_json(gw, "/v1/verifiers", "ig-not-a-key")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
