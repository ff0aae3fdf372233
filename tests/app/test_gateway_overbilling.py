"""A miner cannot bill more than the request allowed (over real HTTP and real contracts, see
settlement_harness.py).

The attack: a miner signs a real attestation whose counts agree with each other (attestation,
usage, prompt and output ids) but bill for more than the request held: a prompt longer than
the forwarded body can tokenize to, or more output than max_tokens. The gateway knows what it
sent, so such an attestation is refused like any other (counted, traced, failed over to an
honest miner while nothing reached the client), nothing is charged and the payer's headroom
is untouched. A request without a completion limit is forwarded with the gateway's default, so
the reservation (protocol.pricing.max_request_value of the forwarded body) is what it can cost
at most, and no receipt ever exceeds it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import MODEL, RunningGateway, miners_running, running_gateway
from settlement_harness import (
    PAYER_A,
    PAYER_B,
    Network,
    addr,
    metered_gateway,
    registered_miners,
)
from test_gateway_http import assert_openai_error, raw_post, wait_flushed

from infergrid.app import relay
from infergrid.app.billing import PayerAccount
from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.protocol.pricing import (
    DEFAULT_MAX_TOKENS,
    format_btt,
    max_prompt_tokens,
    max_request_value,
    request_value,
)
from infergrid.protocol.wire import MINER_HEADER, REQUEST_ID_HEADER

MESSAGES = [{"role": "user", "content": "hi"}]
# Any request these tests send forwards a body far shorter than this, so a miner claiming this
# many prompt tokens claims hundreds of times what the request can hold.
INFLATED_PROMPT = 100_000
# Output a miner that ignores max_tokens sends: 20,000 times the limit the tests ask for.
LONG_REPLY = " ".join(["word"] * 20_000)


def account_of(gw: RunningGateway, payer: int = PAYER_A) -> PayerAccount:
    settlement = gw.gateway.settlement
    assert settlement is not None
    account = settlement.ledger.get(addr(payer))
    assert account is not None
    return account


def receipts_of(gw: RunningGateway) -> Any:
    assert gw.gateway.settlement is not None
    return gw.gateway.settlement.store


async def attestation_failures(gw: RunningGateway) -> float:
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("infergrid_gateway_attestation_failures_total "):
            return float(line.split()[1])
    raise AssertionError("no attestation failure metric")


async def assert_refused_and_uncharged(
    gw: RunningGateway,
    traces: TraceStore,
    key: str,
    body: dict[str, Any],
    reason: str,
    *,
    stream_cut: str | None = None,
) -> None:
    """A lone over-billing miner: the non-streamed request gets the usual no-miner 503 (nothing
    reached the client), the stream ends with the attestation error event; no receipt, no
    charge, the payer's headroom still its whole deposit (1 BTT), and the reason in both
    traces. With `stream_cut`, the stream is cut as soon as it outgrows the request's limit,
    before any attestation, with that reason in its trace."""
    miner = gw.miners[0]
    state = gw.gateway.pool.get(miner.owner)
    assert state is not None
    failures = await attestation_failures(gw)

    status, headers, data = await raw_post(gw, "/v1/chat/completions", body, key)
    err = assert_openai_error(status, headers, data, 503)
    assert err["code"] == "no_miner_available"
    trace = await wait_flushed(traces, headers[REQUEST_ID_HEADER])
    assert trace.cost_wei is None
    assert trace.attestation_error and miner.owner in trace.attestation_error
    assert "bills beyond the request" in trace.attestation_error
    assert reason in trace.attestation_error

    state.healthy = True  # repeated failures take a miner out; keep it in play
    raw = await gw.client(key).chat.completions.with_raw_response.create(**body, stream=True)
    rid = raw.headers[REQUEST_ID_HEADER]
    with pytest.raises(openai.APIError, match="failed mid-stream" if stream_cut else "vouch"):
        async for _ in raw.parse():
            pass
    trace = await wait_flushed(traces, rid)
    assert trace.status == 502 and trace.cost_wei is None
    if stream_cut:
        assert trace.error and stream_cut in trace.error and trace.attestation_error is None
    else:
        assert trace.attestation_error and reason in trace.attestation_error

    assert receipts_of(gw).count() == 0
    account = account_of(gw)
    assert account.receipts_wei == 0 and account.reserved_wei == 0 and account.inflight == 0
    assert account.available_wei == WEI_PER_BTT
    assert await attestation_failures(gw) == failures + (1 if stream_cut else 2)


# -- the attack, alone -----------------------------------------------------------------------


async def test_inflated_prompt_attestation_is_refused_and_not_charged(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    """A miner signs a real attestation claiming a 100,000-token prompt (ids and usage to
    match) for a request of about a hundred bytes: worth hundreds of times its reservation."""
    async with (
        registered_miners(net, prompt_len=INFLATED_PROMPT) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, health_interval_s=60) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
        await assert_refused_and_uncharged(gw, traces, payer_key, body, "prompt tokens attested")
        forwarded = int(miners[0].seen[-1][0]["content-length"])
        assert 100 * max_prompt_tokens(forwarded) < INFLATED_PROMPT


async def test_output_beyond_max_tokens_is_refused_and_not_charged(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    """A miner ignores max_tokens = 1 and sends, reports and attests 20,000 tokens of output:
    with input free, a receipt worth 20,000 times the reservation. Streamed, the relay stops
    at the second token: nobody pays for output past the limit, so none is relayed."""
    async with (
        registered_miners(
            net, mode="ignore_max_tokens", reply=LONG_REPLY, price_in_wei=0, price_out_wei=10**9
        ) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, health_interval_s=60) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
        await assert_refused_and_uncharged(
            gw,
            traces,
            payer_key,
            body,
            "20000 completion tokens attested, above the request's",
            stream_cut="streamed 2 tokens, above the request's limit 1",
        )


async def test_a_receipt_above_its_reservation_is_refused_even_if_the_limits_let_it_pass(
    net: Network,
    keys: KeyStore,
    traces: TraceStore,
    payer_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defence in depth: with the limit check broken (patched out here), the gateway still
    refuses to commit a receipt worth more than the call's reservation, logs it as an error
    and charges nothing; the client gets what any rejected attestation gets."""
    monkeypatch.setattr("infergrid.verify.attestation.over_limit", lambda *a, **k: None)
    async with (
        registered_miners(net, prompt_len=INFLATED_PROMPT) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, health_interval_s=60) as gw,
    ):
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
        with caplog.at_level(logging.ERROR, logger="infergrid.app.gateway"):
            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, payer_key)
        err = assert_openai_error(status, headers, data, 503)
        assert err["code"] == "no_miner_available"
        assert any("refusing its receipt" in r.getMessage() for r in caplog.records)
        trace = await wait_flushed(traces, headers[REQUEST_ID_HEADER])
        assert trace.attestation_error and "reserved for the request" in trace.attestation_error
        assert receipts_of(gw).count() == 0
        account = account_of(gw)
        assert account.receipts_wei == 0 and account.reserved_wei == 0


