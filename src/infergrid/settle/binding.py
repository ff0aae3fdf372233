"""Off-chain state belongs to one chain: which deployment a store settles on, and the check.

A gateway's receipts, keys and traces and a miner's receipt log record money owed on one
deployment of the contracts. Read against another — a devnet restarted in the same directory
gets a fresh chain with the contracts at the same addresses — they bill a developer again for
requests paid on the old chain and replay anchors the new contracts never saw. So every store
is bound to its deployment when first opened, and checked on every open after.

A deployment is identified by its `ChainBinding`:

- the **chain id**, which tells networks apart (BTTC 199, Donau 1029, a devnet 1337);
- the **genesis block hash**, which tells apart two chains with the same id (every devnet and
  anvil is 1337 or 31337, and their genesis blocks differ by their timestamps);
- the **contract addresses** the store depends on, by contract name (`NodeRegistry`,
  `PaymentEscrow`, `RewardDistributor`), which tell apart two deployments on one chain.

Comparing (`reconcile`): the chain id and the genesis hash must be equal; a contract named in
both must be at the same address; a contract only the store names is kept (a gateway started
once without `--rewards` still settles on the same escrow); a contract only the node names is
added to the store's binding (anchoring turned on later). A store that holds no binding (written
before bindings existed, or new) takes the node's. Anything else is `ChainMismatch`, a
ValueError whose message is one line naming both deployments: the node refuses to start.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eth_utils import to_checksum_address

if TYPE_CHECKING:
    from infergrid.settle.chain import Chain

log = logging.getLogger(__name__)

META_TABLE = "chain_binding"
_SCHEMA = f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_CHAIN_ID = "chain_id"
_GENESIS = "genesis_hash"
_CONTRACT = "contract:"  # key prefix of a contract's address, by contract name

# The contracts a store can depend on, named as deploy.NetworkContracts and devnet.json name them.
REGISTRY = "NodeRegistry"
ESCROW = "PaymentEscrow"
REWARDS = "RewardDistributor"


@dataclass(frozen=True)
class ChainBinding:
    """One deployment: chain id, genesis block hash, contract addresses by contract name."""

    chain_id: int
    genesis_hash: str  # 0x-prefixed, lowercase hex
    contracts: tuple[tuple[str, str], ...] = ()  # (name, checksummed address), sorted by name

    @classmethod
    def make(
        cls, chain_id: int, genesis_hash: str | bytes, contracts: Mapping[str, str | None]
    ) -> ChainBinding:
        """Normalized: genesis as lowercase 0x-hex, addresses checksummed, unset ones left out.
        ValueError for an address that is not one."""
        if isinstance(genesis_hash, bytes):
            genesis_hash = "0x" + genesis_hash.hex()
        genesis = genesis_hash.lower()
        if not genesis.startswith("0x"):
            genesis = "0x" + genesis
        named = tuple(
            sorted(
                (name, to_checksum_address(address))
                for name, address in contracts.items()
                if address
            )
        )
        return cls(int(chain_id), genesis, named)

    @classmethod
    def of(cls, chain: Chain, **contracts: str | None) -> ChainBinding:
        """The deployment `chain` is on, with these contracts (None ones left out)."""
        return cls.make(chain.chain_id, chain.genesis_hash(), contracts)

    def contract(self, name: str) -> str | None:
        return dict(self.contracts).get(name)

    def describe(self) -> str:
        """'chain id 1337, genesis 0x1a2b3c4d…, PaymentEscrow 0x…': for one-line messages."""
        parts = [f"chain id {self.chain_id}", f"genesis {self.genesis_hash[:10]}…"]
        parts += [f"{name} {address}" for name, address in self.contracts]
        return ", ".join(parts)


def gateway_binding(
    chain: Chain, *, registry: str, escrow: str | None = None, rewards: str | None = None
) -> ChainBinding:
    """What a gateway's stores (keys and traces, receipts) are bound to: the registry it
    routes from, the escrow it bills through and, when anchoring, the reward distributor."""
    return ChainBinding.of(chain, **{REGISTRY: registry, ESCROW: escrow, REWARDS: rewards})


def miner_binding(chain: Chain, *, registry: str, escrow: str | None) -> ChainBinding:
    """What a miner's receipt log is bound to: its registry and the escrow that pays it."""
    return ChainBinding.of(chain, **{REGISTRY: registry, ESCROW: escrow})


