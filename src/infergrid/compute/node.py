"""The miner node's shell: load the engine, register and stake on-chain, serve requests, and
(with an escrow) attest every response, log it, and collect vouchers on a schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eth_account import Account
from rich.console import Console

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role

if TYPE_CHECKING:  # the chain stack loads only when a miner starts
    from infergrid.compute.attestation import Attestor
    from infergrid.compute.collector import CollectionLoop, Collector
    from infergrid.compute.engine import Engine
    from infergrid.compute.receipt_log import ReceiptLog
    from infergrid.settle.chain import Chain
    from infergrid.settle.escrow import PaymentEscrow
    from infergrid.settle.registry import Registry

# Often enough that payers' deposits do not sit owed for long, rarely enough that gas per
# collection stays small against what it collects.
DEFAULT_COLLECT_INTERVAL_S = 300.0
DEFAULT_STATE_DIR = Path(".infergrid")


def default_receipt_log_path(owner: str, state_dir: Path = DEFAULT_STATE_DIR) -> Path:
    """Where a miner keeps its receipt log unless told otherwise: one file per owner, so
    several miners started from one directory (the devnet) never share a log."""
    return state_dir / f"miner-{owner.lower()}.receipts.db"


@dataclass(frozen=True)
class MinerSettings:
    chain_rpc: str
    registry: str
    private_key: str
    model: str
    host: str
    port: int
    endpoint: str
    stake_wei: int
    price_in_wei: int
    price_out_wei: int
    # Settlement: without an escrow the miner serves unattested (no payments possible).
    escrow: str | None = None
    # Seconds between voucher collections; 0 turns collection off (run `collect_now`).
    collect_interval_s: float = DEFAULT_COLLECT_INTERVAL_S
    # Gateways to collect from; empty means every active gateway in the registry.
    gateway_urls: tuple[str, ...] = field(default_factory=tuple)
    # The miner's own receipt log; None means default_receipt_log_path(owner).
    receipt_log: Path | None = None
    # torch CPU threads; None means every core this process may use (right for a lone miner;
    # miners sharing a machine should split its cores between them).
    threads: int | None = None
    # RED TEAM (compute.attacks): serve this model's tokens under `model`'s id, after
    # `honest_first` honest requests. Verifiers catch and slash such a miner.
    substitute_model: str | None = None
    honest_first: int = 0
    # Which engine serves the model (compute.engine_factory.ENGINE_KINDS): the model id
    # depends on it (llama.cpp serves a GGUF at its quantization, transformers dequantized).
    engine: str = "transformers"
    # With engine "openai": the server the miner fronts, and which kind it is.
    upstream: str | None = None
    upstream_flavor: str | None = None
    upstream_model: str | None = None  # the upstream's name for it (default: its first model)


def make_attestor(escrow: PaymentEscrow, private_key: str) -> Attestor:
    """The attestor of a miner whose owner key is also its registered signer (as run_miner
    registers it), in the escrow's EIP-712 domain.

    The domain is checked against the contract's own separator: attestations signed in a
    wrong domain (a wrong chain id or escrow address) would be refused by every gateway, and
    better the miner fails at start than serves unpaid.
    """
    from infergrid.compute.attestation import Attestor
    from infergrid.protocol.eip712 import Signer

    domain = escrow.domain()
    on_chain = bytes(escrow.chain.call(escrow.contract.functions.domain_separator()))
    if on_chain != domain.separator:
        raise ValueError(
            f"the escrow at {escrow.address} reports another EIP-712 domain than chain id "
            f"{domain.chain_id} and its address: is it a PaymentEscrow of this network?"
        )
    signer = Signer(private_key)
    return Attestor(domain, signer, signer.address)


@dataclass
class MinerSettlement:
    """A running miner's settlement side: what create_miner_app needs, and the schedule."""

    attestor: Attestor
    receipts: ReceiptLog
    offer: ModelOffer
    collector: Collector | None  # None when collect_interval_s is 0
    loop: CollectionLoop | None


