"""Settlement on the gateway: the shell that keeps billing headroom current (escrow polling,
receipt store, anchoring). The attestation checks are pure and live in verify.attestation,
which the gateway's metering calls.

The request path only ever touches memory here, with one exception the protocol requires:
`ReceiptStore.commit`, the durable group-committed write of a receipt before the response
finishes. Escrow figures are read in a worker thread by a background poller, and once, on the
first request of a payer the gateway has not seen (or not seen for a while), since nothing can
be admitted before the deposit is known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from infergrid.app.billing import (
    EscrowSnapshot,
    InsufficientHeadroom,
    Ledger,
    PayerAccount,
)
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.openai_types import MAX_TOKENS_LIMIT, APIError
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS, format_btt

if TYPE_CHECKING:
    from infergrid.app.anchoring import ReceiptAnchorer
    from infergrid.app.receipts import ReceiptStore

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# An escrow read is a few RPCs of milliseconds; one still waiting after this long means a chain
# that is not answering, which /health says before the request times out.
ESCROW_STALL_S = 5.0

# --- the errors a payer gets ------------------------------------------------------------------


def _quota_error(message: str, code: str = "insufficient_quota") -> APIError:
    return APIError(402, message, type="insufficient_quota", code=code)


def no_payer_error(signer: str) -> APIError:
    return _quota_error(
        "This API key is not bound to a payer account, and this gateway charges every request"
        " to one. Deposit into the escrow (`infergrid account deposit`), authorize this"
        f" gateway's signer {signer} (`infergrid account authorize {signer}`), and ask the"
        " gateway's operator for a key bound to your payer address"
        " (`infergrid keys create --payer <address>`).",
        code="no_payer",
    )


def unauthorized_error(payer: str, signer: str, revoking: bool) -> APIError:
    why = (
        "is revoking this gateway's signer"
        if revoking
        else "has not authorized this gateway's signer"
    )
    return _quota_error(
        f"Payer {payer} {why} {signer}, so the gateway cannot sign receipts that charge it."
        f" Authorize it with `infergrid account authorize {signer}`.",
        code="signer_not_authorized",
    )


def insufficient_error(exc: InsufficientHeadroom) -> APIError:
    return _quota_error(
        f"Insufficient quota: payer {exc.payer} has {format_btt(exc.available_wei)} BTT left at"
        f" this gateway, and this request may cost up to {format_btt(exc.needed_wei)} BTT (its"
        " prompt and max_tokens at the miner's prices). Top up with `infergrid account"
        " deposit`, or ask for fewer max_tokens."
    )


def escrow_unavailable_error() -> APIError:
    return APIError(
        503,
        "The gateway cannot read the payment escrow right now; please retry.",
        type="server_error",
        code="escrow_unavailable",
    )


# --- the shell --------------------------------------------------------------------------------


class EscrowReader(Protocol):
    """What the gateway reads from the PaymentEscrow (settle.escrow.PaymentEscrow); blocking."""

    def account(self, payer: str) -> Any: ...  # .balance_wei, .thawing_wei
    def gateway_collected(self, payer: str, gateway: str) -> int: ...
    def is_authorized(self, payer: str, signer: str) -> bool: ...
    def revoke_at(self, payer: str, signer: str) -> int: ...


class Settlement:
    """Everything a metered gateway needs beyond routing: the domain and signer of its
    receipts, the durable receipt store, the headroom ledger and the escrow it polls."""

    def __init__(
        self,
        *,
        domain: Domain,
        signer: Signer,
        store: ReceiptStore,
        escrow: EscrowReader,
        anchorer: ReceiptAnchorer | None = None,
        poll_interval_s: float = 3.0,
        idle_s: float = 600.0,
        first_read_timeout_s: float = 10.0,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        """`default_max_tokens`: the completion limit the gateway reserves for, and writes into
        the body it forwards, when a request sets none."""
        if not 1 <= default_max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"default_max_tokens must be from 1 to {MAX_TOKENS_LIMIT}")
        self.domain = domain
        self.signer = signer
        self.store = store
        self.escrow = escrow
        self.anchorer = anchorer
        self.poll_interval_s = poll_interval_s
        self.idle_s = idle_s
        self.first_read_timeout_s = first_read_timeout_s
        self.default_max_tokens = default_max_tokens
        self.ledger = Ledger()
        self._escrow_error: str | None = None  # the last read's failure (escrow_error)
        self._reads_started: dict[int, float] = {}  # escrow reads in flight: when each began
        self.anchor_error: str | None = None
        self._first_reads: dict[str, asyncio.Future[None]] = {}
        self._started = False

    @property
    def gateway(self) -> str:
        """The address receipts and vouchers name as their gateway: the signer's."""
        return self.signer.address

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the receipt store and load what this gateway already signed (before serving:
        the headroom of a payer must count receipts from before a restart)."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.store.start)
        totals = await asyncio.to_thread(self.store.payer_totals)
        self.ledger.load_receipts(dict(totals))

    async def run(self) -> None:
        """The background work, until cancelled: escrow polling and receipt anchoring."""
        tasks = [self._poll_loop()]
        if self.anchorer is not None:
            tasks.append(self._anchor_loop())
        await asyncio.gather(*tasks)

    def close(self) -> None:
        self.store.close()

    # -- escrow figures ----------------------------------------------------------------------

    @property
    def escrow_error(self) -> str | None:
        """For /health: the last escrow read's failure or, while a read has been waiting for
        longer than ESCROW_STALL_S, that the chain is not answering. A chain that accepts
        connections and never answers so shows in seconds, not when its request times out."""
        if self._reads_started:
            waited = time.monotonic() - min(self._reads_started.values())
            if waited > ESCROW_STALL_S:
                return f"the chain has not answered an escrow read for {waited:.0f} s"
        return self._escrow_error

    @escrow_error.setter
    def escrow_error(self, error: str | None) -> None:
        self._escrow_error = error

    async def _read_in_thread(self, read: Callable[..., _T], *args: Any) -> _T:
        """`read(*args)` in a worker thread, counted as in flight for escrow_error."""
        token = object()
        self._reads_started[id(token)] = time.monotonic()
        try:
            return await asyncio.to_thread(read, *args)
        finally:
            del self._reads_started[id(token)]

    def read_escrow(self, payer: str) -> EscrowSnapshot:
        """Read one payer's figures from the chain (blocking: call it in a thread)."""
        # Collected before the balance: a collection landing between the two reads then
        # shows as a lower balance with the receipts still outstanding (headroom too low for
        # a poll interval), never the reverse, which would admit more than the deposit covers.
        collected = self.escrow.gateway_collected(payer, self.gateway)
        account = self.escrow.account(payer)
        authorized = self.escrow.is_authorized(payer, self.gateway)
        # A pending revocation ends our right to charge this payer at a time the miners may
        # not collect by: stop signing now rather than hand out receipts that expire.
        revoking = authorized and self.escrow.revoke_at(payer, self.gateway) != 0
        return EscrowSnapshot(
            balance_wei=int(account.balance_wei),
            thawing_wei=int(account.thawing_wei),
            collected_wei=int(collected),
            authorized=bool(authorized) and not revoking,
            read_at=time.monotonic(),
            revoking=bool(revoking),
        )

    def _read_many(self, payers: list[str]) -> tuple[dict[str, EscrowSnapshot], str | None]:
        snapshots: dict[str, EscrowSnapshot] = {}
        error: str | None = None
        for payer in payers:
            try:
                snapshots[payer] = self.read_escrow(payer)
            except Exception as exc:  # a chain outage: keep the last figures we had
                error = f"{type(exc).__name__}: {exc}"
        return snapshots, error

    async def refresh(self, payers: list[str] | None = None) -> None:
        """Re-read the escrow figures of `payers` (default: every recently active payer)."""
        now = time.monotonic()
        if payers is None:
            self.ledger.forget_escrow(now - self.idle_s)
            payers = self.ledger.active_payers(now - self.idle_s)
        if not payers:
            return
        # One worker thread for the whole round: the reads are many small RPCs.
        snapshots, error = await self._read_in_thread(self._read_many, payers)
        for payer, snapshot in snapshots.items():
            self.ledger.update_escrow(payer, snapshot)
        if error is not None:
            log.warning("reading the escrow failed, keeping the last figures: %s", error)
        self.escrow_error = error

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("escrow poll failed")

    async def _first_read(self, payer: str) -> None:
        snapshot = await self._read_in_thread(self.read_escrow, payer)
        self.ledger.update_escrow(payer, snapshot)

    async def admit(self, payer: str) -> PayerAccount:
        """The payer's account, with escrow figures; raises APIError (402, or 503 when the
        first read of an unknown payer fails). Memory only, except that first read."""
        account = self.ledger.account(payer)
        account.last_seen = time.monotonic()
        if account.escrow is None:
            pending = self._first_reads.get(payer)
            if pending is None:
                pending = asyncio.ensure_future(self._first_read(payer))
                self._first_reads[payer] = pending
                pending.add_done_callback(lambda _f: self._first_reads.pop(payer, None))
            try:
                # Shielded: one request giving up must not cancel the read others wait on.
                await asyncio.wait_for(asyncio.shield(pending), self.first_read_timeout_s)
            except (Exception, TimeoutError) as exc:
                self.escrow_error = (
                    f"{type(exc).__name__}: {exc}"
                    if str(exc)
                    else f"the escrow read took longer than {self.first_read_timeout_s:g} s"
                )
                log.warning("first escrow read for %s failed: %s", payer, self.escrow_error)
                raise escrow_unavailable_error() from None
        escrow = account.escrow
        assert escrow is not None
        if not escrow.authorized:
            raise unauthorized_error(payer, self.gateway, revoking=escrow.revoking)
        return account

    # -- anchoring ---------------------------------------------------------------------------

    async def _anchor_loop(self) -> None:
        """Run the anchorer; if it ever dies, log and start it again: anchoring is for
        proofs after the fact and must never stop serving."""
        assert self.anchorer is not None
        while True:
            try:
                await self.anchorer.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.anchor_error = f"{type(exc).__name__}: {exc}"
                log.exception("receipt anchoring failed; restarting it")
                await asyncio.sleep(max(1.0, self.poll_interval_s))
