"""The DisputeManager contract from Python: deployment, equivocation reports, disputes.

The dispute manager is the NodeRegistry's slasher. After `deploy_disputes`, the registry's
admin must call `Registry.set_slasher(admin_key, dispute_manager_address)`: deployment does
not do it, because the deployer of this contract need not be the registry's admin, and
handing over the slasher role is a governance act that should be visible on its own.

A dispute is about one attested, paid response: the challenger posts the miner's signed
attestation and the gateway's signed receipt for it (`open_dispute`). If it is upheld the
receipt's payer is refunded at most the receipt's value and what the escrow collected from it
for that (gateway, miner) and was not refunded before. Verifiers vote with the bonded stake
they had `min_verifier_age` before the dispute opened (and must have registered by then);
each voter stays frozen until `settle_vote`, which slashes one that voted against the verdict.

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

from infergrid.protocol.eip712 import Domain, InvalidSignature, signature_bytes, to_bytes32
from infergrid.protocol.messages import Attestation, Receipt, recover_signer
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ChainError, PrivateKey, decode_events
from infergrid.settle.registry import UINT256_MAX, RegistryEvent, check_address

CONTRACT_NAME = "DisputeManager"
PPM = 1_000_000
ZERO_ADDRESS = "0x" + "00" * 20

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
# The contract's Receipt struct, in field order.


@dataclass(frozen=True)
class DisputeRecord:
    id: int
    challenger: str
    miner: str
    payer: str  # the receipt's payer, refunded first if the dispute is upheld
    gateway: str  # the receipt's gateway signer
    request_hash: bytes  # the disputed request; once judged, never disputed again
    refund_wei: int  # the receipt's value: the most the payer is refunded
    evidence_hash: bytes
    deposit_wei: int
    opened_at: int  # unix seconds; votes weigh bonded stake min_verifier_age before
    deadline: int  # opened_at + voting period; votes strictly before, resolve at or after
    votes_for_wei: int
    votes_against_wei: int
    status: DisputeStatus


@dataclass(frozen=True)
class VoteRecord:
    weight_wei: int  # min(stake min_verifier_age before the opening, stake at the vote)
    uphold: bool
    settled: bool  # settle_vote unfroze the voter (and slashed it if it lost)


def record_from_tuple(dispute_id: int, value: Any) -> DisputeRecord:
    """A DisputeRecord from the contract's Dispute struct."""
    (
        challenger,
        miner,
        payer,
        gateway,
        request_hash,
        refund,
        evidence_hash,
        deposit,
        opened_at,
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
        gateway=to_checksum_address(gateway),
        request_hash=bytes(request_hash),
        refund_wei=int(refund),
        evidence_hash=bytes(evidence_hash),
        deposit_wei=int(deposit),
        opened_at=int(opened_at),
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
    was_signer: Callable[[str, str], bool] | None = None,
) -> Equivocation | None:
    """The first pair of signed attestations with one (miner, request hash) and different
    response hashes, in input order; None if there is none.

    Without `domain` the signatures are taken as they come (the caller checked them). With
    it, attestations whose signature does not recover are skipped, and a pair must recover
    to the same key, so a forged second attestation cannot pair with a real one. With
    `was_signer(miner, key)` too (e.g. `Registry.was_signer`), an attestation counts only if
    its key is one the registry says the miner holds or held within the unbonding delay, and
    two such keys of one miner pair with each other: exactly what `slash_equivocation`
    accepts.
    """
    # key -> the first attestation seen for it; a later one with another response conflicts.
    first: dict[tuple[str, bytes, str | None], SignedAttestation] = {}
    held: dict[tuple[str, str], bool] = {}
    for attestation, signature in attestations:
        signer: str | None = None
        if domain is not None:
            try:
                signer = recover_signer(domain, attestation, signature)
            except InvalidSignature:
                continue
            if was_signer is not None:
                pair = (attestation.miner, signer)
                if pair not in held:
                    held[pair] = was_signer(*pair)
                if not held[pair]:
                    continue
                # Any key of the miner speaks for it: pair across keys.
                signer = None
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
    min_verifier_age_s: int,
    wrong_vote_slash_ppm: int,
    no_quorum_forfeit_ppm: int,
    max_open_per_miner: int,
    max_open_per_challenger: int,
) -> str:
    """Deploy a DisputeManager; returns its address. The registry's admin must then make it
    the registry's slasher (`Registry.set_slasher`); this function does not.

    `escrow` is the PaymentEscrow whose address is the EIP-712 verifyingContract of every
    signed message and whose `collected` bounds refunds. A verifier votes only on disputes
    opened at least `min_verifier_age_s` after it registered; one on the losing side of a
    verdict loses `wrong_vote_slash_ppm` of its vote weight; a dispute without quorum
    forfeits `no_quorum_forfeit_ppm` of its deposit to the treasury; at most
    `max_open_per_miner` disputes are open on one miner and `max_open_per_challenger` by one
    challenger. The contract refuses a voting period not shorter than the registry's
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
        _positive(min_verifier_age_s, "min verifier age"),
        _ppm(wrong_vote_slash_ppm, "wrong vote slash ppm"),
        _ppm(no_quorum_forfeit_ppm, "no quorum forfeit ppm"),
        _positive(max_open_per_miner, "max open disputes per miner"),
        _positive(max_open_per_challenger, "max open disputes per challenger"),
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

    def min_verifier_age(self) -> int:
        return int(self._param("min_verifier_age"))

    def wrong_vote_slash_ppm(self) -> int:
        return int(self._param("wrong_vote_slash_ppm"))

    def no_quorum_forfeit_ppm(self) -> int:
        return int(self._param("no_quorum_forfeit_ppm"))

    def max_open_per_miner(self) -> int:
        return int(self._param("max_open_per_miner"))

    def max_open_per_challenger(self) -> int:
        return int(self._param("max_open_per_challenger"))

    def domain(self) -> Domain:
        """The signing domain the contract checks attestations in (the escrow's)."""
        return Domain(self.chain.chain_id, self.escrow())

    def domain_separator(self) -> bytes:
        """The separator the contract checks signatures with now (it follows the chain id)."""
        return bytes(self.chain.call(self.contract.functions.domain_separator()))

    def attestation_digest(self, attestation: Attestation) -> bytes:
        fn = self.contract.functions.attestation_digest(attestation.as_tuple())
        return bytes(self.chain.call(fn))

    def receipt_digest(self, receipt: Receipt) -> bytes:
        fn = self.contract.functions.receipt_digest(receipt.as_tuple())
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

    def vote_of(self, dispute_id: int, voter: str) -> VoteRecord | None:
        """`voter`'s vote on the dispute; None if it did not vote."""
        fn = self.contract.functions.votes(_dispute_id(dispute_id), check_address(voter, "voter"))
        weight, uphold, settled = self.chain.call(fn)
        if int(weight) == 0:
            return None
        return VoteRecord(weight_wei=int(weight), uphold=bool(uphold), settled=bool(settled))

    def open_on_miner(self, miner: str) -> int:
        """Open disputes about `miner` (at most `max_open_per_miner`)."""
        fn = self.contract.functions.open_on_miner(check_address(miner, "miner"))
        return int(self.chain.call(fn))

    def open_by_challenger(self, challenger: str) -> int:
        """Open disputes `challenger` opened (at most `max_open_per_challenger`)."""
        fn = self.contract.functions.open_by_challenger(check_address(challenger, "challenger"))
        return int(self.chain.call(fn))

    def refunded(self, payer: str, gateway: str, miner: str) -> int:
        """What upheld disputes refunded `payer` of its payments to `miner` through `gateway`;
        later refunds are bounded by the escrow's `collected` minus this."""
        fn = self.contract.functions.refunded(
            check_address(payer, "payer"),
            check_address(gateway, "gateway"),
            check_address(miner, "miner"),
        )
        return int(self.chain.call(fn))

    def evidence_disputed(self, evidence_hash: bytes | str) -> bool:
        fn = self.contract.functions.evidence_disputed(to_bytes32(evidence_hash, "evidence hash"))
        return bool(self.chain.call(fn))

    def request_disputed(self, miner: str, request_hash: bytes | str) -> bool:
        fn = self.contract.functions.request_disputed(
            check_address(miner, "miner"), to_bytes32(request_hash, "request hash")
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
        receipt = self.chain.send(
            key,
            self.contract,
            "slash_equivocation",
            a.as_tuple(),
            signature_bytes(sig_a, "sig_a"),
            b.as_tuple(),
            signature_bytes(sig_b, "sig_b"),
        )
        return int(self._event(receipt, "EquivocationSlashed").args["amount"])

    def open_dispute(
        self,
        key: PrivateKey,
        attestation: Attestation,
        attestation_signature: bytes,
        receipt: Receipt,
        receipt_signature: bytes,
        evidence_hash: bytes | str,
        deposit_wei: int | None = None,
    ) -> int:
        """Dispute the response `attestation` attests, paid by `receipt`, depositing
        `deposit_wei` (the contract's minimum unless given); returns the dispute id. The
        attestation must be signed by a key of its miner, the receipt by its gateway and be
        the receipt of that attestation; its payer is the one refunded. The miner is frozen
        until the dispute is resolved."""
        deposit = self.dispute_deposit() if deposit_wei is None else deposit_wei
        if not isinstance(attestation, Attestation):
            raise ValueError("attestation must be a messages.Attestation")
        if not isinstance(receipt, Receipt):
            raise ValueError("receipt must be a messages.Receipt")
        attestation_signature = signature_bytes(attestation_signature, "attestation signature")
        receipt_signature = signature_bytes(receipt_signature, "receipt signature")
        tx = self.chain.send(
            key,
            self.contract,
            "open_dispute",
            attestation.as_tuple(),
            bytes(attestation_signature),
            receipt.as_tuple(),
            bytes(receipt_signature),
            to_bytes32(evidence_hash, "evidence hash"),
            value=_amount(deposit, "deposit"),
        )
        return int(self._event(tx, "DisputeOpened").args["dispute_id"])

    def vote(self, key: PrivateKey, dispute_id: int, uphold: bool) -> TxReceipt:
        return self.chain.send(key, self.contract, "vote", _dispute_id(dispute_id), bool(uphold))

    def resolve(self, key: PrivateKey, dispute_id: int) -> DisputeRecord:
        """Close a dispute after its deadline; returns it with its final status."""
        self.chain.send(key, self.contract, "resolve", _dispute_id(dispute_id))
        return self.dispute(dispute_id)

    def settle_vote(self, key: PrivateKey, dispute_id: int, voter: str) -> int:
        """Settle `voter`'s vote on a resolved dispute (anyone may): the voter is unfrozen;
        returns what was slashed from it to the treasury (0 unless it voted against the
        verdict)."""
        receipt = self.chain.send(
            key,
            self.contract,
            "settle_vote",
            _dispute_id(dispute_id),
            check_address(voter, "voter"),
        )
        return int(self._event(receipt, "VoteSettled").args["slashed"])

    def claim(self, key: PrivateKey) -> TxReceipt:
        """Collect the deposits credited to the key's address."""
        return self.chain.send(key, self.contract, "claim")
