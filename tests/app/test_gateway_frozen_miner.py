"""A real miner frozen with SIGSTOP (its own process, compute.miner_server over the tiny random
model) next to a second real miner: no request waits past its deadline. Before the first token
they move to the other miner unseen by the client; after it the stream ends with an error
event within the stall timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_harness import RealMiner, running_gateway
from miner_process import MinerProcess

from infergrid.app.keys import KeyStore
from infergrid.app.traces import TraceStore
from infergrid.protocol.wire import MINER_HEADER

miner_server = pytest.importorskip("infergrid.compute.miner_server")
model_store = pytest.importorskip("infergrid.compute.model_store")
transformers_engine = pytest.importorskip("infergrid.compute.transformers_engine")

FROZEN, OTHER = "0x" + "f0" * 20, "0x" + "0f" * 20
MESSAGES = [{"role": "user", "content": "Say hello."}]
FLOOR_S, CAP_S, STALL_S = 2.0, 4.0, 2.0
MARGIN_S = 6.0  # generous: a correctness deadline on a busy machine, not a benchmark
# What the gateway waits without deadlines: longer than the client below is willing to.
READ_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_store.build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", seed=0, name="tiny-gw"
    )


@pytest.fixture(scope="module")
def frozen(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinerProcess]:
    log = tmp_path_factory.mktemp("miner") / "miner.log"
    with MinerProcess(model_dir, FROZEN, log) as process:
        yield process


@pytest.fixture(scope="module")
def other(model_dir: Path) -> Iterator[RealMiner]:
    engine = transformers_engine.TransformersEngine.from_dir(model_dir, device="cpu")
    app = miner_server.create_miner_app(engine, node_address=OTHER, max_concurrency=2)
    with miner_server.MinerServerThread(app, log_level="critical") as server:
        yield RealMiner(OTHER, server.url, engine)


def gateway_settings() -> dict[str, Any]:
    return {
        # Deadlines are what these are about (hedging: test_gateway_scheduling).
        "hedge_streams": False,
        "read_timeout_s": READ_TIMEOUT_S,
        "first_token_timeout_floor_s": FLOOR_S,
        "first_token_timeout_cap_s": CAP_S,
        "stream_stall_timeout_s": STALL_S,
    }


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, timeout=CLIENT_TIMEOUT_S
    )


async def timed(oa: openai.AsyncOpenAI, model: str, stream: bool) -> tuple[float, str]:
    """(seconds, serving miner) of one chat request that must succeed."""
    started = time.monotonic()
    raw = await oa.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=8, stream=stream
    )
    if stream:
        chunks = [chunk async for chunk in raw.parse()]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    else:
        assert raw.parse().choices[0].finish_reason in ("stop", "length")
    return time.monotonic() - started, raw.headers[MINER_HEADER]


async def test_frozen_miner_delays_no_request_past_its_deadline(
    frozen: MinerProcess, other: RealMiner, keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    model = frozen.record().models[0].name
    async with running_gateway([frozen, other], keys, traces, **gateway_settings()) as gw:  # type: ignore[list-item]
        oa = client(gw.url, api_key)
        try:
            # Both serve, and the gateway learns how fast the model is.
            warm = await asyncio.gather(*(timed(oa, model, s) for s in (True, False) * 3))
            assert {miner for _, miner in warm} == {FROZEN, OTHER}
            frozen.freeze()
            try:
                # Sent at once, before any health check notices: some go to the frozen miner.
                results = await asyncio.gather(*(timed(oa, model, s) for s in (True, False) * 3))
            finally:
                frozen.thaw()
            for elapsed, miner in results:
                assert miner == OTHER
                assert elapsed < CAP_S + MARGIN_S, f"a request waited {elapsed:.1f} s"
            registry = gw.gateway.metrics.registry
            moved = sum(
                registry.get_sample_value(
                    "infergrid_gateway_first_token_timeouts_total", {"reason": reason}
                )
                or 0.0
                for reason in ("deadline", "miner_down")
            )
            assert moved >= 1  # requests really were held by the frozen miner, then moved
        finally:
            await oa.close()


async def test_frozen_mid_stream_ends_the_stream_within_the_stall_timeout(
    frozen: MinerProcess, keys: KeyStore, traces: TraceStore, api_key: str
) -> None:
    """Frozen after the first token: the client has output, so there is no failing over; the
    stream ends with an OpenAI-shaped error within the stall timeout, not the read timeout."""
    model = frozen.record().models[0].name
    async with running_gateway([frozen], keys, traces, **gateway_settings()) as gw:  # type: ignore[list-item]
        oa = client(gw.url, api_key)
        try:
            # A long greedy answer (about 1 ms a token on the tiny model), so the freeze lands
            # while the miner is still generating.
            stream = await oa.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=1500,
                temperature=0,
                stream=True,
            )
            chunks = aiter(stream)
            while not (await anext(chunks)).choices[0].delta.content:
                pass
            frozen.freeze()
            frozen_at = time.monotonic()
            try:
                with pytest.raises(openai.APIError, match="sent nothing for 2 s"):
                    async for _ in chunks:
                        pass
                stalled = time.monotonic() - frozen_at
            finally:
                frozen.thaw()
            assert stalled < STALL_S + MARGIN_S
            assert gw.gateway.metrics.registry.get_sample_value(
                "infergrid_gateway_stream_stalls_total"
            )
        finally:
            await oa.close()


async def test_a_miner_killed_before_its_first_tokens_costs_the_clients_nothing(
    model_dir: Path,
    other: RealMiner,
    keys: KeyStore,
    traces: TraceStore,
    api_key: str,
    tmp_path: Path,
) -> None:
    """kill -9 of a miner holding requests that wait for their first token (frozen first, so
    they surely wait): the kernel resets their connections and each moves to the other miner,
    unseen by the client. Health checks are slow here, so it is the reset that moves them."""
    doomed_owner = "0x" + "d0" * 20
    with MinerProcess(model_dir, doomed_owner, tmp_path / "doomed.log") as doomed:
        model = doomed.record().models[0].name
        settings = {**gateway_settings(), "health_interval_s": 60}
        async with running_gateway([doomed, other], keys, traces, **settings) as gw:  # type: ignore[list-item]
            oa = client(gw.url, api_key)
            try:
                warm = await asyncio.gather(*(timed(oa, model, s) for s in (True, False) * 3))
                assert {miner for _, miner in warm} == {doomed_owner, OTHER}
                state = gw.gateway.pool.get(doomed_owner)
                assert state is not None
                doomed.freeze()
                pending = [asyncio.create_task(timed(oa, model, s)) for s in (True, False) * 3]
                deadline = time.monotonic() + 10
                while state.inflight == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                held = state.inflight
                assert held >= 1  # some requests really are waiting on it
                doomed.process.kill()
                doomed.process.wait(timeout=10)
                results = await asyncio.gather(*pending)
                assert [miner for _, miner in results] == [OTHER] * len(results)
                failovers = gw.gateway.metrics.registry.get_sample_value(
                    "infergrid_gateway_failovers_total"
                )
                assert failovers is not None and failovers >= held
                assert state.healthy is False  # marked down by the refused connections
            finally:
                await oa.close()
