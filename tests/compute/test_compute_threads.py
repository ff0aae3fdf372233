"""Miners share a machine: torch's thread pools are sized per miner, and the devnet divides
the cores among its miners instead of letting each take all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from infergrid.devnet import threads_per_miner


@pytest.mark.parametrize(
    ("miners", "cores", "expected"),
    [(1, 16, 16), (2, 2, 1), (2, 16, 8), (3, 16, 5), (4, 2, 1), (8, 1, 1)],
)
def test_devnet_divides_the_cores_among_its_miners(miners: int, cores: int, expected: int) -> None:
    assert threads_per_miner(miners, cores) == expected


def _torch_threads_after(code: str) -> dict[str, int]:
    # A process of its own: torch's pools are process-wide, and the interop pool can be sized
    # only once.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    script = (
        "import json, torch\n"
        f"{code}\n"
        "print(json.dumps({'intra': torch.get_num_threads(),"
        " 'inter': torch.get_num_interop_threads()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_set_torch_threads_sizes_both_pools() -> None:
    threads = _torch_threads_after(
        "from infergrid.compute.transformers_engine import set_torch_threads\nset_torch_threads(1)"
    )
    assert threads == {"intra": 1, "inter": 1}


def test_set_torch_threads_after_the_interop_pool_ran_still_sizes_intra_op() -> None:
    threads = _torch_threads_after(
        "torch.jit.wait(torch.jit.fork(torch.add, torch.ones(1), 1))\n"
        "from infergrid.compute.transformers_engine import set_torch_threads\n"
        "set_torch_threads(1)"
    )
    assert threads["intra"] == 1


def test_set_torch_threads_refuses_zero() -> None:
    from infergrid.compute.transformers_engine import set_torch_threads

    with pytest.raises(ValueError, match="at least 1"):
        set_torch_threads(0)


def test_available_cores_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this platform")
    script = (
        "import os\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from infergrid.compute.transformers_engine import available_cores\n"
        "print(available_cores())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_miner_cli_takes_threads() -> None:
    from typer.testing import CliRunner

    from infergrid.cli import app

    result = CliRunner().invoke(app, ["miner", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--threads" in result.output
    refused = CliRunner().invoke(
        app, ["miner", "--threads", "0", "--chain-rpc", "http://x", "--registry", "0x0"]
    )
    assert refused.exit_code != 0