@contextlib.contextmanager
def miner_settlement(
    settings: MinerSettings,
    chain: Chain,
    registry: Registry,
    offer: ModelOffer,
    console: Console | None = None,
) -> Iterator[MinerSettlement]:
    """Attestor, receipt log and (with collect_interval_s > 0) the collection loop of a miner
    with an escrow; everything stops and is flushed on exit. Pass the result's parts to
    create_miner_app(attestor=, receipt_log=, offer=)."""
    from infergrid.compute.collector import CollectionLoop, Collector, VoucherResult
    from infergrid.compute.receipt_log import ReceiptLog
    from infergrid.settle.binding import miner_binding
    from infergrid.settle.escrow import PaymentEscrow

    if settings.escrow is None:
        raise ValueError("settlement needs the escrow address")
    escrow = PaymentEscrow(chain, settings.escrow)
    attestor = make_attestor(escrow, settings.private_key)
    log_path = settings.receipt_log or default_receipt_log_path(attestor.miner)
    chain_binding = miner_binding(chain, registry=settings.registry, escrow=escrow.address)
    with ReceiptLog(log_path, chain=chain_binding) as receipts:
        if console is not None:
            console.print(f"attesting for escrow {escrow.address}; receipt log {log_path}")
        collector: Collector | None = None
        loop: CollectionLoop | None = None
        if settings.collect_interval_s > 0:
            collector = Collector(
                escrow,
                settings.private_key,
                receipts,
                registry=registry,
                gateway_urls=settings.gateway_urls,
            )

            def report(results: list[VoucherResult]) -> None:
                for result in results:
                    if console is not None and result.status != "nothing_new":
                        console.print(f"collection: {result.summary()}")

            loop = CollectionLoop(collector, settings.collect_interval_s, report).start()
            if console is not None:
                console.print(f"collecting vouchers every {settings.collect_interval_s:g} s")
        try:
            yield MinerSettlement(attestor, receipts, offer, collector, loop)
        finally:
            if loop is not None:
                loop.stop()


def run_miner(settings: MinerSettings, console: Console) -> None:
    from infergrid.compute.engine_factory import load_engine
    from infergrid.compute.miner_server import create_miner_app, run_miner_server
    from infergrid.compute.receipt_log import ReceiptLog
    from infergrid.compute.transformers_engine import available_cores
    from infergrid.settle.binding import miner_binding
    from infergrid.settle.chain import Chain
    from infergrid.settle.registry import Registry

    owner = Account.from_key(settings.private_key).address
    threads = settings.threads or available_cores()
    console.print(
        f"miner {owner}: loading {settings.model} on {settings.engine} ({threads} CPU threads)"
    )
    engine: Engine = load_engine(
        settings.engine,
        settings.model,
        num_threads=threads,
        upstream=settings.upstream,
        upstream_flavor=settings.upstream_flavor,
        upstream_model=settings.upstream_model,
    )
    if settings.substitute_model is not None:
        from infergrid.compute.attacks import SubstitutedEngine

        actual = load_engine(settings.engine, settings.substitute_model, num_threads=threads)
        console.print(
            f"[bold red]RED TEAM: serving {actual.name}'s tokens under {engine.name}'s id after"
            f" {settings.honest_first} honest request(s); verifiers will slash this miner[/]"
        )
        engine = SubstitutedEngine(engine, actual, honest_first=settings.honest_first)
    offer = ModelOffer(
        name=engine.name,
        model_id=engine.model_id,
        price_in_wei=settings.price_in_wei,
        price_out_wei=settings.price_out_wei,
    )
    console.print(f"model {offer.name} id {offer.model_id}")

    chain = Chain.connect(settings.chain_rpc)
    registry = Registry(chain, settings.registry)
    if settings.escrow is not None:
        # Before registering: a log of another chain's responses must not start a miner here
        # (ChainMismatch); miner_settlement checks it again when it opens the log.
        ReceiptLog(
            settings.receipt_log or default_receipt_log_path(owner),
            chain=miner_binding(chain, registry=settings.registry, escrow=settings.escrow),
        ).close()
    # Idempotent: a restarted miner updates its record and tops up its stake, never re-registers.
    # The owner key is also the registered signer: attestations are signed with it.
    registry.ensure_registered(
        settings.private_key,
        Role.MINER,
        settings.endpoint,
        owner,
        [offer],
        settings.stake_wei,
    )
    node = registry.node(owner)
    stake = node.stake_wei / WEI_PER_BTT if node else 0.0
    console.print(f"registered at {settings.endpoint} with {stake:,.2f} BTT staked")

    # As many generations at once as the engine batches: each worker thread holds one row of
    # the running batch (an upstream-fronting engine batches on its own side).
    concurrency = int(getattr(engine, "max_batch", 1) or 1)
    if settings.escrow is None:
        console.print("no escrow configured: responses are not attested and nothing is collected")
        app = create_miner_app(engine, node_address=owner, max_concurrency=concurrency)
        run_miner_server(app, settings.host, settings.port)
        return
    with miner_settlement(settings, chain, registry, offer, console) as settlement:
        app = create_miner_app(
            engine,
            node_address=owner,
            max_concurrency=concurrency,
            attestor=settlement.attestor,
            receipt_log=settlement.receipts,
            offer=offer,
        )
        run_miner_server(app, settings.host, settings.port)
