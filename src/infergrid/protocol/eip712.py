"""EIP-712 typed-data hashing, signing and recovery for InferGrid's fixed message types.

Every signed message of a network shares one domain: name "InferGrid", version "1", the chain
id, and the PaymentEscrow contract's address as verifyingContract. A signature made for one
chain or one deployment is therefore worthless on any other, and the contracts that check
signatures (the escrow for vouchers, the dispute manager for attestations) compute the same
separator.

Hashing is done by hand over 32-byte words rather than through eth_account's generic
typed-data encoder: our structs only hold static types (bytes32, address, uint256), and the
generic path costs about a millisecond per message, which the gateway cannot pay per request.
Signatures are 65 bytes r ‖ s ‖ v with v in {27, 28} and s in the lower half of the curve
order, exactly what `ecrecover` in the contracts accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, TypeAlias

import coincurve
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes

from infergrid.protocol.hashing import keccak256

DOMAIN_NAME = "InferGrid"
DOMAIN_VERSION = "1"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
DOMAIN_TYPEHASH = keccak(text=DOMAIN_TYPE)

# secp256k1 group order; signatures with s above half of it are the malleable twin of another.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2
ZERO32 = b"\x00" * 32

FieldKind: TypeAlias = Literal["bytes32", "address", "uint256"]


class InvalidSignature(ValueError):
    """A signature that is malformed, malleable, or recovers to no key."""


SIGNATURE_LENGTH = 65  # r ‖ s ‖ v


def signature_bytes(value: object, what: str = "signature") -> bytes:
    """The 65 bytes of a signature given as bytes or 0x-hex; InvalidSignature (a ValueError)
    naming `what` for any other shape. Only the shape: `recover` (or a contract) judges v, s
    and who signed."""
    try:
        raw = bytes(HexBytes(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidSignature(f"{what} is not hex") from None
    if len(raw) != SIGNATURE_LENGTH:
        raise InvalidSignature(f"{what} must be {SIGNATURE_LENGTH} bytes, got {len(raw)}")
    return raw


def _plain_hex(value: object, length: int) -> bytes | None:
    """`length` bytes from exactly "0x" + 2·length hex digits, or None for anything else (the
    strict HexBytes path then judges it). The forms messages and their JSON hold, decoded
    without HexBytes' cost on the gateway's hot path."""
    if type(value) is not str or len(value) != 2 + 2 * length or value[:2] not in ("0x", "0X"):
        return None
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError:
        return None
    return raw if len(raw) == length else None  # fromhex skips spaces: a spaced one is short


def to_bytes32(value: bytes | str, what: str = "value") -> bytes:
    """32 raw bytes from bytes or 0x-hex; raises ValueError otherwise."""
    if type(value) is bytes and len(value) == 32:
        return value
    fast = _plain_hex(value, 32)
    if fast is not None:
        return fast
    try:
        raw = bytes(HexBytes(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} {value!r} is not hex") from exc
    if len(raw) != 32:
        raise ValueError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def hex32(value: bytes) -> str:
    return "0x" + value.hex()


def word(kind: FieldKind, value: bytes | str | int) -> bytes:
    """One ABI word of a static EIP-712 field."""
    if kind == "bytes32":
        return to_bytes32(value)  # type: ignore[arg-type]
    if kind == "address":
        fast = _plain_hex(value, 20)
        if fast is not None:
            return b"\x00" * 12 + fast
        raw = bytes(HexBytes(value))  # type: ignore[arg-type]
        if len(raw) != 20:
            raise ValueError(f"address {value!r} is not 20 bytes")
        return b"\x00" * 12 + raw
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**256:
        raise ValueError(f"uint256 out of range: {value!r}")
    return value.to_bytes(32, "big")


def struct_hash(typehash: bytes, fields: Sequence[tuple[FieldKind, bytes | str | int]]) -> bytes:
    """hashStruct of a struct whose members are all static: keccak(typehash ‖ words)."""
    return keccak256(typehash + b"".join([word(kind, value) for kind, value in fields]))


@dataclass(frozen=True)
class Domain:
    """The signing domain of one InferGrid deployment."""

    chain_id: int
    verifying_contract: str  # the PaymentEscrow address
    separator: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.chain_id <= 0:
            raise ValueError("chain id must be positive")
        contract = to_checksum_address(self.verifying_contract)
        object.__setattr__(self, "verifying_contract", contract)
        separator = keccak(
            DOMAIN_TYPEHASH
            + keccak(text=DOMAIN_NAME)
            + keccak(text=DOMAIN_VERSION)
            + word("uint256", self.chain_id)
            + word("address", contract)
        )
        object.__setattr__(self, "separator", separator)

    def digest(self, struct_hash_: bytes) -> bytes:
        """The EIP-712 digest that is signed: keccak(0x1901 ‖ separator ‖ hashStruct)."""
        return keccak256(b"\x19\x01" + self.separator + struct_hash_)


def private_key_bytes(key: str | bytes) -> bytes:
    raw = bytes(HexBytes(key)) if isinstance(key, str) else bytes(key)
    if len(raw) != 32:
        raise ValueError("a private key is 32 bytes")
    return raw


class Signer:
    """Signs EIP-712 digests with one private key (coincurve: ~30 µs a signature)."""

    def __init__(self, private_key: str | bytes) -> None:
        self._key = coincurve.PrivateKey(private_key_bytes(private_key))
        public = self._key.public_key.format(compressed=False)[1:]
        self.address = to_checksum_address(keccak(public)[-20:])

    def sign(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("a digest is 32 bytes")
        # libsecp256k1 always produces low-s signatures.
        rsv = self._key.sign_recoverable(digest, hasher=None)
        return rsv[:64] + bytes([rsv[64] + 27])


def recover(digest: bytes, signature: bytes | str) -> str:
    """The checksummed address that signed `digest`; raises InvalidSignature."""
    sig = signature_bytes(signature)
    v = sig[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature v must be 27 or 28, got {v}")
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:64], "big")
    if not 0 < r < SECP256K1_N or not 0 < s <= SECP256K1_HALF_N:
        raise InvalidSignature("signature r or s out of range (malleable or invalid)")
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            sig[:64] + bytes([v - 27]), digest, hasher=None
        )
    except Exception as exc:  # coincurve raises plain Exception on bad points
        raise InvalidSignature(f"signature does not recover: {exc}") from None
    return _address_of(public.format(compressed=False)[1:])


@lru_cache(maxsize=1024)
def _address_of(public_key: bytes) -> str:
    """The checksummed address of a 64-byte public key; cached, because a gateway recovers
    the same few miner keys on every request and the checksum costs another keccak."""
    return to_checksum_address(keccak256(public_key)[-20:])
