"""A benchmark peer's own virtual environment (LiteLLM, llama-cpp-python's server).

A peer we compare against is installed in a venv of its own beside the benchmark, never into
the project's .venv: its pins must not move ours. The venv lies inside `bench/`, and writes a
`.gitignore` of `*` into itself so that git never sees it (as `python -m venv` does from
Python 3.13 on).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
INSTALL_TIMEOUT_S = 900.0


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(
    name: str,
    requirements: list[str],
    *,
    check: str,
    pip_args: list[str] | None = None,
    timeout_s: float = INSTALL_TIMEOUT_S,
) -> Path:
    """The interpreter of `bench/<name>`, created and filled with `requirements` unless
    `check` (a Python statement) already runs there; RuntimeError if the install fails or
    takes longer than `timeout_s`."""
    venv = BENCH / name
    python = venv_python(venv)
    if python.exists() and _runs(python, check):
        return python
    print(f"installing {' '.join(requirements)} into {venv} (once) ...", flush=True)
    started = time.monotonic()
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    (venv / ".gitignore").write_text("*\n")
    cmd = [str(python), "-m", "pip", "install", "--quiet", *(pip_args or []), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0 or not _runs(python, check):
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"installing {requirements} into {venv} failed:\n{tail}")
    print(f"installed in {time.monotonic() - started:.0f} s", flush=True)
    return python


def _runs(python: Path, statement: str) -> bool:
    try:
        return (
            subprocess.run(
                [str(python), "-c", statement], capture_output=True, timeout=120
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False
