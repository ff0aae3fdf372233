"""Settlement logic without HTTP: the headroom ledger, attestation checks, the escrow poller's
shell against a fake escrow, and the schema changes settlement brought (payer-bound keys,
trace columns, frozen miners)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from eth_utils import to_checksum_address

from infergrid.app import relay
from infergrid.app.billing import EscrowSnapshot, InsufficientHeadroom, Ledger
from infergrid.app.keys import KeyStore
from infergrid.app.miners import MinerPool
from infergrid.app.node import receipts_db_path
from infergrid.app.settlement import Settlement
from infergrid.app.traces import Trace, TraceStore
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import (
    Attestation,
    request_hash,
    response_hash,
    signed_json,
)
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.pricing import TEMPLATE_TOKEN_ALLOWANCE, max_request_value
from infergrid.verify.attestation import AttestationRejected, offer_for, verify_attestation

PAYER = "0x" + "aa" * 20
OWNER = "0x" + "0b" * 20
DOMAIN = Domain(1337, "0x" + "e5" * 20)
MINER_SIGNER = Signer("0x" + "11" * 32)
OFFER = ModelOffer("m", "0x" + "ab" * 32, 3, 5)


def snapshot(balance: int, *, thawing: int = 0, collected: int = 0, ok: bool = True) -> Any:
    return EscrowSnapshot(balance, thawing, collected, ok, time.monotonic())


# -- the ledger ----------------------------------------------------------------------------------


def test_a_reservation_counts_each_body_byte_the_template_allowance_and_the_limit() -> None:
    prompt_bound = 100 + TEMPLATE_TOKEN_ALLOWANCE
    assert max_request_value(100, 16, OFFER) == prompt_bound * 3 + 16 * 5
    assert max_request_value(100, 16, replace(OFFER, price_in_wei=0, price_out_wei=0)) == 0


def test_headroom_is_balance_minus_thawing_outstanding_and_reservations() -> None:
    ledger = Ledger()
    assert ledger.account(PAYER).available_wei == 0  # unknown escrow: nothing to spend
    ledger.update_escrow(PAYER, snapshot(1000, thawing=100, collected=50))
    ledger.load_receipts({PAYER: 250})  # 200 of it not collected yet
    account = ledger.account(PAYER)
    assert account.outstanding_wei == 200 and account.available_wei == 700
    first = ledger.reserve(PAYER, 300)
    second = ledger.reserve(PAYER, 400)
    assert account.available_wei == 0 and account.inflight == 2
    with pytest.raises(InsufficientHeadroom) as info:
        ledger.reserve(PAYER, 1)
    assert (info.value.available_wei, info.value.needed_wei) == (0, 1)
    ledger.reserve(PAYER, 0)  # free: always admitted
    # The first request ends with a receipt for less than its worst case.
    ledger.charge(PAYER, 120)
    ledger.release(first)
    ledger.release(first)  # idempotent
    assert account.available_wei == 700 - 120 - 400
    ledger.release(second)
    assert account.reserved_wei == 0 and account.available_wei == 580
    # Miners collect: their receipts stop counting twice (the balance went down instead).
    ledger.update_escrow(PAYER, snapshot(1000 - 370, thawing=100, collected=50 + 320))
    assert account.outstanding_wei == 0 and account.available_wei == 530


def test_resize_moves_a_reservation_to_another_miner() -> None:
    ledger = Ledger()
    ledger.update_escrow(PAYER, snapshot(100))
    held = ledger.reserve(PAYER, 60)
    ledger.resize(held, 90)
    assert ledger.account(PAYER).reserved_wei == 90
    with pytest.raises(InsufficientHeadroom) as info:
        ledger.resize(held, 101)
    assert info.value.available_wei == 100 and held.amount_wei == 90  # unchanged on refusal
    ledger.resize(held, 10)
    ledger.release(held)
    assert ledger.account(PAYER).reserved_wei == 0


def test_over_collected_and_over_thawing_never_add_headroom() -> None:
    ledger = Ledger()
    ledger.update_escrow(PAYER, snapshot(100, thawing=500, collected=10**6))
    account = ledger.account(PAYER)
    assert account.outstanding_wei == 0 and account.available_wei == 0


def test_idle_payers_are_forgotten_but_their_receipts_are_not() -> None:
    ledger = Ledger()
    ledger.update_escrow(PAYER, snapshot(100))
    ledger.charge(PAYER, 7)
    account = ledger.account(PAYER)
    account.last_seen = 10.0
    assert ledger.active_payers(since=5.0) == [PAYER]
    assert ledger.active_payers(since=20.0) == []
    held = ledger.reserve(PAYER, 1)
    assert ledger.forget_escrow(before=20.0) == 0  # a request in flight keeps it fresh
    ledger.release(held)
    assert ledger.forget_escrow(before=20.0) == 1
    assert account.escrow is None and account.receipts_wei == 7


# -- attestation checks ---------------------------------------------------------------------------

RID = "req-1"
PAYLOAD = b'{"model":"m","seed":1}'
PROMPT_IDS = [1, 2, 3]
OUTPUT_IDS = [7, 8, 9, 2]
RECORD = NodeRecord(OWNER, Role.MINER, "http://x", MINER_SIGNER.address, (OFFER,))


def attested(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_hash": request_hash(RID, PAYLOAD),
        "response_hash": response_hash(OUTPUT_IDS),
        "model_id": OFFER.model_id,
        "miner": OWNER,
        "tokens_in": len(PROMPT_IDS),
        "tokens_out": len(OUTPUT_IDS),
    }
    signer = changes.pop("signer", MINER_SIGNER)
    fields.update(changes)
    attestation = Attestation(**fields)
    return signed_json(attestation, signer.sign(DOMAIN.digest(attestation.struct_hash())))


def check(signed: Any, **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "record": RECORD,
        "offer": OFFER,
        "request_hash": request_hash(RID, PAYLOAD),
        "signed": signed,
        "output_token_ids": list(OUTPUT_IDS),
        "prompt_token_ids": list(PROMPT_IDS),
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "body_bytes": len(PAYLOAD),
        "max_tokens": 16,
    }
    args.update(overrides)
    return verify_attestation(DOMAIN, **args)


def test_a_good_attestation_verifies() -> None:
    verified = check(attested())
    assert verified.attestation.tokens_out == 4 and len(verified.signature) == 65
    assert verified.value_wei == 3 * OFFER.price_in_wei + 4 * OFFER.price_out_wei
    # The registered signer is compared case-insensitively, as registries return it.
    check(attested(), record=replace(RECORD, signer=MINER_SIGNER.address.lower()))


@pytest.mark.parametrize(
    ("signed", "overrides", "reason"),
    [
        (None, {}, "no attestation"),
        ({"requestHash": "0x12"}, {}, "malformed"),
        ({**attested(), "signature": None}, {}, "not signed"),
        ({**attested(), "signature": "0x1234"}, {}, "bad signature"),
        (attested(signer=Signer("0x" + "22" * 32)), {}, "not the registered signer"),
        (attested(miner="0x" + "0c" * 20), {}, "names miner"),
        (attested(request_hash=b"\x01" * 32), {}, "request hash"),
        (attested(), {"request_hash": request_hash(RID, PAYLOAD + b" ")}, "request hash"),
        (attested(model_id="0x" + "cd" * 32), {}, "model id"),
        (attested(), {"output_token_ids": [7, 8, 9]}, "response hash"),
        (attested(), {"output_token_ids": None}, "no output token ids"),
        (attested(), {"output_token_ids": [7, 8, -9, 2]}, "uint32"),
        (attested(), {"output_token_ids": [7, 8, "9", 2]}, "uint32"),
        (attested(tokens_in=4), {}, "tokens in"),
        (attested(), {"usage": {"prompt_tokens": 2, "completion_tokens": 4}}, "tokens in"),
        (attested(), {"prompt_token_ids": [1, 2]}, "tokens in"),
        (attested(), {"usage": None}, "tokens in"),
        (attested(tokens_out=5), {}, "tokens out"),
        (attested(), {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}, "tokens out"),
    ],
)
def test_forgeries_are_rejected(signed: Any, overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(AttestationRejected, match=reason):
        check(signed, **overrides)


def _claiming(tokens_in: int, tokens_out: int) -> dict[str, Any]:
    """check() arguments for a miner whose counts all agree on tokens_in and tokens_out."""
    output = [7] * tokens_out
    return {
        "signed": attested(
            tokens_in=tokens_in, tokens_out=tokens_out, response_hash=response_hash(output)
        ),
        "prompt_token_ids": [1] * tokens_in,
        "output_token_ids": output,
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out},
    }


def test_an_attestation_exactly_at_the_requests_limits_verifies() -> None:
    """The most prompt tokens the forwarded body can hold and exactly max_tokens of output are
    billable, and worth exactly the reservation made for them."""
    bound = len(PAYLOAD) + TEMPLATE_TOKEN_ALLOWANCE
    verified = check(**_claiming(bound, 16), max_tokens=16)
    assert verified.value_wei == max_request_value(len(PAYLOAD), 16, OFFER)


@pytest.mark.parametrize(
    ("tokens_in", "tokens_out", "reason"),
    [
        (len(PAYLOAD) + TEMPLATE_TOKEN_ALLOWANCE + 1, 4, "prompt tokens attested for a"),
        (1_000 * (len(PAYLOAD) + TEMPLATE_TOKEN_ALLOWANCE), 4, "prompt tokens attested for a"),
        (3, 17, "above the request's limit 16"),
    ],
)
def test_self_consistent_counts_beyond_the_requests_limits_are_rejected(
    tokens_in: int, tokens_out: int, reason: str
) -> None:
    """The attack: a miner signs counts that agree with each other (attestation, usage, ids)
    but bill for more prompt than the forwarded body can tokenize to, or more output than
    max_tokens. Refused before the signature is even recovered."""
    with pytest.raises(AttestationRejected, match=f"bills beyond the request: .*{reason}"):
        check(**_claiming(tokens_in, tokens_out), max_tokens=16)


def test_offer_for_by_name_or_pinned_id() -> None:
    assert offer_for(RECORD, "m") is OFFER
    assert offer_for(RECORD, OFFER.model_id.upper().replace("0X", "0x")) is OFFER
    assert offer_for(RECORD, "other") is None


# -- the shell, on a fake escrow --------------------------------------------------------------


@dataclass
class _Account:
    balance_wei: int
    thawing_wei: int = 0


class FakeEscrow:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.authorized: set[str] = set()
        self.revoking: set[str] = set()
        self.reads = 0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def account(self, payer: str) -> _Account:
        self.gate.wait(5)
        self.reads += 1
        if self.fail:
            raise ConnectionError("chain down")
        return _Account(self.balances.get(payer, 0))

    def gateway_collected(self, payer: str, gateway: str) -> int:
        return 0

    def is_authorized(self, payer: str, signer: str) -> bool:
        return payer in self.authorized

    def revoke_at(self, payer: str, signer: str) -> int:
        return 123 if payer in self.revoking else 0


class FakeStore:
    def __init__(self, totals: dict[str, int]) -> None:
        self.totals = totals
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def payer_totals(self) -> dict[str, int]:
        return dict(self.totals)

    def close(self) -> None:
        self.closed = True


def settlement(escrow: FakeEscrow, store: FakeStore | None = None) -> Settlement:
    return Settlement(
        domain=DOMAIN,
        signer=Signer("0x" + "33" * 32),
        store=store or FakeStore({}),  # type: ignore[arg-type]
        escrow=escrow,
        poll_interval_s=0.05,
        first_read_timeout_s=1.0,
    )


async def test_first_sight_reads_once_for_concurrent_requests() -> None:
    escrow = FakeEscrow()
    escrow.balances[PAYER] = 1000
    escrow.authorized.add(PAYER)
    s = settlement(escrow, FakeStore({PAYER: 400}))
    await s.start()
    escrow.gate.clear()
    waiting = [asyncio.ensure_future(s.admit(PAYER)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting)  # nothing admitted before the deposit is known
    escrow.gate.set()
    accounts = await asyncio.gather(*waiting)
    assert escrow.reads == 1 and all(a is accounts[0] for a in accounts)
    assert accounts[0].available_wei == 600  # the store's receipts count from the start
    await s.admit(PAYER)
    assert escrow.reads == 1  # known payers are memory only


async def test_unauthorized_revoking_and_unreadable_payers() -> None:
    escrow = FakeEscrow()
    s = settlement(escrow)
    with pytest.raises(APIError) as info:
        await s.admit(PAYER)
    assert info.value.status == 402 and info.value.code == "signer_not_authorized"
    escrow.authorized.add(PAYER)
    escrow.revoking.add(PAYER)
    await s.refresh()
    with pytest.raises(APIError, match="revoking") as info:
        await s.admit(PAYER)
    other = "0x" + "bb" * 20
    escrow.fail = True
    with pytest.raises(APIError) as info:
        await s.admit(other)
    assert info.value.status == 503 and info.value.code == "escrow_unavailable"


async def test_poller_keeps_figures_fresh_and_survives_outages() -> None:
    escrow = FakeEscrow()
    escrow.authorized.add(PAYER)
    s = settlement(escrow)
    account = await s.admit(PAYER)
    assert account.available_wei == 0
    task = asyncio.create_task(s.run())
    try:
        escrow.balances[PAYER] = 500
        for _ in range(40):
            await asyncio.sleep(0.025)
            if account.available_wei == 500:
                break
        assert account.available_wei == 500
        escrow.fail = True  # the chain goes away: serving goes on with the last figures
        await asyncio.sleep(0.15)
        assert s.escrow_error and "chain down" in s.escrow_error
        assert account.available_wei == 500
        await s.admit(PAYER)
        escrow.fail = False
        await asyncio.sleep(0.15)
        assert s.escrow_error is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_anchorer_is_restarted_and_never_stops_the_poller() -> None:
    class Flaky:
        runs = 0

        async def run(self) -> None:
            Flaky.runs += 1
            raise RuntimeError("rpc down")

    s = settlement(FakeEscrow())
    s.anchorer = Flaky()  # type: ignore[assignment]
    s.poll_interval_s = 0.01
    task = asyncio.create_task(s.run())
    await asyncio.sleep(1.2)  # restarts wait at least a second
    assert not task.done() and Flaky.runs >= 2 and "rpc down" in (s.anchor_error or "")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- schema: payer-bound keys, trace columns, frozen miners -------------------------------------


def test_keys_bound_to_payers(keys: KeyStore) -> None:
    key_id, secret = keys.create("billed", payer=PAYER)
    record = keys.verify(secret)
    assert record is not None and record.payer == to_checksum_address(PAYER)
    assert keys.get(key_id).payer == record.payer  # type: ignore[union-attr]
    assert keys.create("free")[0] and keys.list()[1].payer is None
    with pytest.raises(ValueError, match="not an address"):
        keys.create("bad", payer="0x1234")


def test_old_key_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_hash BLOB"
        " NOT NULL UNIQUE, hint TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL)"
    )
    conn.execute("INSERT INTO api_keys VALUES ('key_old', 'old', x'00', 'ig-…abcd', 1.0, NULL)")
    conn.commit()
    conn.close()
    store = KeyStore(db)
    again = KeyStore(db)  # a second opener finds the column there
    [old] = store.list()
    assert old.key_id == "key_old" and old.payer is None
    _, secret = store.create("new", payer=PAYER)
    assert again.verify(secret).payer is not None  # type: ignore[union-attr]
    store.close()
    again.close()


def test_old_trace_database_gets_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE traces (request_id, key_id, model, route, stream, created_at,"
        " status, PRIMARY KEY (request_id))"
    )
    conn.commit()
    conn.close()
    store = TraceStore(db)
    store.record(Trace("r1", None, "m", "/x", False, 0.0, 200, payer=PAYER, cost_wei=str(2**70)))
    store.flush()
    got = store.get_flushed("r1")
    assert got is not None and got.cost_wei == str(2**70) and got.payer == PAYER
    store.close()


def test_frozen_miners_get_no_traffic() -> None:
    record = NodeRecord(OWNER, Role.MINER, "http://127.0.0.1:1", OWNER, (OFFER,))
    pool = MinerPool()
    assert pool.update([replace(record, frozen=True)]) == []
    assert pool.models() == []
    assert len(pool.update([record])) == 1


def test_cost_fields_and_finish_detection() -> None:
    usage = relay.add_cost({"prompt_tokens": 1}, 1_500_000_000_000_000_000)
    assert usage == {"prompt_tokens": 1, "cost": 1.5, "cost_wei": "1500000000000000000"}
    assert relay.finishes({"choices": [{"index": 0, "finish_reason": "stop"}]})
    assert not relay.finishes({"choices": [{"index": 0, "finish_reason": None}]})
    assert not relay.finishes({"choices": []})


def test_receipts_live_beside_the_gateway_db() -> None:
    assert receipts_db_path(Path("/s/gateway.db")) == Path("/s/gateway.receipts.db")
    assert receipts_db_path(Path("/s/gw")) == Path("/s/gw.receipts.db")
