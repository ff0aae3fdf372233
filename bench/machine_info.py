"""What machine a benchmark ran on, for the figures in docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it (the platform's word where lscpu fails)."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return model
