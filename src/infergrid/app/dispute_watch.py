"""Watching the DisputeManager (the registry's slasher) for disputes about this gateway's
requests: DisputeOpened makes a request DISPUTED, DisputeResolved SLASHED (upheld: the payer's
refund is the event's `to_payer`) or PASSED again (rejected), through AuditService.

A poll reads the new blocks' logs in a worker thread, every `interval_s`; a dispute is this
gateway's when its receipt's gateway is this gateway's signer and the request is in the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from infergrid.app.audits import AuditService
from infergrid.app.request_status import RequestLog, RequestRecord
from infergrid.settle.disputes import STATUS_NAMES, DisputeManager

__all__ = ["DisputeWatch"]

log = logging.getLogger("infergrid.app.gateway")


def _tx(entry: Any) -> str | None:
    tx = entry.get("transactionHash")
    if tx is None:
        return None
    text = tx.hex() if isinstance(tx, bytes | bytearray) else str(getattr(tx, "hex", lambda: tx)())
    return text if text.startswith("0x") else "0x" + text


class DisputeWatch:
    def __init__(
        self,
        manager: DisputeManager,
        *,
        gateway: str,
        audits: AuditService,
        requests: RequestLog,
        interval_s: float = 3.0,
    ) -> None:
        self.manager = manager
        self.gateway = gateway
        self.audits = audits
        self.requests = requests
        self.interval_s = interval_s
        self.next_block = 0
        self.error: str | None = None

    def _read(self) -> list[tuple[str, Any]]:
        """(name, log entry) of the DisputeOpened / DisputeResolved events since the last
        read, in chain order (blocking)."""
        chain = self.manager.chain
        head = chain.block_number()
        if head < self.next_block:
            return []
        events = self.manager.contract.events
        found: list[tuple[int, int, str, Any]] = []
        for name in ("DisputeOpened", "DisputeResolved"):
            for entry in getattr(events, name).get_logs(from_block=self.next_block, to_block=head):
                found.append((entry["blockNumber"], entry["logIndex"], name, entry))
        self.next_block = head + 1
        found.sort(key=lambda item: (item[0], item[1]))
        return [(name, entry) for _, _, name, entry in found]

    def collect(self) -> list[tuple[str, RequestRecord, tuple[Any, ...]]]:
        """The new events about this gateway's requests, each with its request's record
        (blocking: run in a worker thread); `apply` them on the event loop."""
        found: list[tuple[str, RequestRecord, tuple[Any, ...]]] = []
        for name, entry in self._read():
            args = entry["args"]
            dispute_id = int(args["dispute_id"])
            if name == "DisputeOpened":
                if args["gateway"].lower() != self.gateway.lower():
                    continue
                record = self.requests.by_hash(bytes(args["request_hash"]))
                if record is not None:
                    found.append((name, record, (dispute_id, _tx(entry))))
            else:
                dispute = self.manager.dispute(dispute_id)
                if dispute.gateway.lower() != self.gateway.lower():
                    continue
                record = self.requests.by_hash(dispute.request_hash)
                if record is not None:
                    status = STATUS_NAMES.get(int(args["status"]), "open")
                    found.append(
                        (name, record, (dispute_id, status, int(args["to_payer"]), _tx(entry)))
                    )
        return found

    def apply(self, found: list[tuple[str, RequestRecord, tuple[Any, ...]]]) -> None:
        """Hand collected events to the audits (on the event loop, like verdicts)."""
        for name, record, args in found:
            if name == "DisputeOpened":
                self.audits.dispute_opened(record, *args)
            else:
                self.audits.dispute_resolved(record, *args)

    async def run(self) -> None:
        """Poll until cancelled; a failing read is logged and retried."""
        while True:
            try:
                self.apply(await asyncio.to_thread(self.collect))
                self.error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("reading the dispute manager failed: %s", self.error)
            await asyncio.sleep(self.interval_s)
