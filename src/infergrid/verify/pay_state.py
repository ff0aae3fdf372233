"""The state file of verifier pay (verify.pay_epoch): the epochs paid, per deployment.

JSON, written whole and atomically (a temporary file, then a rename): `{"version": 1,
"deployments": {"<chain id>:<genesis hash>:<RewardDistributor>": {"epochs": [...]}}}`. Each
epoch keeps its two windows (chain and gateway clocks), the pool, each verifier's work, the
allocations its reward tree is built from, its status and the proposal's transaction. A fresh
devnet is a new genesis, so it starts a new section instead of reading the old network's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STATE_VERSION", "EpochRecord", "PayState"]

STATE_VERSION = 1


@dataclass
class EpochRecord:
    """One epoch of verifier pay as the state file keeps it."""

    epoch: int
    since: int  # the chain window (block timestamps): fees and votes
    until: int
    pool_wei: int
    allocations: dict[str, int]
    work: list[dict[str, Any]]
    audits_since: int = 0  # the gateway window (its clock): audits
    audits_until: int = 0
    status: str = "pending"  # "pending" (money may be moving) | "proposed" | "finalized"
    root: str = ""
    tx: str | None = None
    block: int = 0  # the chain's head when the record was made: funding is looked for after

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "since": self.since,
            "until": self.until,
            "audits_since": self.audits_since,
            "audits_until": self.audits_until,
            "pool_wei": str(self.pool_wei),
            "allocations": {a: str(w) for a, w in self.allocations.items()},
            "work": self.work,
            "status": self.status,
            "root": self.root,
            "tx": self.tx,
            "block": self.block,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpochRecord:
        return cls(
            epoch=int(data["epoch"]),
            since=int(data["since"]),
            until=int(data["until"]),
            pool_wei=int(data["pool_wei"]),
            allocations={a: int(w) for a, w in data["allocations"].items()},
            work=list(data.get("work", [])),
            audits_since=int(data.get("audits_since", data["since"])),
            audits_until=int(data.get("audits_until", data["until"])),
            status=str(data.get("status", "pending")),
            root=str(data.get("root", "")),
            tx=data.get("tx"),
            block=int(data.get("block", 0)),
        )


@dataclass
class PayState:
    """The state file: epochs paid, per deployment. Written whole, atomically."""

    path: Path
    deployment: str
    epochs: list[EpochRecord] = field(default_factory=list)
    _others: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, deployment: str) -> PayState:
        sections: dict[str, Any] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                sections = dict(data["deployments"])
                mine = [
                    EpochRecord.from_json(e) for e in sections.pop(deployment, {}).get("epochs", [])
                ]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"the verifier pay state file {path} is unreadable: {exc}"
                ) from None
        else:
            mine = []
        return cls(path, deployment, mine, sections)

    def last_until(self) -> tuple[int, int]:
        """Where the paid epochs end: (on the chain's clock, on the gateway's)."""
        return (
            max((e.until for e in self.epochs), default=0),
            max((e.audits_until for e in self.epochs), default=0),
        )

    def save(self) -> None:
        sections = {**self._others, self.deployment: {"epochs": [e.to_json() for e in self.epochs]}}
        text = json.dumps({"version": STATE_VERSION, "deployments": sections}, indent=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
