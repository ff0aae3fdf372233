"""A metered gateway on real contracts: an embedded EVM with a NodeRegistry and a
PaymentEscrow, ScriptedMiners registered there with their own signer keys, payers who deposit
and authorize the gateway's signer, and the gateway's settlement built as the node builds it
(app.node.build_settlement)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway_harness import RunningGateway, running_gateway
from scripted_miner import ScriptedMiner

from infergrid.app.keys import KeyStore
from infergrid.app.node import build_settlement
from infergrid.app.settlement import Settlement
from infergrid.app.traces import TraceStore
from infergrid.protocol.eip712 import Domain
from infergrid.protocol.nodes import WEI_PER_BTT, Role
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS
from infergrid.settle.chain import Chain, as_account, dev_private_keys
from infergrid.settle.escrow import PaymentEscrow, deploy_escrow
from infergrid.settle.registry import Registry, deploy_registry
from infergrid.settle.rewards import RewardDistributor, deploy_rewards

KEYS = dev_private_keys(10)
ADMIN, PAYER_A, PAYER_B, MINER_1, MINER_2, GATEWAY = 0, 1, 2, 3, 4, 5
MINER_KEYS = (MINER_1, MINER_2)
MIN_STAKE = WEI_PER_BTT // 100
PROTOCOL_FEE_PPM, VERIFIER_POOL_PPM = 20_000, 30_000


def addr(index: int) -> str:
    return as_account(KEYS[index]).address


@dataclass
class Network:
    chain: Chain
    registry: Registry
    escrow: PaymentEscrow
    rewards: RewardDistributor
    domain: Domain = field(init=False)

    def __post_init__(self) -> None:
        self.domain = self.escrow.domain()

    def fund_payer(self, payer: int, amount_wei: int, *, authorize: bool = True) -> str:
        if amount_wei:
            self.escrow.deposit(KEYS[payer], amount_wei)
        if authorize:
            self.escrow.authorize_signer(KEYS[payer], addr(GATEWAY))
        return addr(payer)

    def discover(self) -> list[Any]:
        return self.registry.nodes(active_only=True)


def deploy_network(chain: Chain) -> Network:
    """Fresh contracts (so balances and receipts start at zero) on a shared chain."""
    admin = addr(ADMIN)
    registry = deploy_registry(
        chain, KEYS[ADMIN], {Role.MINER: MIN_STAKE, Role.VERIFIER: MIN_STAKE, Role.GATEWAY: 1}, 3600
    )
    escrow = deploy_escrow(
        chain,
        KEYS[ADMIN],
        treasury=admin,
        verifier_pool=admin,
        protocol_fee_ppm=PROTOCOL_FEE_PPM,
        verifier_pool_ppm=VERIFIER_POOL_PPM,
        thaw_period_s=600,
        fee_delay_s=601,
    )
    rewards = deploy_rewards(
        chain,
        KEYS[ADMIN],
        arbiter=admin,
        treasury=admin,
        proposer_bond_wei=WEI_PER_BTT,
        challenge_window_s=60,
        arbiter_delay_s=61,
    )
    return Network(
        chain,
        Registry(chain, registry),
        PaymentEscrow(chain, escrow),
        RewardDistributor(chain, rewards),
    )


@contextlib.asynccontextmanager
async def registered_miners(
    net: Network, count: int = 1, **kwargs: Any
) -> AsyncIterator[list[ScriptedMiner]]:
    """Running ScriptedMiners, each registered on-chain by its owner key with a signer key of
    its own, signing attestations in the escrow's domain."""
    async with contextlib.AsyncExitStack() as stack:
        miners = []
        for index in MINER_KEYS[:count]:
            miner = ScriptedMiner(
                addr(index), signer_key="0x" + os.urandom(32).hex(), domain=net.domain, **kwargs
            )
            await stack.enter_async_context(miner.running())
            net.registry.register(
                KEYS[index], Role.MINER, miner.base_url, miner.signer, miner.offers(), MIN_STAKE
            )
            miners.append(miner)
        yield miners


@contextlib.asynccontextmanager
async def metered_gateway(
    net: Network,
    miners: list[ScriptedMiner],
    keys: KeyStore,
    traces: TraceStore,
    tmp_path: Path,
    *,
    anchor: bool = False,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    **overrides: Any,
) -> AsyncIterator[RunningGateway]:
    settlement: Settlement = build_settlement(
        net.chain,
        escrow=net.escrow.address,
        private_key=KEYS[GATEWAY],
        receipts_db=tmp_path / "gateway.receipts.db",
        rewards=net.rewards.address if anchor else None,
        anchor_interval_s=0.2,
        escrow_poll_s=0.2,
        default_max_tokens=default_max_tokens,
    )
    # The gateway's request records live beside its database: the test's, not the cwd's.
    overrides.setdefault("db_path", tmp_path / "gateway.db")
    try:
        async with running_gateway(
            miners, keys, traces, settlement=settlement, discover=net.discover, **overrides
        ) as gw:
            yield gw
    finally:
        settlement.close()