# -- with an honest miner in the pool ------------------------------------------------------------


@pytest.mark.parametrize(
    ("lie", "reason"),
    [
        ({"prompt_len": INFLATED_PROMPT}, "prompt tokens attested"),
        ({"mode": "ignore_max_tokens"}, "completion tokens attested"),
    ],
)
async def test_an_over_billing_miner_is_failed_over_to_an_honest_one(
    net: Network,
    keys: KeyStore,
    traces: TraceStore,
    payer_key: str,
    tmp_path: Path,
    lie: dict[str, Any],
    reason: str,
) -> None:
    """The client never sees the over-billing miner: its request is served, and charged, by
    the honest miner at the honest price."""
    async with (
        registered_miners(net, 2) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        liar, honest = miners
        for name, value in lie.items():
            setattr(liar, name, value)
        oa = gw.client(payer_key)
        spent = 0
        for i in range(40):
            # A prompt of its own each time: no prefix affinity to the miner that served last.
            raw = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2
            )
            assert raw.headers[MINER_HEADER] == honest.owner
            usage = raw.parse().usage
            assert usage is not None and usage.completion_tokens == 2
            assert usage.prompt_tokens == 7  # the honest miner's count
            spent += int(usage.cost_wei)  # type: ignore[attr-defined]
            if liar.served:
                break
        assert liar.served == 1  # it was tried once, and the client never saw it
        rid = raw.headers[REQUEST_ID_HEADER]
        stored = receipts_of(gw).get(rid)
        assert stored is not None and stored.receipt.miner == honest.owner
        assert stored.receipt.value == request_value(7, 2, honest.offers()[0])
        assert receipts_of(gw).count() == honest.served
        trace = await wait_flushed(traces, rid)
        assert trace.status == 200 and trace.attempts == 2
        assert trace.attestation_error and liar.owner in trace.attestation_error
        assert reason in trace.attestation_error
        account = account_of(gw)
        assert account.receipts_wei == spent and account.reserved_wei == 0


