"""The gateway node's shell: optionally register on-chain, then serve the API from the registry.

With an escrow address the gateway meters: its private key is the signer of its receipts and
vouchers (payers authorize that address in the escrow), receipts go to their own SQLite file
(`receipts_db_path`), and with a RewardDistributor address it also anchors their Merkle roots
on-chain every `anchor_interval_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eth_account import Account
from rich.console import Console

from infergrid.app.config import GatewayConfig
from infergrid.protocol.nodes import NodeRecord, Role
from infergrid.protocol.pricing import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    from infergrid.app.settlement import Settlement
    from infergrid.settle.binding import ChainBinding
    from infergrid.settle.chain import Chain


@dataclass(frozen=True)
class GatewaySettings:
    chain_rpc: str
    registry: str
    db_path: Path
    host: str
    port: int
    discovery_interval_s: float
    private_key: str | None  # registers the gateway; with `escrow`, signs its receipts
    stake_wei: int
    # Settlement: None serves unmetered (no receipts, no 402s).
    escrow: str | None = None  # PaymentEscrow address
    rewards: str | None = None  # RewardDistributor address: anchor receipt roots there
    anchor_interval_s: float = 300.0
    escrow_poll_s: float = 3.0  # how stale a payer's escrow figures may get
    # Stated in the forwarded body, and reserved for, when a request sets no limit.
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    receipts_db: Path | None = None  # default: receipts_db_path(db_path)
    # Answers wait for their receipt's fsync, not only its commit (app.receipts).
    receipts_wait_for_disk: bool = False
    hedge_streams: bool = GatewayConfig.hedge_streams  # GatewayConfig documents it
    # How long a miner may keep a request (GatewayConfig documents the rule).
    first_token_timeout_floor_s: float = GatewayConfig.first_token_timeout_floor_s
    first_token_timeout_cap_s: float = GatewayConfig.first_token_timeout_cap_s
    stream_stall_timeout_s: float = GatewayConfig.stream_stall_timeout_s
    # Audits and qualification (metered gateways; GatewayConfig documents them).
    qualification_audits: int = GatewayConfig.qualification_audits
    qualification_tokens_per_s: float = GatewayConfig.qualification_tokens_per_s
    audit_timeout_s: float = GatewayConfig.audit_timeout_s
    request_retention_max: int = GatewayConfig.request_retention_max
    request_retention_s: float = GatewayConfig.request_retention_s


def receipts_db_path(db_path: Path) -> Path:
    """Where a gateway keeps its receipts by default: next to its keys-and-traces file, but
    apart from it, so the trace writer never holds the lock a receipt commit waits for
    (gateway.db → gateway.receipts.db)."""
    return db_path.with_name(db_path.stem + ".receipts" + (db_path.suffix or ".db"))


def build_settlement(
    chain: Chain,
    *,
    escrow: str,
    private_key: str,
    receipts_db: Path,
    rewards: str | None = None,
    anchor_interval_s: float = 300.0,
    escrow_poll_s: float = 3.0,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    binding: ChainBinding | None = None,
    receipts_wait_for_disk: bool = False,
) -> Settlement:
    """A metered gateway's settlement: the escrow's signing domain, the gateway's signer, its
    receipt store and, with a reward distributor, the anchorer. Reads the chain id once.
    With `binding` (gateway_binding), the receipt store is bound to that deployment:
    ChainMismatch if it holds another chain's receipts. `receipts_wait_for_disk`: see
    app.receipts."""
    from infergrid.app.anchoring import ReceiptAnchorer, distributor_submit
    from infergrid.app.receipts import ReceiptStore
    from infergrid.app.settlement import Settlement
    from infergrid.protocol.eip712 import Signer
    from infergrid.settle.escrow import PaymentEscrow
    from infergrid.settle.rewards import RewardDistributor

    reader = PaymentEscrow(chain, escrow)
    domain = reader.domain()
    signer = Signer(private_key)
    store = ReceiptStore(
        receipts_db, domain, signer, chain=binding, wait_for_disk=receipts_wait_for_disk
    )
    anchorer = None
    if rewards:
        # Anchors are kept per sender: they must go out from the signer's own address.
        distributor = RewardDistributor(chain, rewards)
        anchorer = ReceiptAnchorer(
            store, distributor_submit(distributor, private_key), interval_s=anchor_interval_s
        )
    return Settlement(
        domain=domain,
        signer=signer,
        store=store,
        escrow=reader,
        anchorer=anchorer,
        poll_interval_s=escrow_poll_s,
        default_max_tokens=default_max_tokens,
    )


def run_gateway_node(settings: GatewaySettings, console: Console) -> None:
    from infergrid.app.gateway import run_gateway
    from infergrid.settle.binding import bind_file, gateway_binding
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    chain = Chain.connect(settings.chain_rpc)
    registry = Registry(chain, settings.registry)
    # Before anything else touches the chain or the files: the keys, traces and receipts of
    # another chain must not serve (or bill) on this one.
    binding = gateway_binding(
        chain,
        registry=settings.registry,
        escrow=settings.escrow,
        rewards=settings.rewards if settings.escrow else None,
    )
    bind_file(settings.db_path, binding, what="the gateway's database")
    if settings.escrow and not settings.private_key:
        raise ValueError(
            "a metered gateway (--escrow) needs its signing key in INFERGRID_PRIVATE_KEY"
        )
    settlement = None
    if settings.escrow and settings.private_key:
        settlement = build_settlement(
            chain,
            escrow=settings.escrow,
            private_key=settings.private_key,
            receipts_db=settings.receipts_db or receipts_db_path(settings.db_path),
            rewards=settings.rewards,
            anchor_interval_s=settings.anchor_interval_s,
            escrow_poll_s=settings.escrow_poll_s,
            default_max_tokens=settings.default_max_tokens,
            binding=binding,
            receipts_wait_for_disk=settings.receipts_wait_for_disk,
        )
    if settings.private_key:
        owner = Account.from_key(settings.private_key).address
        registry.ensure_registered(
            settings.private_key,
            Role.GATEWAY,
            f"http://{settings.host}:{settings.port}",
            owner,
            [],
            settings.stake_wei,
        )
        console.print(f"gateway {owner} registered")

    if settlement is not None:
        anchoring = f", anchoring to {settings.rewards}" if settings.rewards else ""
        console.print(
            f"gateway signer {settlement.gateway} charges payers through escrow"
            f" {settings.escrow}{anchoring}"
        )

    def discover() -> list[NodeRecord]:
        return registry.nodes(active_only=True)

    config = GatewayConfig(
        hedge_streams=settings.hedge_streams,
        db_path=settings.db_path,
        host=settings.host,
        port=settings.port,
        discovery_interval_s=settings.discovery_interval_s,
        first_token_timeout_floor_s=settings.first_token_timeout_floor_s,
        first_token_timeout_cap_s=settings.first_token_timeout_cap_s,
        stream_stall_timeout_s=settings.stream_stall_timeout_s,
        qualification_audits=settings.qualification_audits,
        qualification_tokens_per_s=settings.qualification_tokens_per_s,
        audit_timeout_s=settings.audit_timeout_s,
        request_retention_max=settings.request_retention_max,
        request_retention_s=settings.request_retention_s,
    )
    disputes = None
    if settlement is not None:
        # The registry's slasher is the DisputeManager whose disputes about this gateway's
        # requests the gateway watches (DESIGN.md section 6); none set, nothing to watch.
        from infergrid.settle.disputes import ZERO_ADDRESS, DisputeManager

        slasher = registry.slasher()
        if int(slasher, 16) != int(ZERO_ADDRESS, 16):
            disputes = DisputeManager(chain, slasher)
    run_gateway(config, discover, settlement, disputes)