class ChainMismatch(ValueError):
    """A store was written for another deployment than the one the node settles on."""

    def __init__(
        self, what: str, path: Path | str, stored: ChainBinding, current: ChainBinding
    ) -> None:
        self.what = what
        self.path = Path(path)
        self.stored = stored
        self.current = current
        why = "; ".join(differences(stored, current))
        super().__init__(
            f"{what} {path} belongs to another chain ({stored.describe()}), not to the one"
            f" this node settles on ({current.describe()}): {why}. Move it aside (or point"
            " the node at another file) to start fresh on this chain"
        )


def differences(stored: ChainBinding, current: ChainBinding) -> list[str]:
    """What makes `stored` another deployment than `current`; empty when they agree."""
    found = []
    if stored.chain_id != current.chain_id:
        found.append(f"chain id {stored.chain_id} is not {current.chain_id}")
    if stored.genesis_hash != current.genesis_hash:
        found.append("the genesis block differs")
    theirs = dict(stored.contracts)
    for name, address in current.contracts:
        if name in theirs and theirs[name] != address:
            found.append(f"{name} was at {theirs[name]}, is at {address}")
    return found


def reconcile(
    stored: ChainBinding | None, current: ChainBinding, *, what: str, path: Path | str
) -> ChainBinding:
    """The binding the store keeps from now on (see the module docstring); ChainMismatch when
    `stored` is another deployment than `current`."""
    if stored is None:
        return current
    if differences(stored, current):
        raise ChainMismatch(what, path, stored, current)
    merged = dict(stored.contracts) | dict(current.contracts)
    return ChainBinding(stored.chain_id, stored.genesis_hash, tuple(sorted(merged.items())))


def _read(conn: sqlite3.Connection) -> ChainBinding | None:
    rows = dict(conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    if _CHAIN_ID not in rows or _GENESIS not in rows:
        return None
    contracts = {k[len(_CONTRACT) :]: v for k, v in rows.items() if k.startswith(_CONTRACT)}
    return ChainBinding.make(int(rows[_CHAIN_ID]), rows[_GENESIS], contracts)


def read_binding(conn: sqlite3.Connection) -> ChainBinding | None:
    """The binding a store's database holds, or None if it holds none."""
    conn.execute(_SCHEMA)
    return _read(conn)


def bind_database(
    conn: sqlite3.Connection, current: ChainBinding, *, what: str, path: Path | str
) -> ChainBinding:
    """Check the database behind `conn` against `current` and record the reconciled binding
    (in table `chain_binding`), in one write transaction so two processes opening the same
    file agree. Returns it; ChainMismatch (nothing written) for another deployment's store.
    `conn` must not be inside a transaction."""
    conn.execute(_SCHEMA)
    conn.execute("BEGIN IMMEDIATE")
    try:
        stored = _read(conn)
        binding = reconcile(stored, current, what=what, path=path)
        if binding != stored:
            rows = [(_CHAIN_ID, str(binding.chain_id)), (_GENESIS, binding.genesis_hash)]
            rows += [(_CONTRACT + name, address) for name, address in binding.contracts]
            conn.executemany(
                f"INSERT OR REPLACE INTO {META_TABLE} (key, value) VALUES (?, ?)", rows
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if stored is None:
        log.info("%s %s is now bound to %s", what, path, binding.describe())
    return binding


def bind_file(path: Path | str, current: ChainBinding, *, what: str) -> ChainBinding:
    """bind_database on a file of its own connection (created if missing), closed after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        return bind_database(conn, current, what=what, path=path)
    finally:
        conn.close()
