"""The gateway's lookup endpoints: vouchers, receipts, request status, miners, verifiers and
the network's demand against its supply.

Everything here reads what the gateway already holds (the receipt store, the traces, the
request log, the audits' miner records); the blocking reads run in worker threads.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from typing import Any

from eth_utils import is_address, to_checksum_address
from starlette.requests import Request
from starlette.responses import Response

from infergrid.app.api_common import authenticate, error_response, json_response, request_id
from infergrid.app.audits import AuditService
from infergrid.app.demand import ModelCounts
from infergrid.app.keys import KeyStore
from infergrid.app.miner_epochs import MinerEpoch, observe, verdict_rows
from infergrid.app.miners import MinerPool
from infergrid.app.request_status import RequestLog, request_status_for
from infergrid.app.settlement import Settlement
from infergrid.app.traces import TraceStore
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.supply import ModelDemand, emission_weights_ppm

__all__ = ["NETWORK_WINDOW_S", "Lookups"]

# GET /v1/network's default window: one devnet ScoreBoard epoch.
NETWORK_WINDOW_S = 300.0


class Lookups:
    """GET /v1/vouchers, /v1/receipts/{id}, /v1/requests/{id}, /v1/miners and /v1/verifiers."""

    def __init__(
        self,
        *,
        keys: KeyStore,
        traces: TraceStore,
        pool: MinerPool,
        settlement: Settlement | None,
        requests: RequestLog | None,
        audits: AuditService | None,
    ) -> None:
        self.keys = keys
        self.traces = traces
        self.pool = pool
        self.settlement = settlement
        self.requests = requests
        self.audits = audits

    def _settlement_or_404(self) -> Settlement:
        if self.settlement is None:
            raise APIError(
                404,
                "This gateway does not meter requests: it signs no receipts or vouchers.",
                code="settlement_disabled",
            )
        return self.settlement

    async def vouchers(self, request: Request) -> Response:
        """A miner's cumulative vouchers, one per payer. No API key: a voucher pays only the
        miner named in it, so handing it to anyone gives nothing away that the miner's own
        endpoint log does not already say."""
        rid = request_id(request.scope)
        try:
            settlement = self._settlement_or_404()
            _only_params(request, frozenset({"miner"}))
            miner = request.query_params.get("miner", "").strip()
            if not miner or not is_address(miner):
                raise APIError(
                    400,
                    "Give the miner's address: /v1/vouchers?miner=0x…",
                    param="miner",
                    code="invalid_value",
                )
            # Signing and the Merkle roots run in a worker thread, off the event loop.
            found = await asyncio.to_thread(
                settlement.store.vouchers_for, to_checksum_address(miner)
            )
        except APIError as exc:
            return error_response(exc, rid)
        body = {"gateway": settlement.gateway, "vouchers": [v.to_json() for v in found]}
        return json_response(body, rid)

    async def receipt(self, request: Request) -> Response:
        """The receipt of one request, with its anchor proof once anchored; only for the key
        that made the request (anyone else gets the same 404 as for an unknown id)."""
        rid = request_id(request.scope)
        wanted = request.path_params["request_id"]
        try:
            key = authenticate(self.keys, request)
            settlement = self._settlement_or_404()
            trace = self.traces.get_pending(wanted) or await asyncio.to_thread(
                self.traces.get_flushed, wanted
            )
            stored = None
            if trace is not None and trace.key_id == key.key_id:
                stored = await asyncio.to_thread(settlement.store.get, wanted)
            if stored is None:
                raise APIError(
                    404,
                    f"No receipt for request `{wanted}` under this API key.",
                    code="receipt_not_found",
                )
            proof = await asyncio.to_thread(settlement.store.anchor_proof, wanted)
        except APIError as exc:
            return error_response(exc, rid)
        assert trace is not None
        body = {
            **stored.to_json(),
            "anchor": proof.to_json() if proof is not None else None,
            "trace": {
                "model": trace.model,
                "route": trace.route,
                "stream": trace.stream,
                "status": trace.status,
                "created_at": trace.created_at,
                "miner": trace.miner,
                "prompt_tokens": trace.prompt_tokens,
                "completion_tokens": trace.completion_tokens,
                "ttft_ms": trace.ttft_ms,
                "total_ms": trace.total_ms,
                "attempts": trace.attempts,
                "cost_wei": trace.cost_wei,
            },
        }
        return json_response(body, rid)

    async def request_status(self, request: Request) -> Response:
        """GET /v1/requests/{id}: a request's verification status (app.request_status)."""
        rid = request_id(request.scope)
        try:
            key = authenticate(self.keys, request)
            body = await request_status_for(
                request.path_params["request_id"], key.key_id, self.traces, self.requests
            )
        except APIError as exc:
            return error_response(exc, rid)
        return json_response(body, rid)

    async def list_miners(self, request: Request) -> Response:
        """GET /v1/miners: every registered miner, its state and its audit record."""
        rid = request_id(request.scope)
        try:
            authenticate(self.keys, request)
        except APIError as exc:
            return error_response(exc, rid)
        if self.audits is not None:
            data = self.audits.miners_json()
        else:
            data = [
                {
                    "address": m.owner,
                    "models": [o.name for o in m.record.models],
                    "state": "active",
                    "served": m.served,
                    "audits": {"passed": 0, "failed": 0, "pending": 0},
                }
                for m in self.pool.miners()
            ]
        return json_response({"object": "list", "data": data}, rid)

    async def miner_epoch(self, request: Request) -> Response:
        """GET /v1/miners/epoch?since=<unix>&until=<unix>: what this gateway observed of each
        miner over requests it received in [since, until) (default: its first trace until
        now): requests, errors, verified tokens, latency against the model's typical, health
        checks, audit verdicts (app.miner_epochs). The verifiers' input to epoch scores."""
        rid = request_id(request.scope)
        try:
            authenticate(self.keys, request)
            since, until = _window(request)
            low = 0.0 if since is None else since
            high = time.time() if until is None else until
            found = await asyncio.to_thread(self._miner_epoch, low, high)
        except APIError as exc:
            return error_response(exc, rid)
        body = {
            "object": "list",
            "since": low,
            "until": high,
            "data": [m.to_json() for m in found],
        }
        return json_response(body, rid)

    def _miner_epoch(self, since: float, until: float) -> list[MinerEpoch]:
        traces = self.traces.window(since, until) if since < until else []
        verdicts = (
            verdict_rows(self.requests.verdicts_in(since, until))
            if self.requests is not None and since < until
            else []
        )
        return observe(
            traces, verdicts, self.pool.health_log, since, until,
            miners=[m.owner for m in self.pool.miners()],
        )  # fmt: skip

    async def network(self, request: Request) -> Response:
        """GET /v1/network[?since=<unix>&until=<unix>]: per model, its miners and their slots
        now, and over [since, until) (default: the last NETWORK_WINDOW_S seconds) its requests,
        shed requests, tokens asked for and served, slot time busy and offered, utilization,
        median price, and `reward_share_ppm`: the share of the miners' emission its demand
        earns it (app.demand, protocol.supply). What operators read to choose what to serve."""
        rid = request_id(request.scope)
        try:
            authenticate(self.keys, request)
            since, until = _window(request)
        except APIError as exc:
            return error_response(exc, rid)
        high = time.time() if until is None else until
        low = max(0.0, high - NETWORK_WINDOW_S) if since is None else since
        body = {
            "object": "network",
            "since": low,
            "until": high,
            "models": self._network(low, high),
        }
        return json_response(body, rid)

    def _network(self, since: float, until: float) -> list[dict[str, Any]]:
        pool = self.pool
        names = sorted({name for name, _ in pool.models()} | set(pool.demand.models()))
        rows: list[dict[str, Any]] = []
        for name in names:
            miners = pool.serving(name)
            offers = [o for m in miners for o in m.record.models if o.name == name]
            in_service = [m for m in miners if pool.in_service(m)]
            counts = pool.demand.window(name, since, until) if since < until else None
            row: dict[str, Any] = {
                "model": name,
                "model_id": offers[0].model_id if offers else None,
                "miners": len(miners),
                "healthy": len(in_service),
                "standby": len(pool.standby.parked(name)),
                "capacity": sum(m.capacity for m in in_service),
                "in_flight": sum(m.inflight for m in miners),
                **(counts.to_json() if counts is not None else ModelCounts().to_json()),
                "price_wei": (
                    {
                        "prompt": int(statistics.median(o.price_in_wei for o in offers)),
                        "completion": int(statistics.median(o.price_out_wei for o in offers)),
                    }
                    if offers
                    else None
                ),
            }
            rows.append(row)
        # The share of the miners' emission each model's demand earns it (protocol.supply:
        # what `infergrid rewards pay-miners --gateway` pays by, from these same rows).
        shares = emission_weights_ppm([ModelDemand.from_json(row) for row in rows])
        for row in rows:
            row["reward_share_ppm"] = shares[row["model"]]
        return rows

    async def list_verifiers(self, request: Request) -> Response:
        """GET /v1/verifiers[?since=<unix>&until=<unix>]: per verifier, the verdicts this
        gateway recorded (passed, failed) for requests it received in [since, until) (default:
        all it keeps; `since` after `until` is an empty window); every verifier the registry
        lists is shown, with zeros if it audited nothing. What verifier pay
        (verify.pay_epoch) counts as audits."""
        rid = request_id(request.scope)
        try:
            authenticate(self.keys, request)
            since, until = _window(request)
            counts: dict[str, tuple[int, int]] = {}
            if self.requests is not None:
                counts = await asyncio.to_thread(self.requests.verdict_counts, since, until)
        except APIError as exc:
            return error_response(exc, rid)
        registered = [v.owner for v in self.audits.verifiers] if self.audits is not None else []
        data: list[dict[str, Any]] = []
        for address in sorted({*counts, *registered}):
            passed, failed = counts.get(address, (0, 0))
            data.append(
                {
                    "address": address,
                    "audits": {"passed": passed, "failed": failed, "total": passed + failed},
                }
            )
        body = {"object": "list", "since": since, "until": until, "data": data}
        return json_response(body, rid)


_WINDOW_PARAMS = frozenset({"since", "until"})


def _only_params(request: Request, allowed: frozenset[str]) -> None:
    """Refuse a query parameter the endpoint does not take, by name: it would be ignored."""
    for name in request.query_params:
        if name not in allowed:
            raise APIError(
                400,
                f"Unknown query parameter {name!r}: this endpoint takes"
                f" {', '.join(sorted(allowed))}.",
                param=name,
                code="unsupported_parameter",
            )


def _window(request: Request) -> tuple[float | None, float | None]:
    """The `since` and `until` of a windowed lookup (None where absent); any other query
    parameter, or a bad time, is a 400 naming it."""
    _only_params(request, _WINDOW_PARAMS)
    return _unix_param(request, "since"), _unix_param(request, "until")


def _unix_param(request: Request, name: str) -> float | None:
    """A query parameter holding a unix time (seconds, may have a fraction); None if absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return None  # an empty value is no time: refused below, like any other
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise APIError(
            400,
            f"`{name}` must be a unix time in seconds, got {raw!r}.",
            param=name,
            code="invalid_value",
        )
    return int(value) if value.is_integer() else value
