"""protocol.vouchers.SignedVoucher: the one wire format of a signed voucher, which the gateway
serves in GET /v1/vouchers and the miner's collector parses. A round trip, every malformed
field refused with ValueError naming it, and signer/verify."""

from __future__ import annotations

import json
from typing import Any

import pytest
from eth_utils import keccak

from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import Voucher, sign_message
from infergrid.protocol.vouchers import SignedVoucher

DOMAIN = Domain(chain_id=1337, verifying_contract="0x" + "ab" * 20)
GATEWAY = Signer("0x" + "11" * 32)
VOUCHER = Voucher(
    payer="0x" + "b1" * 20,
    miner="0x" + "a1" * 20,
    gateway=GATEWAY.address,
    value_aggregate=12_345 * 10**12,
    timestamp=1_700_000_000,
    receipts_root=keccak(text="root"),
)
SIGNATURE = sign_message(DOMAIN, VOUCHER, GATEWAY)


def wire() -> dict[str, Any]:
    """The entry as it travels: through JSON text, as the collector gets it."""
    signed = SignedVoucher(VOUCHER, SIGNATURE, 3)
    return json.loads(json.dumps(signed.to_json()))


def test_round_trip_through_json() -> None:
    doc = wire()
    assert doc == {
        "voucher": VOUCHER.to_json(),
        "signature": "0x" + SIGNATURE.hex(),
        "receipt_count": 3,
    }
    parsed = SignedVoucher.from_json(doc)
    assert parsed == SignedVoucher(VOUCHER, SIGNATURE, 3)
    assert parsed.to_json() == doc
    # Zero receipts is a count like any other (an empty root).
    assert SignedVoucher.from_json({**doc, "receipt_count": 0}).receipt_count == 0


def test_signer_and_verify() -> None:
    signed = SignedVoucher.from_json(wire())
    assert signed.signer(DOMAIN) == GATEWAY.address
    assert signed.verify(DOMAIN)
    # Another deployment's domain recovers to some other address.
    assert not signed.verify(Domain(chain_id=199, verifying_contract=DOMAIN.verifying_contract))
    # Right shape, not a signature: verify says no instead of raising.
    assert not SignedVoucher(VOUCHER, b"\x00" * 65, 3).verify(DOMAIN)


@pytest.mark.parametrize("data", [None, [], "x", 7])
def test_refuses_an_entry_that_is_not_an_object(data: object) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        SignedVoucher.from_json(data)


@pytest.mark.parametrize(
    "voucher",
    [
        None,
        "x",
        [],
        {**VOUCHER.to_json(), "payer": "nope"},
        {k: v for k, v in VOUCHER.to_json().items() if k != "miner"},
        {**VOUCHER.to_json(), "valueAggregate": -1},
        {**VOUCHER.to_json(), "valueAggregate": "12"},
        {**VOUCHER.to_json(), "receiptsRoot": "0x12"},
        {**VOUCHER.to_json(), "receiptsRoot": None},
    ],
)
def test_refuses_a_malformed_voucher_naming_it(voucher: object) -> None:
    with pytest.raises(ValueError, match="'voucher'"):
        SignedVoucher.from_json({**wire(), "voucher": voucher})


@pytest.mark.parametrize(
    "signature",
    [
        None,
        5,
        "",
        "0x",
        "0x1234",  # too short: the collector's old parser took any length
        "0x" + SIGNATURE.hex()[:-2],  # 64 bytes, the compact form, is not accepted
        "0x" + SIGNATURE.hex() + "00",  # 66
        SIGNATURE.hex(),  # bare hex: the wire format is 0x-hex
        "0x" + "zz" * 65,
    ],
)
def test_refuses_a_malformed_signature_naming_it(signature: object) -> None:
    with pytest.raises(ValueError, match="'signature'"):
        SignedVoucher.from_json({**wire(), "signature": signature})


@pytest.mark.parametrize("count", [None, -1, True, False, 1.0, "3", [3]])
def test_refuses_a_malformed_receipt_count_naming_it(count: object) -> None:
    with pytest.raises(ValueError, match="'receipt_count'"):
        SignedVoucher.from_json({**wire(), "receipt_count": count})


def test_refuses_a_missing_receipt_count() -> None:
    """The gateway always sends it; a parser that defaulted it would report a count nobody
    gave (the collector's old parser made it None)."""
    doc = wire()
    del doc["receipt_count"]
    with pytest.raises(ValueError, match="'receipt_count' is missing"):
        SignedVoucher.from_json(doc)


def test_construction_enforces_the_same_rules() -> None:
    """What the gateway builds satisfies what the parser demands, so it cannot serve an
    entry its own collector-side parser would refuse."""
    with pytest.raises(ValueError, match="'signature'"):
        SignedVoucher(VOUCHER, SIGNATURE[:64], 3)
    with pytest.raises(ValueError, match="'signature'"):
        SignedVoucher(VOUCHER, "0x" + SIGNATURE.hex(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'receipt_count'"):
        SignedVoucher(VOUCHER, SIGNATURE, -1)
    with pytest.raises(ValueError, match="'voucher'"):
        SignedVoucher(VOUCHER.to_json(), SIGNATURE, 1)  # type: ignore[arg-type]
