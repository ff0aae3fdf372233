"""Voucher collection: ask gateways for the miner's vouchers, check them, get paid on-chain.

Each gateway serves `GET {gateway}/v1/vouchers?miner=0x…`: one cumulative voucher per payer
for this miner, signed by the gateway's signer (docs/settlement.md, "Life of a payment").
For each voucher the miner

1. checks it (pure, `check_voucher`): the signature recovers to `voucher.gateway`, which is
   the signer the gateway advertises, and the voucher pays this miner;
2. compares its value with the miner's own receipt log for (payer, gateway) up to the
   voucher's timestamp (`compare_with_log`): a *shortfall* means the gateway vouches for less
   than the miner attested, a *surplus* for more. Both are reported, neither blocks payment:
   what a voucher pays is all the escrow will ever pay on it, and the operator decides
   whether a gateway that underpays still gets served;
3. skips it when the escrow already paid at least its value (`nothing_new`), else submits
   it with `PaymentEscrow.collect`, which pays the delta: one transaction per (payer,
   gateway) per run, not per request.

A gateway that is down or answers garbage is reported as one failed result; nothing here
raises for a single bad gateway or voucher. `CollectionLoop` runs a `Collector` on a
schedule in a background thread; `collect_now` is the one-shot for the CLI.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from eth_utils import is_address, to_checksum_address

from infergrid.compute.receipt_log import ReceiptLog
from infergrid.protocol.eip712 import Domain
from infergrid.protocol.json_body import too_deep
from infergrid.protocol.messages import Voucher
from infergrid.protocol.nodes import Role
from infergrid.protocol.pricing import format_btt
from infergrid.protocol.vouchers import SignedVoucher
from infergrid.settle.binding import miner_binding
from infergrid.settle.chain import Chain, ChainError, ContractRevert, as_account
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.registry import Registry
from infergrid.verify.voucher import check_voucher

log = logging.getLogger(__name__)

VOUCHERS_PATH = "/v1/vouchers"
DEFAULT_HTTP_TIMEOUT_S = 10.0
# A voucher list is one small object per payer; anything far larger is not an answer.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

Status = str  # "collected" | "nothing_new" | "rejected: <reason>" | "failed: <reason>"
Discrepancy = Literal["match", "shortfall", "surplus"]


# --- what comes back from a gateway ---------------------------------------------------------


@dataclass(frozen=True)
class MalformedVoucher:
    """An entry of a gateway's list that is not a voucher; reported, never collected."""

    raw: Any
    error: str


@dataclass(frozen=True)
class GatewayVouchers:
    url: str
    signer: str  # the gateway's advertised voucher signer
    entries: tuple[SignedVoucher | MalformedVoucher, ...]


def parse_vouchers(url: str, data: Any) -> GatewayVouchers:
    """The body of GET /v1/vouchers; ValueError when the body as a whole is unusable.

    Each entry is parsed by the gateway's own `protocol.vouchers.SignedVoucher.from_json`
    (so a 65-byte 0x-hex signature and a non-negative `receipt_count` are required); an entry
    it refuses becomes a MalformedVoucher carrying the reason, and the rest still count."""
    if not isinstance(data, Mapping):
        raise ValueError("the answer is not a JSON object")
    signer = data.get("gateway")
    if not isinstance(signer, str) or not is_address(signer):
        raise ValueError(f"'gateway' is not an address: {signer!r}")
    items = data.get("vouchers")
    if not isinstance(items, list):
        raise ValueError("'vouchers' is not a list")
    entries: list[SignedVoucher | MalformedVoucher] = []
    for item in items:
        try:
            entries.append(SignedVoucher.from_json(item))
        except (TypeError, ValueError) as exc:  # one bad entry never sinks the listing
            entries.append(MalformedVoucher(item, str(exc) or type(exc).__name__))
    return GatewayVouchers(url, to_checksum_address(signer), tuple(entries))


# --- the pure checks ------------------------------------------------------------------------


