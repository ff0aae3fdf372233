"""The miner's acceptance check of a gateway's voucher before collecting it (pure)."""

from __future__ import annotations

from eth_utils import to_checksum_address

from infergrid.protocol.eip712 import Domain, InvalidSignature
from infergrid.protocol.vouchers import SignedVoucher


def check_voucher(
    domain: Domain, entry: SignedVoucher, *, advertised_signer: str, miner: str
) -> str | None:
    """Why this voucher must not be collected, or None when it is fit to submit: its
    signature (in `domain`, the escrow's) must recover to the voucher's own gateway, that
    gateway must be `advertised_signer` (the signer the gateway serving the list names), and
    the voucher must pay `miner`."""
    voucher = entry.voucher
    try:
        recovered = entry.signer(domain)
    except InvalidSignature as exc:
        return f"bad signature: {exc}"
    if recovered != voucher.gateway:
        return f"signature is by {recovered}, not by the voucher's gateway {voucher.gateway}"
    if voucher.gateway != to_checksum_address(advertised_signer):
        return (
            f"voucher gateway {voucher.gateway} is not the gateway's advertised signer "
            f"{to_checksum_address(advertised_signer)}"
        )
    if voucher.miner != to_checksum_address(miner):
        return f"voucher is for miner {voucher.miner}, not {to_checksum_address(miner)}"
    return None
