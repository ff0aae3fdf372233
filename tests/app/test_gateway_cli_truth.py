"""What a metered gateway tells its users and operators, end to end over real HTTP and real
contracts: `infergrid chat` prints what a request cost, and a chain that stops answering shows
in /health within seconds (not when its request finally times out)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_harness import MODEL
from settlement_harness import PAYER_A, addr, deploy_network, metered_gateway, registered_miners
from typer.testing import CliRunner

from infergrid.app.keys import KeyStore
from infergrid.app.settlement import ESCROW_STALL_S
from infergrid.app.traces import TraceStore
from infergrid.cli import app
from infergrid.protocol.nodes import WEI_PER_BTT
from infergrid.settle.chain import Chain, EmbeddedEVM
from infergrid.settle.rpc_server import EmbeddedChainServer


class FreezableProxy:
    """A TCP proxy on 127.0.0.1 in front of a JSON-RPC server. `freeze()` makes it a chain
    that hangs: connections stay open and requests are read, but nothing is answered."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client = self._server.accept()[0]
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.frozen.is_set():  # frozen: swallow, answer nothing
                    dst.sendall(data)


@pytest.fixture
def proxied_chain() -> Iterator[tuple[Chain, FreezableProxy]]:
    with EmbeddedChainServer(EmbeddedEVM(accounts=10)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        proxy = FreezableProxy(port)
        try:
            # A long request timeout: what /health shows must not wait for it.
            yield Chain.connect(proxy.url, request_timeout_s=120), proxy
        finally:
            proxy.close()


async def health(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        assert resp.status == 200
        return dict(await resp.json())


async def test_a_hanging_chain_shows_in_health_within_seconds(
    proxied_chain: tuple[Chain, FreezableProxy],
    keys: KeyStore,
    traces: TraceStore,
    tmp_path: Path,
) -> None:
    chain, proxy = proxied_chain
    net = deploy_network(chain)
    net.fund_payer(PAYER_A, WEI_PER_BTT)
    key = keys.create("payer-a", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        try:
            # One paid request makes the payer one the gateway keeps polling.
            await gw.client(key).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            assert (await health(gw.url))["settlement"]["escrow_error"] is None
            proxy.freeze()
            seen = None
            for _ in range(int((ESCROW_STALL_S + 10) / 0.25)):
                seen = (await health(gw.url))["settlement"]["escrow_error"]
                if seen:
                    break
                await asyncio.sleep(0.25)
            assert seen is not None and "has not answered" in seen, seen
        finally:
            proxy.close()  # the stuck reads fail at once, and the gateway stops cleanly


async def test_chat_prints_the_cost(keys: KeyStore, traces: TraceStore, tmp_path: Path) -> None:
    net = deploy_network(Chain.embedded(EmbeddedEVM(accounts=10)))
    net.fund_payer(PAYER_A, WEI_PER_BTT)
    key = keys.create("payer-a", payer=addr(PAYER_A))[1]
    async with (
        registered_miners(net) as miners,
        metered_gateway(net, miners, keys, traces, tmp_path) as gw,
    ):
        for stream in ("--stream", "--no-stream"):
            args = ["chat", "hi", "--base-url", gw.v1, "--api-key", key, "--model", MODEL, stream]
            # A thread of its own: the CLI blocks, and the gateway runs on this event loop.
            result = await asyncio.to_thread(CliRunner().invoke, app, args, env={"COLUMNS": "200"})
            assert result.exit_code == 0, result.stderr
            assert " · cost 0." in result.stderr and " BTT (" in result.stderr, result.stderr
            assert " wei)" in result.stderr
