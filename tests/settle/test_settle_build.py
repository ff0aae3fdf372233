"""The committed contract artifacts are what the sources compile to."""

from __future__ import annotations

import json

import pytest

from infergrid.settle import build


@pytest.mark.parametrize("name", build.contract_names())
def test_committed_artifacts_match_a_fresh_compile(name: str) -> None:
    committed = json.loads(build.artifact_path(name).read_text())
    fresh = build.compile_contract(name)
    assert committed["source_sha256"] == fresh["source_sha256"], (
        f"{name}.vy changed since its artifact was built: run `python -m infergrid.settle.build`"
    )
    assert committed == fresh, f"stale artifact for {name}: run `python -m infergrid.settle.build`"


def test_registry_source_pins_compiler_and_target() -> None:
    source = (build.CONTRACTS_DIR / "NodeRegistry.vy").read_text().splitlines()
    assert source[:2] == ["# pragma version ~=0.4.3", "# pragma evm-version london"]
    artifact = build.load_artifact("NodeRegistry")
    assert artifact.evm_version == "london"
    assert artifact.bytecode.startswith("0x")
    assert {item.get("name") for item in artifact.abi} >= {
        "register",
        "stake",
        "update",
        "request_unbonding",
        "withdraw",
        "deregister",
        "slash",
        "claim",
        "get_nodes",
        "node_count",
        "was_signer",
        "signer_retired_at",
        "stake_at",
        "stake_checkpoint",
        "stake_checkpoint_count",
        "registered_at",
        "set_slasher",
        "transfer_admin",
        "accept_admin",
        "admin",
        "pending_admin",
    }


def test_every_state_change_has_an_event() -> None:
    artifact = build.load_artifact("NodeRegistry")
    events = {item["name"] for item in artifact.abi if item["type"] == "event"}
    assert events == {
        "NodeRegistered",
        "NodeUpdated",
        "Staked",
        "UnbondingRequested",
        "Withdrawn",
        "NodeDeregistered",
        "NodeDeactivated",
        "NodeFrozen",
        "NodeUnfrozen",
        "NodeRemoved",
        "Slashed",
        "Claimed",
        "SignerRetired",
        "SlasherSet",
        "AdminTransferStarted",
        "AdminTransferred",
    }


def test_unknown_contract() -> None:
    with pytest.raises(FileNotFoundError):
        build.compile_contract("NoSuchContract")
    with pytest.raises(FileNotFoundError, match=r"infergrid\.settle\.build"):
        build.load_artifact("NoSuchContract")


def test_build_artifacts_rewrites_identically(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    out = Path(str(tmp_path))
    monkeypatch.setattr(build, "ARTIFACTS_DIR", out)
    (written,) = build.build_artifacts(["NodeRegistry"])
    assert written == out / "NodeRegistry.json"
    committed = (build.SETTLE_DIR / "artifacts" / "NodeRegistry.json").read_text()
    assert written.read_text() == committed
    build.load_artifact.cache_clear()
