"""Billing headroom: how much a payer may still spend through this gateway, in memory.

Pure bookkeeping that the request path consults with dict lookups and integer maths; the
escrow figures come in from a background poller (app/settlement.py) and the receipt totals
from the gateway's own receipt store, so admitting a request never waits on the chain once a
payer has been seen.

For one payer (docs/settlement.md, "Life of a payment", step 2)::

    available = escrow balance − thawing
              − outstanding (this gateway's receipts total − what miners collected of them)
              − reservations of the payer's requests in flight

A request reserves the most it can cost at the chosen miner's prices before it is forwarded
(protocol.pricing.max_request_value of the body the gateway forwards and the completion limit
it states there); when it ends the reservation is released and, if it produced a receipt, the
receipt's value joins the total instead. A receipt is never worth more than its reservation:
the gateway refuses attestations above the request's limits (protocol.pricing.over_limit).

Other gateways' receipts for the same payer are invisible here: the escrow pays whoever
collects first, so a payer spreading one deposit over several gateways risks only the miners'
money, and miners collect often to keep that small.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EscrowSnapshot:
    """One read of a payer's escrow figures that matter to this gateway."""

    balance_wei: int
    thawing_wei: int
    collected_wei: int  # escrow.gateway_collected(payer, this gateway's signer)
    authorized: bool  # the payer authorized this gateway's signer and is not revoking it
    read_at: float  # time.monotonic() of the read
    revoking: bool = False  # authorized, but a revocation is pending


@dataclass(slots=True)
class PayerAccount:
    payer: str
    escrow: EscrowSnapshot | None = None  # None until the first read
    receipts_wei: int = 0  # value of every receipt this gateway signed for the payer
    reserved_wei: int = 0  # what the requests in flight can cost at most
    inflight: int = 0
    last_seen: float = 0.0  # monotonic time of the last request

    @property
    def outstanding_wei(self) -> int:
        """Receipts this gateway signed that no miner has collected yet."""
        collected = self.escrow.collected_wei if self.escrow else 0
        return max(0, self.receipts_wei - collected)

    @property
    def available_wei(self) -> int:
        """What a new request may still reserve; negative once over-committed."""
        if self.escrow is None:
            return 0
        spendable = max(0, self.escrow.balance_wei - self.escrow.thawing_wei)
        return spendable - self.outstanding_wei - self.reserved_wei


class InsufficientHeadroom(Exception):
    def __init__(self, payer: str, available_wei: int, needed_wei: int) -> None:
        super().__init__(f"payer {payer} has {available_wei} wei of headroom, needs {needed_wei}")
        self.payer = payer
        self.available_wei = max(0, available_wei)
        self.needed_wei = needed_wei


@dataclass(slots=True)
class Reservation:
    """A request's hold on its payer's headroom; released exactly once."""

    account: PayerAccount
    amount_wei: int
    released: bool = False


@dataclass
class Ledger:
    """Every payer this gateway has seen; all methods are synchronous and do no I/O."""

    accounts: dict[str, PayerAccount] = field(default_factory=dict)

    def get(self, payer: str) -> PayerAccount | None:
        return self.accounts.get(payer)

    def account(self, payer: str) -> PayerAccount:
        account = self.accounts.get(payer)
        if account is None:
            account = self.accounts[payer] = PayerAccount(payer)
        return account

    def load_receipts(self, totals: dict[str, int]) -> None:
        """Start from the receipt store's totals (once, before serving)."""
        for payer, total in totals.items():
            self.account(payer).receipts_wei = int(total)

    def update_escrow(self, payer: str, snapshot: EscrowSnapshot) -> None:
        self.account(payer).escrow = snapshot

    def reserve(self, payer: str, amount_wei: int) -> Reservation:
        """Hold `amount_wei` of the payer's headroom, or raise InsufficientHeadroom.

        A request that costs nothing (a free model) is always admitted.
        """
        account = self.account(payer)
        if amount_wei > 0 and account.available_wei < amount_wei:
            raise InsufficientHeadroom(payer, account.available_wei, amount_wei)
        account.reserved_wei += amount_wei
        account.inflight += 1
        return Reservation(account, amount_wei)

    def resize(self, reservation: Reservation, amount_wei: int) -> None:
        """Move a reservation to another miner's prices (failover to a pricier one)."""
        account = reservation.account
        grow = amount_wei - reservation.amount_wei
        if grow > 0 and account.available_wei < grow:
            available = account.available_wei + reservation.amount_wei
            raise InsufficientHeadroom(account.payer, available, amount_wei)
        account.reserved_wei += grow
        reservation.amount_wei = amount_wei

    def release(self, reservation: Reservation) -> None:
        if reservation.released:
            return
        reservation.released = True
        account = reservation.account
        account.reserved_wei -= reservation.amount_wei
        account.inflight -= 1

    def charge(self, payer: str, value_wei: int) -> None:
        """A receipt for `value_wei` was committed."""
        self.account(payer).receipts_wei += value_wei

    def refund(self, payer: str, value_wei: int) -> None:
        """A receipt for `value_wei` was voided (its audit failed): it no longer counts."""
        account = self.account(payer)
        account.receipts_wei = max(0, account.receipts_wei - value_wei)

    def active_payers(self, since: float) -> list[str]:
        """Payers with a request in flight or seen since `since` (monotonic): the ones whose
        escrow figures are worth keeping fresh."""
        return [
            payer
            for payer, account in self.accounts.items()
            if account.inflight or account.last_seen >= since
        ]

    def forget_escrow(self, before: float) -> int:
        """Drop escrow figures of idle payers not seen since `before`, so their next request
        reads the chain again rather than trusting figures minutes old. Receipt totals stay:
        only this gateway knows them."""
        dropped = 0
        for account in self.accounts.values():
            if account.escrow is not None and not account.inflight and account.last_seen < before:
                account.escrow = None
                dropped += 1
        return dropped
