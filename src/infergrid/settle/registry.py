"""The NodeRegistry contract from Python: deployment, node operations, discovery, and the
history that disputes judge by.

Gateways call `Registry.nodes()` every few seconds to find miners; it costs one RPC for the
block number plus one per page of 32 nodes, all read at that one block so that a node moving in
the list between pages is neither skipped nor seen twice.

What a node did stays answerable after it changes: a signing key it replaced is still
`was_signer` for one unbonding delay; its role cannot change while the old role's funds are
unbonding; `stake_at` gives its bonded stake at any past time and `registered_at` when it
registered. The admin hands over in two steps (`transfer_admin`, then `accept_admin` by the
successor) and names the slasher once, for the registry's life (`set_slasher`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3.contract import Contract
from web3.types import TxReceipt

from infergrid.protocol.addresses import checked_address
from infergrid.protocol.nodes import ModelOffer, NodeRecord, Role
from infergrid.protocol.pricing import PPM
from infergrid.protocol.scoring import EarlyMinerSchedule
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractEvent, PrivateKey, as_account, decode_events

CONTRACT_NAME = "NodeRegistry"
MAX_MODELS = 16
MAX_ENDPOINT_BYTES = 256
MAX_MODEL_NAME_BYTES = 64
UINT256_MAX = 2**256 - 1

# The tuple the contract's ModelOffer struct encodes to: (name, model_id, price_in, price_out).
OfferTuple: TypeAlias = tuple[str, bytes, int, int]


RegistryEvent = ContractEvent  # the name the settle clients have always used


# --- pure conversions between protocol types and contract values --------------------------


def offer_to_tuple(offer: ModelOffer) -> OfferTuple:
    """Validate `offer` and encode it for the contract; raises ValueError on bad input."""
    name_bytes = offer.name.encode()
    if not name_bytes:
        raise ValueError("model name is empty")
    if len(name_bytes) > MAX_MODEL_NAME_BYTES:
        raise ValueError(f"model name {offer.name!r} is over {MAX_MODEL_NAME_BYTES} bytes")
    try:
        model_id = bytes(HexBytes(offer.model_id))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model id {offer.model_id!r} is not hex") from exc
    if len(model_id) != 32:
        raise ValueError(f"model id {offer.model_id!r} is not 32 bytes")
    for label, price in (("input", offer.price_in_wei), ("output", offer.price_out_wei)):
        if not isinstance(price, int) or isinstance(price, bool):
            raise ValueError(f"{label} price must be an int (wei per token)")
        if not 0 <= price <= UINT256_MAX:
            raise ValueError(f"{label} price {price} is out of range")
    return (offer.name, model_id, offer.price_in_wei, offer.price_out_wei)


def offer_from_tuple(value: Sequence[Any]) -> ModelOffer:
    name, model_id, price_in, price_out = value
    return ModelOffer(
        name=name,
        model_id="0x" + bytes(model_id).hex(),
        price_in_wei=int(price_in),
        price_out_wei=int(price_out),
    )


def check_endpoint(endpoint: str) -> str:
    size = len(endpoint.encode())
    if size == 0:
        raise ValueError("endpoint is empty")
    if size > MAX_ENDPOINT_BYTES:
        raise ValueError(f"endpoint is over {MAX_ENDPOINT_BYTES} bytes")
    return endpoint


check_address = checked_address  # the protocol's address rule, under its settle/ name


def check_models(models: Iterable[ModelOffer]) -> list[OfferTuple]:
    offers = [offer_to_tuple(offer) for offer in models]
    if len(offers) > MAX_MODELS:
        raise ValueError(f"at most {MAX_MODELS} models per node")
    ids = [offer[1] for offer in offers]
    if len(set(ids)) != len(ids):
        raise ValueError("the same model id is offered twice")
    return offers


def record_from_view(value: Sequence[Any]) -> NodeRecord | None:
    """A NodeRecord from the contract's NodeView tuple; None where no node is registered."""
    owner, role, endpoint, signer, models, stake, unbonding, unbond_at, active, frozen = value
    if int(role) == 0:
        return None
    return NodeRecord(
        owner=to_checksum_address(owner),
        role=Role(int(role)),
        endpoint=endpoint,
        signer=to_checksum_address(signer),
        models=tuple(offer_from_tuple(m) for m in models),
        stake_wei=int(stake),
        unbonding_wei=int(unbonding),
        unbond_at=int(unbond_at),
        active=bool(active),
        frozen=bool(frozen),
    )


