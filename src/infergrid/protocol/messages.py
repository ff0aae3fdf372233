"""The signed messages of settlement: attestations, receipts and vouchers.

- **Attestation**, signed by a miner's registered signer key for every response it serves:
  which request (request hash), what it answered (response hash), with which model, how many
  tokens in and out. Two valid attestations by one miner for one request hash with different
  response hashes are equivocation, slashable on-chain without a vote.
- **Receipt**, signed by a gateway after it checked an attestation: the payer owes the miner
  `value` = tokens_in × price_in + tokens_out × price_out at the miner's registered prices.
  Receipts stay off-chain; their struct hashes are the leaves of the Merkle roots that
  vouchers and epoch anchors commit to.
- **Voucher**, signed by a gateway whose signer the payer authorized in the escrow: the
  cumulative value of all receipts for one (payer, miner, gateway), with the Merkle root of
  those receipts. The escrow pays the miner the part it has not paid yet.

All three are EIP-712 structs in the network's one domain (see `eip712`). Field and type
names here are the contracts' exactly; the JSON forms use hex for bytes32, checksummed
addresses and plain integers for uint256.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from eth_utils import keccak

from infergrid.protocol.addresses import checked_address
from infergrid.protocol.eip712 import (
    ZERO32,
    Domain,
    Signer,
    hex32,
    recover,
    struct_hash,
    to_bytes32,
)
from infergrid.protocol.hashing import keccak256

ATTESTATION_TYPE = (
    "Attestation(bytes32 requestHash,bytes32 responseHash,bytes32 modelId,address miner,"
    "uint256 tokensIn,uint256 tokensOut,bytes32 proofHash)"
)
RECEIPT_TYPE = (
    "Receipt(bytes32 requestHash,address payer,address miner,address gateway,bytes32 modelId,"
    "uint256 tokensIn,uint256 tokensOut,uint256 value,uint256 timestamp,bytes32 attestationHash)"
)
VOUCHER_TYPE = (
    "Voucher(address payer,address miner,address gateway,uint256 valueAggregate,"
    "uint256 timestamp,bytes32 receiptsRoot)"
)
ATTESTATION_TYPEHASH = keccak(text=ATTESTATION_TYPE)
RECEIPT_TYPEHASH = keccak(text=RECEIPT_TYPE)
VOUCHER_TYPEHASH = keccak(text=VOUCHER_TYPE)

SIGNATURE_KEY = "signature"


def request_hash(request_id: str, payload: bytes) -> bytes:
    """What a request is, for attestations: keccak(request id ‖ 0x0a ‖ the exact body bytes
    the gateway sent the miner, which include the sampling seed)."""
    return keccak256(request_id.encode() + b"\n" + payload)


def response_hash(output_token_ids: Iterable[int]) -> bytes:
    """What a response is: keccak over its output token ids, each 4 bytes big-endian (the
    ids of `output_token_ids` in the wire extension, ending token included).

    Raises ValueError unless every id is an integer in [0, 2**32) (ints, or anything with
    __index__; floats and strings are refused); TypeError if `output_token_ids` is not
    iterable. One struct.pack, no Python loop per id: the gateway hashes every response.
    """
    # A generator or array becomes a tuple: struct.pack needs the count first.
    ids: Sequence[int] = (
        output_token_ids if isinstance(output_token_ids, list | tuple) else tuple(output_token_ids)
    )
    try:
        packed = struct.pack(f">{len(ids)}I", *ids)
    except (struct.error, TypeError, OverflowError) as exc:  # the latter two from an __index__
        raise ValueError(f"output token ids must be uint32: {exc}") from None
    return keccak256(packed)


_address = checked_address


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**256:
        raise ValueError(f"{what} must be a non-negative integer below 2**256, got {value!r}")
    return value


def _field(data: Mapping[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"missing field {name!r}")
    return data[name]


@lru_cache(maxsize=4096)
def _memoized_struct_hash(message: Attestation | Receipt) -> bytes:
    """A frozen message's hashStruct, by value (equal fields, equal hash): kept outside the
    instance so that copying one through its __dict__ copies only its fields."""
    return message._hash()


@dataclass(frozen=True)
class Attestation:
    request_hash: bytes
    response_hash: bytes
    model_id: bytes
    miner: str  # the miner's registry owner address
    tokens_in: int
    tokens_out: int
    proof_hash: bytes = ZERO32  # activation commitment; zero until miners produce one

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_hash", to_bytes32(self.request_hash, "requestHash"))
        object.__setattr__(self, "response_hash", to_bytes32(self.response_hash, "responseHash"))
        object.__setattr__(self, "model_id", to_bytes32(self.model_id, "modelId"))
        object.__setattr__(self, "proof_hash", to_bytes32(self.proof_hash, "proofHash"))
        object.__setattr__(self, "miner", _address(self.miner, "miner"))
        _uint(self.tokens_in, "tokensIn")
        _uint(self.tokens_out, "tokensOut")

    def struct_hash(self) -> bytes:
        """hashStruct of the attestation (memoized by value: the message is immutable, and a
        gateway needs it to verify, to build the receipt and to store it)."""
        return _memoized_struct_hash(self)

    def _hash(self) -> bytes:
        return struct_hash(
            ATTESTATION_TYPEHASH,
            [
                ("bytes32", self.request_hash),
                ("bytes32", self.response_hash),
                ("bytes32", self.model_id),
                ("address", self.miner),
                ("uint256", self.tokens_in),
                ("uint256", self.tokens_out),
                ("bytes32", self.proof_hash),
            ],
        )

    def as_tuple(self) -> tuple[bytes, bytes, bytes, str, int, int, bytes]:
        """The contract's Attestation struct, in field order."""
        return (
            self.request_hash,
            self.response_hash,
            self.model_id,
            self.miner,
            self.tokens_in,
            self.tokens_out,
            self.proof_hash,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "requestHash": hex32(self.request_hash),
            "responseHash": hex32(self.response_hash),
            "modelId": hex32(self.model_id),
            "miner": self.miner,
            "tokensIn": self.tokens_in,
            "tokensOut": self.tokens_out,
            "proofHash": hex32(self.proof_hash),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attestation:
        return cls(
            request_hash=_field(data, "requestHash"),
            response_hash=_field(data, "responseHash"),
            model_id=_field(data, "modelId"),
            miner=_field(data, "miner"),
            tokens_in=_field(data, "tokensIn"),
            tokens_out=_field(data, "tokensOut"),
            proof_hash=data.get("proofHash", ZERO32),
        )


@dataclass(frozen=True)
class Receipt:
    request_hash: bytes
    payer: str
    miner: str
    gateway: str  # the gateway's signer address
    model_id: bytes
    tokens_in: int
    tokens_out: int
    value: int  # wei the payer owes the miner for this request
    timestamp: int  # unix seconds when the gateway accepted the attestation
    attestation_hash: bytes  # Attestation.struct_hash() of the miner's attestation

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_hash", to_bytes32(self.request_hash, "requestHash"))
        object.__setattr__(self, "model_id", to_bytes32(self.model_id, "modelId"))
        object.__setattr__(
            self, "attestation_hash", to_bytes32(self.attestation_hash, "attestationHash")
        )
        for name in ("payer", "miner", "gateway"):
            object.__setattr__(self, name, _address(getattr(self, name), name))
        for name in ("tokens_in", "tokens_out", "value", "timestamp"):
            _uint(getattr(self, name), name)

    def as_tuple(self) -> tuple[bytes, str, str, str, bytes, int, int, int, int, bytes]:
        """The contract's Receipt struct (DisputeManager.open_dispute), in field order."""
        return (
            self.request_hash,
            self.payer,
            self.miner,
            self.gateway,
            self.model_id,
            self.tokens_in,
            self.tokens_out,
            self.value,
            self.timestamp,
            self.attestation_hash,
        )

    def struct_hash(self) -> bytes:
        """hashStruct of the receipt, also its Merkle leaf in vouchers and epoch anchors
        (memoized by value, as Attestation's)."""
        return _memoized_struct_hash(self)

    def _hash(self) -> bytes:
        return struct_hash(
            RECEIPT_TYPEHASH,
            [
                ("bytes32", self.request_hash),
                ("address", self.payer),
                ("address", self.miner),
                ("address", self.gateway),
                ("bytes32", self.model_id),
                ("uint256", self.tokens_in),
                ("uint256", self.tokens_out),
                ("uint256", self.value),
                ("uint256", self.timestamp),
                ("bytes32", self.attestation_hash),
            ],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "requestHash": hex32(self.request_hash),
            "payer": self.payer,
            "miner": self.miner,
            "gateway": self.gateway,
            "modelId": hex32(self.model_id),
            "tokensIn": self.tokens_in,
            "tokensOut": self.tokens_out,
            "value": self.value,
            "timestamp": self.timestamp,
            "attestationHash": hex32(self.attestation_hash),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Receipt:
        return cls(
            request_hash=_field(data, "requestHash"),
            payer=_field(data, "payer"),
            miner=_field(data, "miner"),
            gateway=_field(data, "gateway"),
            model_id=_field(data, "modelId"),
            tokens_in=_field(data, "tokensIn"),
            tokens_out=_field(data, "tokensOut"),
            value=_field(data, "value"),
            timestamp=_field(data, "timestamp"),
            attestation_hash=_field(data, "attestationHash"),
        )


@dataclass(frozen=True)
class Voucher:
    payer: str
    miner: str
    gateway: str  # the signer; the payer must have authorized it in the escrow
    value_aggregate: int  # wei, cumulative over every receipt this voucher covers
    timestamp: int
    receipts_root: bytes  # merkle.merkle_root of the covered receipts' struct hashes

    def __post_init__(self) -> None:
        for name in ("payer", "miner", "gateway"):
            object.__setattr__(self, name, _address(getattr(self, name), name))
        _uint(self.value_aggregate, "valueAggregate")
        _uint(self.timestamp, "timestamp")
        object.__setattr__(self, "receipts_root", to_bytes32(self.receipts_root, "receiptsRoot"))

    def struct_hash(self) -> bytes:
        return struct_hash(
            VOUCHER_TYPEHASH,
            [
                ("address", self.payer),
                ("address", self.miner),
                ("address", self.gateway),
                ("uint256", self.value_aggregate),
                ("uint256", self.timestamp),
                ("bytes32", self.receipts_root),
            ],
        )

    def as_tuple(self) -> tuple[str, str, str, int, int, bytes]:
        """The contract's Voucher struct, in field order."""
        return (
            self.payer,
            self.miner,
            self.gateway,
            self.value_aggregate,
            self.timestamp,
            self.receipts_root,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "payer": self.payer,
            "miner": self.miner,
            "gateway": self.gateway,
            "valueAggregate": self.value_aggregate,
            "timestamp": self.timestamp,
            "receiptsRoot": hex32(self.receipts_root),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Voucher:
        return cls(
            payer=_field(data, "payer"),
            miner=_field(data, "miner"),
            gateway=_field(data, "gateway"),
            value_aggregate=_field(data, "valueAggregate"),
            timestamp=_field(data, "timestamp"),
            receipts_root=_field(data, "receiptsRoot"),
        )


Message = Attestation | Receipt | Voucher


def sign_message(domain: Domain, message: Message, signer: Signer) -> bytes:
    return signer.sign(domain.digest(message.struct_hash()))


def recover_signer(domain: Domain, message: Message, signature: bytes | str) -> str:
    """The address that signed `message` in `domain`; raises eip712.InvalidSignature."""
    return recover(domain.digest(message.struct_hash()), signature)


def signed_json(message: Message, signature: bytes) -> dict[str, Any]:
    """A message's JSON with its signature under SIGNATURE_KEY, as it travels on the wire."""
    return {**message.to_json(), SIGNATURE_KEY: "0x" + signature.hex()}
