"""Prometheus metrics of one gateway, in a registry of its own (tests run several gateways)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

from infergrid.app.miners import MinerPool

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _RejectedRows:
    """`infergrid_writer_rejected_rows_total{writer}`: rows a background writer could not
    store and dropped (infergrid.batch_writes), read from each writer's own count at scrape
    time."""

    def __init__(self) -> None:
        self.writers: dict[str, Callable[[], int]] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "infergrid_writer_rejected_rows",
            "Rows a background writer could not store and dropped, by writer (each distinct"
            " failure is logged once).",
            labels=["writer"],
        )
        for name, read in sorted(self.writers.items()):
            family.add_metric([name], read())
        yield family


class GatewayMetrics:
    def __init__(self, pool: MinerPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._pool = pool
        r = self.registry
        self.requests = Counter(
            "infergrid_gateway_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "infergrid_gateway_request_seconds",
            "Time until the response finished, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "infergrid_gateway_ttft_seconds",
            "Time to first token of streamed requests.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "infergrid_gateway_tokens", "Tokens metered, by kind.", ["kind"], registry=r
        )
        self.failovers = Counter(
            "infergrid_gateway_failovers",
            "Miner attempts that failed before the first token and were retried elsewhere.",
            registry=r,
        )
        self.hedges = Counter(
            "infergrid_gateway_hedges",
            "Streams whose first token was late and were also sent to a second miner.",
            registry=r,
        )
        self.shed = Counter(
            "infergrid_gateway_shed",
            "Requests refused with 429 network_saturated (every miner serving the model at"
            " capacity), by model.",
            ["model"],
            registry=r,
        )
        self.stream_errors = Counter(
            "infergrid_gateway_stream_errors",
            "Streams that broke after the first token.",
            registry=r,
        )
        self.first_token_timeouts = Counter(
            "infergrid_gateway_first_token_timeouts",
            "Attempts given up before the first token (also counted as failovers), by reason:"
            " `deadline` (the miner was too slow) or `miner_down` (taken out of service).",
            ["reason"],
            registry=r,
        )
        self.stream_stalls = Counter(
            "infergrid_gateway_stream_stalls",
            "Streams ended because the miner went silent after the first token (also counted"
            " as stream errors).",
            registry=r,
        )
        self.receipts = Counter(
            "infergrid_gateway_receipts",
            "Receipts signed and durably stored (metered gateways).",
            registry=r,
        )
        self.receipt_value = Counter(
            "infergrid_gateway_receipt_value_wei",
            "Value of the receipts signed, in wei (a float: for rates, not accounting).",
            registry=r,
        )
        self.receipt_commit = Histogram(
            "infergrid_gateway_receipt_commit_seconds",
            "Time to store a receipt durably (group commit), on the request's path.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.attestation_failures = Counter(
            "infergrid_gateway_attestation_failures",
            "Miner responses whose attestation was missing or did not check out.",
            registry=r,
        )
        self.quota_refusals = Counter(
            "infergrid_gateway_quota_refusals",
            "Requests refused with 402: no payer, signer not authorized, or no headroom.",
            registry=r,
        )
        inflight = Gauge("infergrid_gateway_inflight", "Requests in flight to miners.", registry=r)
        # Read from the pool's own counts at scrape time: nothing to update per request.
        inflight.set_function(lambda: sum(m.inflight for m in self._pool.miners()))
        miners = Gauge(
            "infergrid_gateway_miners",
            "Registered active miners, by health.",
            ["state"],
            registry=r,
        )
        miners.labels("healthy").set_function(lambda: self._count(True))
        miners.labels("unhealthy").set_function(lambda: self._count(False))
        miners.labels("unchecked").set_function(lambda: self._count(None))
        self._rejected_rows = _RejectedRows()
        r.register(self._rejected_rows)
        self._children: dict[tuple[str, int], MetricWrapperBase] = {}
        self._latency_children: dict[str, Histogram] = {}
        self.prompt_tokens = self.tokens.labels("prompt")
        self.completion_tokens = self.tokens.labels("completion")

    def watch_writer(self, name: str, rejected: Callable[[], int]) -> None:
        """Export a background writer's count of rejected rows as
        infergrid_writer_rejected_rows_total{writer=name}."""
        self._rejected_rows.writers[name] = rejected

    def _count(self, healthy: bool | None) -> int:
        return sum(1 for m in self._pool.miners() if m.healthy is healthy)

    def observe(self, route: str, status: int, seconds: float) -> None:
        # labels() takes a lock and builds a tuple each time; the children are few, keep them.
        child = self._children.get((route, status))
        if child is None:
            child = self._children[(route, status)] = self.requests.labels(route, str(status))
        child.inc()  # type: ignore[attr-defined]
        hist = self._latency_children.get(route)
        if hist is None:
            hist = self._latency_children[route] = self.latency.labels(route)
        hist.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
