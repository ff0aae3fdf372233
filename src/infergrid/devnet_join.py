"""Adding a node by hand to the network `infergrid up` runs: `--devnet` on `infergrid miner`
and `infergrid verifier`.

A joining node reads the network from `<state dir>/devnet.json`, takes the next dev account of
its role's range (devnet.py lists the ranges) that no node has registered and no other joining
process has claimed, and is funded by the deployer if it holds less than a node needs. A
verifier also gets its canary payer account (the matching index of the canary range) with an
escrow deposit, the gateway's signer authorized, and a canary API key in the gateway's
database (the gateway reloads its keys by itself).

Claims are files `<state dir>/joined/<address>` holding the claimant's pid, created
exclusively, so two nodes joining at once never take the same account; a claim whose process
is gone is taken over.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infergrid.devnet import (
    DEPLOYER_INDEX,
    DEVNET_CANARY_DEPOSIT_WEI,
    FIRST_CANARY_KEY_INDEX,
    FIRST_MINER_KEY_INDEX,
    FIRST_VERIFIER_KEY_INDEX,
    GATEWAY_KEY_INDEX,
    MAX_MINERS,
    MAX_VERIFIERS,
    NODE_FUNDING_WEI,
    read_devnet,
)
from infergrid.protocol.nodes import Role

CLAIMS_DIR = "joined"


class DevnetFull(RuntimeError):
    """Every dev account of the role's range is registered or claimed."""


@dataclass(frozen=True)
class JoinPlan:
    """Everything a node needs to join the running devnet."""

    chain_rpc: str
    registry: str
    escrow: str
    base_url: str  # the gateway's, ending in /v1
    private_key: str
    address: str
    state_dir: Path
    canary_api_key: str | None = None  # verifiers only
    engine: str = "transformers"  # the devnet's nodes' engine (their model ids depend on it)
    scoreboard: str | None = None  # where verifiers report miner scores (None: older devnet)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(claims: Path, address: str) -> bool:
    """Claim `address` for this process; False if a live process holds it."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / address
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder == os.getpid():
                return True
            if holder and _pid_alive(holder):
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _ranges(role: Role) -> tuple[int, int]:
    if role == Role.MINER:
        return FIRST_MINER_KEY_INDEX, MAX_MINERS
    if role == Role.VERIFIER:
        return FIRST_VERIFIER_KEY_INDEX, MAX_VERIFIERS
    raise ValueError(f"only miners and verifiers join a devnet by hand, not {role.name.lower()}s")


def join_devnet(state_dir: Path, role: Role) -> JoinPlan:
    """Pick, claim and fund the next free dev account of `role` on the devnet at `state_dir`;
    FileNotFoundError if no devnet runs there, DevnetFull if the range is used up."""
    from infergrid.settle.chain import Chain, as_account, dev_private_keys
    from infergrid.settle.registry import Registry

    info = read_devnet(state_dir)
    chain = Chain.connect(info["chain_rpc"])
    contracts = info["contracts"]
    registry = Registry(chain, contracts["NodeRegistry"])
    first, count = _ranges(role)
    keys = dev_private_keys(FIRST_CANARY_KEY_INDEX + MAX_VERIFIERS)
    claims = state_dir / CLAIMS_DIR
    taken = {node["address"] for node in [*info.get("miners", []), *info.get("verifiers", [])]}
    for offset in range(count):
        key = keys[first + offset]
        address = as_account(key).address
        if address in taken or registry.node(address) is not None:
            continue
        if not _claim(claims, address):
            continue
        _fund(chain, keys[DEPLOYER_INDEX], address)
        canary_api_key = None
        if role == Role.VERIFIER:
            canary_api_key = _canary_account(
                chain,
                info,
                deployer_key=keys[DEPLOYER_INDEX],
                canary_key=keys[FIRST_CANARY_KEY_INDEX + offset],
                gateway_key=keys[GATEWAY_KEY_INDEX],
            )
        return JoinPlan(
            chain_rpc=info["chain_rpc"],
            registry=contracts["NodeRegistry"],
            escrow=contracts["PaymentEscrow"],
            base_url=info["base_url"],
            private_key=key,
            address=address,
            scoreboard=contracts.get("ScoreBoard"),
            state_dir=state_dir,
            canary_api_key=canary_api_key,
            engine=str(info.get("engine", "transformers")),
        )
    raise DevnetFull(
        f"every devnet {role.name.lower()} account ({count}) is registered or claimed;"
        " join with your own key instead (INFERGRID_PRIVATE_KEY and --chain-rpc/--registry)"
    )


def _fund(chain: Any, deployer_key: str, address: str) -> None:
    shortfall = NODE_FUNDING_WEI - chain.balance(address)
    if shortfall > NODE_FUNDING_WEI // 2:
        chain.transfer(deployer_key, address, shortfall)


def _canary_account(
    chain: Any, info: dict[str, Any], *, deployer_key: str, canary_key: str, gateway_key: str
) -> str:
    """Fund the canary payer, deposit and authorize the gateway's signer, and create its
    canary API key in the gateway's database; returns the key."""
    from infergrid.app.keys import KeyStore
    from infergrid.settle.chain import as_account
    from infergrid.settle.escrow import PaymentEscrow

    payer = as_account(canary_key).address
    _fund(chain, deployer_key, payer)
    escrow = PaymentEscrow(chain, info["contracts"]["PaymentEscrow"])
    if escrow.account(payer).available_wei < DEVNET_CANARY_DEPOSIT_WEI // 2:
        escrow.deposit(canary_key, DEVNET_CANARY_DEPOSIT_WEI)
    gateway_signer = as_account(gateway_key).address
    if not escrow.is_authorized(payer, gateway_signer):
        escrow.authorize_signer(canary_key, gateway_signer)
    store = KeyStore(Path(info["gateway_db"]))
    try:
        return store.create(f"canaries of {payer}", payer=payer, canary=True)[1]
    finally:
        store.close()