def compare_with_log(value_aggregate: int, own_total: int) -> tuple[Discrepancy, int]:
    """(kind, voucher value − own total): shortfall when the gateway vouches for less."""
    difference = value_aggregate - own_total
    if difference < 0:
        return "shortfall", difference
    if difference > 0:
        return "surplus", difference
    return "match", 0


def own_total_cutoff(voucher: Voucher) -> float:
    """Responses the miner signed before this moment can be in the voucher: its timestamp is
    whole seconds, taken when the gateway signed, after every receipt it covers."""
    return float(voucher.timestamp + 1)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoucherResult:
    """What happened to one voucher (or to one gateway that gave none): the CLI's rows."""

    gateway_url: str
    status: Status
    payer: str | None = None
    gateway: str | None = None  # the voucher's signer
    voucher_value_wei: int | None = None
    receipt_count: int | None = None
    own_total_wei: int | None = None  # the miner's log for (payer, gateway), to the voucher
    difference_wei: int | None = None  # voucher − own total
    discrepancy: Discrepancy | None = None
    collected_before_wei: int | None = None  # paid on-chain before this run
    paid_wei: int = 0  # taken from the payer by this run, fees included
    miner_wei: int = 0
    protocol_fee_wei: int = 0
    verifier_fee_wei: int = 0
    tx_hash: str | None = None
    gas_used: int | None = None

    @property
    def collected(self) -> bool:
        return self.status == "collected"

    def to_json(self) -> dict[str, Any]:
        # Plain integers for wei, as protocol.messages does: exact, and JSON has no limit.
        return {
            "gateway_url": self.gateway_url,
            "status": self.status,
            "payer": self.payer,
            "gateway": self.gateway,
            "voucher_value_wei": self.voucher_value_wei,
            "receipt_count": self.receipt_count,
            "own_total_wei": self.own_total_wei,
            "difference_wei": self.difference_wei,
            "discrepancy": self.discrepancy,
            "collected_before_wei": self.collected_before_wei,
            "paid_wei": self.paid_wei,
            "miner_wei": self.miner_wei,
            "protocol_fee_wei": self.protocol_fee_wei,
            "verifier_fee_wei": self.verifier_fee_wei,
            "tx_hash": self.tx_hash,
            "gas_used": self.gas_used,
        }

    def summary(self) -> str:
        """One line for logs and the console."""
        who = f"payer {self.payer} via {self.gateway}" if self.payer else self.gateway_url
        parts = [f"{self.status}: {who}"]
        if self.voucher_value_wei is not None:
            parts.append(f"voucher {format_btt(self.voucher_value_wei)} BTT")
        if self.discrepancy not in (None, "match") and self.difference_wei is not None:
            parts.append(f"{self.discrepancy} {format_btt(abs(self.difference_wei))} BTT")
        if self.collected:
            parts.append(f"miner got {format_btt(self.miner_wei)} BTT (tx {self.tx_hash})")
        return ", ".join(parts)


# --- I/O: gateways --------------------------------------------------------------------------


def vouchers_url(gateway_url: str, miner: str) -> str:
    query = urllib.parse.urlencode({"miner": to_checksum_address(miner)})
    return f"{gateway_url.rstrip('/')}{VOUCHERS_PATH}?{query}"