def same_models(a: Sequence[ModelOffer], b: Sequence[ModelOffer]) -> bool:
    # Model ids are hex: compare them case-insensitively, everything else exactly, in order.
    def norm(offers: Sequence[ModelOffer]) -> list[OfferTuple]:
        return [offer_to_tuple(o) for o in offers]

    return norm(a) == norm(b)


# --- deployment -----------------------------------------------------------------------------


def deploy_registry(
    chain: Chain,
    deployer_key: PrivateKey,
    min_stakes: dict[Role, int],
    unbonding_delay_s: int,
    *,
    early_period_s: int = 0,
    early_multiplier_ppm: int = PPM,
    early_decay_s: int = 0,
) -> str:
    """Deploy a NodeRegistry; the deployer becomes its admin. Returns the address. By default
    no miner is early (a 1x multiplier for everyone)."""
    missing = [role.name.lower() for role in Role if role not in min_stakes]
    if missing:
        raise ValueError(f"min_stakes lacks a minimum for: {', '.join(missing)}")
    for role, amount in min_stakes.items():
        if amount <= 0:
            raise ValueError(f"min stake for {Role(role).name.lower()} must be positive")
    if unbonding_delay_s < 0:
        raise ValueError("unbonding delay must be non-negative")
    # The contract's own checks, as a ValueError naming the parameter before any gas.
    EarlyMinerSchedule(0, early_period_s, early_multiplier_ppm, early_decay_s)
    artifact = load_artifact(CONTRACT_NAME)
    return chain.deploy(
        deployer_key,
        artifact.abi,
        artifact.bytecode,
        min_stakes[Role.MINER],
        min_stakes[Role.VERIFIER],
        min_stakes[Role.GATEWAY],
        unbonding_delay_s,
        early_period_s,
        early_multiplier_ppm,
        early_decay_s,
    )


# --- the client -----------------------------------------------------------------------------


