"""The gateway's receipt anchorer: every interval, the Merkle root of the receipts signed since
the last anchor goes on-chain (RewardDistributor.anchor), so any receipt can later be proven
to anyone with its inclusion proof (ReceiptStore.anchor_proof).

Anchoring is settlement, not serving: the chain call runs in a worker thread, and a failed one
(chain down, out of gas money) is logged and retried at the next interval while the gateway
keeps answering requests and storing receipts; the next anchor then simply covers more.

The anchorer must send from the gateway's signer key: the contract keeps anchors per sender,
and a verifier looks a receipt's anchor up under the receipt's gateway address.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infergrid.app.receipts import ReceiptStore
from infergrid.protocol import merkle
from infergrid.protocol.eip712 import hex32

log = logging.getLogger(__name__)

AnchorSubmit = Callable[[bytes, int], tuple[int, str]]
"""(root, count) -> (on-chain anchor index, tx hash). Blocking; e.g. RewardDistributor.anchor
bound to the gateway's key (see `distributor_submit`)."""


@dataclass(frozen=True)
class AnchorResult:
    anchor_index: int
    root: bytes
    count: int
    tx_hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor_index": self.anchor_index,
            "root": hex32(self.root),
            "count": self.count,
            "tx_hash": self.tx_hash,
        }


class _AnchorRecordLike(Protocol):
    index: int
    tx_hash: str | None


class _DistributorLike(Protocol):
    def anchor(self, key: Any, root: bytes, count: int) -> _AnchorRecordLike: ...


def distributor_submit(distributor: _DistributorLike, key: Any) -> AnchorSubmit:
    """An AnchorSubmit that sends `distributor.anchor(key, root, count)`: the adapter from
    settle.rewards.RewardDistributor (typed structurally so the app layer does not import
    web3 just to be configured)."""

    def submit(root: bytes, count: int) -> tuple[int, str]:
        record = distributor.anchor(key, root, count)
        return record.index, record.tx_hash or ""

    return submit


@dataclass
class _Unrecorded:
    """An anchor that is on-chain but not yet in the store (the store write failed)."""

    anchor_index: int
    seqs: Sequence[int]
    leaves: Sequence[bytes]
    root: bytes
    tx_hash: str


class ReceiptAnchorer:
    def __init__(
        self,
        store: ReceiptStore,
        submit: AnchorSubmit,
        *,
        interval_s: float = 60.0,
        max_batch: int = 100_000,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.store = store
        self.submit = submit
        self.interval_s = interval_s
        self.max_batch = max_batch
        # One anchor at a time: two in parallel would both take the same unanchored receipts
        # and pay for two transactions of which only one could be recorded.
        self._lock = threading.Lock()
        self._unrecorded: _Unrecorded | None = None
        self.anchors_sent = 0
        self.failures = 0
        self.last_result: AnchorResult | None = None

    def anchor_once(self) -> AnchorResult | None:
        """Anchor the oldest unanchored receipts (up to max_batch); None if there are none.
        Blocking: it waits for the chain."""
        with self._lock:
            if self._unrecorded is not None:
                # The last anchor is on-chain but its store write failed; record it before
                # anchoring anything else, or its receipts would be anchored twice.
                self._record(self._unrecorded)
            seqs, leaves = self.store.unanchored_leaves(self.max_batch)
            if not leaves:
                return None
            root = merkle.merkle_root(leaves)
            anchor_index, tx_hash = self.submit(root, len(leaves))
            self.anchors_sent += 1
            pending = _Unrecorded(anchor_index, seqs, leaves, root, tx_hash)
            self._unrecorded = pending
            self._record(pending)
            result = AnchorResult(anchor_index, root, len(leaves), tx_hash)
            self.last_result = result
            log.info(
                "anchored %d receipts as anchor %d (root %s, tx %s)",
                len(leaves),
                anchor_index,
                hex32(root),
                tx_hash,
            )
            return result

    def _record(self, pending: _Unrecorded) -> None:
        # verify=False: the seqs, leaves and root all came from the store a moment ago.
        self.store.record_anchor_leaves(
            pending.anchor_index,
            pending.seqs,
            pending.leaves,
            pending.root,
            pending.tx_hash,
            verify=False,
        )
        self._unrecorded = None

    async def run(self) -> None:
        """Anchor every interval_s until cancelled. A full batch means a backlog, so the next
        one goes at once; errors are logged and retried next interval. (A submit that fails
        after its transaction was mined leaves an orphan anchor on-chain: harmless, since
        proofs name the anchor the store recorded.)"""
        result: AnchorResult | None = None
        while True:
            if result is None or result.count < self.max_batch:
                await asyncio.sleep(self.interval_s)
            try:
                result = await asyncio.to_thread(self.anchor_once)
            except Exception:  # CancelledError is not an Exception: cancelling still stops it
                self.failures += 1
                log.exception("anchoring receipts failed; retrying in %.0f s", self.interval_s)
                result = None