def fetch_vouchers(
    gateway_url: str, miner: str, timeout_s: float = DEFAULT_HTTP_TIMEOUT_S
) -> GatewayVouchers:
    """GET the miner's vouchers from one gateway (blocking). Raises OSError (unreachable,
    HTTP error) or ValueError (an answer that is not a voucher list)."""
    request = urllib.request.Request(
        vouchers_url(gateway_url, miner), headers={"accept": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        raw = response.read(MAX_RESPONSE_BYTES + 1)
    if len(raw) > MAX_RESPONSE_BYTES:
        raise ValueError(f"the answer is over {MAX_RESPONSE_BYTES} bytes")
    if too_deep(raw):  # json's C decoder would recurse off the stack (see json_body)
        raise ValueError("the answer nests too deeply")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the answer is not JSON: {exc}") from None
    return parse_vouchers(gateway_url, data)


def _http_failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"gateway answered HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"gateway unreachable: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "gateway timed out"
    return f"gateway unreachable: {exc}" if isinstance(exc, OSError) else str(exc)


# --- the collector --------------------------------------------------------------------------


class Collector:
    """Collects one miner's vouchers from gateways into its wallet.

    `key` pays the gas; the money goes to `miner` (default: the key's address), the registry
    owner that vouchers name. Gateways are `gateway_urls` when given, else every active
    gateway in the registry, by its registered endpoint, looked up afresh each run.
    """

    def __init__(
        self,
        escrow: PaymentEscrow,
        key: str,
        receipt_log: ReceiptLog | None,
        *,
        miner: str | None = None,
        registry: Registry | None = None,
        gateway_urls: Sequence[str] | None = None,
        http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
    ) -> None:
        self.escrow = escrow
        self.key = key
        self.miner = to_checksum_address(miner or as_account(key).address)
        self.receipt_log = receipt_log
        self.registry = registry
        self.gateway_urls = list(gateway_urls or [])
        self.http_timeout_s = http_timeout_s
        self._domain: Domain | None = None
        if not self.gateway_urls and registry is None:
            raise ValueError("give gateway URLs or a registry to find gateways in")

    def domain(self) -> Domain:
        if self._domain is None:
            self._domain = self.escrow.domain()
        return self._domain

    def gateways(self) -> list[str]:
        """The gateway base URLs to ask this run."""
        if self.gateway_urls:
            return list(self.gateway_urls)
        assert self.registry is not None  # the constructor requires one or the other
        records = self.registry.nodes(role=Role.GATEWAY)
        return list(dict.fromkeys(r.endpoint for r in records if r.endpoint))

    def run_once(self) -> list[VoucherResult]:
        """Ask every gateway and collect what is due; one result per voucher or failure."""
        if self.receipt_log is not None:
            self.receipt_log.flush()  # compare against everything attested so far
        try:
            urls = self.gateways()
        except Exception as exc:
            return [VoucherResult("(registry)", f"failed: cannot list gateways: {exc}")]
        results: list[VoucherResult] = []
        for url in urls:
            results.extend(self.collect_from(url))
        return results

    def collect_from(self, gateway_url: str) -> list[VoucherResult]:
        try:
            listing = fetch_vouchers(gateway_url, self.miner, self.http_timeout_s)
        except (OSError, ValueError) as exc:
            return [VoucherResult(gateway_url, f"failed: {_http_failure(exc)}")]
        results: list[VoucherResult] = []
        for entry in listing.entries:
            if isinstance(entry, MalformedVoucher):
                results.append(
                    VoucherResult(gateway_url, f"rejected: malformed voucher: {entry.error}")
                )
                continue
            results.append(self.settle(gateway_url, listing.signer, entry))
        return results

    def settle(
        self, gateway_url: str, advertised_signer: str, entry: SignedVoucher
    ) -> VoucherResult:
        """Check one voucher, compare it with the log, and collect it if anything is new."""
        voucher = entry.voucher
        base: dict[str, Any] = {
            "gateway_url": gateway_url,
            "payer": voucher.payer,
            "gateway": voucher.gateway,
            "voucher_value_wei": voucher.value_aggregate,
            "receipt_count": entry.receipt_count,
        }
        try:
            reason = check_voucher(
                self.domain(), entry, advertised_signer=advertised_signer, miner=self.miner
            )
        except ChainError as exc:
            return VoucherResult(status=f"failed: cannot read the escrow domain: {exc}", **base)
        if reason is not None:
            return VoucherResult(status=f"rejected: {reason}", **base)
        if self.receipt_log is not None:
            own = self.receipt_log.total(
                voucher.payer, voucher.gateway, until=own_total_cutoff(voucher)
            )
            discrepancy, difference = compare_with_log(voucher.value_aggregate, own)
            base.update(own_total_wei=own, difference_wei=difference, discrepancy=discrepancy)
            if discrepancy != "match":
                log.warning(
                    "voucher from %s for payer %s: %s of %d wei against the miner's log",
                    voucher.gateway,
                    voucher.payer,
                    discrepancy,
                    abs(difference),
                )
        try:
            before = self.escrow.collected(voucher.payer, voucher.gateway, self.miner)
        except ChainError as exc:
            return VoucherResult(status=f"failed: {exc}", **base)
        base["collected_before_wei"] = before
        if voucher.value_aggregate <= before:
            return VoucherResult(status="nothing_new", **base)
        try:
            paid = self.escrow.collect(self.key, voucher, entry.signature)
        except ContractRevert as exc:
            if exc.reason == "nothing to collect":  # paid by someone else meanwhile
                return VoucherResult(status="nothing_new", **base)
            return VoucherResult(status=f"failed: {exc.reason}", **base)
        except (ChainError, ValueError) as exc:
            return VoucherResult(status=f"failed: {exc}", **base)
        return VoucherResult(
            status="collected",
            paid_wei=paid.paid_wei,
            miner_wei=paid.miner_wei,
            protocol_fee_wei=paid.protocol_fee_wei,
            verifier_fee_wei=paid.verifier_fee_wei,
            tx_hash=paid.tx_hash,
            gas_used=paid.gas_used,
            **base,
        )


# --- on a schedule --------------------------------------------------------------------------


class CollectionLoop:
    """Runs `collector.run_once()` every `interval_s` seconds in a daemon thread.

    The first run waits one interval (the miner has just started and has nothing new).
    Errors are logged, never fatal: a chain or gateway outage stops settlement, not serving.
    `on_results` (e.g. print to the console) gets every run's results.
    """

    def __init__(
        self,
        collector: Collector,
        interval_s: float,
        on_results: Callable[[list[VoucherResult]], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.collector = collector
        self.interval_s = interval_s
        self.on_results = on_results
        self.runs = 0
        self.last_results: list[VoucherResult] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="collector", daemon=True)

    def start(self) -> CollectionLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> CollectionLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                results = self.collector.run_once()
            except Exception:
                log.exception("voucher collection failed")
                continue
            self.runs += 1
            self.last_results = results
            for result in results:
                level = logging.INFO if not result.status.startswith("failed") else logging.WARNING
                log.log(level, "collection: %s", result.summary())
            if self.on_results is not None:
                try:
                    self.on_results(results)
                except Exception:
                    log.exception("collection: reporting results failed")


# --- for the CLI ----------------------------------------------------------------------------


def collect_now(
    chain_rpc: str,
    registry: str,
    escrow: str,
    private_key: str,
    log_path: str | Path | None,
    gateway_urls: Sequence[str] | None = None,
    *,
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
) -> list[VoucherResult]:
    """Collect everything gateways owe this miner now; for `infergrid miner collect`.

    `log_path` is the miner's receipt log (safe to open while the miner runs: SQLite WAL);
    None, or a file that does not exist, skips the comparison with the log rather than
    creating an empty log that would flag every voucher as a surplus. A log of another
    chain's responses is refused (settle.binding.ChainMismatch): compared with this chain's
    vouchers, it would report shortfalls that are not there.
    """
    chain = Chain.connect(chain_rpc)
    receipts = None
    if log_path is not None and Path(log_path).exists():
        binding = miner_binding(chain, registry=registry, escrow=escrow)
        receipts = ReceiptLog(log_path, chain=binding)
    try:
        collector = Collector(
            PaymentEscrow(chain, escrow),
            private_key,
            receipts,
            registry=Registry(chain, registry),
            gateway_urls=gateway_urls,
            http_timeout_s=http_timeout_s,
        )
        return collector.run_once()
    finally:
        if receipts is not None:
            receipts.close()
