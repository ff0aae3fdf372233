"""The DisputeManager contract from Python: deployment, equivocation reports, disputes.

The dispute manager is the NodeRegistry's slasher. After `deploy_disputes`, the registry's
admin must call `Registry.set_slasher(admin_key, dispute_manager_address)`: deployment does
not do it, because the deployer of this contract need not be the registry's admin, and
handing over the slasher role is a governance act that should be visible on its own.

Slashed stake is credited in the registry (`Registry.claim`); challengers' deposits are
credited here (`DisputeManager.claim`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from eth_utils import to_checksum_address
from web3.contract import Contract
from web3.types import TxReceipt

from infergrid.protocol.eip712 import Domain, InvalidSignature, to_bytes32
from infergrid.protocol.messages import Attestation, recover_signer
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ChainError, PrivateKey, decode_events
from infergrid.settle.registry import UINT256_MAX, RegistryEvent, check_address

CONTRACT_NAME = "DisputeManager"
PPM = 1_000_000
ZERO_ADDRESS = "0x" + "00" * 20
SIGNATURE_BYTES = 65

DisputeStatus: TypeAlias = Literal["open", "upheld", "rejected", "no_quorum"]
# The contract's status codes (0 is never stored).
STATUS_NAMES: dict[int, DisputeStatus] = {
    1: "open",
    2: "upheld",
    3: "rejected",
    4: "no_quorum",
}

SignedAttestation: TypeAlias = tuple[Attestation, bytes]
# Two conflicting signed attestations: (a, sig_a, b, sig_b), ready for slash_equivocation.
Equivocation: TypeAlias = tuple[Attestation, bytes, Attestation, bytes]


@dataclass(frozen=True)
class DisputeRecord:
    id: int
    challenger: str
    miner: str
    payer: str  # the zero address when the dispute refunds nobody
    refund_wei: int
    evidence_hash: bytes
    deposit_wei: int
    deadline: int  # unix seconds; votes strictly before, resolve at or after
    votes_for_wei: int
    votes_against_wei: int
    status: DisputeStatus


def record_from_tuple(dispute_id: int, value: Any) -> DisputeRecord:
    """A DisputeRecord from the contract's Dispute struct."""
    (
        challenger,
        miner,
        payer,
        refund,
        evidence_hash,
        deposit,
        deadline,
        votes_for,
        votes_against,
        status,
    ) = value
    return DisputeRecord(
        id=dispute_id,
        challenger=to_checksum_address(challenger),
        miner=to_checksum_address(miner),
        payer=to_checksum_address(payer),
        refund_wei=int(refund),
        evidence_hash=bytes(evidence_hash),
        deposit_wei=int(deposit),
        deadline=int(deadline),
        votes_for_wei=int(votes_for),
        votes_against_wei=int(votes_against),
        status=STATUS_NAMES[int(status)],
    )


# --- finding equivocation off-chain ---------------------------------------------------------


def find_equivocation(
    attestations: Iterable[SignedAttestation],
    *,
    domain: Domain | None = None,
    signer_of: Callable[[str], str | None] | None = None,
) -> Equivocation | None:
    """The first pair of signed attestations with one (miner, request hash) and different
    response hashes, in input order; None if there is none.

    Without `domain` the signatures are taken as they come (the caller checked them). With
    it, attestations whose signature does not recover are skipped, and a pair must recover
    to the same key, so a forged second attestation cannot pair with a real one. With
    `signer_of` too (e.g. `Registry.signer_of`), that key must be the miner's registered
    signer: exactly what `slash_equivocation` accepts.
    """
    # key -> the first attestation seen for it; a later one with another response conflicts.
    first: dict[tuple[str, bytes, str | None], SignedAttestation] = {}
    signers: dict[str, str | None] = {}
    for attestation, signature in attestations:
        signer: str | None = None
        if domain is not None:
            try:
                signer = recover_signer(domain, attestation, signature)
            except InvalidSignature:
                continue
            if signer_of is not None:
                if attestation.miner not in signers:
                    signers[attestation.miner] = signer_of(attestation.miner)
                if signers[attestation.miner] != signer:
                    continue
        key = (attestation.miner, attestation.request_hash, signer)
        seen = first.get(key)
        if seen is None:
            first[key] = (attestation, bytes(signature))
        elif seen[0].response_hash != attestation.response_hash:
            return (seen[0], seen[1], attestation, bytes(signature))
    return None


