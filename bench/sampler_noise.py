"""Protocol noise cost per decode step on the CPU (docs/protocol.md, docs/benchmarks.md).

    .venv/bin/python bench/sampler_noise.py [--threads 1] [--repeats 50]

For vocabularies of 49,152 (SmolLM2) and 151,936 (Qwen2.5) it times, per step: the
counter-based noise of a whole row (torch and numpy), a batch of 8 rows in one call, a
top-k 40 step (noise for the kept tokens only), a whole protocol sampling step of one row
(sample_rows, temperature 1, no truncation), and the Mersenne-Twister noise the sampler used
before (for comparison). Medians over the repeats, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from infergrid.protocol import sampling
from machine_info import cpu_model


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _mersenne_twister_noise(key: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(key)
    u = torch.rand(vocab, generator=generator, dtype=torch.float64)
    return u.log_().neg_().log_().neg_()


def _steps(vocab: int) -> dict[str, Callable[[], object]]:
    logits = torch.randn(1, vocab, dtype=torch.float32) * 4
    key = sampling.step_seed(1, 2)
    keys8 = [sampling.step_seed(s, 2) for s in range(8)]
    top_k = [sampling.RowSampling(1, 2, 0.8, top_k=40)]
    full = [sampling.RowSampling(1, 2, 1.0)]
    return {
        "noise, one row (torch)": lambda: sampling.gumbel_noise(1, 2, vocab),
        "noise, one row (numpy)": lambda: sampling.gumbel_noise_numpy(1, 2, vocab),
        "noise, 8 rows in one call (torch)": lambda: sampling.gumbel_noise_rows(keys8, vocab),
        "sampling step, top-k 40 (kept noise only)": lambda: sampling.sample_rows(logits, top_k),
        "sampling step, full vocabulary": lambda: sampling.sample_rows(logits, full),
        "before: Mersenne Twister noise, one row": lambda: _mersenne_twister_noise(key, vocab),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'what':<44} {'V=49,152':>10} {'V=151,936':>10}")
    rows: dict[str, list[float]] = {}
    for vocab in (49_152, 151_936):
        for name, fn in _steps(vocab).items():
            rows.setdefault(name, []).append(_median_ms(fn, args.repeats))
    for name, (small, large) in rows.items():
        print(f"{name:<44} {small:>8.3f}ms {large:>8.3f}ms")


if __name__ == "__main__":
    main()
