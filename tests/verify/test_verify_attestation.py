"""verify.attestation: the gateway's attestation check lives in verify/ and is the one
app.settlement (where the gateway imports it) exposes; the checks themselves are specified in
tests/app/test_gateway_billing.py. The acceptance checks in verify/ do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import infergrid.verify
from infergrid.app import metering
from infergrid.verify import attestation

PURE_MODULES = ("attestation.py", "receipt.py", "voucher.py")
# Nothing that reaches a file, socket, process or the chain, nor the layers that do.
IO_MODULES = (
    "asyncio",
    "http",
    "os",
    "pathlib",
    "shutil",
    "socket",
    "sqlite3",
    "subprocess",
    "threading",
    "urllib",
    "infergrid.app",
    "infergrid.compute",
    "infergrid.settle",
)


def test_the_gateway_uses_the_verify_check() -> None:
    assert metering.verify_attestation is attestation.verify_attestation
    assert metering.offer_for is attestation.offer_for


@pytest.mark.parametrize("name", PURE_MODULES)
def test_acceptance_checks_do_no_io(name: str) -> None:
    """Each pure check module imports no I/O module nor an I/O layer, and never opens or
    prints anything."""
    tree = ast.parse((Path(infergrid.verify.__file__).parent / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("open", "print", "input"), f"{name} calls {node.func.id}"
            continue
        else:
            continue
        for module in imported:
            assert not any(
                module == banned or module.startswith(banned + ".") for banned in IO_MODULES
            ), f"{name} imports {module}"
