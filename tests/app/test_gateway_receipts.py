"""The gateway's receipt store: durable group commit, vouchers, anchors and proofs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from eth_utils import keccak, to_checksum_address

from infergrid.app.receipts import (
    MerkleAccumulator,
    ReceiptStore,
    SignedVoucher,
    StoredReceipt,
)
from infergrid.compute.collector import parse_vouchers
from infergrid.protocol import merkle
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import (
    Attestation,
    Receipt,
    recover_signer,
    sign_message,
)
from infergrid.settle.binding import ChainBinding, ChainMismatch
from infergrid.verify.voucher import check_voucher

DOMAIN = Domain(chain_id=1337, verifying_contract="0x" + "ab" * 20)
GATEWAY_KEY = "0x" + "11" * 32
MINER_KEY = "0x" + "22" * 32
GATEWAY = Signer(GATEWAY_KEY)
MINER_SIGNER = Signer(MINER_KEY)
MINER = to_checksum_address("0x" + "a1" * 20)
MINER_2 = to_checksum_address("0x" + "a2" * 20)
PAYER = to_checksum_address("0x" + "b1" * 20)
PAYER_2 = to_checksum_address("0x" + "b2" * 20)
MODEL = keccak(text="tiny-test")


def make(
    i: int,
    *,
    payer: str = PAYER,
    miner: str = MINER,
    value: int | None = None,
    gateway: str | None = None,
) -> tuple[str, Receipt, Attestation, bytes]:
    """(request id, receipt, attestation, miner's signature) for request number i."""
    attestation = Attestation(
        request_hash=keccak(text=f"request {i}"),
        response_hash=keccak(text=f"response {i}"),
        model_id=MODEL,
        miner=miner,
        tokens_in=10 + i,
        tokens_out=20 + i,
    )
    receipt = Receipt(
        request_hash=attestation.request_hash,
        payer=payer,
        miner=attestation.miner,
        gateway=gateway or GATEWAY.address,
        model_id=MODEL,
        tokens_in=attestation.tokens_in,
        tokens_out=attestation.tokens_out,
        # Above 2**64 on purpose: values are uint256, not SQLite integers.
        value=(10**19 + i) if value is None else value,
        timestamp=1_700_000_000 + i,
        attestation_hash=attestation.struct_hash(),
    )
    return f"req-{i}", receipt, attestation, sign_message(DOMAIN, attestation, MINER_SIGNER)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def store(db: Path) -> Iterator[ReceiptStore]:
    s = ReceiptStore(db, DOMAIN, GATEWAY)
    yield s
    s.close()


async def commit(store: ReceiptStore, i: int, **kw: object) -> bytes:
    return await store.commit(*make(i, **kw))  # type: ignore[arg-type]


@contextlib.contextmanager
def writer_paused(store: ReceiptStore) -> Iterator[None]:
    """Hold the write lock so commits pile up in the queue and land in one batch after."""
    store._write_lock.acquire()
    try:
        yield
    finally:
        store._write_lock.release()


def raw_count(db: Path) -> int:
    """Rows in the file, through a connection of our own (as another process would see)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM receipts").fetchone()[0])


# -- commit ------------------------------------------------------------------------------------


async def test_commit_get_round_trip(store: ReceiptStore, db: Path) -> None:
    request_id, receipt, attestation, att_sig = make(1)
    signature = await store.commit(request_id, receipt, attestation, att_sig)
    assert len(signature) == 65
    assert recover_signer(DOMAIN, receipt, signature) == GATEWAY.address
    assert raw_count(db) == 1  # durable before commit() returned

    stored = store.get(request_id)
    assert stored == StoredReceipt(
        seq=1,
        request_id=request_id,
        receipt=receipt,
        signature=signature,
        attestation=attestation,
        attestation_signature=att_sig,
        anchor_index=None,
    )
    assert stored.leaf == receipt.struct_hash()
    assert store.get("req-unknown") is None

    doc = stored.to_json()
    assert set(doc) == {"request_id", "receipt", "attestation", "anchor_index"}
    assert doc["request_id"] == request_id and doc["anchor_index"] is None
    assert doc["receipt"]["signature"] == "0x" + signature.hex()
    assert doc["attestation"]["signature"] == "0x" + att_sig.hex()
    assert Receipt.from_json(doc["receipt"]) == receipt
    assert Attestation.from_json(doc["attestation"]) == attestation
    json.dumps(doc)  # wire-ready

    assert await commit(store, 2) and store.get("req-2").seq == 2  # type: ignore[union-attr]
    assert store.payer_total(PAYER) == receipt.value + make(2)[1].value
    assert store.payer_total(PAYER.lower()) == store.payer_total(PAYER)
    assert store.payer_total(PAYER_2) == 0
    assert store.count() == 2


async def test_concurrent_commits_are_durable_and_ordered(store: ReceiptStore, db: Path) -> None:
    n = 300
    signatures = await asyncio.gather(*(commit(store, i) for i in range(n)))
    assert raw_count(db) == n
    assert store.receipts_written == n
    seqs = set()
    for i, signature in enumerate(signatures):
        stored = store.get(f"req-{i}")
        assert stored is not None and stored.signature == signature
        assert recover_signer(DOMAIN, stored.receipt, signature) == GATEWAY.address
        seqs.add(stored.seq)
    assert seqs == set(range(1, n + 1))
    assert store.payer_total(PAYER) == sum(make(i)[1].value for i in range(n))


async def test_one_batch_for_everything_queued(store: ReceiptStore) -> None:
    store.start()
    with writer_paused(store):
        tasks = [asyncio.create_task(commit(store, i)) for i in range(50)]
        while store.pending < 50:  # queued, or taken by the writer that waits on the lock
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert store.batches_written <= 2
    assert store.receipts_written == 50


async def test_max_batch_splits_transactions(db: Path) -> None:
    store = ReceiptStore(db, DOMAIN, GATEWAY, max_batch=8)
    store.start()
    with writer_paused(store):
        tasks = [asyncio.create_task(commit(store, i)) for i in range(40)]
        while store.pending < 40:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert store.batches_written >= 5  # 40 receipts, at most 8 a transaction
    store.close()


async def test_duplicate_request_id_fails_alone(store: ReceiptStore, db: Path) -> None:
    await commit(store, 1)
    with pytest.raises(ValueError, match="duplicate request id"):
        await commit(store, 1)

    # A duplicate inside a batch (of an earlier receipt and of one in the same batch) fails
    # its own commit only.
    request_id, receipt, attestation, att_sig = make(7)
    store.start()
    with writer_paused(store):
        tasks = [asyncio.create_task(commit(store, i)) for i in range(2, 12)]
        tasks.append(asyncio.create_task(commit(store, 1)))
        tasks.append(asyncio.create_task(store.commit(request_id, receipt, attestation, att_sig)))
        while store.pending < len(tasks):
            await asyncio.sleep(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 2 and all(isinstance(e, ValueError) for e in errors)
    assert all(isinstance(r, bytes) for r in results[:10])
    assert raw_count(db) == 11  # req-1 .. req-11, each once
    assert store.receipts_written == 11
    assert store.payer_total(PAYER) == sum(make(i)[1].value for i in range(1, 12))
    assert [s.seq for s in store.receipts_for(MINER, PAYER)] == list(range(1, 12))


async def test_rejects_receipts_that_are_not_ours_or_do_not_match(
    store: ReceiptStore, db: Path
) -> None:
    request_id, receipt, attestation, att_sig = make(1)
    other_gateway = Signer("0x" + "33" * 32).address
    with pytest.raises(ValueError, match="gateway"):
        await store.commit(
            request_id, replace(receipt, gateway=other_gateway), attestation, att_sig
        )
    with pytest.raises(ValueError, match="attestation hash"):
        await store.commit(
            request_id, replace(receipt, attestation_hash=keccak(b"other")), attestation, att_sig
        )
    # The hash matches but the receipt charges for more tokens than were attested.
    inflated = replace(receipt, tokens_out=receipt.tokens_out + 1)
    with pytest.raises(ValueError, match="tokens_out"):
        await store.commit(request_id, inflated, attestation, att_sig)
    with pytest.raises(ValueError, match="65 bytes"):
        await store.commit(request_id, receipt, attestation, att_sig[:64])
    with pytest.raises(ValueError, match="request id"):
        await store.commit("", receipt, attestation, att_sig)
    assert raw_count(db) == 0 and store.payer_totals() == {}
    # None of that poisoned the store.
    assert await store.commit(request_id, receipt, attestation, att_sig)


async def test_errors_reach_the_waiting_caller(
    store: ReceiptStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(Signer):
        def sign(self, digest: bytes) -> bytes:
            raise RuntimeError("signer unavailable")

    monkeypatch.setattr(store, "signer", Broken(GATEWAY_KEY))
    with pytest.raises(RuntimeError, match="signer unavailable"):
        await commit(store, 1)
    monkeypatch.undo()
    assert await commit(store, 1)
    assert store.count() == 1


async def test_close_drains_queued_commits(db: Path) -> None:
    store = ReceiptStore(db, DOMAIN, GATEWAY)
    store.start()
    with writer_paused(store):
        tasks = [asyncio.create_task(commit(store, i)) for i in range(20)]
        while store.pending < 20:
            await asyncio.sleep(0)
    store.close()  # returns once all 20 are written
    assert raw_count(db) == 20
    assert all(isinstance(s, bytes) for s in await asyncio.gather(*tasks))
    with pytest.raises(RuntimeError, match="closed"):
        await commit(store, 99)
    store.close()  # idempotent


# -- vouchers ----------------------------------------------------------------------------------


def test_accumulator_matches_merkle_root() -> None:
    acc = MerkleAccumulator()
    leaves: list[bytes] = []
    assert acc.root() == merkle.merkle_root(leaves)
    for i in range(130):
        leaf = keccak(i.to_bytes(4, "big"))
        leaves.append(leaf)
        acc.append(leaf)
        assert acc.root() == merkle.merkle_root(leaves), i + 1


async def test_vouchers_cumulative_signed_and_rooted(store: ReceiptStore) -> None:
    assert store.vouchers_for(MINER) == []
    for i in range(5):
        await commit(store, i)
    for i in range(5, 8):
        await commit(store, i, payer=PAYER_2)
    await commit(store, 8, miner=MINER_2)

    vouchers = store.vouchers_for(MINER.lower(), now=1234)
    assert [v.voucher.payer for v in vouchers] == sorted([PAYER, PAYER_2])
    by_payer = {v.voucher.payer: v for v in vouchers}
    for payer, ids in ((PAYER, range(5)), (PAYER_2, range(5, 8))):
        signed = by_payer[payer]
        v = signed.voucher
        assert (v.miner, v.gateway, v.timestamp) == (MINER, GATEWAY.address, 1234)
        assert v.value_aggregate == sum(make(i)[1].value for i in ids)
        assert signed.receipt_count == len(ids)
        receipts = store.receipts_for(MINER, payer)
        assert [s.request_id for s in receipts] == [f"req-{i}" for i in ids]
        assert v.receipts_root == merkle.merkle_root([s.receipt.struct_hash() for s in receipts])
        assert recover_signer(DOMAIN, v, signed.signature) == GATEWAY.address
        assert signed.verify(DOMAIN)
        assert not signed.verify(Domain(chain_id=199, verifying_contract=DOMAIN.verifying_contract))

    # Cumulative: more receipts raise the aggregate and extend the root (incrementally).
    before = by_payer[PAYER]
    for i in range(20, 27):
        await commit(store, i)
    [after] = [v for v in store.vouchers_for(MINER) if v.voucher.payer == PAYER]
    assert after.voucher.value_aggregate == before.voucher.value_aggregate + sum(
        make(i)[1].value for i in range(20, 27)
    )
    assert after.receipt_count == 12
    leaves = [s.leaf for s in store.receipts_for(MINER, PAYER)]
    assert after.voucher.receipts_root == merkle.merkle_root(leaves)
    assert [v.voucher.payer for v in store.vouchers_for(MINER_2)] == [PAYER]
    assert store.payer_totals() == {
        PAYER: sum(make(i)[1].value for i in [*range(5), 8, *range(20, 27)]),
        PAYER_2: sum(make(i)[1].value for i in range(5, 8)),
    }


async def test_signed_voucher_json(store: ReceiptStore) -> None:
    await commit(store, 1)
    [signed] = store.vouchers_for(MINER, now=99)
    doc = json.loads(json.dumps(signed.to_json()))
    assert doc["signature"] == "0x" + signed.signature.hex() and doc["receipt_count"] == 1
    assert doc["voucher"] == signed.voucher.to_json()
    assert SignedVoucher.from_json(doc) == signed

    bad: list[object] = [
        None,
        [],
        {},
        {**doc, "voucher": "x"},
        {**doc, "voucher": {**doc["voucher"], "payer": "nope"}},
        {**doc, "voucher": {k: v for k, v in doc["voucher"].items() if k != "miner"}},
        {**doc, "voucher": {**doc["voucher"], "valueAggregate": -1}},
        {**doc, "signature": "0x1234"},
        {**doc, "signature": "zz" * 65},
        {**doc, "signature": None},
        {**doc, "receipt_count": -1},
        {**doc, "receipt_count": True},
        {k: v for k, v in doc.items() if k != "receipt_count"},
    ]
    for data in bad:
        with pytest.raises(ValueError):
            SignedVoucher.from_json(data)


async def test_the_collector_parses_exactly_what_the_gateway_serves(store: ReceiptStore) -> None:
    """The gateway's and the collector's voucher parsers once disagreed (the collector took a
    missing receipt_count and any signature length); now the miner reads the gateway's own
    to_json, in the body GET /v1/vouchers serves, back to equal vouchers that check out."""
    for i in range(3):
        await commit(store, i)
    await commit(store, 3, payer=PAYER_2)
    served = store.vouchers_for(MINER, now=99)
    body = json.loads(
        json.dumps({"gateway": store.gateway, "vouchers": [v.to_json() for v in served]})
    )
    listing = parse_vouchers("http://gw", body)
    assert listing.entries == tuple(served)
    assert [e.receipt_count for e in served] == [3, 1]
    for entry in listing.entries:
        assert isinstance(entry, SignedVoucher)
        assert check_voucher(DOMAIN, entry, advertised_signer=listing.signer, miner=MINER) is None


# -- anchors -----------------------------------------------------------------------------------


async def test_anchor_batches_and_proofs(store: ReceiptStore) -> None:
    for i in range(13):
        await commit(store, i, payer=PAYER if i % 3 else PAYER_2)
    first = store.unanchored(5)
    assert [s.seq for s in first] == [1, 2, 3, 4, 5]
    root = merkle.merkle_root([s.leaf for s in first])

    with pytest.raises(ValueError, match="root"):
        store.record_anchor(0, first, keccak(b"wrong"), "0xfeed")
    store.record_anchor(0, list(reversed(first)), root, "0xfeed")  # order of the list is free
    with pytest.raises(ValueError, match="already"):
        store.record_anchor(1, first[:1], first[0].leaf, None)  # already anchored
    rest = store.unanchored(100)
    assert [s.seq for s in rest] == list(range(6, 14))
    # An anchor covers every receipt since the last one: no gaps, none skipped.
    for part in (rest[1:], rest[:3] + rest[4:]):
        part_root = merkle.merkle_root([s.leaf for s in part])
        with pytest.raises(ValueError, match="oldest unanchored"):
            store.record_anchor_leaves(
                1, [s.seq for s in part], [s.leaf for s in part], part_root, None, verify=False
            )
        with pytest.raises(ValueError, match=r"oldest unanchored|not all of a run"):
            store.record_anchor(1, part, part_root, None)
    with pytest.raises(ValueError, match="already recorded"):
        store.record_anchor(0, rest, merkle.merkle_root([s.leaf for s in rest]), None)
    store.record_anchor(1, rest, merkle.merkle_root([s.leaf for s in rest]), None)
    assert store.unanchored(100) == [] and store.unanchored_leaves(100) == ([], [])
    assert store.anchors() == [
        (0, root, 5, "0xfeed"),
        (1, merkle.merkle_root([s.leaf for s in rest]), 8, None),
    ]

    for anchor_index, batch, tx_hash in ((0, first, "0xfeed"), (1, rest, None)):
        leaves = [s.leaf for s in batch]
        for position, stored in enumerate(batch):
            proof = store.anchor_proof(stored.request_id)
            assert proof is not None and proof.verify()
            assert (proof.anchor_index, proof.count, proof.position) == (
                anchor_index,
                len(batch),
                position,
            )
            assert proof.root == merkle.merkle_root(leaves) and proof.tx_hash == tx_hash
            assert proof.leaf == stored.receipt.struct_hash()
            assert proof.proof == merkle.merkle_proof(leaves, position)
            assert store.get(stored.request_id).anchor_index == anchor_index  # type: ignore[union-attr]
            assert not replace(proof, leaf=keccak(b"forged")).verify()
    doc = json.loads(json.dumps(store.anchor_proof("req-3").to_json()))  # type: ignore[union-attr]
    assert doc["anchor_index"] == 0 and doc["root"] == "0x" + root.hex()
    assert len(doc["proof"]) == len(store.anchor_proof("req-3").proof)  # type: ignore[union-attr]

    await commit(store, 50)
    assert store.anchor_proof("req-50") is None  # not anchored yet
    assert store.anchor_proof("req-unknown") is None


# -- restarts ----------------------------------------------------------------------------------


async def test_reopen_restores_totals_seq_and_anchors(db: Path) -> None:
    store = ReceiptStore(db, DOMAIN, GATEWAY)
    for i in range(10):
        await commit(store, i, payer=PAYER if i % 2 else PAYER_2)
    anchored = store.unanchored(4)
    root = merkle.merkle_root([s.leaf for s in anchored])
    store.record_anchor(0, anchored, root, "0xabc")
    totals = store.payer_totals()
    vouchers = store.vouchers_for(MINER, now=5)
    store.close()

    reopened = ReceiptStore(db, DOMAIN, GATEWAY)
    try:
        assert reopened.payer_totals() == totals
        assert reopened.vouchers_for(MINER, now=5) == vouchers
        assert [s.seq for s in reopened.unanchored(100)] == list(range(5, 11))
        proof = reopened.anchor_proof(anchored[2].request_id)
        assert proof is not None and proof.verify() and proof.root == root
        await commit(reopened, 10, payer=PAYER_2)
        assert reopened.get("req-10").seq == 11  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="duplicate"):
            await commit(reopened, 3)
        assert reopened.payer_total(PAYER_2) == totals[PAYER_2] + make(10)[1].value
    finally:
        reopened.close()


async def test_another_gateway_key_does_not_inherit_receipts(db: Path) -> None:
    store = ReceiptStore(db, DOMAIN, GATEWAY)
    await commit(store, 1)
    store.close()
    rotated = Signer("0x" + "44" * 32)
    other = ReceiptStore(db, DOMAIN, rotated)
    try:
        assert other.payer_totals() == {} and other.vouchers_for(MINER) == []
        assert other.unanchored(10) == []
        assert other.get("req-1") is not None  # still readable, and provable under its key
        await other.commit(*make(2, gateway=rotated.address))
        assert [v.receipt_count for v in other.vouchers_for(MINER)] == [1]
    finally:
        other.close()


_KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_gateway_receipts import DOMAIN, GATEWAY, make
    from infergrid.app.receipts import ReceiptStore

    async def main() -> None:
        store = ReceiptStore({db!r}, DOMAIN, GATEWAY, max_batch=16)
        acknowledged = 0
        async def one(i: int) -> None:
            nonlocal acknowledged
            signature = await store.commit(*make(i))
            # Printed (acknowledged) only after commit() returned.
            print(f"req-{{i}} {{signature.hex()}}", flush=True)
            acknowledged += 1
            if acknowledged == 40:
                # Die with commits still queued and in flight, as a kill -9 would strike.
                os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.gather(*(one(i) for i in range(400)))

    asyncio.run(main())
    """
)


