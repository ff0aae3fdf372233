"""The receipt anchorer against a real RewardDistributor on the embedded chain: every anchored
receipt's proof verifies against the root the contract holds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gateway_receipts import make

from infergrid.app.anchoring import AnchorSubmit, ReceiptAnchorer, distributor_submit
from infergrid.app.receipts import ReceiptStore
from infergrid.protocol import merkle
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.settle.chain import Chain, as_account, dev_private_keys
from infergrid.settle.rewards import RewardDistributor, deploy_rewards

KEYS = dev_private_keys(4)
ADMIN_KEY, ARBITER_KEY, GATEWAY_KEY = KEYS[0], KEYS[1], KEYS[2]
GATEWAY = Signer(GATEWAY_KEY)


@pytest.fixture
def distributor(chain: Chain) -> RewardDistributor:
    # A fresh contract per test, so anchor indices start at 0.
    address = deploy_rewards(
        chain,
        ADMIN_KEY,
        arbiter=as_account(ARBITER_KEY).address,
        treasury=as_account(ADMIN_KEY).address,
        proposer_bond_wei=10**18,
        challenge_window_s=3600,
        arbiter_delay_s=3601,
    )
    return RewardDistributor(chain, address)


@pytest.fixture
def store(tmp_path: Path, chain: Chain) -> Iterator[ReceiptStore]:
    domain = Domain(chain_id=chain.chain_id, verifying_contract="0x" + "ab" * 20)
    s = ReceiptStore(tmp_path / "gateway.db", domain, GATEWAY)
    yield s
    s.close()


@pytest.fixture
def submit(distributor: RewardDistributor) -> AnchorSubmit:
    # The gateway anchors from its signer key, so anchors are found under receipts' gateway.
    return distributor_submit(distributor, GATEWAY_KEY)


async def commit_many(store: ReceiptStore, ids: range) -> None:
    await asyncio.gather(*(store.commit(*make(i, gateway=GATEWAY.address)) for i in ids))


def assert_all_provable(store: ReceiptStore, distributor: RewardDistributor, ids: range) -> None:
    for i in ids:
        proof = store.anchor_proof(f"req-{i}")
        assert proof is not None, i
        on_chain = distributor.get_anchor(GATEWAY.address, proof.anchor_index)
        assert proof.root == on_chain.root and proof.count == on_chain.count
        assert proof.verify()
        assert merkle.verify_proof(proof.leaf, proof.proof, on_chain.root)


async def test_anchor_once_puts_roots_on_chain(
    store: ReceiptStore, distributor: RewardDistributor, submit: AnchorSubmit
) -> None:
    anchorer = ReceiptAnchorer(store, submit, max_batch=16)
    assert anchorer.anchor_once() is None  # nothing to anchor, no transaction
    assert distributor.anchor_count(GATEWAY.address) == 0

    await commit_many(store, range(37))
    results = []
    while (result := anchorer.anchor_once()) is not None:
        results.append(result)
    assert [(r.anchor_index, r.count) for r in results] == [(0, 16), (1, 16), (2, 5)]
    assert distributor.anchor_count(GATEWAY.address) == 3
    for result in results:
        on_chain = distributor.get_anchor(GATEWAY.address, result.anchor_index)
        assert (on_chain.root, on_chain.count) == (result.root, result.count)
        assert result.tx_hash.startswith("0x")
    assert [a[0] for a in store.anchors()] == [0, 1, 2]
    assert store.unanchored(100) == []
    assert_all_provable(store, distributor, range(37))
    assert store.anchor_proof("req-20").tx_hash == results[1].tx_hash  # type: ignore[union-attr]

    # Later receipts go into the next anchor.
    await commit_many(store, range(37, 40))
    result = anchorer.anchor_once()
    assert result is not None and (result.anchor_index, result.count) == (3, 3)
    assert_all_provable(store, distributor, range(40))


async def test_chain_outage_stops_anchoring_not_receipts(
    store: ReceiptStore, distributor: RewardDistributor, submit: AnchorSubmit
) -> None:
    up = False

    def flaky(root: bytes, count: int) -> tuple[int, str]:
        if not up:
            raise ConnectionError("chain unreachable")
        return submit(root, count)

    anchorer = ReceiptAnchorer(store, flaky)
    await commit_many(store, range(5))
    with pytest.raises(ConnectionError):
        anchorer.anchor_once()
    assert len(store.unanchored(100)) == 5  # nothing recorded for a failed submission
    await commit_many(store, range(5, 9))  # serving goes on
    up = True
    result = anchorer.anchor_once()
    assert result is not None and (result.anchor_index, result.count) == (0, 9)
    assert_all_provable(store, distributor, range(9))


async def test_store_failure_after_submit_is_recorded_later_not_resent(
    store: ReceiptStore,
    distributor: RewardDistributor,
    submit: AnchorSubmit,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    anchorer = ReceiptAnchorer(store, submit)
    await commit_many(store, range(6))
    real = store.record_anchor_leaves

    def broken(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "record_anchor_leaves", broken)
    with pytest.raises(OSError):
        anchorer.anchor_once()
    assert distributor.anchor_count(GATEWAY.address) == 1  # on-chain, not in the store
    monkeypatch.setattr(store, "record_anchor_leaves", real)
    await commit_many(store, range(6, 8))

    # The next round records the anchor already sent, then anchors only the newer receipts.
    result = anchorer.anchor_once()
    assert result is not None and (result.anchor_index, result.count) == (1, 2)
    assert distributor.anchor_count(GATEWAY.address) == 2
    assert [(a[0], a[2]) for a in store.anchors()] == [(0, 6), (1, 2)]
    assert_all_provable(store, distributor, range(8))


async def test_run_keeps_going_through_errors(
    store: ReceiptStore, distributor: RewardDistributor, submit: AnchorSubmit
) -> None:
    calls = 0

    def fails_twice(root: bytes, count: int) -> tuple[int, str]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError("chain unreachable")
        return submit(root, count)

    await commit_many(store, range(7))
    anchorer = ReceiptAnchorer(store, fails_twice, interval_s=0.01, max_batch=3)
    task = asyncio.create_task(anchorer.run())
    try:
        # Bounded by iterations, not by a deadline: only progress is asserted.
        for _ in range(2000):
            if not store.unanchored(1):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert anchorer.failures == 2
    assert distributor.anchor_count(GATEWAY.address) == 3  # 3 + 3 + 1
    assert_all_provable(store, distributor, range(7))


async def test_proofs_survive_a_restart(
    tmp_path: Path, store: ReceiptStore, distributor: RewardDistributor, submit: AnchorSubmit
) -> None:
    await commit_many(store, range(11))
    result = ReceiptAnchorer(store, submit).anchor_once()
    assert result is not None
    store.close()
    reopened = ReceiptStore(tmp_path / "gateway.db", store.domain, GATEWAY)
    try:
        assert reopened.unanchored(100) == []
        assert_all_provable(reopened, distributor, range(11))
    finally:
        reopened.close()
