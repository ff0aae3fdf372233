"""How llama.cpp itself scales with batch size on this machine: the time of one llama_decode
step for 1, 2, 4 and 8 sequences of one token each, on SmolLM2's GGUF, in three cache
configurations (ours: a KV stream per sequence with flash attention over a Q8_0 cache, the
batch-invariant path; llama.cpp's default: a unified F16 cache without flash attention; and a
unified F16 cache with flash attention).

    .venv/bin/python bench/llamacpp_batch_step.py [--threads 2] [--steps 20]
        [--requantize q8_0,q4_0]

`--requantize` also measures SmolLM2 requantized from its shipped Q4_1 into each listed type
(llama.cpp's own llama_model_quantize, into a temporary directory): whether another weight
format's kernels batch better on this CPU. A requantized file is another precision, hence
another model id: this only measures the kernels.

This is the ceiling for any llama.cpp-based engine's aggregate throughput: if 8 sequences cost
8x one, batching cannot multiply throughput, whatever the engine around it does.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

import llama_cpp

from infergrid.compute import llamacpp_engine, model_store
from machine_info import cpu_model

CONFIGS = [
    ("stream per sequence, flash, Q8_0 (ours)", False, True, "q8_0"),
    ("unified, no flash, F16 (llama.cpp default)", True, False, "f16"),
    ("unified, flash, F16", True, True, "f16"),
]


def step_ms(model: object, threads: int, steps: int, unified: bool, flash: bool, kv: str) -> dict:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 4096, 512, 8
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = unified
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flash
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.type_k = params.type_v = llamacpp_engine.KV_CACHE_TYPES[kv]
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(4096, 0, 1)
    positions = [0] * 8

    def decode(entries: list[tuple[int, list[int]]]) -> None:
        n = 0
        for seq, tokens in entries:
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n] = token, positions[seq]
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, seq
                batch.logits[n] = i == len(tokens) - 1
                positions[seq] += 1
                n += 1
        batch.n_tokens = n
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    for seq in range(8):  # a 40-token prompt in every sequence
        decode([(seq, list(range(100, 140)))])
    out = {}
    for rows in (1, 2, 4, 8):
        start = time.perf_counter()
        for _ in range(steps):
            decode([(seq, [200]) for seq in range(rows)])
        out[rows] = (time.perf_counter() - start) / steps * 1e3
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--requantize",
        default="",
        help="comma-separated weight types (q8_0, q4_0, ...) to also measure, ours only",
    )
    args = parser.parse_args()
    llamacpp_engine._init_backend()
    shipped = model_store.smollm2_gguf_path()
    print(f"machine: {cpu_model()}, {args.threads} thread(s), SmolLM2-135M")
    print(
        f"{'configuration':<50} {'1 row':>8} {'2 rows':>8} {'4 rows':>8} {'8 rows':>8}  8 rows / 1"
    )

    def measure(path: Path, label: str, configs: list[tuple[str, bool, bool, str]]) -> None:
        params = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise SystemExit(f"llama.cpp could not load {path}")
        for name, unified, flash, kv in configs:
            ms = step_ms(model, args.threads, args.steps, unified, flash, kv)
            cells = " ".join(f"{ms[r]:>6.1f}ms" for r in (1, 2, 4, 8))
            print(f"{label + name:<50} {cells}  {8 * ms[1] / ms[8]:.2f}x aggregate")
        llama_cpp.llama_model_free(model)

    measure(shipped, "Q4_1: ", CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in filter(None, (k.strip().upper() for k in args.requantize.split(","))):
            ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None)
            if ftype is None:
                raise SystemExit(f"llama.cpp has no weight type {kind!r}")
            quantize = llama_cpp.llama_model_quantize_default_params()
            quantize.ftype, quantize.allow_requantize, quantize.nthread = ftype, True, args.threads
            out = Path(tmp) / f"smollm2-{kind}.gguf"
            if llama_cpp.llama_model_quantize(
                str(shipped).encode(), str(out).encode(), ctypes.byref(quantize)
            ):
                raise SystemExit(f"llama.cpp could not requantize SmolLM2 to {kind}")
            measure(out, f"{kind}: ", CONFIGS[:1])


if __name__ == "__main__":
    main()
