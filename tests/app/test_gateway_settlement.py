"""A metered gateway over real HTTP and real contracts (see settlement_harness.py): headroom and
402s, attestation checks, receipts stored before the response ends, cost in usage, vouchers
that the escrow pays, and the receipt lookup.

ScriptedMiners stand in for the model only: they are registered on-chain and sign real
attestations with their registered signer keys in the escrow's EIP-712 domain.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import MODEL, RunningGateway, miners_running, running_gateway
from scripted_miner import DEFAULT_REPLY
from settlement_harness import (
    GATEWAY,
    KEYS,
    MINER_1,
    PAYER_A,
    PAYER_B,
    Network,
    addr,
    metered_gateway,
    registered_miners,
)
from test_gateway_http import assert_openai_error, raw_post, wait_flushed

from infergrid.app.keys import KeyStore
from infergrid.app.receipts import SignedVoucher
from infergrid.app.traces import TraceStore
from infergrid.protocol.messages import recover_signer
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.protocol.pricing import wei_to_btt
from infergrid.protocol.wire import (
    EXTENSION_KEY,
    GATEWAY_HEADER,
    MINER_HEADER,
    PAYER_HEADER,
    REQUEST_ID_HEADER,
)

MESSAGES = [{"role": "user", "content": "hi"}]
REPLY_TOKENS = len(DEFAULT_REPLY.split())


def receipt_value(prompt: int, completion: int, price_in: int = 1, price_out: int = 2) -> int:
    return prompt * price_in + completion * price_out


def store_of(gw: RunningGateway) -> Any:
    assert gw.gateway.settlement is not None
    return gw.gateway.settlement.store


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def sse_events(data: bytes) -> list[Any]:
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:]
            out.append(None if payload == b"[DONE]" else json.loads(payload))
    return out


# -- receipts and cost -----------------------------------------------------------------------


async def test_non_streamed_receipt_and_cost(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        raw = await gw.client(payer_key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        # Stored before the response ended: no waiting needed.
        stored = store_of(gw).get(rid)
        assert stored is not None
        completion = raw.parse()
        usage = completion.usage
        assert usage is not None
        value = receipt_value(usage.prompt_tokens, usage.completion_tokens)
        assert stored.receipt.value == value
        assert stored.receipt.payer == addr(PAYER_A) and stored.receipt.miner == miners[0].owner
        assert stored.receipt.gateway == addr(GATEWAY)
        assert recover_signer(net.domain, stored.receipt, stored.signature) == addr(GATEWAY)
        assert recover_signer(net.domain, stored.attestation, stored.attestation_signature) == (
            miners[0].signer
        )
        # The official client sees the cost; the raw body has it exactly.
        assert usage.cost == pytest.approx(wei_to_btt(value))  # type: ignore[attr-defined]
        body = json.loads(raw.content)
        assert body["usage"]["cost_wei"] == str(value) and EXTENSION_KEY not in body
        # The miner was told who pays and who signs.
        headers, _ = miners[0].seen[-1]
        assert headers[PAYER_HEADER] == addr(PAYER_A)
        assert headers[GATEWAY_HEADER] == addr(GATEWAY)
        trace = await wait_flushed(traces, rid)
        assert trace.cost_wei == str(value) and trace.payer == addr(PAYER_A)
        assert trace.attestation_error is None
        # Legacy completions are metered the same way.
        legacy = await gw.client(payer_key).completions.create(
            model=MODEL, prompt="hi", max_tokens=3
        )
        assert legacy.usage is not None
        assert legacy.usage.cost_wei == str(receipt_value(7, 3))  # type: ignore[attr-defined]


async def test_streamed_receipts_and_cost_on_the_last_chunk(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        oa = gw.client(payer_key)
        # With a usage chunk: it carries the cost.
        stream = await oa.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        rid = chunks[0].id.removeprefix("chatcmpl-")
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        value = receipt_value(last.usage.prompt_tokens, last.usage.completion_tokens)
        assert last.usage.cost_wei == str(value)  # type: ignore[attr-defined]
        assert last.usage.cost == pytest.approx(wei_to_btt(value))  # type: ignore[attr-defined]
        assert all(c.usage is None for c in chunks[:-1])
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == DEFAULT_REPLY + " "
        stored = store_of(gw).get(rid)
        assert stored is not None and stored.receipt.value == value

        # Without: the finish chunk, the last one, tells the cost anyway.
        stream = await oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        assert all(c.choices for c in chunks)
        last = chunks[-1]
        assert last.choices[0].finish_reason == "stop" and last.usage is not None
        assert last.usage.completion_tokens == REPLY_TOKENS
        assert last.usage.cost_wei == str(value)  # type: ignore[attr-defined]
        assert all(c.usage is None for c in chunks[:-1])
        rid = chunks[0].id.removeprefix("chatcmpl-")
        assert store_of(gw).get(rid).receipt.value == value
        trace = await wait_flushed(traces, rid)
        assert trace.cost_wei == str(value) and trace.status == 200

        # Raw SSE: the usage chunk comes right before [DONE], nothing of the extension leaks.
        body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 2}
        status, headers, data = await raw_post(gw, "/v1/completions", body, payer_key)
        assert status == 200 and EXTENSION_KEY.encode() not in data
        events = sse_events(data)
        assert events[-1] is None and events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-2]["usage"]["cost_wei"] == str(receipt_value(7, 2))
        assert store_of(gw).get(headers[REQUEST_ID_HEADER]) is not None
        assert store_of(gw).count() == 3


# -- 402s ------------------------------------------------------------------------------------


async def test_no_deposit_is_402(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    net.fund_payer(PAYER_A, 0)  # authorized, nothing deposited
    key = keys.create("broke", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, key)
        err = assert_openai_error(status, headers, data, 402)
        assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
        assert headers["x-should-retry"] == "false"
        assert "infergrid account deposit" in err["message"]
        assert miners[0].served == 0
        with pytest.raises(openai.APIStatusError) as info:
            await gw.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert info.value.status_code == 402
        # A deposit is seen by the poller, without restarting anything: the same key is
        # served once the poller has read it (polled for, not timed: CI machines are slow).
        net.escrow.deposit(KEYS[PAYER_A], WEI_PER_BTT)
        done = None
        for _ in range(60):
            await asyncio.sleep(0.25)
            try:
                done = await gw.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
                break
            except openai.APIStatusError as refused:
                assert refused.status_code == 402
        assert done is not None, "the deposit was never seen"
        assert done.usage is not None and done.usage.cost_wei  # type: ignore[attr-defined]


async def test_headroom_runs_out_after_exactly_n_requests(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    """Input is free here, so a request's worst case (max_tokens × price_out) is exactly what
    it costs: a deposit for N requests admits N and refuses the next."""
    n, max_tokens, price_out = 3, 4, 10**12
    net.fund_payer(PAYER_A, n * max_tokens * price_out)
    key = keys.create("exact", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net, price_in_wei=0, price_out_wei=price_out) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens}
        for i in range(n):
            status, _, data = await raw_post(gw, "/v1/chat/completions", body, key)
            assert status == 200, (i, data)
            assert json.loads(data)["usage"]["cost_wei"] == str(max_tokens * price_out)
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, key)
        err = assert_openai_error(status, headers, data, 402)
        assert err["code"] == "insufficient_quota" and headers["x-should-retry"] == "false"
        assert "0 BTT left" in err["message"]
        assert miners[0].served == n
        # A smaller request that fits nothing either is still refused; headroom never leaks.
        account = gw.gateway.settlement.ledger.get(addr(PAYER_A))  # type: ignore[union-attr]
        assert account is not None and account.reserved_wei == 0 and account.inflight == 0
        assert account.receipts_wei == n * max_tokens * price_out


async def test_concurrent_requests_cannot_overspend(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    """Reservations are taken before forwarding: requests in flight together cannot spend the
    same headroom twice."""
    max_tokens, price_out = 4, 10**12
    net.fund_payer(PAYER_A, 2 * max_tokens * price_out)
    key = keys.create("racer", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net, price_in_wei=0, price_out_wei=price_out, token_delay_s=0.05) as m,
        metered_gateway(net, m, keys, traces, tmp_path) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens}
        results = await asyncio.gather(
            *(raw_post(gw, "/v1/chat/completions", body, key) for _ in range(6))
        )
        assert sorted(status for status, _, _ in results) == [200, 200, 402, 402, 402, 402]
        assert store_of(gw).count() == 2


async def test_key_without_payer_or_unauthorized_signer_is_402(
    net: Network, keys: KeyStore, traces: TraceStore, api_key: str, tmp_path: Path
) -> None:
    net.fund_payer(PAYER_B, WEI_PER_BTT, authorize=False)  # deposited, never authorized
    unauthorized = keys.create("b", payer=addr(PAYER_B))[1]
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES}
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, api_key)
        err = assert_openai_error(status, headers, data, 402)
        assert err["type"] == "insufficient_quota" and err["code"] == "no_payer"
        assert f"infergrid account authorize {addr(GATEWAY)}" in err["message"]
        assert headers["x-should-retry"] == "false"

        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, unauthorized)
        err = assert_openai_error(status, headers, data, 402)
        assert err["code"] == "signer_not_authorized" and addr(GATEWAY) in err["message"]
        assert f"infergrid account authorize {addr(GATEWAY)}" in err["message"]
        assert miners[0].served == 0

        # Authorizing is picked up by the poller.
        net.escrow.authorize_signer(KEYS[PAYER_B], addr(GATEWAY))
        await asyncio.sleep(0.5)
        status, _, data = await raw_post(gw, "/v1/chat/completions", body, unauthorized)
        assert status == 200, data
        # A pending revocation stops the gateway from signing for the payer at once.
        net.escrow.revoke_signer(KEYS[PAYER_B], addr(GATEWAY))
        await asyncio.sleep(0.5)
        status, headers, data = await raw_post(gw, "/v1/chat/completions", body, unauthorized)
        err = assert_openai_error(status, headers, data, 402)
        assert "revoking" in err["message"]


# -- attestation checks ------------------------------------------------------------------------

FORGERIES = [
    "missing",
    "wrong_key",
    "wrong_response",
    "wrong_request",
    "wrong_tokens",
    "wrong_model",
    "wrong_miner",
]


async def test_forged_attestations_are_never_charged(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    """A lone miner that forges: non-streamed requests get a 503 (nothing reached the client),
    streams end with an error event; no receipt either way, and the reason is traced."""
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, health_interval_s=60) as gw,
    ):
        miner = miners[0]
        pool = gw.gateway.pool
        state = pool.get(miner.owner)
        assert state is not None
        # Failures in a row would open the miner's breaker; keep it in play for every forgery.
        pool.scheduler.config = replace(pool.scheduler.config, breaker_failures=10**6)
        body = {"model": MODEL, "messages": MESSAGES}
        for forgery in FORGERIES:
            miner.attest = forgery  # type: ignore[assignment]
            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, payer_key)
            err = assert_openai_error(status, headers, data, 503)
            assert err["code"] == "no_miner_available", forgery
            trace = await wait_flushed(traces, headers[REQUEST_ID_HEADER])
            assert trace.attestation_error and miner.owner in trace.attestation_error, forgery

            raw = await gw.client(payer_key).chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, stream=True
            )
            rid = raw.headers[REQUEST_ID_HEADER]
            got = []
            with pytest.raises(openai.APIError, match="could not vouch"):
                async for chunk in raw.parse():
                    got.extend(c.delta.content or "" for c in chunk.choices)
            assert "".join(got).startswith("Hello")  # output went out; the bill did not
            trace = await wait_flushed(traces, rid)
            assert trace.status == 502 and trace.cost_wei is None, forgery
            assert trace.attestation_error, forgery
        assert store_of(gw).count() == 0
        assert state.failed >= 2 * len(FORGERIES)
        account = gw.gateway.settlement.ledger.get(addr(PAYER_A))  # type: ignore[union-attr]
        assert account is not None and account.reserved_wei == 0 and account.receipts_wei == 0
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as r:
            text = await r.text()
        assert f"infergrid_gateway_attestation_failures_total {2 * len(FORGERIES)}.0" in text


async def test_forger_is_failed_over_to_an_honest_miner(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    async with (
        registered_miners(net, 2) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        forger, honest = miners
        forger.attest = "wrong_response"
        oa = gw.client(payer_key)
        for i in range(40):
            # A prompt of its own each time: no prefix affinity to the miner that served last.
            messages = [{"role": "user", "content": f"hi {i}"}]
            raw = await oa.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
            assert raw.headers[MINER_HEADER] == honest.owner
            if forger.served:
                break
        assert forger.served >= 1  # it was tried, and the client never saw it
        rid = raw.headers[REQUEST_ID_HEADER]
        stored = store_of(gw).get(rid)
        assert stored is not None and stored.receipt.miner == honest.owner
        assert store_of(gw).count() == honest.served
        trace = await wait_flushed(traces, rid)
        assert trace.status == 200 and trace.attempts == 2
        assert "response hash" in trace.attestation_error


async def test_stream_failure_after_first_token_is_not_charged(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    async with (
        registered_miners(net, mode="die_mid_stream") as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        raw = await gw.client(payer_key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, stream=True
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            async for _ in raw.parse():
                pass
        trace = await wait_flushed(traces, rid)
        assert trace.status == 502 and trace.cost_wei is None
        assert store_of(gw).get(rid) is None and store_of(gw).count() == 0
        account = gw.gateway.settlement.ledger.get(addr(PAYER_A))  # type: ignore[union-attr]
        assert account is not None and account.reserved_wei == 0 and account.inflight == 0


# -- vouchers and receipts endpoints -------------------------------------------------------------


async def test_vouchers_sum_receipts_and_the_escrow_pays_them(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    net.fund_payer(PAYER_B, WEI_PER_BTT)
    key_b = keys.create("payer-b", payer=addr(PAYER_B))[1]
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        miner = miners[0]
        spent: dict[str, int] = {addr(PAYER_A): 0, addr(PAYER_B): 0}
        for key, payer, n in ((payer_key, addr(PAYER_A), 3), (key_b, addr(PAYER_B), 2)):
            for i in range(n):
                done = await gw.client(key).chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=i + 1, stream=bool(i % 2)
                )
                # Streamed without a usage chunk: the last chunk carries usage all the same.
                last = [c async for c in done][-1] if i % 2 else done  # type: ignore[union-attr]
                spent[payer] += int(last.usage.cost_wei)  # type: ignore[union-attr]

        async with aiohttp.ClientSession() as session:
            url = gw.v1 + "/vouchers"
            async with session.get(url, params={"miner": miner.owner.lower()}) as resp:
                assert resp.status == 200  # no API key needed
                answer = await resp.json()
            for params in ({}, {"miner": "0x1234"}, {"miner": "nope"}):
                async with session.get(url, params=params) as resp:
                    err = assert_openai_error(resp.status, resp.headers, await resp.read(), 400)
                    assert err["param"] == "miner"
        assert answer["gateway"] == addr(GATEWAY)
        vouchers = [SignedVoucher.from_json(v) for v in answer["vouchers"]]
        assert {v.voucher.payer: v.voucher.value_aggregate for v in vouchers} == spent
        assert {v.voucher.payer: v.receipt_count for v in vouchers} == {
            addr(PAYER_A): 3,
            addr(PAYER_B): 2,
        }
        assert all(v.verify(net.domain) and v.voucher.miner == miner.owner for v in vouchers)

        # The escrow pays them: the gateway's own vouchers are valid on-chain.
        for v in vouchers:
            paid = net.escrow.collect(KEYS[MINER_1], v.voucher, v.signature)
            assert paid.paid_wei == v.voucher.value_aggregate
        # Collected receipts are no longer outstanding: headroom is back to balance − thawing.
        ledger = gw.gateway.settlement.ledger  # type: ignore[union-attr]
        await wait_for(lambda: ledger.get(addr(PAYER_A)).outstanding_wei == 0)  # type: ignore
        account = ledger.get(addr(PAYER_A))
        assert account is not None
        assert account.available_wei == WEI_PER_BTT - spent[addr(PAYER_A)]


async def test_receipt_lookup_is_for_its_key_only(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    other_key = keys.create("same payer, other key", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        raw = await gw.client(payer_key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        cost_wei = json.loads(raw.content)["usage"]["cost_wei"]
        url = f"{gw.v1}/receipts/{rid}"
        async with aiohttp.ClientSession() as session:
            auth = {"authorization": f"Bearer {payer_key}"}
            async with session.get(url, headers=auth) as resp:
                assert resp.status == 200
                found = await resp.json()
            async with session.get(url, headers={"authorization": f"Bearer {other_key}"}) as resp:
                err = assert_openai_error(resp.status, resp.headers, await resp.read(), 404)
                assert err["code"] == "receipt_not_found"
            async with session.get(url) as resp:
                assert resp.status == 401
            async with session.get(f"{gw.v1}/receipts/nope", headers=auth) as resp:
                assert resp.status == 404
        assert found["request_id"] == rid
        assert str(found["receipt"]["value"]) == cost_wei
        assert found["receipt"]["payer"] == addr(PAYER_A)
        assert found["attestation"]["miner"] == miners[0].owner
        assert found["anchor"] is None  # no anchoring configured
        assert found["trace"]["miner"] == miners[0].owner and found["trace"]["status"] == 200


async def test_anchoring_runs_in_the_background(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, anchor=True) as gw,
    ):
        raw = await gw.client(payer_key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        rid = raw.headers[REQUEST_ID_HEADER]
        store = store_of(gw)
        await wait_for(lambda: store.anchor_proof(rid) is not None)
        proof = store.anchor_proof(rid)
        on_chain = net.rewards.get_anchor(addr(GATEWAY), proof.anchor_index)
        assert on_chain.root == proof.root and proof.verify()
        auth = {"authorization": f"Bearer {payer_key}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gw.v1}/receipts/{rid}", headers=auth) as resp,
        ):
            found = await resp.json()
        assert found["anchor"]["root"] == "0x" + proof.root.hex()


async def test_unmetered_gateway_has_no_settlement_endpoints(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        async with aiohttp.ClientSession() as session:
            url = gw.v1 + "/vouchers"
            async with session.get(url, params={"miner": miners[0].owner}) as resp:
                err = assert_openai_error(resp.status, resp.headers, await resp.read(), 404)
                assert err["code"] == "settlement_disabled"
            auth = {"authorization": f"Bearer {api_key}"}
            async with session.get(gw.v1 + "/receipts/x", headers=auth) as resp:
                err = assert_openai_error(resp.status, resp.headers, await resp.read(), 404)
                assert err["code"] == "settlement_disabled"
        # And no payer headers go to miners.
        await gw.client(api_key).chat.completions.create(model=MODEL, messages=MESSAGES)
        headers, _ = miners[0].seen[-1]
        assert PAYER_HEADER not in headers and GATEWAY_HEADER not in headers


async def test_a_hedged_stream_is_charged_once_by_the_winner(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    """Metered hedging: while two miners race for a stream the payer's hold covers the dearer;
    only the winner's receipt is stored and charged, and the whole hold is returned."""
    async with registered_miners(net, 2, hang_s=3.0) as miners:
        slow, fast = miners
        async with metered_gateway(
            net, miners, keys, traces, tmp_path,
            first_token_timeout_floor_s=30, first_token_timeout_cap_s=30,
        ) as gw:  # fmt: skip
            oa = gw.client(payer_key).with_options(max_retries=0)

            async def warm(i: int) -> None:
                stream = await oa.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"warm {i}"}], stream=True
                )
                [chunk async for chunk in stream]

            # Both are measured (concurrent requests spread), the soon-slow one as the faster:
            # the policy picks it first, so each request below needs its hedge.
            fast.token_delay_s = 0.05
            scheduler = gw.gateway.pool.scheduler
            for i in range(10):
                await asyncio.gather(*(warm(4 * i + j) for j in range(4)))
                stats = [scheduler.get(m.owner) for m in miners]
                if all(st is not None and st.ttft.value is not None for st in stats):
                    break
            fast.token_delay_s = 0.0
            slow.mode = "hang_before_first"
            before = store_of(gw).count()
            hedged: list[str] = []
            for i in range(6):
                raw = await oa.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"q {i}"}], stream=True
                )
                assert raw.headers[MINER_HEADER] == fast.owner
                [chunk async for chunk in raw.parse()]
                trace = await wait_flushed(traces, raw.headers[REQUEST_ID_HEADER])
                if trace.attempts == 2:
                    hedged.append(raw.headers[REQUEST_ID_HEADER])
            assert len(hedged) == 6
            assert store_of(gw).count() == before + 6  # one receipt per request
            for rid in hedged:
                stored = store_of(gw).get(rid)
                assert stored is not None and stored.receipt.miner == fast.owner
                trace = await wait_flushed(traces, rid)
                assert trace.status == 200 and trace.cost_wei == str(stored.receipt.value)
            account = gw.gateway.settlement.ledger.get(addr(PAYER_A))  # type: ignore[union-attr]
            assert account is not None and account.reserved_wei == 0 and account.inflight == 0