class Registry:
    """A deployed NodeRegistry. Writes take the node owner's key and return the receipt;
    reverts raise `ContractRevert` with the contract's reason. Reads are views at the latest
    block; `stake_at` and `was_signer` answer for the past as the contract defines it."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = check_address(address, "registry address")
        self.contract: Contract = chain.contract(self.address, load_artifact(CONTRACT_NAME).abi)
        self._min_stakes: dict[Role, int] = {}
        self._unbonding_delay: int | None = None
        self._page_size: int | None = None
        self._early: EarlyMinerSchedule | None = None

    # --- parameters (immutable in the contract, so read once) ---

    def min_stake(self, role: Role) -> int:
        role = Role(role)
        if role not in self._min_stakes:
            self._min_stakes[role] = int(
                self.chain.call(self.contract.functions.min_stake(int(role)))
            )
        return self._min_stakes[role]

    def unbonding_delay(self) -> int:
        if self._unbonding_delay is None:
            self._unbonding_delay = int(self.chain.call(self.contract.functions.unbonding_delay()))
        return self._unbonding_delay

    def early_schedule(self) -> EarlyMinerSchedule:
        """The early-miner schedule the contract was deployed with (protocol.scoring's rule,
        which NodeRegistry.early_multiplier_at computes on-chain)."""
        if self._early is None:
            fns = self.contract.functions
            self._early = EarlyMinerSchedule(
                genesis=int(self.chain.call(fns.genesis())),
                early_period_s=int(self.chain.call(fns.early_period())),
                multiplier_ppm=int(self.chain.call(fns.early_multiplier_ppm())),
                decay_s=int(self.chain.call(fns.early_decay())),
            )
        return self._early

    def early_multiplier_at(self, owner: str, timestamp: int) -> int:
        """`owner`'s epoch-reward multiplier at block time `timestamp`, in ppm (1x = 10**6)."""
        address = check_address(owner, "owner")
        when = _amount(timestamp, "timestamp")
        return int(self.chain.call(self.contract.functions.early_multiplier_at(address, when)))

    def page_size(self) -> int:
        if self._page_size is None:
            self._page_size = int(self.chain.call(self.contract.functions.max_page()))
        return self._page_size

    def admin(self) -> str:
        return to_checksum_address(self.chain.call(self.contract.functions.admin()))

    def pending_admin(self) -> str | None:
        """The successor the admin named and who has not accepted yet; None if none."""
        pending = to_checksum_address(self.chain.call(self.contract.functions.pending_admin()))
        return None if int(pending, 16) == 0 else pending

    def slasher(self) -> str:
        return to_checksum_address(self.chain.call(self.contract.functions.slasher()))

    def credits(self, recipient: str) -> int:
        address = check_address(recipient, "recipient")
        return int(self.chain.call(self.contract.functions.credits(address)))

    # --- reads ---

    def node(self, owner: str) -> NodeRecord | None:
        address = check_address(owner, "owner")
        return record_from_view(self.chain.call(self.contract.functions.get_node(address)))

    def signer_of(self, owner: str) -> str | None:
        """The key that signs `owner`'s attestations; None if no node is registered."""
        address = check_address(owner, "owner")
        signer = to_checksum_address(self.chain.call(self.contract.functions.signer_of(address)))
        return None if int(signer, 16) == 0 else signer

    def was_signer(self, owner: str, signer: str) -> bool:
        """Whether `signer` signs for `owner`: its current key, or one it replaced less than
        one unbonding delay ago (stake bonded under that key may still be here)."""
        address = check_address(owner, "owner")
        key = check_address(signer, "signer")
        return bool(self.chain.call(self.contract.functions.was_signer(address, key)))

    def stake_at(self, owner: str, timestamp: int) -> int:
        """`owner`'s bonded stake as of block time `timestamp`, changes made at exactly that
        time included; 0 before its first stake. Still answers once the node is forgotten."""
        address = check_address(owner, "owner")
        when = _amount(timestamp, "timestamp")
        return int(self.chain.call(self.contract.functions.stake_at(address, when)))

    def stake_checkpoints(self, owner: str) -> list[tuple[int, int]]:
        """Every (block time, bonded stake from then on) of `owner`, oldest first."""
        address = check_address(owner, "owner")
        fns = self.contract.functions
        count = int(self.chain.call(fns.stake_checkpoint_count(address)))
        return [
            (int(t), int(stake))
            for t, stake in (
                self.chain.call(fns.stake_checkpoint(address, i)) for i in range(count)
            )
        ]

    def registered_at(self, owner: str) -> int:
        """Block time of `owner`'s current registration; 0 if none (or forgotten)."""
        address = check_address(owner, "owner")
        return int(self.chain.call(self.contract.functions.registered_at(address)))

    def total_stake_of(self, owner: str) -> int:
        """Bonded plus unbonding wei: everything a slash can still take from `owner`."""
        address = check_address(owner, "owner")
        return int(self.chain.call(self.contract.functions.total_stake_of(address)))

    def is_frozen(self, owner: str) -> bool:
        """Whether an open dispute holds `owner`'s funds (no unbonding, no withdrawal)."""
        address = check_address(owner, "owner")
        return int(self.chain.call(self.contract.functions.frozen(address))) != 0

    def node_count(self) -> int:
        return int(self.chain.call(self.contract.functions.node_count()))

    def nodes(self, active_only: bool = True, role: Role | None = None) -> list[NodeRecord]:
        """Every listed node (those active or still holding funds), in list order.

        With `active_only`, only nodes that are active and hold at least their role's minimum
        stake: a slashed node below the minimum stays registered but must not get traffic.
        Frozen nodes (`NodeRecord.frozen`, under an open dispute) are still returned: they are
        active and may be acquitted, so whether to route to one is the caller's decision (the
        gateway skips them).
        """
        block = self.chain.block_number()
        page = self.page_size()
        records: list[NodeRecord] = []
        start = 0
        while True:
            batch = self.chain.call(self.contract.functions.get_nodes(start, page), block)
            for value in batch:
                record = record_from_view(value)
                if record is not None:
                    records.append(record)
            if len(batch) < page:
                break
            start += page
        if role is not None:
            records = [r for r in records if r.role == role]
        if active_only:
            records = [r for r in records if r.active and r.stake_wei >= self.min_stake(r.role)]
        return records

    def events(self, receipt: TxReceipt) -> list[RegistryEvent]:
        """The registry events a transaction emitted, in log order."""
        return decode_events(self.contract, receipt)

    # --- node operations ---

    def register(
        self,
        key: PrivateKey,
        role: Role,
        endpoint: str,
        signer: str,
        models: Sequence[ModelOffer],
        stake_wei: int,
    ) -> TxReceipt:
        offers = check_models(models)
        return self.chain.send(
            key,
            self.contract,
            "register",
            int(Role(role)),
            check_endpoint(endpoint),
            check_address(signer, "signer"),
            offers,
            value=_amount(stake_wei, "stake"),
        )

    def update(
        self, key: PrivateKey, endpoint: str, signer: str, models: Sequence[ModelOffer]
    ) -> TxReceipt:
        offers = check_models(models)
        return self.chain.send(
            key,
            self.contract,
            "update",
            check_endpoint(endpoint),
            check_address(signer, "signer"),
            offers,
        )

    def stake(self, key: PrivateKey, amount_wei: int) -> TxReceipt:
        return self.chain.send(key, self.contract, "stake", value=_amount(amount_wei, "stake"))

    def request_unbonding(self, key: PrivateKey, amount_wei: int) -> TxReceipt:
        return self.chain.send(
            key, self.contract, "request_unbonding", _amount(amount_wei, "amount")
        )

    def withdraw(self, key: PrivateKey) -> TxReceipt:
        return self.chain.send(key, self.contract, "withdraw")

    def deregister(self, key: PrivateKey) -> TxReceipt:
        return self.chain.send(key, self.contract, "deregister")

    def claim(self, key: PrivateKey) -> TxReceipt:
        """Collect slashed stake credited to the key's address."""
        return self.chain.send(key, self.contract, "claim")

    def ensure_registered(
        self,
        key: PrivateKey,
        role: Role,
        endpoint: str,
        signer: str,
        models: Sequence[ModelOffer],
        stake_wei: int,
    ) -> NodeRecord:
        """Make the chain say what this node says, sending only the transactions needed.

        Safe to call at every start: registers if the key has no active node; otherwise
        updates endpoint, signer and models where they differ and tops the stake up to
        `stake_wei`. Stake above `stake_wei` is left alone (unbonding is a deliberate act).
        A node registered under another role raises ValueError: roles do not change in place,
        nor while the old role's funds are unbonding (withdraw them first). A frozen node
        whose details differ raises ContractRevert "node frozen".
        """
        role = Role(role)
        owner = as_account(key).address
        signer = check_address(signer, "signer")
        check_endpoint(endpoint)
        check_models(models)
        _amount(stake_wei, "stake")
        current = self.node(owner)
        if (
            current is not None
            and not current.active
            and current.role != role
            and current.unbonding_wei > 0
        ):
            raise ValueError(
                f"{owner} still has {current.role.name.lower()} stake unbonding; "
                f"withdraw it before registering as {role.name.lower()}"
            )
        if current is None or not current.active:
            self.register(key, role, endpoint, signer, models, stake_wei)
        else:
            if current.role != role:
                raise ValueError(
                    f"{owner} is registered as {current.role.name.lower()}, not "
                    f"{role.name.lower()}; deregister it first"
                )
            if (
                current.endpoint != endpoint
                or current.signer != signer
                or not same_models(current.models, models)
            ):
                self.update(key, endpoint, signer, models)
            if current.stake_wei < stake_wei:
                self.stake(key, stake_wei - current.stake_wei)
        record = self.node(owner)
        assert record is not None  # it was just registered
        return record

    # --- administration (the deployer, then whoever accepts the role from it) ---

    def set_slasher(self, admin_key: PrivateKey, slasher: str) -> TxReceipt:
        """Name the slasher (the dispute manager). Works once: it is fixed for the registry's
        life, so no admin can later take the stake through it."""
        address = check_address(slasher, "slasher")
        if int(address, 16) == 0:
            raise ValueError("slasher must not be the zero address")
        return self.chain.send(admin_key, self.contract, "set_slasher", address)

    def transfer_admin(self, admin_key: PrivateKey, new_admin: str) -> TxReceipt:
        """Step one: name `new_admin`, who becomes admin with `accept_admin`. The admin stays
        in charge until then; naming the zero address cancels the transfer."""
        return self.chain.send(
            admin_key, self.contract, "transfer_admin", check_address(new_admin, "admin")
        )

    def accept_admin(self, new_admin_key: PrivateKey) -> TxReceipt:
        """Step two: the named successor takes over."""
        return self.chain.send(new_admin_key, self.contract, "accept_admin")

    def freeze(self, slasher_key: PrivateKey, owner: str) -> TxReceipt:
        """Hold `owner`'s funds in place (the slasher: the dispute manager, or a test key)."""
        return self.chain.send(slasher_key, self.contract, "freeze", check_address(owner, "owner"))

    def unfreeze(self, slasher_key: PrivateKey, owner: str) -> TxReceipt:
        """Release one freeze of `owner`; freezes nest."""
        return self.chain.send(
            slasher_key, self.contract, "unfreeze", check_address(owner, "owner")
        )

    def slash(
        self, slasher_key: PrivateKey, owner: str, amount_wei: int, recipient: str
    ) -> TxReceipt:
        """Slash up to `amount_wei` of `owner`'s stake (for tests and the dispute manager)."""
        return self.chain.send(
            slasher_key,
            self.contract,
            "slash",
            check_address(owner, "owner"),
            _amount(amount_wei, "amount"),
            check_address(recipient, "recipient"),
        )


def _amount(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an int amount of wei")
    if not 0 <= value <= UINT256_MAX:
        raise ValueError(f"{what} {value} is out of range")
    return value
