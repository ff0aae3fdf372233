"""Shared fixtures: a tiny random model (built once per session), SmolLM2, a live miner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from compute_helpers import MINER_ADDRESS, TINY_SEED

from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.model_store import build_tiny_model
from infergrid.compute.transformers_engine import TransformersEngine


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir: Path) -> TransformersEngine:
    # One CPU thread: the tiny model is bound by Python overhead, and tests run beside a
    # server thread on a 2-core machine.
    return TransformersEngine.from_dir(tiny_dir, device="auto", num_threads=1)


@pytest.fixture(scope="session")
def smollm2() -> TransformersEngine:
    """SmolLM2 from the default cache ($INFERGRID_CACHE or ~/.cache/infergrid).

    The first run dequantizes the GGUF from the wheel (about 20 s); later runs load the
    cached safetensors in well under a second.
    """
    return TransformersEngine.load("smollm2", quiet=True)


@pytest.fixture(scope="session")
def miner(tiny_engine: TransformersEngine) -> Iterator[MinerServerThread]:
    app = create_miner_app(tiny_engine, node_address=MINER_ADDRESS, max_concurrency=1)
    with MinerServerThread(app) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> str:
    """SmolLM2's tokenizer files, from the cached model (built on first use, ~20 s)."""
    from infergrid.compute.model_store import default_model_dir

    return str(default_model_dir(quiet=True))
