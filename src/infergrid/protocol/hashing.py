"""keccak256, the one hash of every protocol message, Merkle tree and id.

A gateway hashes a dozen times per request (the request, the response, the attestation and
receipt structs, their EIP-712 digests, Merkle nodes), so the call's fixed cost matters more
than its throughput on 100-byte inputs: `safe-pysha3`'s C type (the backend of eth-hash's
`pysha3` extra) costs about 2 µs a call here, pycryptodome's (eth-utils' default) about
13 µs (bench/metering_crypto.py). pycryptodome stays the fallback where safe-pysha3 does not
install; both are the original Keccak-256 (Ethereum's), not NIST SHA3-256, and a known-answer
test holds each to it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["KECCAK_BACKEND", "keccak256"]


def _pysha3() -> Callable[[bytes], bytes]:
    from sha3 import keccak_256  # safe-pysha3

    def keccak256(data: bytes) -> bytes:
        return keccak_256(data).digest()

    return keccak256


def _pycryptodome() -> Callable[[bytes], bytes]:
    from Crypto.Hash import keccak

    def keccak256(data: bytes) -> bytes:
        return keccak.new(digest_bits=256, data=data).digest()

    return keccak256


try:
    keccak256 = _pysha3()
    KECCAK_BACKEND = "safe-pysha3"
except ImportError:  # pragma: no cover - exercised where safe-pysha3 is missing
    keccak256 = _pycryptodome()
    KECCAK_BACKEND = "pycryptodome"
