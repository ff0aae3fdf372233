"""The RewardDistributor contract from Python: epoch reward roots, claims, receipt anchors.

The network builds an epoch's allocations into a `RewardTree` (pure, deterministic), proposes
its root with a bond (epochs from 1, in order: `next_epoch()`), and after the challenge window
anyone finalizes it; each account then claims its amount with the proof from the same tree. A
challenge is ruled on by the arbiter; the loser's bond goes half to the winner and half to the
treasury, and a root upheld still waits out its window. The arbiter changes only through a
timelock longer than the window; the admin is handed over in two steps. Gateways anchor the
Merkle roots of their receipts (protocol/merkle.py over receipt struct hashes) so any receipt
can be proven later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3.contract import Contract
from web3.types import TxReceipt

from infergrid.protocol.merkle import MAX_PROOF_LENGTH, MerkleTree, merkle_root, reward_leaf
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ChainError, PrivateKey, as_account, decode_events
from infergrid.settle.registry import RegistryEvent, check_address

CONTRACT_NAME = "RewardDistributor"
UINT256_MAX = 2**256 - 1
ZERO_ADDRESS = "0x" + "00" * 20
# Mirror MAX_CHALLENGE_WINDOW, MAX_ANCHOR_COUNT and BOND_TO_TREASURY_PPM in the contract, and
# MAX_DELAY in lib/timelock.vy.
MAX_CHALLENGE_WINDOW_S = 30 * 86400
MAX_ANCHOR_COUNT = 2**64 - 1
MAX_ARBITER_DELAY_S = 365 * 86400
BOND_TO_TREASURY_PPM = 500_000
# The timelock's key for arbiter changes: keccak256("arbiter") in the contract.
ARBITER_CHANGE = keccak(b"arbiter")

# The contract's status codes, by name.
EPOCH_STATUSES = ("none", "proposed", "challenged", "finalized")


# --- the reward tree (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class RewardTree:
    """One epoch's rewards as the contract checks them.

    `allocations` are ordered by address value (the 20 bytes, so the order does not depend on
    how the addresses were cased); `leaves[i]` is the leaf of `allocations[i]`.
    """

    allocations: tuple[tuple[str, int], ...]
    leaves: tuple[bytes, ...]
    root: bytes
    total: int

    def index_of(self, account: str) -> int:
        address = check_address(account, "account")
        try:
            return self._index[address]
        except KeyError:
            raise KeyError(f"{address} has no reward in this tree") from None

    def amount_of(self, account: str) -> int:
        return self.allocations[self.index_of(account)][1]

    def proof_for(self, account: str) -> list[bytes]:
        """The sibling hashes that prove `account`'s leaf under `root` (what
        protocol.merkle.merkle_proof gives, read from a tree built once per RewardTree)."""
        return self._tree.proof(self.index_of(account))

    # Cached so that proofs for every account of a large epoch cost O(n log n) in all, not
    # O(n) hashes each (merkle_proof rebuilds the whole tree per call).
    @cached_property
    def _index(self) -> dict[str, int]:
        return {holder: i for i, (holder, _) in enumerate(self.allocations)}

    @cached_property
    def _tree(self) -> MerkleTree:
        return MerkleTree(self.leaves)

    @property
    def accounts(self) -> list[str]:
        return [holder for holder, _ in self.allocations]


def reward_tree(allocations: Mapping[str, int]) -> RewardTree:
    """Build the reward tree of `allocations` (account -> wei); raises ValueError on bad input.

    Every amount must be positive (the contract refuses zero claims) and every account
    distinct once checksummed, so one account never has two leaves.
    """
    if not allocations:
        raise ValueError("no allocations: an epoch root needs at least one reward")
    entries: dict[str, int] = {}
    for account, amount in allocations.items():
        address = check_address(account, "account")
        if address == ZERO_ADDRESS:
            raise ValueError("the zero address cannot claim a reward")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise ValueError(f"reward of {address} must be an int amount of wei")
        if not 0 < amount <= UINT256_MAX:
            raise ValueError(f"reward {amount} of {address} is not a positive uint256")
        if address in entries:
            raise ValueError(f"{address} is listed twice")
        entries[address] = amount
    ordered = tuple(sorted(entries.items(), key=lambda item: bytes(HexBytes(item[0]))))
    total = sum(amount for _, amount in ordered)
    if total > UINT256_MAX:
        raise ValueError("the rewards add up to more than a uint256")
    leaves = tuple(reward_leaf(address, amount) for address, amount in ordered)
    if len(leaves) > 2**MAX_PROOF_LENGTH:
        raise ValueError("too many rewards for the contract's proof length")
    return RewardTree(allocations=ordered, leaves=leaves, root=merkle_root(leaves), total=total)


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    status: str  # "none" | "proposed" | "challenged" | "finalized"
    root: bytes
    total_wei: int
    claimed_wei: int
    proposer: str
    challenger: str
    proposed_at: int


@dataclass(frozen=True)
class AnchorRecord:
    gateway: str
    index: int
    root: bytes
    count: int
    timestamp: int
    block_number: int
    tx_hash: str | None = None


def epoch_from_view(epoch: int, value: Sequence[Any]) -> EpochRecord:
    status, root, total, claimed, proposer, challenger, proposed_at = value
    return EpochRecord(
        epoch=epoch,
        status=EPOCH_STATUSES[int(status)],
        root=bytes(root),
        total_wei=int(total),
        claimed_wei=int(claimed),
        proposer=to_checksum_address(proposer),
        challenger=to_checksum_address(challenger),
        proposed_at=int(proposed_at),
    )


# --- deployment -----------------------------------------------------------------------------


def forfeited_split(bond_wei: int) -> tuple[int, int]:
    """How a losing bond of `bond_wei` is split: (to the winner, to the treasury), as the
    contract rounds it (the treasury's share rounded down)."""
    to_treasury = _amount(bond_wei, "bond") * BOND_TO_TREASURY_PPM // 1_000_000
    return bond_wei - to_treasury, to_treasury


def deploy_rewards(
    chain: Chain,
    deployer_key: PrivateKey,
    *,
    arbiter: str,
    treasury: str,
    proposer_bond_wei: int,
    challenge_window_s: int,
    arbiter_delay_s: int,
) -> str:
    """Deploy a RewardDistributor; the deployer becomes its admin. Returns the address.

    `treasury` receives half of every losing bond. `challenge_window_s` must be positive, and
    `arbiter_delay_s` (how long a newly scheduled arbiter waits) longer than the window.
    """
    arbiter = _nonzero_address(arbiter, "arbiter")
    treasury = _nonzero_address(treasury, "treasury")
    if _amount(proposer_bond_wei, "proposer bond") == 0:
        raise ValueError("proposer bond must be positive")
    if not _is_int(challenge_window_s) or challenge_window_s <= 0:
        raise ValueError("challenge window must be a positive int of seconds")
    if challenge_window_s > MAX_CHALLENGE_WINDOW_S:
        raise ValueError(f"challenge window is over {MAX_CHALLENGE_WINDOW_S} s")
    if not _is_int(arbiter_delay_s):
        raise ValueError("arbiter delay must be an int of seconds")
    if arbiter_delay_s <= challenge_window_s:
        raise ValueError(
            f"arbiter delay {arbiter_delay_s} s must outlast the challenge window"
            f" {challenge_window_s} s"
        )
    if arbiter_delay_s > MAX_ARBITER_DELAY_S:
        raise ValueError(f"arbiter delay is over {MAX_ARBITER_DELAY_S} s")
    artifact = load_artifact(CONTRACT_NAME)
    return chain.deploy(
        deployer_key,
        artifact.abi,
        artifact.bytecode,
        arbiter,
        treasury,
        proposer_bond_wei,
        challenge_window_s,
        arbiter_delay_s,
    )


# --- the client -----------------------------------------------------------------------------


class RewardDistributor:
    """A deployed RewardDistributor. Writes return the receipt; reverts raise
    `ContractRevert` with the contract's reason."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = check_address(address, "reward distributor address")
        self.contract: Contract = chain.contract(self.address, load_artifact(CONTRACT_NAME).abi)
        self._bond: int | None = None
        self._window: int | None = None
        self._treasury: str | None = None
        self._arbiter_delay: int | None = None

    # --- parameters (immutable in the contract, so read once) ---

    def proposer_bond(self) -> int:
        if self._bond is None:
            self._bond = int(self.chain.call(self.contract.functions.proposer_bond()))
        return self._bond

    def challenge_window(self) -> int:
        if self._window is None:
            self._window = int(self.chain.call(self.contract.functions.challenge_window()))
        return self._window

    def treasury(self) -> str:
        if self._treasury is None:
            self._treasury = to_checksum_address(
                self.chain.call(self.contract.functions.treasury())
            )
        return self._treasury

    def arbiter_delay(self) -> int:
        """Seconds between schedule_arbiter() and the earliest apply_arbiter()."""
        if self._arbiter_delay is None:
            self._arbiter_delay = int(self.chain.call(self.contract.functions.delay()))
        return self._arbiter_delay

    def admin(self) -> str:
        return to_checksum_address(self.chain.call(self.contract.functions.admin()))

    def pending_admin(self) -> str:
        """The address named by transfer_admin() that has not accepted yet; zero if none."""
        return to_checksum_address(self.chain.call(self.contract.functions.pending_admin()))

    def arbiter(self) -> str:
        return to_checksum_address(self.chain.call(self.contract.functions.arbiter()))

    def pending_arbiter(self) -> str:
        """The arbiter announced by schedule_arbiter() and not applied; zero if none."""
        return to_checksum_address(self.chain.call(self.contract.functions.pending_arbiter()))

    def arbiter_ready_at(self) -> int:
        """From when apply_arbiter() succeeds (block timestamp); 0 if nothing is pending."""
        _, ready_at = self.chain.call(self.contract.functions.pending(ARBITER_CHANGE))
        return int(ready_at)

    # --- reads ---

    def next_epoch(self) -> int:
        """The lowest epoch never proposed: the one the next new proposal must name."""
        return int(self.chain.call(self.contract.functions.next_epoch()))

    def epoch(self, epoch: int) -> EpochRecord:
        value = self.chain.call(self.contract.functions.epoch_info(_amount(epoch, "epoch")))
        return epoch_from_view(epoch, value)

    def is_claimed(self, epoch: int, account: str) -> bool:
        return bool(
            self.chain.call(
                self.contract.functions.is_claimed(
                    _amount(epoch, "epoch"), check_address(account, "account")
                )
            )
        )

    def unallocated_wei(self) -> int:
        return int(self.chain.call(self.contract.functions.unallocated()))

    def total_funded_wei(self) -> int:
        return int(self.chain.call(self.contract.functions.total_funded()))

    def allocated_wei(self) -> int:
        return int(self.chain.call(self.contract.functions.allocated()))

    def total_claimed_wei(self) -> int:
        return int(self.chain.call(self.contract.functions.total_claimed()))

    def bonds_held_wei(self) -> int:
        return int(self.chain.call(self.contract.functions.bonds_held()))

    def credits(self, address: str) -> int:
        return int(
            self.chain.call(self.contract.functions.credits(check_address(address, "address")))
        )

    def verify(self, root: bytes, account: str, amount_wei: int, proof: Sequence[bytes]) -> bool:
        """Whether the contract accepts `proof` for (account, amount) under `root`: a free
        check before paying gas for a claim."""
        return bool(
            self.chain.call(
                self.contract.functions.verify(
                    _bytes32(root, "root"),
                    check_address(account, "account"),
                    _amount(amount_wei, "amount"),
                    _proof(proof),
                )
            )
        )

    def anchor_count(self, gateway: str) -> int:
        address = check_address(gateway, "gateway")
        return int(self.chain.call(self.contract.functions.anchor_count(address)))

    def get_anchor(self, gateway: str, index: int) -> AnchorRecord:
        address = check_address(gateway, "gateway")
        root, count, timestamp, block_number = self.chain.call(
            self.contract.functions.get_anchor(address, _amount(index, "index"))
        )
        return AnchorRecord(
            gateway=address,
            index=index,
            root=bytes(root),
            count=int(count),
            timestamp=int(timestamp),
            block_number=int(block_number),
        )

    def events(self, receipt: TxReceipt) -> list[RegistryEvent]:
        """The distributor's events a transaction emitted, in log order."""
        return decode_events(self.contract, receipt)

    # --- rewards ---

    def fund(self, key: PrivateKey, amount_wei: int) -> TxReceipt:
        return self.chain.send(key, self.contract, "fund", value=_amount(amount_wei, "amount"))

    def propose(self, key: PrivateKey, epoch: int, root: bytes, total_wei: int) -> TxReceipt:
        """Propose `root` for `epoch`, posting the proposer bond. `epoch` is next_epoch(), or
        an earlier epoch whose proposal was ruled invalid."""
        return self.chain.send(
            key,
            self.contract,
            "propose",
            _epoch(epoch),
            _bytes32(root, "root"),
            _amount(total_wei, "total"),
            value=self.proposer_bond(),
        )

    def propose_tree(self, key: PrivateKey, epoch: int, tree: RewardTree) -> TxReceipt:
        return self.propose(key, epoch, tree.root, tree.total)

    def challenge(self, key: PrivateKey, epoch: int) -> TxReceipt:
        """Dispute `epoch`'s proposed root, posting a bond equal to the proposer's; the loser
        of the arbiter's ruling forfeits it (half to the winner, half to the treasury)."""
        return self.chain.send(
            key, self.contract, "challenge", _epoch(epoch), value=self.proposer_bond()
        )

    def resolve_challenge(self, key: PrivateKey, epoch: int, root_valid: bool) -> TxReceipt:
        """The arbiter's ruling. A root ruled valid is proposed again and still waits out its
        window; one ruled invalid is erased."""
        if not isinstance(root_valid, bool):
            raise ValueError("root_valid must be a bool")
        return self.chain.send(key, self.contract, "resolve_challenge", _epoch(epoch), root_valid)

    def finalize(self, key: PrivateKey, epoch: int) -> TxReceipt:
        return self.chain.send(key, self.contract, "finalize", _epoch(epoch))

    def claim(
        self,
        key: PrivateKey,
        epoch: int,
        account: str,
        amount_wei: int,
        proof: Sequence[bytes],
    ) -> TxReceipt:
        """Claim `account`'s reward; `key` pays the gas, `account` gets the reward."""
        return self.chain.send(
            key,
            self.contract,
            "claim",
            _epoch(epoch),
            check_address(account, "account"),
            _amount(amount_wei, "amount"),
            _proof(proof),
        )

    def claim_from_tree(
        self, key: PrivateKey, epoch: int, tree: RewardTree, account: str | None = None
    ) -> TxReceipt:
        """Claim the reward of `account` (default: the key's own address) out of `tree`."""
        holder = check_address(account, "account") if account else as_account(key).address
        return self.claim(key, epoch, holder, tree.amount_of(holder), tree.proof_for(holder))

    def withdraw_credit(self, key: PrivateKey) -> TxReceipt:
        """Collect the bonds credited to the key's address."""
        return self.chain.send(key, self.contract, "withdraw_credit")

    # --- receipt anchors ---

    def anchor(self, key: PrivateKey, root: bytes, count: int) -> AnchorRecord:
        """Anchor the root of `count` receipts under the key's address; returns the record."""
        if _amount(count, "count") > MAX_ANCHOR_COUNT:
            raise ValueError(f"count {count} is over {MAX_ANCHOR_COUNT}")
        receipt = self.chain.send(key, self.contract, "anchor", _bytes32(root, "root"), count)
        for event in self.events(receipt):
            if event.name == "ReceiptsAnchored":
                record = self.get_anchor(event.args["gateway"], int(event.args["index"]))
                return AnchorRecord(
                    gateway=record.gateway,
                    index=record.index,
                    root=record.root,
                    count=record.count,
                    timestamp=record.timestamp,
                    block_number=record.block_number,
                    tx_hash=receipt["transactionHash"].to_0x_hex(),
                )
        raise ChainError("anchor transaction emitted no ReceiptsAnchored event")

    # --- administration ---

    def schedule_arbiter(self, admin_key: PrivateKey, arbiter: str) -> TxReceipt:
        """Announce `arbiter` as the next arbiter; anyone applies it after arbiter_delay()."""
        return self.chain.send(
            admin_key, self.contract, "schedule_arbiter", _nonzero_address(arbiter, "arbiter")
        )

    def apply_arbiter(self, key: PrivateKey) -> TxReceipt:
        """Make the announced arbiter the arbiter, once arbiter_ready_at() has come."""
        return self.chain.send(key, self.contract, "apply_arbiter")

    def cancel_arbiter(self, admin_key: PrivateKey) -> TxReceipt:
        return self.chain.send(admin_key, self.contract, "cancel_arbiter")

    def transfer_admin(self, admin_key: PrivateKey, new_admin: str) -> TxReceipt:
        """Name `new_admin` as the next admin; it takes over with accept_admin(). The zero
        address withdraws a pending nomination."""
        return self.chain.send(
            admin_key, self.contract, "transfer_admin", check_address(new_admin, "admin")
        )

    def accept_admin(self, key: PrivateKey) -> TxReceipt:
        """Become admin; only the pending admin may."""
        return self.chain.send(key, self.contract, "accept_admin")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonzero_address(address: str, what: str) -> str:
    checked = check_address(address, what)
    if checked == ZERO_ADDRESS:
        raise ValueError(f"{what} must not be the zero address")
    return checked


def _epoch(epoch: int) -> int:
    """An epoch a write names: epochs are numbered from 1."""
    if _amount(epoch, "epoch") == 0:
        raise ValueError("epochs are numbered from 1")
    return epoch


def _amount(value: int, what: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{what} must be an int")
    if not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{what} {value} is out of range")
    return value


def _bytes32(value: bytes | str, what: str) -> bytes:
    try:
        raw = bytes(HexBytes(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not bytes or hex") from exc
    if len(raw) != 32:
        raise ValueError(f"{what} is not 32 bytes")
    return raw


def _proof(proof: Sequence[bytes]) -> list[bytes]:
    if len(proof) > MAX_PROOF_LENGTH:
        raise ValueError(f"proof is longer than {MAX_PROOF_LENGTH} hashes")
    return [_bytes32(node, "proof node") for node in proof]