def test_acknowledged_receipts_survive_kill_9(db: Path) -> None:
    script = _KILLED_WRITER.format(tests=str(Path(__file__).parent), db=str(db))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == -9, done.stderr
    acknowledged = dict(line.split() for line in done.stdout.splitlines())
    assert len(acknowledged) >= 40
    store = ReceiptStore(db, DOMAIN, GATEWAY)
    try:
        for request_id, signature in acknowledged.items():
            stored = store.get(request_id)
            assert stored is not None and stored.signature.hex() == signature
        # Whatever else made it to disk before the kill is whole: totals match the rows.
        stored = [store.get(f"req-{i}") for i in range(400)]
        present = [s for s in stored if s is not None]
        assert store.payer_total(PAYER) == sum(s.receipt.value for s in present)
        assert sorted(s.seq for s in present) == list(range(1, len(present) + 1))
    finally:
        store.close()


async def test_an_unstorable_receipt_fails_alone_and_is_counted(
    store: ReceiptStore, db: Path
) -> None:
    # A timestamp is a uint256 in the receipt but past SQLite's INTEGER: the batch around it
    # used to fail whole, failing every other commit of the batch.
    request_id, receipt, attestation, att_sig = make(99)
    poisoned = replace(receipt, timestamp=2**63)
    store.start()
    with writer_paused(store):
        tasks = [asyncio.create_task(commit(store, i)) for i in range(1, 6)]
        tasks.append(asyncio.create_task(store.commit(request_id, poisoned, attestation, att_sig)))
        tasks += [asyncio.create_task(commit(store, i)) for i in range(6, 9)]
        while store.pending < len(tasks):
            await asyncio.sleep(0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], ValueError)
    assert "req-99" in str(failed[0]) and "cannot be stored" in str(failed[0])
    assert raw_count(db) == 8 and store.rejected == 1
    # Not charged: totals and seqs cover exactly the stored receipts.
    assert store.payer_total(PAYER) == sum(make(i)[1].value for i in range(1, 9))
    assert [s.seq for s in store.receipts_for(MINER, PAYER)] == list(range(1, 9))
    assert store.get("req-99") is None
    # Nothing is retried, and the store goes on.
    assert await commit(store, 9)
    assert raw_count(db) == 9 and store.rejected == 1


async def test_store_is_bound_to_one_chain(db: Path) -> None:
    a = ChainBinding.make(1337, "0x" + "aa" * 32, {"PaymentEscrow": DOMAIN.verifying_contract})
    store = ReceiptStore(db, DOMAIN, GATEWAY, chain=a)
    await commit(store, 1)
    store.close()
    # A fresh chain at the same addresses (a restarted devnet) has another genesis block.
    restarted = ChainBinding.make(1337, "0x" + "bb" * 32, dict(a.contracts))
    for other in (restarted, ChainBinding.make(1337, a.genesis_hash, {"PaymentEscrow": MINER})):
        with pytest.raises(ChainMismatch, match=r"the gateway.s receipt store .* another chain"):
            ReceiptStore(db, DOMAIN, GATEWAY, chain=other)
    again = ReceiptStore(db, DOMAIN, GATEWAY, chain=a)
    assert again.count() == 1 and again.binding == a
    again.close()
