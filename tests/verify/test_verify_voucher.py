"""verify.voucher.check_voucher: the miner's pure check of a gateway's voucher, the one the
collector calls (compute.collector re-exports it)."""

from __future__ import annotations

from eth_utils import keccak

from infergrid.compute import collector
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import Voucher, sign_message
from infergrid.protocol.vouchers import SignedVoucher
from infergrid.verify.voucher import check_voucher

DOMAIN = Domain(1337, "0x" + "e5" * 20)
GATEWAY = Signer("0x" + "6b" * 32)
MINER = Signer("0x" + "42" * 32).address
PAYER = Signer("0x" + "43" * 32).address


def signed(*, miner: str = MINER, by: Signer = GATEWAY, domain: Domain = DOMAIN) -> SignedVoucher:
    voucher = Voucher(
        payer=PAYER,
        miner=miner,
        gateway=GATEWAY.address,
        value_aggregate=1000,
        timestamp=1_700_000_000,
        receipts_root=keccak(b"root"),
    )
    return SignedVoucher(voucher, sign_message(domain, voucher, by), 3)


def check(entry: SignedVoucher, advertised: str = GATEWAY.address) -> str | None:
    return check_voucher(DOMAIN, entry, advertised_signer=advertised, miner=MINER.lower())


def test_the_collector_calls_this_check() -> None:
    assert collector.check_voucher is check_voucher


def test_an_honest_voucher_is_fit_to_submit() -> None:
    assert check(signed()) is None


def test_a_voucher_signed_by_another_key_is_refused() -> None:
    forger = Signer("0x" + "99" * 32)
    reason = check(signed(by=forger))
    assert reason == (
        f"signature is by {forger.address}, not by the voucher's gateway {GATEWAY.address}"
    )


def test_a_voucher_from_an_unadvertised_signer_is_refused() -> None:
    other = Signer("0x" + "77" * 32).address
    assert check(signed(), advertised=other.lower()) == (
        f"voucher gateway {GATEWAY.address} is not the gateway's advertised signer {other}"
    )


def test_a_voucher_for_another_miner_is_refused() -> None:
    assert check(signed(miner=PAYER)) == f"voucher is for miner {PAYER}, not {MINER}"


def test_a_malformed_signature_is_refused() -> None:
    entry = SignedVoucher(signed().voucher, b"\x00" * 65, 0)
    assert (check(entry) or "").startswith("bad signature: ")
