"""Fixtures for the audit tests: two tiny random models sharing a vocabulary (tiny:0, the
reference, and tiny:1, the substitute), an attestor, and `serve`, which answers a request as
the miner does (compute.attacks.serve_job) and returns the audit job a gateway would build."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from infergrid.compute.attacks import serve_job
from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import Engine
from infergrid.compute.model_store import build_tiny_model
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer

DOMAIN = Domain(1337, "0x" + "e5" * 20)  # any escrow address: nothing here touches a chain
MINER_KEY = "0x" + "11" * 32
MINER = "0x00000000000000000000000000000000000000aA"

Serve = Callable[..., AuditJob]


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny0") / "model", seed=0)
    return TransformersEngine.from_dir(path, device="cpu", num_threads=1)


@pytest.fixture(scope="session")
def tiny_other(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny1") / "model", seed=1)
    return TransformersEngine.from_dir(path, device="cpu")


@pytest.fixture(scope="session")
def attestor() -> Attestor:
    return Attestor(DOMAIN, Signer(MINER_KEY), MINER)


def request_body(model: str, content: str, *, chat: bool = True, **params: Any) -> bytes:
    """A request body as a gateway forwards it."""
    payload: dict[str, Any] = {"model": model, **params}
    if chat:
        payload["messages"] = [{"role": "user", "content": content}]
    else:
        payload["prompt"] = content
    return json.dumps(payload).encode()


@pytest.fixture(scope="session")
def serve(tiny_ref: TransformersEngine, attestor: Attestor) -> Serve:
    """serve(engine=None, content=..., chat=True, request_id="req-1", **params) -> AuditJob."""

    def run(
        content: str = "Tell me a story about a dragon.",
        *,
        engine: Engine | None = None,
        chat: bool = True,
        request_id: str = "req-1",
        **params: Any,
    ) -> AuditJob:
        params.setdefault("max_tokens", 16)
        body = request_body(tiny_ref.name, content, chat=chat, **params)
        return serve_job(
            engine or tiny_ref, body, chat=chat, request_id=request_id, attestor=attestor
        )

    return run