# --- deployment -----------------------------------------------------------------------------


def _ppm(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= PPM:
        raise ValueError(f"{what} must be an int in [0, {PPM}], got {value!r}")
    return value


def _positive(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= UINT256_MAX:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _amount(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{what} must be an int amount of wei, got {value!r}")
    return value


def _dispute_id(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= UINT256_MAX:
        raise ValueError(f"dispute id must be a positive int, got {value!r}")
    return value


def deploy_disputes(
    chain: Chain,
    deployer_key: PrivateKey,
    *,
    registry: str,
    escrow: str,
    treasury: str,
    dispute_deposit_wei: int,
    voting_period_s: int,
    max_slash_ppm: int,
    challenger_share_ppm: int,
    equivocation_slash_ppm: int,
    min_quorum_stake_wei: int,
) -> str:
    """Deploy a DisputeManager; returns its address. The registry's admin must then make it
    the registry's slasher (`Registry.set_slasher`); this function does not.

    `escrow` is the PaymentEscrow whose address is the EIP-712 verifyingContract of every
    signed message. The contract refuses a voting period not shorter than the registry's
    unbonding delay.
    """
    args = (
        check_address(registry, "registry"),
        check_address(escrow, "escrow"),
        check_address(treasury, "treasury"),
        _positive(dispute_deposit_wei, "dispute deposit"),
        _positive(voting_period_s, "voting period"),
        _ppm(max_slash_ppm, "max slash ppm"),
        _ppm(challenger_share_ppm, "challenger share ppm"),
        _ppm(equivocation_slash_ppm, "equivocation slash ppm"),
        _positive(min_quorum_stake_wei, "min quorum stake"),
    )
    zero = to_checksum_address(ZERO_ADDRESS)
    for label, address in zip(("registry", "escrow", "treasury"), args[:3], strict=True):
        if address == zero:
            raise ValueError(f"{label} is the zero address")
    artifact = load_artifact(CONTRACT_NAME)
    return chain.deploy(deployer_key, artifact.abi, artifact.bytecode, *args)


# --- the client -----------------------------------------------------------------------------


class DisputeManager:
    """A deployed DisputeManager. Writes take the sender's key; reverts raise
    `ContractRevert` with the contract's reason."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = check_address(address, "dispute manager address")
        self.contract: Contract = chain.contract(self.address, load_artifact(CONTRACT_NAME).abi)
        self._params: dict[str, Any] = {}

    # --- parameters (immutable in the contract, so read once) ---

    def _param(self, name: str) -> Any:
        if name not in self._params:
            self._params[name] = self.chain.call(getattr(self.contract.functions, name)())
        return self._params[name]

    def registry(self) -> str:
        return to_checksum_address(self._param("registry"))

    def escrow(self) -> str:
        return to_checksum_address(self._param("escrow"))

    def treasury(self) -> str:
        return to_checksum_address(self._param("treasury"))

    def dispute_deposit(self) -> int:
        return int(self._param("dispute_deposit"))

    def voting_period(self) -> int:
        return int(self._param("voting_period"))

    def max_slash_ppm(self) -> int:
        return int(self._param("max_slash_ppm"))

    def challenger_share_ppm(self) -> int:
        return int(self._param("challenger_share_ppm"))

    def equivocation_slash_ppm(self) -> int:
        return int(self._param("equivocation_slash_ppm"))

    def min_quorum_stake(self) -> int:
        return int(self._param("min_quorum_stake"))

    def domain(self) -> Domain:
        """The signing domain the contract checks attestations in (the escrow's)."""
        return Domain(self.chain.chain_id, self.escrow())

    def domain_separator(self) -> bytes:
        return bytes(self.chain.call(self.contract.functions.domain_separator()))

    def attestation_digest(self, attestation: Attestation) -> bytes:
        fn = self.contract.functions.attestation_digest(attestation.as_tuple())
        return bytes(self.chain.call(fn))

    # --- reads ---

    def dispute(self, dispute_id: int) -> DisputeRecord:
        value = self.chain.call(self.contract.functions.dispute(_dispute_id(dispute_id)))
        return record_from_tuple(dispute_id, value)

    def dispute_count(self) -> int:
        return int(self.chain.call(self.contract.functions.dispute_count()))

    def has_voted(self, dispute_id: int, voter: str) -> bool:
        fn = self.contract.functions.has_voted(
            _dispute_id(dispute_id), check_address(voter, "voter")
        )
        return bool(self.chain.call(fn))

    def equivocation_slashed(self, miner: str, request_hash: bytes | str) -> bool:
        fn = self.contract.functions.equivocation_slashed(
            check_address(miner, "miner"), to_bytes32(request_hash, "request hash")
        )
        return bool(self.chain.call(fn))

    def credits(self, recipient: str) -> int:
        """Deposits owed to `recipient`, paid by `claim`."""
        fn = self.contract.functions.credits(check_address(recipient, "recipient"))
        return int(self.chain.call(fn))

    def events(self, receipt: TxReceipt) -> list[RegistryEvent]:
        """This contract's events in a transaction, in log order (registry events skipped)."""
        return decode_events(self.contract, receipt)

    def _event(self, receipt: TxReceipt, name: str) -> RegistryEvent:
        for event in self.events(receipt):
            if event.name == name:
                return event
        raise ChainError(f"transaction {receipt['transactionHash'].hex()} emitted no {name}")

    # --- writes ---

    def slash_equivocation(
        self,
        key: PrivateKey,
        a: Attestation,
        sig_a: bytes,
        b: Attestation,
        sig_b: bytes,
    ) -> int:
        """Report two conflicting attestations; returns the wei taken from the miner (the
        caller is credited its share in the registry)."""
        for label, sig in (("sig_a", sig_a), ("sig_b", sig_b)):
            if len(sig) != SIGNATURE_BYTES:
                raise ValueError(f"{label} must be {SIGNATURE_BYTES} bytes, got {len(sig)}")
        receipt = self.chain.send(
            key,
            self.contract,
            "slash_equivocation",
            a.as_tuple(),
            bytes(sig_a),
            b.as_tuple(),
            bytes(sig_b),
        )
        return int(self._event(receipt, "EquivocationSlashed").args["amount"])

    def open_dispute(
        self,
        key: PrivateKey,
        miner: str,
        evidence_hash: bytes | str,
        payer: str | None,
        refund_wei: int,
        deposit_wei: int | None = None,
    ) -> int:
        """Open a dispute against `miner`, depositing `deposit_wei` (the contract's minimum
        unless given); returns its id. The miner is frozen until it is resolved. `payer` may
        be None (the zero address) when `refund_wei` is 0."""
        deposit = self.dispute_deposit() if deposit_wei is None else deposit_wei
        payer = ZERO_ADDRESS if payer is None else payer
        receipt = self.chain.send(
            key,
            self.contract,
            "open_dispute",
            check_address(miner, "miner"),
            to_bytes32(evidence_hash, "evidence hash"),
            check_address(payer, "payer"),
            _amount(refund_wei, "refund"),
            value=_amount(deposit, "deposit"),
        )
        return int(self._event(receipt, "DisputeOpened").args["dispute_id"])

    def vote(self, key: PrivateKey, dispute_id: int, uphold: bool) -> TxReceipt:
        return self.chain.send(key, self.contract, "vote", _dispute_id(dispute_id), bool(uphold))

    def resolve(self, key: PrivateKey, dispute_id: int) -> DisputeRecord:
        """Close a dispute after its deadline; returns it with its final status."""
        self.chain.send(key, self.contract, "resolve", _dispute_id(dispute_id))
        return self.dispute(dispute_id)

    def claim(self, key: PrivateKey) -> TxReceipt:
        """Collect the deposits credited to the key's address."""
        return self.chain.send(key, self.contract, "claim")
