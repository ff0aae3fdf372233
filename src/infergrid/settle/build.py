"""Compile the Vyper contracts into committed JSON artifacts, and load those at runtime.

Nodes never compile: they load `artifacts/<Name>.json`. After editing a contract or a shared
module under `contracts/lib/`, regenerate with `python -m infergrid.settle.build`; a test fails
while the artifacts are stale.

Contracts share code as Vyper modules in `contracts/lib/` (`initializes:` / `uses:`, as
Snekmate does), never by copying functions; a module is not a contract and has no artifact.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SETTLE_DIR = Path(__file__).resolve().parent
CONTRACTS_DIR = SETTLE_DIR / "contracts"
MODULES_DIR = CONTRACTS_DIR / "lib"
ARTIFACTS_DIR = SETTLE_DIR / "artifacts"
EVM_VERSION = "london"  # BTTC runs Berlin rules: no PUSH0, no BASEFEE


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # 0x-prefixed deployment bytecode
    source_sha256: str
    compiler: str
    evm_version: str


def contract_names() -> list[str]:
    return sorted(path.stem for path in CONTRACTS_DIR.glob("*.vy"))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _modules_source() -> str:
    """Every shared module, in name order: part of each contract's source hash, so editing a
    module marks every artifact stale (a contract that does not import it rebuilds the same)."""
    return "".join(
        f"\n# --- lib/{path.name}\n{path.read_text()}" for path in sorted(MODULES_DIR.glob("*.vy"))
    )


def compile_contract(name: str) -> dict[str, Any]:
    """Compile contracts/<name>.vy; returns the artifact as the JSON file holds it."""
    import vyper
    from vyper.compiler.input_bundle import FilesystemInputBundle
    from vyper.compiler.settings import Settings

    path = CONTRACTS_DIR / f"{name}.vy"
    if not path.is_file():
        raise FileNotFoundError(f"no contract source {path}")
    source = path.read_text()
    # Paths relative to the contracts folder, so the bytecode's metadata does not depend on
    # where the checkout lies.
    bundle = FilesystemInputBundle([CONTRACTS_DIR])
    out = vyper.compiler.compile_from_file_input(
        bundle.load_file(path.name),
        input_bundle=bundle,
        output_formats=["abi", "bytecode"],
        settings=Settings(evm_version=EVM_VERSION),
    )
    return {
        "contract": name,
        "compiler": f"vyper {vyper.__version__}",
        "evm_version": EVM_VERSION,
        "source_sha256": source_hash(source + _modules_source()),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
    }


def artifact_path(name: str) -> Path:
    return ARTIFACTS_DIR / f"{name}.json"


def build_artifacts(names: list[str] | None = None) -> list[Path]:
    """Recompile the contracts (all unless `names`) and rewrite their artifact files."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or contract_names():
        path = artifact_path(name)
        path.write_text(json.dumps(compile_contract(name), indent=1, sort_keys=True) + "\n")
        written.append(path)
    load_artifact.cache_clear()
    return written


@cache
def load_artifact(name: str) -> Artifact:
    path = artifact_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no artifact {path}; run `python -m infergrid.settle.build` to compile it"
        )
    data = json.loads(path.read_text())
    return Artifact(
        name=data["contract"],
        abi=data["abi"],
        bytecode=data["bytecode"],
        source_sha256=data["source_sha256"],
        compiler=data["compiler"],
        evm_version=data["evm_version"],
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for path in build_artifacts(args or None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
