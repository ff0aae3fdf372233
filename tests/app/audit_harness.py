"""Helpers for the gateway's audit tests: verifiers (ScriptedVerifier stand-ins) registered
on-chain, raw completion requests that keep the response headers, and waiting for a request's
audit state through `GET /v1/requests/{id}`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from gateway_harness import MODEL, RunningGateway
from scripted_verifier import ScriptedVerifier, VerifierMode
from settlement_harness import KEYS, MIN_STAKE, Network, addr

from infergrid.protocol.nodes import Role
from infergrid.protocol.wire import REQUEST_ID_HEADER, REQUEST_STATUS_HEADER

VERIFIER_KEYS = (6, 7)
MESSAGES = [{"role": "user", "content": "hi"}]


@contextlib.asynccontextmanager
async def registered_verifiers(
    net: Network, count: int = 1, *, mode: VerifierMode = "pass", hold: bool = False
) -> AsyncIterator[list[ScriptedVerifier]]:
    """Running ScriptedVerifiers, registered as VERIFIER nodes with their endpoints."""
    async with contextlib.AsyncExitStack() as stack:
        verifiers = []
        for index in VERIFIER_KEYS[:count]:
            verifier = ScriptedVerifier(KEYS[index], net.domain, mode=mode, hold=hold)
            await stack.enter_async_context(verifier.running())
            net.registry.register(
                KEYS[index], Role.VERIFIER, verifier.base_url, addr(index), [], MIN_STAKE
            )
            verifiers.append(verifier)
        yield verifiers


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any  # JSON (plain) or the list of SSE events (streamed)

    @property
    def request_id(self) -> str:
        return self.headers[REQUEST_ID_HEADER]

    @property
    def status_path(self) -> str:
        return self.headers[REQUEST_STATUS_HEADER]

    @property
    def text(self) -> str:
        if isinstance(self.body, dict):
            return self.body["choices"][0]["message"]["content"]
        return "".join(
            e["choices"][0]["delta"].get("content") or "" for e in self.body if e.get("choices")
        )


async def chat(gw: RunningGateway, key: str, *, stream: bool = False, **extra: Any) -> Answer:
    body = {"model": MODEL, "messages": MESSAGES, "stream": stream, **extra}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.v1 + "/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        ) as resp,
    ):
        raw = await resp.read()
        headers = {k.lower(): v for k, v in resp.headers.items()}
    if stream and resp.status == 200:
        events = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
        return Answer(resp.status, headers, events)
    return Answer(resp.status, headers, json.loads(raw))


async def get_json(gw: RunningGateway, path: str, key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + path, headers={"authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status, await resp.json()


async def wait_state(
    gw: RunningGateway, path: str, key: str, states: set[str], *, polls: int = 500
) -> dict[str, Any]:
    """The request's status once its audit state is one of `states` (polled; fails after
    `polls` tries, 20 ms apart, with the last status seen)."""
    body: Any = None
    for _ in range(polls):
        status, body = await get_json(gw, path, key)
        assert status == 200, body
        if body["audit"]["state"] in states:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"audit never reached {states}: {body}")
