"""Load an engine by kind: the one place the CLI, the devnet and benchmarks choose a backend.

Kinds:
- "transformers": the reference engine (compute.transformers_engine), CPU or CUDA;
- "llamacpp": GGUF files natively through llama-cpp-python (compute.llamacpp_engine);
- "openai": a proxy in front of an OpenAI-compatible server the operator runs
  (compute.proxy_engine), `upstream` is its base URL and `upstream_flavor` says which server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infergrid.compute.engine import Engine

ENGINE_KINDS = ("transformers", "llamacpp", "openai")
# `infergrid up`'s default: the fastest built-in engine that can load the model.
AUTO = "auto"


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def default_engine(model: str) -> str:
    """The built-in engine for `model` when none is named: llama.cpp for a GGUF model (the
    default SmolLM2 or a .gguf file) where llama-cpp-python is installed — it runs the file
    natively, several times faster per stream on a CPU (docs/benchmarks.md) — otherwise the
    transformers engine (safetensors directories, tiny models, or no llama-cpp-python)."""
    from infergrid.compute.model_store import DEFAULT_ALIASES

    gguf = model.lower() in DEFAULT_ALIASES or model.lower().endswith(".gguf")
    return "llamacpp" if gguf and llama_cpp_installed() else "transformers"


def upstream_options_error(
    kind: str,
    upstream: str | None,
    upstream_flavor: str | None = None,
    upstream_model: str | None = None,
) -> str | None:
    """Why these upstream options do not fit engine `kind`, or None: the openai engine needs
    --upstream, and only it takes --upstream, --upstream-flavor or --upstream-model."""
    if kind == "openai":
        return (
            None
            if upstream is not None
            else "--engine openai needs --upstream URL (the server it fronts)"
        )
    if (upstream, upstream_flavor, upstream_model) != (None, None, None):
        return (
            "--upstream, --upstream-flavor and --upstream-model are for --engine openai,"
            f" not {kind}"
        )
    return None


def load_engine(
    kind: str,
    model: str,
    *,
    num_threads: int | None = None,
    device: str = "auto",
    upstream: str | None = None,
    upstream_flavor: str | None = None,
    upstream_model: str | None = None,
    max_batch: int | None = None,
    quiet: bool = False,
) -> Engine:
    """The engine of `kind` serving `model` (a spec such as "smollm2", a .gguf file or a dir).

    Raises ValueError, naming what to change, for an unknown kind, a missing package or an
    option the kind does not take.
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r} (available: {', '.join(ENGINE_KINDS)})")
    error = upstream_options_error(kind, upstream, upstream_flavor, upstream_model)
    if error is not None:
        raise ValueError(error)
    if kind == "transformers":
        from infergrid.compute.transformers_engine import TransformersEngine

        extra = {} if max_batch is None else {"max_batch": max_batch}
        return TransformersEngine.load(
            model, device=device, num_threads=num_threads, quiet=quiet, **extra
        )
    if kind == "llamacpp":
        try:
            from infergrid.compute.llamacpp_engine import LlamaCppEngine
        except ImportError as exc:  # llama_cpp itself is missing
            raise ValueError(
                f"the llamacpp engine needs llama-cpp-python ({exc}); `./dev setup` installs it"
            ) from exc
        extra = {} if max_batch is None else {"max_batch": max_batch}
        return LlamaCppEngine.load(model, num_threads=num_threads, quiet=quiet, **extra)
    # openai: the upstream computes, batches and picks the device; the miner only templates,
    # tokenizes and detokenizes. Raises proxy_engine.UpstreamError when it does not answer.
    assert upstream is not None  # upstream_options_error
    from infergrid.compute.proxy_engine import FLAVORS, ProxyEngine

    flavor = upstream_flavor or "vllm"
    if flavor not in FLAVORS:
        raise ValueError(f"unknown --upstream-flavor {flavor!r} (available: {', '.join(FLAVORS)})")
    if max_batch is not None:
        raise ValueError("--max-batch is for the built-in engines: the upstream batches itself")
    return ProxyEngine.connect(
        upstream, model=model, flavor=flavor, upstream_model=upstream_model, quiet=quiet
    )
