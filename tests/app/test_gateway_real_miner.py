"""The gateway in front of the real miner server (compute.miner_server) over a tiny
random-weight model: the wire format as the miner actually speaks it, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from gateway_harness import RunningGateway, running_gateway

from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
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


class _RealMiner:
    """Enough of ScriptedMiner's shape for the harness: a record to discover."""

    def __init__(self, url: str, engine: Any) -> None:
        self.owner = OWNER
        self.base_url = url
        self.engine = engine

    def record(self) -> NodeRecord:
        offer = ModelOffer(self.engine.name, self.engine.model_id, 1, 2)
        return NodeRecord(OWNER, Role.MINER, self.base_url, OWNER, (offer,))


@contextlib.asynccontextmanager
async def gateway_for(
    miner_url: str, engine: Any, keys: KeyStore, traces: TraceStore
) -> AsyncIterator[RunningGateway]:
    async with running_gateway([_RealMiner(miner_url, engine)], keys, traces) as gw:  # type: ignore[list-item]
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
