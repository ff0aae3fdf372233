"""keccak256 (protocol.hashing) and the EIP-712 word encoding's fast paths."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import pytest
from eth_utils import keccak

from infergrid.protocol import hashing
from infergrid.protocol.eip712 import word
from infergrid.protocol.messages import Attestation

# Keccak-256 as Ethereum uses it (not NIST SHA3-256, whose padding differs).
KNOWN = {
    b"": "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470",
    b"abc": "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45",
}
BACKENDS = [hashing._pycryptodome()]
with contextlib.suppress(ImportError):  # only where safe-pysha3 does not install
    BACKENDS.append(hashing._pysha3())


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda f: f.__module__ + f.__qualname__)
def test_every_backend_is_ethereum_keccak256(backend) -> None:
    for data, digest in KNOWN.items():
        assert backend(data).hex() == digest
    for size in (1, 31, 32, 33, 135, 136, 137, 1000):  # around the 136-byte rate
        data = os.urandom(size)
        assert backend(data) == keccak(data)


def test_the_fast_backend_is_installed() -> None:
    """./dev installs safe-pysha3 (a pyproject dependency): the gateway hashes a dozen times
    per request, and pycryptodome's per-call cost is seven times higher."""
    assert hashing.KECCAK_BACKEND == "safe-pysha3"


def test_address_words_accept_only_twenty_hex_bytes() -> None:
    address = "0x" + "ab" * 20
    assert word("address", address) == b"\x00" * 12 + b"\xab" * 20
    assert word("address", "0X" + "AB" * 20) == word("address", address)
    assert word("address", b"\xab" * 20) == word("address", address)
    with pytest.raises(ValueError):
        word("address", "0x" + "ab" * 19 + " a")  # 42 characters, 19.5 bytes, a space
    with pytest.raises(ValueError):
        word("address", "0x" + "zz" * 20)
    with pytest.raises(ValueError):
        word("address", "0x" + "ab" * 19)


def test_bytes32_words_accept_only_32_bytes() -> None:
    assert word("bytes32", b"\x01" * 32) == b"\x01" * 32
    assert word("bytes32", "0x" + "01" * 32) == b"\x01" * 32
    with pytest.raises(ValueError):
        word("bytes32", b"\x01" * 31)
    with pytest.raises(ValueError):
        word("bytes32", bytearray(33))


def test_memoized_struct_hash_is_the_hash_of_the_fields() -> None:
    attestation = Attestation(
        request_hash=b"\x01" * 32,
        response_hash=b"\x02" * 32,
        model_id=b"\x03" * 32,
        miner="0x" + "a1" * 20,
        tokens_in=5,
        tokens_out=7,
    )
    first = attestation.struct_hash()
    assert attestation.struct_hash() == first == attestation._hash()
    changed = replace(attestation, tokens_out=8)
    assert changed.struct_hash() != first
    assert changed.struct_hash() == changed._hash()
    assert changed != attestation and replace(changed, tokens_out=7) == attestation
    assert "_struct_hash" not in vars(attestation)  # copies through __dict__ stay fields only
