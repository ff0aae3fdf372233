"""The gateway in front of the real miner server (compute.miner_server) over a tiny
random-weight model: the wire format as the miner actually speaks it, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import RealMiner, RunningGateway, running_gateway

from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.protocol.nodes import ModelOffer, Role
from infergrid.protocol.wire import EXTENSION_KEY, MINER_HEADER, REQUEST_ID_HEADER

miner_server = pytest.importorskip("infergrid.compute.miner_server")
model_store = pytest.importorskip("infergrid.compute.model_store")
transformers_engine = pytest.importorskip("infergrid.compute.transformers_engine")

OWNER = "0x" + "5a" * 20
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model_dir = model_store.build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", seed=0, name="tiny-gw"
    )
    return transformers_engine.TransformersEngine.from_dir(model_dir, device="cpu")


@pytest.fixture
def miner_url(engine: Any) -> Iterator[str]:
    app = miner_server.create_miner_app(engine, node_address=OWNER, max_concurrency=2)
    with miner_server.MinerServerThread(app, log_level="critical") as server:
        yield server.url


@contextlib.asynccontextmanager
async def gateway_for(
    miner_url: str, engine: Any, keys: KeyStore, traces: TraceStore
) -> AsyncIterator[RunningGateway]:
    async with running_gateway([RealMiner(OWNER, miner_url, engine)], keys, traces) as gw:  # type: ignore[list-item]
        yield gw


async def test_chat_through_gateway(
    miner_url: str, engine: Any, keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with gateway_for(miner_url, engine, keys, traces) as gw:
        oa = gw.client(api_key)
        raw = await oa.chat.completions.with_raw_response.create(
            model=engine.name, messages=MESSAGES, max_tokens=8
        )
        assert EXTENSION_KEY not in json.loads(raw.content)
        assert raw.headers[MINER_HEADER] == OWNER
        completion = raw.parse()
        assert completion.id == "chatcmpl-" + raw.headers[REQUEST_ID_HEADER]
        assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
        assert completion.choices[0].logprobs is None

        with_lp = await oa.chat.completions.create(
            model=engine.name, messages=MESSAGES, max_tokens=4, logprobs=True
        )
        assert with_lp.choices[0].logprobs is not None and with_lp.choices[0].logprobs.content

        stream = await oa.chat.completions.create(
            model=engine.name,
            messages=MESSAGES,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens > 0 and isinstance(streamed, str)

        stream = await oa.chat.completions.create(
            model=engine.name, messages=MESSAGES, max_tokens=4, stream=True
        )
        assert all([c.usage is None and c.choices async for c in stream])

        legacy = await oa.completions.create(model=engine.name, prompt="Once", max_tokens=4)
        assert legacy.choices[0].finish_reason in ("stop", "length")


async def test_raw_stream_is_clean(
    miner_url: str, engine: Any, keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    async with gateway_for(miner_url, engine, keys, traces) as gw:
        body = {"model": engine.name, "messages": MESSAGES, "max_tokens": 6, "stream": True}
        headers = {"authorization": f"Bearer {api_key}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(gw.v1 + "/chat/completions", json=body, headers=headers) as resp,
        ):
            data = await resp.read()
            rid = resp.headers[REQUEST_ID_HEADER]
        assert resp.status == 200 and EXTENSION_KEY.encode() not in data
        assert data.endswith(b"data: [DONE]\n\n")
        assert b'"usage"' not in data  # the client did not ask for it
        traces.flush()
        for _ in range(50):
            trace = traces.get(rid)
            if trace is not None and trace.status:
                break
            await asyncio.sleep(0.02)
        assert trace is not None and trace.status == 200
        assert trace.completion_tokens and trace.prompt_tokens and trace.ttft_ms is not None


async def test_metered_through_real_miner(
    engine: Any, keys: KeyStore, traces: TraceStore, tmp_path: Path
) -> None:
    """The real miner signs attestations (compute.attestation) that a metered gateway checks
    and turns into receipts: the whole settlement path with nothing scripted."""
    attestation = pytest.importorskip("infergrid.compute.attestation")
    from settlement_harness import (
        KEYS,
        MIN_STAKE,
        MINER_1,
        PAYER_A,
        addr,
        deploy_network,
        metered_gateway,
    )

    from infergrid.protocol.eip712 import Signer
    from infergrid.protocol.nodes import WEI_PER_BTT
    from infergrid.settle.chain import Chain, EmbeddedEVM

    net = deploy_network(Chain.embedded(EmbeddedEVM(accounts=10)))
    owner = addr(MINER_1)
    attestor = attestation.Attestor(net.domain, Signer(KEYS[MINER_1]), owner)
    offer = ModelOffer(engine.name, engine.model_id, 3, 5)
    app = miner_server.create_miner_app(
        engine, node_address=owner, max_concurrency=2, attestor=attestor
    )
    net.fund_payer(PAYER_A, WEI_PER_BTT)
    key = keys.create("real", payer=addr(PAYER_A))[1]
    with miner_server.MinerServerThread(app, log_level="critical") as server:
        net.registry.register(
            KEYS[MINER_1], Role.MINER, server.url, attestor.signer_address, [offer], MIN_STAKE
        )
        async with metered_gateway(net, [], keys, traces, tmp_path) as gw:
            store = gw.gateway.settlement.store  # type: ignore[union-attr]
            oa = gw.client(key)
            raw = await oa.chat.completions.with_raw_response.create(
                model=engine.name, messages=MESSAGES, max_tokens=6
            )
            usage = raw.parse().usage
            assert usage is not None
            value = usage.prompt_tokens * 3 + usage.completion_tokens * 5
            assert usage.cost_wei == str(value)  # type: ignore[attr-defined]
            stored = store.get(raw.headers[REQUEST_ID_HEADER])
            assert stored is not None and stored.receipt.value == value
            assert stored.receipt.miner == owner

            for include_usage in (True, False):
                options = {"include_usage": True} if include_usage else None
                stream = await oa.chat.completions.create(
                    model=engine.name,
                    messages=MESSAGES,
                    max_tokens=6,
                    stream=True,
                    stream_options=options,  # type: ignore[arg-type]
                )
                chunks = [c async for c in stream]
                last = chunks[-1]
                assert last.usage is not None and last.usage.cost_wei  # type: ignore[attr-defined]
                rid = chunks[0].id.removeprefix("chatcmpl-")
                stored = store.get(rid)
                assert stored is not None
                assert str(stored.receipt.value) == last.usage.cost_wei  # type: ignore[attr-defined]

            legacy = await oa.completions.create(model=engine.name, prompt="Once", max_tokens=4)
            assert legacy.usage is not None and legacy.usage.cost_wei  # type: ignore[attr-defined]
            assert store.count() == 4
            trace = gw.gateway.traces.get(raw.headers[REQUEST_ID_HEADER])
            assert trace is not None and trace.attestation_error is None
