"""Metering: what a call may cost, whether the miner's attestation vouches for it, and its
receipt (reserve -> verify -> commit -> release).

One `Metering` serves both the plain path (app.forwarding) and the stream relay
(app.stream_relay), so the two cannot drift apart on what is charged and when.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from infergrid.app.calls import Call
from infergrid.app.failures import _ReceiptFailed
from infergrid.app.metrics import GatewayMetrics
from infergrid.app.miners import MinerState
from infergrid.app.settlement import Settlement
from infergrid.protocol.messages import Receipt, request_hash
from infergrid.protocol.pricing import max_request_value
from infergrid.verify.attestation import (
    AttestationRejected,
    Verified,
    offer_for,
    verify_attestation,
)

__all__ = ["Metering"]

# The gateway's one log, whichever of its modules writes to it.
log = logging.getLogger("infergrid.app.gateway")


class Metering:
    """A metered gateway's charging steps for one call at a time, in the order they happen:
    `reserve` at each miner tried, `verify` the response's attestation, `commit` its receipt,
    and `release` the reservation however the call ends."""

    def __init__(self, settlement: Settlement, metrics: GatewayMetrics) -> None:
        self.settlement = settlement
        self.metrics = metrics

    def reserve(self, call: Call, miner: MinerState) -> bool:
        """Hold the most the call can cost at this miner's prices (max_request_value) on the
        payer's headroom; False if the miner has no offer for the model (the registry changed
        under the pick). Raises InsufficientHeadroom."""
        settlement = self.settlement
        assert call.payer is not None
        offer = offer_for(miner.record, call.model)
        if offer is None:
            return False
        amount = max_request_value(len(call.payload), call.max_tokens, offer)
        if call.reservation is None:
            call.reservation = settlement.ledger.reserve(call.payer, amount)
        else:
            settlement.ledger.resize(call.reservation, amount)
        call.offer = offer
        return True

    def reserve_hedge(self, call: Call, miner: MinerState) -> bool:
        """Before a second miner races the first for the call: grow the hold to cover the
        dearer of the two (only one is ever charged), keeping the call's offer; False if the
        miner has no offer for the model. Raises InsufficientHeadroom (then: no hedge)."""
        assert call.reservation is not None
        offer = offer_for(miner.record, call.model)
        if offer is None:
            return False
        amount = max_request_value(len(call.payload), call.max_tokens, offer)
        if amount > call.reservation.amount_wei:
            self.settlement.ledger.resize(call.reservation, amount)
        return True

    def won(self, call: Call, miner: MinerState) -> None:
        """The race is decided: the call is charged at the winner's offer, and the hold
        shrinks back to what the winner can cost."""
        assert call.reservation is not None
        offer = offer_for(miner.record, call.model)
        assert offer is not None  # reserved for, so it had one
        amount = max_request_value(len(call.payload), call.max_tokens, offer)
        if amount < call.reservation.amount_wei:
            self.settlement.ledger.resize(call.reservation, amount)
        call.offer = offer

    def verify(
        self,
        call: Call,
        miner: MinerState,
        *,
        signed: Any,
        output_token_ids: Any,
        prompt_token_ids: Any,
        usage: Any,
    ) -> Verified:
        """Check the miner's attestation of this call, within the call's limits, and that its
        receipt would not exceed the call's reservation; raises AttestationRejected (counted,
        logged and kept in the trace)."""
        settlement = self.settlement
        assert call.offer is not None
        if call.request_hash is None:
            call.request_hash = request_hash(call.request_id, call.payload)
        try:
            verified = verify_attestation(
                settlement.domain,
                record=miner.record,
                offer=call.offer,
                request_hash=call.request_hash,
                signed=signed,
                output_token_ids=output_token_ids,
                prompt_token_ids=prompt_token_ids,
                usage=usage,
                body_bytes=len(call.payload),
                max_tokens=call.max_tokens,
            )
            reserved = call.reservation.amount_wei if call.reservation is not None else 0
            if verified.value_wei > reserved:
                # Cannot happen while the limits above hold, so it is a bug in them: charge
                # nothing rather than more than the payer's headroom was checked for.
                log.error(
                    "request %s: miner %s's verified attestation is worth %d wei, above the"
                    " %d wei reserved for the request; refusing its receipt",
                    call.request_id,
                    miner.owner,
                    verified.value_wei,
                    reserved,
                )
                raise AttestationRejected(
                    f"a receipt worth {verified.value_wei} wei exceeds the {reserved} wei"
                    " reserved for the request"
                )
            return verified
        except AttestationRejected as exc:
            self.metrics.attestation_failures.inc()
            reason = f"{miner.owner}: {exc}"
            trace = call.trace
            earlier = trace.attestation_error
            trace.attestation_error = reason if earlier is None else f"{earlier}; {reason}"
            log.warning("request %s: attestation rejected: %s", call.request_id, reason)
            raise

    async def commit(self, call: Call, miner: MinerState, verified: Verified) -> int:
        """Sign and durably store the receipt of a verified response; returns its value.

        The store's group commit runs in its writer thread; this only waits for it. The
        ledger is charged when the commit lands even if this request is cancelled meanwhile
        (a client hanging up), so headroom never misses a stored receipt.
        """
        settlement = self.settlement
        assert call.payer is not None and call.offer is not None
        attestation = verified.attestation
        value = verified.value_wei
        receipt = Receipt(
            request_hash=attestation.request_hash,
            payer=call.payer,
            miner=miner.owner,
            gateway=settlement.gateway,
            model_id=attestation.model_id,
            tokens_in=attestation.tokens_in,
            tokens_out=attestation.tokens_out,
            value=value,
            timestamp=int(time.time()),
            attestation_hash=verified.attestation_hash,
        )
        started = time.perf_counter()
        task = asyncio.ensure_future(
            settlement.store.commit(call.request_id, receipt, attestation, verified.signature)
        )
        payer, trace, metrics, ledger = call.payer, call.trace, self.metrics, settlement.ledger

        def committed(done: asyncio.Future[bytes]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            ledger.charge(payer, value)
            trace.cost_wei = str(value)
            metrics.receipts.inc()
            metrics.receipt_value.inc(value)
            metrics.receipt_commit.observe(time.perf_counter() - started)

        task.add_done_callback(committed)
        try:
            call.receipt_signature = await asyncio.shield(task)
            call.receipt = receipt
            call.attestation = attestation
            call.attestation_signature = verified.signature
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("request %s: storing its receipt failed: %r", call.request_id, exc)
            raise _ReceiptFailed(f"{type(exc).__name__}: {exc}") from exc
        return value

    def release(self, call: Call) -> None:
        """Give back the hold on the payer's headroom, if the call took one; what a stored
        receipt charged stays charged."""
        if call.reservation is not None:
            self.settlement.ledger.release(call.reservation)