# -- the limit a request is forwarded with, and its reservation ----------------------------------


async def test_a_request_without_max_tokens_is_forwarded_as_the_client_sent_it(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    """A gateway reserving the protocol's DEFAULT_MAX_TOKENS for a request that states no
    limit forwards it unchanged: an honest miner applies the same default, so a long prompt
    still gets what the context holds instead of a context error. A limit the client set is
    forwarded as given."""
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        miner = miners[0]
        oa = gw.client(payer_key)
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert "max_tokens" not in miner.seen[-1][1]
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5)
        forwarded = miner.seen[-1][1]
        assert forwarded["max_completion_tokens"] == 5 and "max_tokens" not in forwarded
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
        assert miner.seen[-1][1]["max_tokens"] == 3


async def test_a_gateway_with_its_own_default_states_it_to_the_miner(
    net: Network, keys: KeyStore, traces: TraceStore, payer_key: str, tmp_path: Path
) -> None:
    """A gateway reserving another default than the protocol's writes it into the forwarded
    body, or an honest miner would generate (and bill) past the reservation."""
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path, default_max_tokens=7) as gw,
    ):
        miner = miners[0]
        oa = gw.client(payer_key)
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert miner.seen[-1][1]["max_tokens"] == 7
        async for _ in await oa.completions.create(model=MODEL, prompt="hi", stream=True):
            pass
        assert miner.seen[-1][1]["max_tokens"] == 7
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
        assert miner.seen[-1][1]["max_tokens"] == 3


async def test_an_unmetered_gateway_forwards_no_limit_of_its_own(
    keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with miners_running(1) as miners, running_gateway(miners, keys, traces) as gw:
        await gw.client(api_key).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert "max_tokens" not in miners[0].seen[-1][1]


async def test_the_reservation_is_max_request_value_of_the_forwarded_body(
    net: Network, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    """A payer whose headroom is one wei short of max_request_value(forwarded body, default
    max_tokens, the miner's offer) is refused with that figure; one who has exactly it is
    served, and charged what the miner attested, within it."""
    # A seed of the client's own keeps the forwarded body's length known.
    body = {"model": MODEL, "messages": MESSAGES, "seed": 5}
    forwarded = relay.encode(body)
    async with registered_miners(net) as miners:
        offer = miners[0].offers()[0]
        reservation = max_request_value(len(forwarded), DEFAULT_MAX_TOKENS, offer)
        net.fund_payer(PAYER_A, reservation - 1)
        short = keys.create("one wei short", payer=addr(PAYER_A))[1]
        net.fund_payer(PAYER_B, reservation)
        exact = keys.create("exactly enough", payer=addr(PAYER_B))[1]
        async with metered_gateway(net, miners, keys, traces, tmp_path) as gw:
            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, short)
            err = assert_openai_error(status, headers, data, 402)
            assert err["code"] == "insufficient_quota"
            assert f"may cost up to {format_btt(reservation)} BTT" in err["message"]
            assert f"has {format_btt(reservation - 1)} BTT left" in err["message"]
            assert miners[0].served == 0

            status, headers, data = await raw_post(gw, "/v1/chat/completions", body, exact)
            assert status == 200, data
            seen_headers, seen_body = miners[0].seen[-1]
            assert int(seen_headers["content-length"]) == len(forwarded)
            assert seen_body == json.loads(forwarded)
            value = int(json.loads(data)["usage"]["cost_wei"])
            assert 0 < value <= reservation
            account = account_of(gw, PAYER_B)
            assert account.receipts_wei == value and account.reserved_wei == 0
            assert account.available_wei == reservation - value
