"""Settlement on the gateway: attestation checks (pure) and the shell that keeps billing
headroom current (escrow polling, receipt store, anchoring).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from infergrid.app.billing import (
    EscrowSnapshot,
    InsufficientHeadroom,
    Ledger,
    PayerAccount,
)
from infergrid.protocol.eip712 import Domain, InvalidSignature, Signer, recover, to_bytes32
from infergrid.protocol.messages import SIGNATURE_KEY, Attestation, response_hash
from infergrid.protocol.nodes import ModelOffer, NodeRecord
from infergrid.protocol.openai_types import MAX_TOKENS_LIMIT, APIError
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS, format_btt, over_limit, request_value

if TYPE_CHECKING:
    from infergrid.app.anchoring import ReceiptAnchorer
    from infergrid.app.receipts import ReceiptStore

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# An escrow read is a few RPCs of milliseconds; one still waiting after this long means a chain
# that is not answering, which /health says before the request times out.
ESCROW_STALL_S = 5.0

# --- attestation checks (pure) ----------------------------------------------------------------


class AttestationRejected(Exception):
    """The miner's attestation does not vouch for what the gateway relayed: no receipt."""


@dataclass(frozen=True, slots=True)
class Verified:
    attestation: Attestation
    signature: bytes
    attestation_hash: bytes  # its struct hash: the receipt's attestationHash, hashed once
    value_wei: int  # what the attested tokens cost at the offer's prices: the receipt's value


def offer_for(record: NodeRecord, model: str) -> ModelOffer | None:
    """The miner's registered offer for `model`, named or pinned by protocol id."""
    for offer in record.models:
        if offer.name == model:
            return offer
    wanted = model.lower()
    for offer in record.models:
        if offer.model_id.lower() == wanted:
            return offer
    return None


def _same_address(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def verify_attestation(
    domain: Domain,
    *,
    record: NodeRecord,
    offer: ModelOffer,
    request_hash: bytes,
    signed: Any,
    output_token_ids: Any,
    prompt_token_ids: Any,
    usage: Any,
    body_bytes: int,
    max_tokens: int,
) -> Verified:
    """Check a miner's signed attestation against what the gateway itself sent and relayed.

    `signed` is the extension's attestation object (Attestation JSON plus "signature");
    `output_token_ids` the ids the gateway relayed (all of them, the ending token included);
    `prompt_token_ids` and `usage` as the miner reported them; `body_bytes` the length of the
    body the gateway forwarded and `max_tokens` the completion limit it stated there. The
    miner's counts only have to agree with each other, but never bill past those limits
    (protocol.pricing.over_limit): a prompt longer than the body can tokenize to or more
    output than max_tokens is refused, so the value is within the request's reservation.
    Raises AttestationRejected with the first reason found. Cheap checks run first (integer
    comparisons before hashing the output); signature recovery (~40 µs) last.
    """
    if not isinstance(signed, Mapping):
        raise AttestationRejected("no attestation")
    try:
        attestation = Attestation.from_json(signed)
    except (TypeError, ValueError) as exc:
        raise AttestationRejected(f"malformed attestation: {exc}") from None
    signature = signed.get(SIGNATURE_KEY)
    if not isinstance(signature, str):
        raise AttestationRejected("attestation is not signed")
    if not _same_address(attestation.miner, record.owner):
        raise AttestationRejected(f"attestation names miner {attestation.miner}")
    if attestation.request_hash != request_hash:
        raise AttestationRejected("request hash does not match the request sent")
    if attestation.model_id != to_bytes32(offer.model_id):
        raise AttestationRejected(
            f"model id {attestation.model_id.hex()} is not the registered {offer.model_id}"
        )
    beyond = over_limit(
        attestation.tokens_in, attestation.tokens_out, body_bytes=body_bytes, max_tokens=max_tokens
    )
    if beyond is not None:
        raise AttestationRejected(f"bills beyond the request: {beyond}")
    if not isinstance(output_token_ids, list):
        raise AttestationRejected("no output token ids")
    try:
        relayed = response_hash(output_token_ids)
    except ValueError:
        raise AttestationRejected("output token ids are not uint32") from None
    if attestation.response_hash != relayed:
        raise AttestationRejected("response hash does not match the tokens relayed")
    prompt_usage = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    completion_usage = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    prompt_len = len(prompt_token_ids) if isinstance(prompt_token_ids, list) else None
    if not attestation.tokens_in == prompt_usage == prompt_len:
        raise AttestationRejected(
            f"tokens in {attestation.tokens_in}, usage {prompt_usage}, prompt ids {prompt_len}"
        )
    if not attestation.tokens_out == completion_usage == len(output_token_ids):
        raise AttestationRejected(
            f"tokens out {attestation.tokens_out}, usage {completion_usage},"
            f" output ids {len(output_token_ids)}"
        )
    attestation_hash = attestation.struct_hash()
    try:
        signer = recover(domain.digest(attestation_hash), signature)
    except InvalidSignature as exc:
        raise AttestationRejected(f"bad signature: {exc}") from None
    if not _same_address(signer, record.signer):
        raise AttestationRejected(f"signed by {signer}, not the registered signer {record.signer}")
    return Verified(
        attestation,
        bytes.fromhex(signature.removeprefix("0x")),
        attestation_hash,
        request_value(attestation.tokens_in, attestation.tokens_out, offer),
    )


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
