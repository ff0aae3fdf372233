"""Fixtures for the audit tests: two tiny random models sharing a vocabulary (tiny:0, the
reference, and tiny:1, the substitute; built fresh as `tiny_ref`/`tiny_other`, or from the model
store as `tiny`/`tiny1`), an attestor, and `serve`, which answers a request as
the miner does (compute.attacks.serve_job) and returns the audit job a gateway would build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from audit_helpers import DOMAIN, MINER, MINER_KEY, Serve, request_body

from infergrid.compute.attacks import serve_job
from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import Engine
from infergrid.compute.model_store import build_tiny_model
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Signer


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny0") / "model", seed=0)
    return TransformersEngine.from_dir(path, device="cpu", num_threads=1)


@pytest.fixture(scope="session")
def tiny_other(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path: Path = build_tiny_model(tmp_path_factory.mktemp("tiny1") / "model", seed=1)
    return TransformersEngine.from_dir(path, device="cpu")


@pytest.fixture(scope="session")
def tiny() -> TransformersEngine:
    """The devnet's "tiny" from the model store (the verifier node tests serve it over HTTP)."""
    return TransformersEngine.load("tiny", num_threads=1, quiet=True)


@pytest.fixture(scope="session")
def tiny1() -> TransformersEngine:
    """tiny:1, its substitute: same vocabulary, other weights."""
    return TransformersEngine.load("tiny:1", num_threads=1, quiet=True)


@pytest.fixture(scope="session")
def attestor() -> Attestor:
    return Attestor(DOMAIN, Signer(MINER_KEY), MINER)


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
