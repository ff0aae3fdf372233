"""What a metered gateway's per-request cryptography and receipt commit cost on this machine
(docs/benchmarks.md, "Receipts committed, not fsynced").

    .venv/bin/python bench/metering_crypto.py [--repeats 2000] [--commits 300]

Times, in microseconds (medians over `--repeats` calls unless stated):

  keccak256           protocol.hashing's backend against pycryptodome, on 64 bytes
  struct hash         an attestation's hashStruct, computed fresh (not the memoized value)
  verify_attestation  the gateway's whole check of one signed attestation
  recover             secp256k1 recovery of the signer's address
  receipt hash+sign   a receipt's hashStruct, its EIP-712 digest and the gateway's signature
  store commit        ReceiptStore.commit awaited one at a time (`--commits` of them, p50),
                      on the disk (the system temp dir) and with wait_for_disk (an fsync each)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from infergrid.app.receipts import ReceiptStore
from infergrid.protocol import hashing
from infergrid.protocol.eip712 import Domain, Signer, recover
from infergrid.protocol.messages import (
    Attestation,
    Receipt,
    request_hash,
    response_hash,
    sign_message,
    signed_json,
)
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.verify.attestation import verify_attestation
from machine_info import cpu_model

DOMAIN = Domain(chain_id=1337, verifying_contract="0x" + "ab" * 20)
GATEWAY = Signer("0x" + "11" * 32)
MINER = Signer("0x" + "22" * 32)
PAYER = "0x" + "b1" * 20
MODEL_ID = "0x" + hashing.keccak256(b"bench-model").hex()


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _attestation(i: int) -> Attestation:
    return Attestation(
        request_hash=request_hash(f"req-{i}", b'{"messages": []}' * 20),
        response_hash=response_hash([1, 2, 3, 4]),
        model_id=MODEL_ID,
        miner=MINER.address,
        tokens_in=20,
        tokens_out=4,
    )


def _receipt(attestation: Attestation) -> Receipt:
    return Receipt(
        request_hash=attestation.request_hash,
        payer=PAYER,
        miner=attestation.miner,
        gateway=GATEWAY.address,
        model_id=attestation.model_id,
        tokens_in=attestation.tokens_in,
        tokens_out=attestation.tokens_out,
        value=10**15,
        timestamp=int(time.time()),
        attestation_hash=attestation.struct_hash(),
    )


async def _commit_p50_us(db: Path, commits: int, *, wait_for_disk: bool) -> float:
    store = ReceiptStore(db, DOMAIN, GATEWAY, wait_for_disk=wait_for_disk)
    samples = []
    try:
        for i in range(commits):
            attestation = _attestation(i)
            signature = sign_message(DOMAIN, attestation, MINER)
            start = time.perf_counter()
            await store.commit(f"req-{i}", _receipt(attestation), attestation, signature)
            samples.append((time.perf_counter() - start) * 1e6)
    finally:
        store.close()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--commits", type=int, default=300)
    args = parser.parse_args()
    n = args.repeats
    data = os.urandom(64)
    fallback = hashing._pycryptodome()
    attestation = _attestation(0)
    signature = sign_message(DOMAIN, attestation, MINER)
    signed = signed_json(attestation, signature)
    offer = ModelOffer("bench-model", MODEL_ID, 1, 2)
    record = NodeRecord(
        owner=MINER.address,
        role=Role.MINER,
        endpoint="http://127.0.0.1:1",
        signer=MINER.address,
        models=(offer,),
    )
    digest = DOMAIN.digest(attestation.struct_hash())
    receipt = _receipt(attestation)

    def verify() -> object:
        return verify_attestation(
            DOMAIN,
            record=record,
            offer=offer,
            request_hash=attestation.request_hash,
            signed=signed,
            output_token_ids=[1, 2, 3, 4],
            prompt_token_ids=list(range(20)),
            usage={"prompt_tokens": 20, "completion_tokens": 4},
            body_bytes=320,
            max_tokens=16,
        )

    rows = [
        (f"keccak256 ({hashing.KECCAK_BACKEND})", _median_us(lambda: hashing.keccak256(data), n)),
        ("keccak256 (pycryptodome)", _median_us(lambda: fallback(data), n)),
        ("attestation struct hash, fresh", _median_us(attestation._hash, n)),
        ("verify_attestation", _median_us(verify, n)),
        ("recover", _median_us(lambda: recover(digest, signature), n)),
        (
            "receipt hash+sign",
            _median_us(lambda: GATEWAY.sign(DOMAIN.digest(receipt._hash())), n),
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for wait, label in ((False, "store commit (p50)"), (True, "store commit, wait_for_disk")):
            db = Path(tmp) / f"receipts-{wait}.db"
            rows.append((label, asyncio.run(_commit_p50_us(db, args.commits, wait_for_disk=wait))))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; temp dir {tempfile.gettempdir()}")
    for name, us in rows:
        print(f"{name:<34} {us:>9.1f} µs")


if __name__ == "__main__":
    main()
