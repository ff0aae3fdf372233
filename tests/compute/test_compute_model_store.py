"""Model specs, the on-disk cache and its digests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infergrid.compute import model_store
from infergrid.protocol.models import DEFAULT_MODEL


def test_cache_root_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INFERGRID_CACHE", str(tmp_path))
    assert model_store.cache_root() == tmp_path
    assert model_store.models_dir() == tmp_path / "models"
    monkeypatch.delenv("INFERGRID_CACHE")
    assert model_store.cache_root() == Path.home() / ".cache" / "infergrid"


def test_digests_are_cached_by_path_size_and_mtime(tmp_path: Path) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"abc")
    cache = tmp_path / "cache"
    digest = model_store.cached_sha256(blob, cache)
    assert digest == model_store.sha256_file(blob)
    index = json.loads((cache / "digests.json").read_text())
    assert index[str(blob.resolve())]["sha256"] == digest
    blob.write_bytes(b"abcd")  # a new size invalidates the entry
    assert model_store.cached_sha256(blob, cache) == model_store.sha256_file(blob)
    assert model_store.cached_sha256(blob, cache) != digest


def test_several_weight_files_digest_by_name(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"1")
    (tmp_path / "b.safetensors").write_bytes(b"2")
    files = sorted(tmp_path.glob("*.safetensors"))
    one = model_store.weights_digest(files, tmp_path / "c")
    assert one == model_store.weights_digest(list(reversed(files)), tmp_path / "c")
    assert one != model_store.weights_digest(files[:1], tmp_path / "c")


def test_specs_resolve_and_name_the_served_model(tmp_path: Path) -> None:
    assert model_store.served_model_name("smollm2") == DEFAULT_MODEL
    assert model_store.served_model_name(DEFAULT_MODEL) == DEFAULT_MODEL
    assert model_store.served_model_name("tiny") == "tiny-llama-s0"
    assert model_store.served_model_name("tiny:5") == "tiny-llama-s5"
    built = model_store.resolve_model_dir("tiny:3", cache_dir=tmp_path)
    assert built == tmp_path / "models" / "tiny-llama-s3"
    assert model_store.served_model_name(built) == "tiny-llama-s3"
    # A second resolve reuses the directory rather than rebuilding it.
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert model_store.prepare_model("tiny:3", cache_dir=tmp_path) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="unknown model"):
        model_store.resolve_model_dir(str(tmp_path / "nothing-here"), cache_dir=tmp_path)


def test_the_default_model_ships_in_the_wheel() -> None:
    gguf = model_store.smollm2_gguf_path()
    assert gguf.name == model_store.SMOLLM2_GGUF
    assert gguf.stat().st_size > 50_000_000
