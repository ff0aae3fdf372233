"""The PaymentEscrow contract from Python: deposits, thawing withdrawals, gateway signers,
voucher collection, and the timelocked fee changes and two-step admin handover
(docs/settlement.md).

Writes take the acting key and return the receipt (or, for `collect`, what the Collected event
says was paid); reverts raise `ContractRevert` with the contract's reason. Arguments are
checked here first so a typo costs a ValueError, not gas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from eth_utils import keccak, to_checksum_address
from web3.contract import Contract
from web3.types import TxReceipt

from infergrid.protocol.eip712 import Domain, signature_bytes
from infergrid.protocol.messages import Voucher
from infergrid.protocol.pricing import PPM
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ChainError, ContractEvent, PrivateKey, decode_events
from infergrid.settle.registry import check_address

CONTRACT_NAME = "PaymentEscrow"
UINT256_MAX = 2**256 - 1
MAX_THAW_PERIOD_S = 365 * 86400
# The contract's cap on protocol fee + verifier pool share (its max_fee_ppm()): 10 %.
MAX_FEE_PPM = 100_000
# lib/timelock.vy's MAX_DELAY: the longest a fee change may be made to wait.
MAX_FEE_DELAY_S = 365 * 86400
# The timelock kind under which the escrow schedules fee changes (its FEES_CHANGE).
FEES_CHANGE = keccak(text="fees")
ZERO_ADDRESS = "0x" + "00" * 20
EMPTY_CHANGE = b"\x00" * 32


@dataclass(frozen=True)
class EscrowAccount:
    balance_wei: int
    thawing_wei: int  # part of the balance on its way out, still collectable
    thaw_end: int  # unix time from which the thawing funds can be withdrawn; 0 if none

    @property
    def available_wei(self) -> int:
        """What the payer can still spend on requests."""
        return self.balance_wei - self.thawing_wei


@dataclass(frozen=True)
class Collection:
    """What one `collect` took from the payer and where it went."""

    paid_wei: int  # taken from the payer: the three parts below
    miner_wei: int
    protocol_fee_wei: int
    verifier_fee_wei: int
    tx_hash: str
    gas_used: int


class PendingFees(NamedTuple):
    """A fee change schedule_fees() announced: in force once applied, from `ready_at` on."""

    protocol_fee_ppm: int
    verifier_pool_ppm: int
    ready_at: int  # unix time from which anyone may apply it


EscrowEvent = ContractEvent


def _wei(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an int amount of wei")
    if not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{what} {value} is out of range")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fees(protocol_fee_ppm: int, verifier_pool_ppm: int) -> None:
    for what, ppm in (
        ("protocol fee", protocol_fee_ppm),
        ("verifier pool share", verifier_pool_ppm),
    ):
        if not _is_int(ppm) or ppm < 0:
            raise ValueError(f"{what} must be a non-negative int (ppm)")
    if protocol_fee_ppm + verifier_pool_ppm > MAX_FEE_PPM:
        raise ValueError(
            f"fees add up to more than {MAX_FEE_PPM:,} ppm ({100 * MAX_FEE_PPM // PPM} %)"
        )


def deploy_escrow(
    chain: Chain,
    deployer_key: PrivateKey,
    *,
    treasury: str,
    verifier_pool: str,
    protocol_fee_ppm: int,
    verifier_pool_ppm: int,
    thaw_period_s: int,
    fee_delay_s: int,
) -> str:
    """Deploy a PaymentEscrow; the deployer becomes its admin. Returns the address.

    Fees together are at most MAX_FEE_PPM; a later fee change waits `fee_delay_s`, which must
    exceed `thaw_period_s` (so payers can leave first) and be at most MAX_FEE_DELAY_S.
    """
    _check_fees(protocol_fee_ppm, verifier_pool_ppm)
    if not _is_int(thaw_period_s) or not 0 <= thaw_period_s <= MAX_THAW_PERIOD_S:
        raise ValueError(f"thaw period must be 0..{MAX_THAW_PERIOD_S} seconds")
    if not _is_int(fee_delay_s) or not thaw_period_s < fee_delay_s <= MAX_FEE_DELAY_S:
        raise ValueError(
            f"fee delay must outlast the thaw period ({thaw_period_s} s) and be at most"
            f" {MAX_FEE_DELAY_S} seconds"
        )
    artifact = load_artifact(CONTRACT_NAME)
    return chain.deploy(
        deployer_key,
        artifact.abi,
        artifact.bytecode,
        check_address(treasury, "treasury"),
        check_address(verifier_pool, "verifier pool"),
        protocol_fee_ppm,
        verifier_pool_ppm,
        thaw_period_s,
        fee_delay_s,
    )


class PaymentEscrow:
    """A deployed PaymentEscrow."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = check_address(address, "escrow address")
        self.contract: Contract = chain.contract(self.address, load_artifact(CONTRACT_NAME).abi)
        self._immutables: dict[str, Any] = {}

    def domain(self) -> Domain:
        """The EIP-712 domain every message of this deployment is signed in."""
        return Domain(self.chain.chain_id, self.address)

    # --- parameters ---

    def _immutable(self, name: str) -> Any:
        if name not in self._immutables:
            self._immutables[name] = self.chain.call(getattr(self.contract.functions, name)())
        return self._immutables[name]

    def thaw_period(self) -> int:
        return int(self._immutable("thaw_period"))

    def treasury(self) -> str:
        return to_checksum_address(self._immutable("treasury"))

    def verifier_pool(self) -> str:
        return to_checksum_address(self._immutable("verifier_pool"))

    def fee_delay(self) -> int:
        """Seconds between scheduling a fee change and the earliest it can apply."""
        return int(self._immutable("delay"))

    def max_fee_ppm(self) -> int:
        """The contract's cap on protocol fee + verifier pool share."""
        return int(self._immutable("max_fee_ppm"))

    # A scheduled change can apply at any time after its delay, so these are read afresh.
    def protocol_fee_ppm(self) -> int:
        return int(self.chain.call(self.contract.functions.protocol_fee_ppm()))

    def verifier_pool_ppm(self) -> int:
        return int(self.chain.call(self.contract.functions.verifier_pool_ppm()))

    def pending_fees(self) -> PendingFees | None:
        """The scheduled fee change, or None when none is pending."""
        change, ready_at = self.chain.call(self.contract.functions.pending(FEES_CHANGE))
        if bytes(change) == EMPTY_CHANGE:
            return None
        return PendingFees(
            int(self.chain.call(self.contract.functions.pending_protocol_fee_ppm())),
            int(self.chain.call(self.contract.functions.pending_verifier_pool_ppm())),
            int(ready_at),
        )

    def admin(self) -> str:
        return to_checksum_address(self.chain.call(self.contract.functions.admin()))

    def pending_admin(self) -> str | None:
        """The address the admin named to succeed it, until it accepts; None if nobody."""
        pending = to_checksum_address(self.chain.call(self.contract.functions.pending_admin()))
        return None if pending == ZERO_ADDRESS else pending

    # --- reads ---

    def account(self, payer: str) -> EscrowAccount:
        balance, thawing, thaw_end = self.chain.call(
            self.contract.functions.accounts(check_address(payer, "payer"))
        )
        return EscrowAccount(int(balance), int(thawing), int(thaw_end))

    def collected(self, payer: str, gateway: str, miner: str) -> int:
        return int(
            self.chain.call(
                self.contract.functions.collected(
                    check_address(payer, "payer"),
                    check_address(gateway, "gateway"),
                    check_address(miner, "miner"),
                )
            )
        )

    def gateway_collected(self, payer: str, gateway: str) -> int:
        return int(
            self.chain.call(
                self.contract.functions.gateway_collected(
                    check_address(payer, "payer"), check_address(gateway, "gateway")
                )
            )
        )

    def is_authorized(self, payer: str, signer: str) -> bool:
        return bool(
            self.chain.call(
                self.contract.functions.is_authorized(
                    check_address(payer, "payer"), check_address(signer, "signer")
                )
            )
        )

    def revoke_at(self, payer: str, signer: str) -> int:
        """When a pending revocation of `signer` takes effect; 0 if none is pending. A
        gateway should stop signing for the payer well before then."""
        _authorized, revoke_at = self.chain.call(
            self.contract.functions.signers(
                check_address(payer, "payer"), check_address(signer, "signer")
            )
        )
        return int(revoke_at)

    def fees_owed(self, address: str) -> int:
        return int(
            self.chain.call(self.contract.functions.fees_owed(check_address(address, "address")))
        )

    def events(self, receipt: TxReceipt) -> list[EscrowEvent]:
        """The escrow events a transaction emitted, in log order."""
        return decode_events(self.contract, receipt)

    # --- payer operations ---

    def deposit(self, key: PrivateKey, amount_wei: int, payer: str | None = None) -> TxReceipt:
        """Deposit for the key's own address, or for `payer`."""
        value = _wei(amount_wei, "amount")
        if payer is None:
            return self.chain.send(key, self.contract, "deposit", value=value)
        return self.chain.send(
            key, self.contract, "deposit_for", check_address(payer, "payer"), value=value
        )

    def thaw(self, key: PrivateKey, amount_wei: int) -> TxReceipt:
        return self.chain.send(key, self.contract, "thaw", _wei(amount_wei, "amount"))

    def cancel_thaw(self, key: PrivateKey) -> TxReceipt:
        return self.chain.send(key, self.contract, "cancel_thaw")

    def withdraw(self, key: PrivateKey) -> TxReceipt:
        return self.chain.send(key, self.contract, "withdraw")

    def authorize_signer(self, key: PrivateKey, signer: str) -> TxReceipt:
        return self.chain.send(
            key, self.contract, "authorize_signer", check_address(signer, "signer")
        )

    def revoke_signer(self, key: PrivateKey, signer: str) -> TxReceipt:
        return self.chain.send(key, self.contract, "revoke_signer", check_address(signer, "signer"))

    # --- miners and the fee recipients ---

    def collect(self, key: PrivateKey, voucher: Voucher, signature: bytes | str) -> Collection:
        """Submit a signed voucher (any key may); the miner is paid what is new in it."""
        if not isinstance(voucher, Voucher):
            raise ValueError("voucher must be a protocol.messages.Voucher")
        receipt = self.chain.send(
            key, self.contract, "collect", voucher.as_tuple(), signature_bytes(signature)
        )
        for event in self.events(receipt):
            if event.name == "Collected":
                return Collection(
                    paid_wei=int(event.args["paid"]),
                    miner_wei=int(event.args["miner_amount"]),
                    protocol_fee_wei=int(event.args["protocol_fee"]),
                    verifier_fee_wei=int(event.args["verifier_fee"]),
                    tx_hash=receipt["transactionHash"].to_0x_hex(),
                    gas_used=int(receipt["gasUsed"]),
                )
        raise ChainError("collect succeeded but emitted no Collected event")

    def claim_fees(self, key: PrivateKey) -> TxReceipt:
        return self.chain.send(key, self.contract, "claim_fees")

    # --- administration ---

    def schedule_fees(
        self, admin_key: PrivateKey, protocol_fee_ppm: int, verifier_pool_ppm: int
    ) -> TxReceipt:
        """Announce new fees (admin); they can apply fee_delay() seconds later. Replaces a
        pending change and restarts its clock."""
        _check_fees(protocol_fee_ppm, verifier_pool_ppm)
        return self.chain.send(
            admin_key, self.contract, "schedule_fees", protocol_fee_ppm, verifier_pool_ppm
        )

    def apply_fees(self, key: PrivateKey) -> TxReceipt:
        """Put the scheduled fees in force (any key, once they are due)."""
        return self.chain.send(key, self.contract, "apply_fees")

    def cancel_fees(self, admin_key: PrivateKey) -> TxReceipt:
        """Withdraw the scheduled fee change (admin)."""
        return self.chain.send(admin_key, self.contract, "cancel_fees")

    def transfer_admin(self, admin_key: PrivateKey, new_admin: str) -> TxReceipt:
        """Name `new_admin` as the next admin, who must accept_admin(); the zero address
        withdraws a pending nomination."""
        return self.chain.send(
            admin_key, self.contract, "transfer_admin", check_address(new_admin, "admin")
        )

    def accept_admin(self, key: PrivateKey) -> TxReceipt:
        """Become admin; only the nominated address may."""
        return self.chain.send(key, self.contract, "accept_admin")
