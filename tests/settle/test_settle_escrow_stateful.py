"""PaymentEscrow against a Python model of it, driven by random sequences of deposits, thaws,
withdrawals, signer changes, vouchers (valid, forged, replayed, beyond the balance), fee
changes under the timelock, and requests a gateway serves and bills.

After every step the contract must agree with the model, hold exactly what it owes, never
have paid a (payer, gateway, miner) more than the largest voucher its gateway signed, and
never have collected for served requests more than the gateway reserved for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from infergrid.protocol.eip712 import SECP256K1_N, Domain, Signer
from infergrid.protocol.messages import Voucher, sign_message
from infergrid.protocol.nodes import ModelOffer
from infergrid.protocol.pricing import (
    max_request_value,
    over_limit,
    request_value,
    split_payment,
)
from infergrid.settle.chain import Chain, ContractRevert, as_account
from infergrid.settle.escrow import (
    MAX_FEE_PPM,
    EscrowAccount,
    PaymentEscrow,
    PendingFees,
    deploy_escrow,
)

THAW = 1000
FEE_DELAY = 1500  # outlasts the thaw, as the contract requires
# The model cannot know the exact timestamp of the next block, so before anything that
# depends on the clock it moves the chain well clear of every deadline it knows of.
MARGIN = 30
PAYERS = (1, 2, 3)  # dev key indexes
SUBMITTER, TREASURY, POOL, ADMIN = 4, 5, 6, 0
GATEWAYS = (Signer("0x" + "a1" * 32), Signer("0x" + "a2" * 32))
OUTSIDER = Signer("0x" + "a3" * 32)
MINERS = (Signer("0x" + "b1" * 32).address, Signer("0x" + "b2" * 32).address)
# The miner of served requests: its vouchers come only from receipts the gateway accepted,
# so what it is paid can be held to the reservations made for them.
SERVING_MINER = Signer("0x" + "b3" * 32).address
ALL_MINERS = (*MINERS, SERVING_MINER)
# Prices (wei per token) low enough that a deposit of a few thousand wei pays a few requests.
OFFERS = tuple(
    ModelOffer(f"model-{i}", "0x" + f"{i:02x}" * 32, price_in, price_out)
    for i, (price_in, price_out) in enumerate(((0, 1), (1, 1), (1, 3)))
)
# How each kind of bad signature must be refused.
BAD_SIGNATURES = {
    "forged": "signer is not the gateway",
    "other chain": "signer is not the gateway",
    "other contract": "signer is not the gateway",
    "high s": "signatures: malleable",
    "tampered": "signer is not the gateway",
}

payer_ids = st.integers(0, len(PAYERS) - 1)
gateway_ids = st.integers(0, len(GATEWAYS) - 1)
miner_ids = st.integers(0, len(MINERS) - 1)
amounts = st.integers(0, 3000)
# Each within the 10 % cap; their sum is above it now and then.
fee_shares = st.integers(0, MAX_FEE_PPM)
# What a miner attests: mostly near the request's limits, sometimes absurdly far above.
token_counts = st.one_of(st.integers(0, 1000), st.integers(0, 2**64))
# A served request: the miner's offer, the forwarded body's length in bytes, its max_tokens,
# and the prompt and completion tokens the miner attests.
requests = st.tuples(
    st.sampled_from(OFFERS),
    st.integers(0, 600),
    st.integers(0, 256),
    token_counts,
    token_counts,
)
# Vouchers grow; replaying older ones covers equal and lower aggregates.
steps = st.integers(1, 3000)


@dataclass
class SignerModel:
    authorized: bool = False
    revoke_at: int = 0

    def active(self, now: int) -> bool:
        return self.authorized and (self.revoke_at == 0 or now < self.revoke_at)


class EscrowMachine(RuleBasedStateMachine):
    def __init__(self, chain: Chain, keys: list[str]) -> None:
        super().__init__()
        self.chain, self.keys = chain, keys
        self.addrs = [as_account(k).address for k in keys]
        self.protocol_ppm, self.pool_ppm = 30_000, 70_000
        self.pending_fees: PendingFees | None = None
        address = deploy_escrow(
            chain,
            keys[ADMIN],
            treasury=self.addrs[TREASURY],
            verifier_pool=self.addrs[POOL],
            protocol_fee_ppm=self.protocol_ppm,
            verifier_pool_ppm=self.pool_ppm,
            thaw_period_s=THAW,
            fee_delay_s=FEE_DELAY,
        )
        self.escrow = PaymentEscrow(chain, address)
        self.payers = [self.addrs[i] for i in PAYERS]
        self.fee_recipients = (self.addrs[TREASURY], self.addrs[POOL])
        # The model.
        self.accounts = {p: EscrowAccount(0, 0, 0) for p in self.payers}
        self.signers = {(p, g.address): SignerModel() for p in self.payers for g in GATEWAYS}
        self.collected: dict[tuple[str, str, str], int] = {}
        self.max_signed: dict[tuple[str, str, str], int] = {}
        self.fees_owed = dict.fromkeys(self.fee_recipients, 0)
        self.miner_start = {m: chain.balance(m) for m in ALL_MINERS}
        self.paid_to_miners = dict.fromkeys(ALL_MINERS, 0)
        # Served requests: (value, reservation) of every receipt the gateway accepted, and
        # per (payer, gateway, SERVING_MINER) the sum of each.
        self.accepted: list[tuple[int, int]] = []
        self.served: dict[tuple[str, str, str], int] = {}
        self.reserved: dict[tuple[str, str, str], int] = {}
        self.deposited = self.withdrawn = self.fees_claimed = 0
        self.signed: list[tuple[Voucher, bytes]] = []
        # What the current step may have changed, for the per-step comparison.
        self.touched_payers: set[str] = set()
        self.touched_keys: set[tuple[str, str, str]] = set()
        self.touched_signers: set[tuple[str, str]] = set()
        self.touched_fees = False
        self.touched_fee_schedule = False

    # --- helpers ---

    def expect(self, reason: str | None, action: Callable[[], Any]) -> Any:
        """Run `action`; it must succeed if `reason` is None, else revert with `reason`."""
        if reason is None:
            return action()
        with pytest.raises(ContractRevert) as exc:
            action()
        assert exc.value.reason == reason
        return None

    def block_time(self, receipt: Any) -> int:
        return int(self.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])

    def deadlines(self) -> list[int]:
        thaws = [a.thaw_end for a in self.accounts.values() if a.thawing_wei]
        fees = [self.pending_fees.ready_at] if self.pending_fees else []
        return thaws + fees + [s.revoke_at for s in self.signers.values() if s.revoke_at]

    def clear_clock(self) -> int:
        """Move time until no deadline is near; returns a `now` safe for the next block."""
        while True:
            now = self.chain.timestamp()
            if all(abs(deadline - now) > MARGIN for deadline in self.deadlines()):
                return now
            self.chain.increase_time(2 * MARGIN)

    def sign(self, voucher: Voucher, kind: str) -> tuple[Voucher, bytes]:
        domain = self.escrow.domain()
        gateway = next(g for g in GATEWAYS if g.address == voucher.gateway)
        if kind == "valid":
            return voucher, sign_message(domain, voucher, gateway)
        if kind == "forged":
            return voucher, sign_message(domain, voucher, OUTSIDER)
        if kind == "other chain":
            return voucher, sign_message(
                Domain(domain.chain_id + 1, self.escrow.address), voucher, gateway
            )
        if kind == "other contract":
            return voucher, sign_message(Domain(domain.chain_id, MINERS[0]), voucher, gateway)
        signature = sign_message(domain, voucher, gateway)
        if kind == "high s":
            s = SECP256K1_N - int.from_bytes(signature[32:64], "big")
            return voucher, signature[:32] + s.to_bytes(32, "big") + bytes([55 - signature[64]])
        # "tampered": a valid signature over a voucher worth less than the one submitted.
        changed = Voucher(
            *voucher.as_tuple()[:3], voucher.value_aggregate + 1, *voucher.as_tuple()[4:]
        )
        return changed, signature

    def submit(self, voucher: Voucher, signature: bytes, refusal: str | None = None) -> None:
        """Collect and check the outcome against the model. `refusal` is the reason a badly
        signed voucher must be refused; for a validly signed one the model works it out."""
        key = (voucher.payer, voucher.gateway, voucher.miner)
        self.touched_payers.add(voucher.payer)
        self.touched_keys.add(key)
        self.touched_signers.add((voucher.payer, voucher.gateway))
        self.touched_fees = True
        now = self.clear_clock()
        account = self.accounts[voucher.payer]
        already = self.collected.get(key, 0)
        paid, reason = 0, refusal
        if refusal is None:
            if not self.signers[(voucher.payer, voucher.gateway)].active(now):
                reason = "gateway not authorized"
            elif voucher.value_aggregate <= already:
                reason = "nothing to collect"
            else:
                paid = min(voucher.value_aggregate - already, account.balance_wei)
                if paid == 0:
                    reason = "payer balance empty"
        collection = self.expect(
            reason, lambda: self.escrow.collect(self.keys[SUBMITTER], voucher, signature)
        )
        if collection is None:
            return
        split = split_payment(paid, self.protocol_ppm, self.pool_ppm)
        assert (collection.paid_wei, collection.miner_wei) == (paid, split.miner)
        assert (collection.protocol_fee_wei, collection.verifier_fee_wei) == (
            split.protocol,
            split.verifier_pool,
        )
        balance = account.balance_wei - paid
        self.accounts[voucher.payer] = EscrowAccount(
            balance, min(account.thawing_wei, balance), account.thaw_end
        )
        self.collected[key] = already + paid
        self.fees_owed[self.fee_recipients[0]] += split.protocol
        self.fees_owed[self.fee_recipients[1]] += split.verifier_pool
        self.paid_to_miners[voucher.miner] += split.miner

    # --- rules ---

    @initialize(
        deposits=st.tuples(*(st.integers(1, 3000) for _ in PAYERS)),
        second_gateway=st.tuples(*(st.booleans() for _ in PAYERS)),
    )
    def open_accounts(self, deposits: tuple[int, ...], second_gateway: tuple[bool, ...]) -> None:
        """Start where payers usually are: funded, with the first gateway authorized."""
        for index, (amount, both) in enumerate(zip(deposits, second_gateway, strict=True)):
            self.deposit(index, index, amount)
            for gateway in range(2 if both else 1):
                self.authorize(index, gateway)

    @rule(payer=payer_ids, sender=payer_ids, amount=amounts)
    def deposit(self, payer: int, sender: int, amount: int) -> None:
        beneficiary = self.payers[payer]
        self.touched_payers.add(beneficiary)
        self.expect(
            "zero deposit" if amount == 0 else None,
            lambda: self.escrow.deposit(
                self.keys[PAYERS[sender]], amount, None if sender == payer else beneficiary
            ),
        )
        if amount:
            account = self.accounts[beneficiary]
            self.accounts[beneficiary] = EscrowAccount(
                account.balance_wei + amount, account.thawing_wei, account.thaw_end
            )
            self.deposited += amount

    @rule(payer=payer_ids, percent=st.integers(0, 120))
    def thaw(self, payer: int, percent: int) -> None:
        """Thaw a share of the balance; past 100 % it must be refused."""
        address, account = self.payers[payer], self.accounts[self.payers[payer]]
        self.touched_payers.add(address)
        amount = account.balance_wei * percent // 100
        if percent > 100 and amount == account.balance_wei:
            amount += 1
        reason = None
        if amount == 0:
            reason = "zero amount"
        elif amount > account.balance_wei:
            reason = "amount exceeds balance"
        receipt = self.expect(reason, lambda: self.escrow.thaw(self.keys[PAYERS[payer]], amount))
        if receipt is not None:
            self.accounts[address] = EscrowAccount(
                account.balance_wei, amount, self.block_time(receipt) + THAW
            )

    @rule(payer=payer_ids)
    def cancel_thaw(self, payer: int) -> None:
        address, account = self.payers[payer], self.accounts[self.payers[payer]]
        self.touched_payers.add(address)
        receipt = self.expect(
            None if account.thawing_wei else "nothing thawing",
            lambda: self.escrow.cancel_thaw(self.keys[PAYERS[payer]]),
        )
        if receipt is not None:
            self.accounts[address] = EscrowAccount(account.balance_wei, 0, 0)

    @rule(payer=payer_ids, wait=st.booleans())
    def withdraw(self, payer: int, wait: bool) -> None:
        """Withdraw, first travelling past the thaw's end if `wait`. A payer that is thawing
        is picked where there is one: early and late withdrawals are the interesting ones."""
        thawing = [i for i, p in enumerate(self.payers) if self.accounts[p].thawing_wei]
        if thawing and payer not in thawing:
            payer = thawing[payer % len(thawing)]
        address, account = self.payers[payer], self.accounts[self.payers[payer]]
        self.touched_payers.add(address)
        now = self.clear_clock()
        if wait and account.thawing_wei and now < account.thaw_end + MARGIN:
            self.chain.increase_time(account.thaw_end + MARGIN - now)
            now = self.clear_clock()
        reason = None
        if account.thawing_wei == 0:
            reason = "nothing thawing"
        elif now < account.thaw_end:
            reason = "thaw not matured"
        receipt = self.expect(reason, lambda: self.escrow.withdraw(self.keys[PAYERS[payer]]))
        if receipt is not None:
            amount = min(account.thawing_wei, account.balance_wei)
            assert self.escrow.events(receipt)[0].args["amount"] == amount
            self.accounts[address] = EscrowAccount(account.balance_wei - amount, 0, 0)
            self.withdrawn += amount

    @rule(seconds=st.sampled_from([THAW // 3, THAW, 2 * THAW]))
    def advance_time(self, seconds: int) -> None:
        self.chain.increase_time(seconds)

    @rule(payer=payer_ids, gateway=gateway_ids)
    def authorize(self, payer: int, gateway: int) -> None:
        pair = (self.payers[payer], GATEWAYS[gateway].address)
        self.touched_signers.add(pair)
        state = self.signers[pair]
        already = state.authorized and state.revoke_at == 0
        self.expect(
            "already authorized" if already else None,
            lambda: self.escrow.authorize_signer(
                self.keys[PAYERS[payer]], GATEWAYS[gateway].address
            ),
        )
        state.authorized, state.revoke_at = True, 0

    @rule(payer=payer_ids, gateway=gateway_ids)
    def revoke(self, payer: int, gateway: int) -> None:
        pair = (self.payers[payer], GATEWAYS[gateway].address)
        self.touched_signers.add(pair)
        state = self.signers[pair]
        now = self.clear_clock()
        reason = None
        if not state.active(now):
            reason = "signer not authorized"
        elif state.revoke_at:
            reason = "revocation pending"
        receipt = self.expect(
            reason,
            lambda: self.escrow.revoke_signer(self.keys[PAYERS[payer]], GATEWAYS[gateway].address),
        )
        if receipt is not None:
            state.revoke_at = self.block_time(receipt) + THAW

    def next_voucher(self, payer: int, gateway: int, miner: int, step: int) -> Voucher:
        """A voucher for `step` more than was collected so far."""
        address, signer, to = self.payers[payer], GATEWAYS[gateway].address, MINERS[miner]
        value = max(0, self.collected.get((address, signer, to), 0) + step)
        return Voucher(address, to, signer, value, 1, b"\x07" * 32)

    @rule(payer=payer_ids, gateway=gateway_ids, miner=miner_ids, step=steps)
    def collect_valid(self, payer: int, gateway: int, miner: int, step: int) -> None:
        self.sign_and_submit(self.next_voucher(payer, gateway, miner, step))

    def sign_and_submit(self, voucher: Voucher) -> None:
        """Sign `voucher` as its gateway, keep it for replays, and collect it."""
        voucher, signature = self.sign(voucher, "valid")
        key = (voucher.payer, voucher.gateway, voucher.miner)
        self.max_signed[key] = max(self.max_signed.get(key, 0), voucher.value_aggregate)
        self.signed.append((voucher, signature))
        self.submit(voucher, signature)

    @rule(
        payer=payer_ids,
        gateway=gateway_ids,
        miner=miner_ids,
        step=steps,
        kind=st.sampled_from(sorted(BAD_SIGNATURES)),
    )
    def collect_invalid(self, payer: int, gateway: int, miner: int, step: int, kind: str) -> None:
        voucher, signature = self.sign(self.next_voucher(payer, gateway, miner, step), kind)
        self.submit(voucher, signature, BAD_SIGNATURES[kind])

    @precondition(lambda self: self.signed)
    @rule(index=st.integers(min_value=0))
    def replay(self, index: int) -> None:
        """Submit a validly signed voucher again, or an older, smaller one."""
        voucher, signature = self.signed[index % len(self.signed)]
        self.submit(voucher, signature)

    @precondition(lambda self: any(self.fees_owed.values()))
    @rule(recipient=st.sampled_from((TREASURY, POOL)))
    def claim_fees(self, recipient: int) -> None:
        address = self.addrs[recipient]
        owed = self.fees_owed[address]
        self.touched_fees = True
        self.expect(
            None if owed else "nothing to claim",
            lambda: self.escrow.claim_fees(self.keys[recipient]),
        )
        self.fees_claimed += owed
        self.fees_owed[address] = 0

    @rule(protocol=fee_shares, pool=fee_shares, sender=st.sampled_from((ADMIN,) * 3 + (SUBMITTER,)))
    def schedule_fees(self, protocol: int, pool: int, sender: int) -> None:
        """The admin (or, refused, anyone else) announces fees; above the cap is refused."""
        self.touched_fee_schedule = True
        key = self.keys[sender]
        reason = None
        if sender != ADMIN:
            reason = "admin: only admin"
        elif protocol + pool > MAX_FEE_PPM:
            reason = "fees exceed 10%"
        # Sent as is: the Python side would refuse fees above the cap before the contract.
        receipt = self.expect(
            reason,
            lambda: self.chain.send(key, self.escrow.contract, "schedule_fees", protocol, pool),
        )
        if receipt is not None:
            self.pending_fees = PendingFees(protocol, pool, self.block_time(receipt) + FEE_DELAY)

    @rule(wait=st.booleans())
    def apply_fees(self, wait: bool) -> None:
        """Anyone applies the scheduled fees, first travelling past their time if `wait`."""
        self.touched_fee_schedule = True
        now = self.clear_clock()
        pending = self.pending_fees
        if wait and pending and now < pending.ready_at + MARGIN:
            self.chain.increase_time(pending.ready_at + MARGIN - now)
            now = self.clear_clock()
        reason = None
        if pending is None:
            reason = "timelock: nothing pending"
        elif now < pending.ready_at:
            reason = "timelock: not ready"
        receipt = self.expect(reason, lambda: self.escrow.apply_fees(self.keys[SUBMITTER]))
        if receipt is not None and pending is not None:
            self.protocol_ppm, self.pool_ppm = pending.protocol_fee_ppm, pending.verifier_pool_ppm
            self.pending_fees = None

    @rule(outsider=st.booleans())
    def cancel_fees(self, outsider: bool) -> None:
        self.touched_fee_schedule = True
        reason = None
        if outsider:
            reason = "admin: only admin"
        elif self.pending_fees is None:
            reason = "timelock: nothing pending"
        key = self.keys[SUBMITTER if outsider else ADMIN]
        if self.expect(reason, lambda: self.escrow.cancel_fees(key)) is not None:
            self.pending_fees = None

    @rule(payer=payer_ids, gateway=gateway_ids, requests=st.lists(requests, min_size=1, max_size=4))
    def serve_requests(
        self, payer: int, gateway: int, requests: list[tuple[ModelOffer, int, int, int, int]]
    ) -> None:
        """The gateway serves requests and the miner collects: for each request the gateway
        reserves the most it can cost, the miner attests token counts, and the gateway
        accepts the receipt only within the request's limits. The miner's voucher aggregates
        the accepted receipts alone."""
        address, signer = self.payers[payer], GATEWAYS[gateway].address
        key = (address, signer, SERVING_MINER)
        for offer, body_bytes, max_tokens, tokens_in, tokens_out in requests:
            reservation = max_request_value(body_bytes, max_tokens, offer)
            limit = over_limit(tokens_in, tokens_out, body_bytes=body_bytes, max_tokens=max_tokens)
            if limit is not None:
                continue  # refused: the request is not charged, its reservation released
            value = request_value(tokens_in, tokens_out, offer)
            self.accepted.append((value, reservation))
            self.served[key] = self.served.get(key, 0) + value
            self.reserved[key] = self.reserved.get(key, 0) + reservation
        if key in self.served:
            self.sign_and_submit(
                Voucher(address, SERVING_MINER, signer, self.served[key], 1, b"\x09" * 32)
            )

    # --- invariants ---

    def check_against_model(self, everything: bool) -> None:
        """Compare the contract with the model: what the last step touched, or everything.

        Each view is an EVM call, so every step checks only what it could have changed and the
        end of each run checks all of it.
        """
        payers = self.payers if everything else self.touched_payers
        keys = self.collected if everything else self.touched_keys
        pairs = self.signers if everything else self.touched_signers
        for payer in payers:
            assert self.escrow.account(payer) == self.accounts[payer]
        for key in keys:
            assert self.escrow.collected(*key) == self.collected.get(key, 0)
        for payer, gateway in {(p, g) for p, g, _ in keys}:
            expected = sum(
                v for (p, g, _), v in self.collected.items() if (p, g) == (payer, gateway)
            )
            assert self.escrow.gateway_collected(payer, gateway) == expected
        if everything or self.touched_fees:
            for address in self.fee_recipients:
                assert self.escrow.fees_owed(address) == self.fees_owed[address]
        if everything or self.touched_fee_schedule:
            assert self.escrow.pending_fees() == self.pending_fees
            assert self.escrow.protocol_fee_ppm() == self.protocol_ppm
            assert self.escrow.verifier_pool_ppm() == self.pool_ppm
        now = self.chain.timestamp()
        # Too close to a deadline to say which side of it the call runs; checked later.
        if all(abs(deadline - now) > MARGIN for deadline in self.deadlines()):
            for payer, gateway in pairs:
                state = self.signers[(payer, gateway)]
                assert self.escrow.is_authorized(payer, gateway) == state.active(now)
        self.touched_payers, self.touched_keys, self.touched_signers = set(), set(), set()
        self.touched_fees = self.touched_fee_schedule = False

    @invariant()
    def contract_matches_model(self) -> None:
        self.check_against_model(everything=False)

    @invariant()
    def money_is_conserved(self) -> None:
        balances = sum(a.balance_wei for a in self.accounts.values())
        owed = sum(self.fees_owed.values())
        assert self.chain.balance(self.escrow.address) == balances + owed
        paid = sum(self.paid_to_miners.values())
        assert self.deposited == balances + paid + owed + self.fees_claimed + self.withdrawn
        for miner in ALL_MINERS:
            assert self.chain.balance(miner) - self.miner_start[miner] == self.paid_to_miners[miner]
        for account in self.accounts.values():
            assert account.thawing_wei <= account.balance_wei

    @invariant()
    def never_more_than_signed(self) -> None:
        for key, value in self.collected.items():
            assert value <= self.max_signed.get(key, 0)

    @invariant()
    def receipts_bounded_by_reservations(self) -> None:
        """A miner that over-attests is never billed for it: each accepted receipt is worth at
        most what was reserved for its request, so no (payer, gateway, miner) is paid more
        than the reservations of its accepted requests."""
        for value, reservation in self.accepted:
            assert value <= reservation
        for key, reserved in self.reserved.items():
            assert self.collected.get(key, 0) <= self.served[key] <= reserved

    def teardown(self) -> None:
        self.check_against_model(everything=True)


def test_escrow_against_its_model(chain: Chain, keys: list[str]) -> None:
    run = functools.partial(
        run_state_machine_as_test,
        lambda: EscrowMachine(chain, keys),
        settings=settings(
            max_examples=25,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    # On a fresh thread's shallow stack. Under pytest's deep one, py-evm's hot calls happen to
    # straddle a boundary of CPython 3.11's frame-stack chunks, which are then mmapped and
    # unmapped on every call: 40 % of this test's time went to the kernel.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(run).result()
