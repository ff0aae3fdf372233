"""A signed cumulative voucher as it travels from a gateway to a miner: the one wire format.

The gateway serves these in `GET /v1/vouchers?miner=0x…` (one per payer, in the answer's
`vouchers` list) and the miner's collector parses them back; both use this class, so what one
writes the other reads. On the wire an entry is a JSON object:

- `voucher`: `messages.Voucher.to_json()` (payer, miner, gateway, valueAggregate, timestamp,
  receiptsRoot), parsed and validated by `Voucher.from_json`;
- `signature`: the gateway's EIP-712 signature of the voucher, 0x-prefixed hex of exactly
  `eip712.SIGNATURE_LENGTH` (65) bytes, r ‖ s ‖ v (`eip712.signature_bytes`);
- `receipt_count`: how many receipts the voucher covers (the leaves under receiptsRoot). The
  gateway always sends it; a parser refuses an entry without it, or with anything but a
  non-negative JSON integer (not a boolean), rather than guessing.

`from_json` raises ValueError naming the offending field for any other shape. It checks only
the shape: the signature's signer is judged by `signer(domain)` / `verify(domain)`, and
whether the payer authorized that gateway only by the escrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infergrid.protocol.eip712 import Domain, signature_bytes
from infergrid.protocol.messages import Voucher, recover_signer

VOUCHER_KEY = "voucher"
SIGNATURE_KEY = "signature"
RECEIPT_COUNT_KEY = "receipt_count"


def _receipt_count(value: Any) -> int:
    # bool is an int subclass: `true` must not read as one receipt.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"'{RECEIPT_COUNT_KEY}' must be a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SignedVoucher:
    """A voucher, the gateway's 65-byte signature of it, and how many receipts it covers.

    Construction validates all three (ValueError naming the field), so every instance, built
    by the gateway or parsed by a miner, satisfies the wire rules in the module docstring.
    """

    voucher: Voucher
    signature: bytes
    receipt_count: int

    def __post_init__(self) -> None:
        if not isinstance(self.voucher, Voucher):
            raise ValueError(f"'{VOUCHER_KEY}' must be a Voucher, got {type(self.voucher)!r}")
        if not isinstance(self.signature, bytes):
            raise ValueError(f"'{SIGNATURE_KEY}' must be bytes, got {type(self.signature)!r}")
        signature_bytes(self.signature, f"'{SIGNATURE_KEY}'")  # the length
        _receipt_count(self.receipt_count)

    def to_json(self) -> dict[str, Any]:
        """The entry as the gateway serves it; `from_json` reads it back equal."""
        return {
            VOUCHER_KEY: self.voucher.to_json(),
            SIGNATURE_KEY: "0x" + self.signature.hex(),
            RECEIPT_COUNT_KEY: self.receipt_count,
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedVoucher:
        """Parse one entry of a gateway's voucher list; ValueError naming the field on
        anything malformed. The signature is only checked for shape: use `verify(domain)`
        before trusting it."""
        if not isinstance(data, Mapping):
            raise ValueError("a signed voucher is a JSON object")
        voucher_data = data.get(VOUCHER_KEY)
        if not isinstance(voucher_data, Mapping):
            raise ValueError(f"'{VOUCHER_KEY}' is missing or not an object")
        try:
            voucher = Voucher.from_json(voucher_data)
        except (TypeError, KeyError, ValueError) as exc:
            # Voucher's parsers name the inner field; say which object it is in.
            raise ValueError(f"'{VOUCHER_KEY}' is malformed: {exc}") from None
        signature = data.get(SIGNATURE_KEY)
        # 0x-hex only: HexBytes would also take bare hex or a JSON number, which no gateway
        # sends, and one format is what lets both sides agree.
        if not isinstance(signature, str) or not signature.startswith("0x"):
            raise ValueError(f"'{SIGNATURE_KEY}' must be a 0x-hex string, got {signature!r}")
        if RECEIPT_COUNT_KEY not in data:
            raise ValueError(f"'{RECEIPT_COUNT_KEY}' is missing")
        return cls(
            voucher=voucher,
            signature=signature_bytes(signature, f"'{SIGNATURE_KEY}'"),
            receipt_count=_receipt_count(data[RECEIPT_COUNT_KEY]),
        )

    def signer(self, domain: Domain) -> str:
        """The address that signed this voucher in `domain`; raises eip712.InvalidSignature."""
        return recover_signer(domain, self.voucher, self.signature)

    def verify(self, domain: Domain) -> bool:
        """Whether the voucher's own gateway signed it in `domain` (what the escrow checks,
        before it also checks that the payer authorized that gateway)."""
        try:
            return self.signer(domain) == self.voucher.gateway
        except ValueError:
            return False
