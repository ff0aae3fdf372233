"""A real network for the fuzz tests: a metered gateway on the embedded EVM in front of the
real miner server (attesting, with its receipt log) over a tiny random model, each serving on
its own thread so that plain blocking clients (http.client, schemathesis' requests) can drive
them; plus the checks that say whether the network is still healthy after a fuzz run."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families
from settlement_harness import GATEWAY, KEYS, MIN_STAKE, MINER_1, PAYER_A, addr, deploy_network

from infergrid.app.config import GatewayConfig
from infergrid.app.gateway import Gateway, create_gateway_app
from infergrid.app.keys import KeyStore
from infergrid.app.node import build_settlement
from infergrid.app.receipts import ReceiptStore
from infergrid.app.traces import TraceStore
from infergrid.compute.attestation import Attestor
from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.model_store import build_tiny_model
from infergrid.compute.receipt_log import ReceiptLog
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.eip712 import Signer
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.wire import REQUEST_ID_HEADER
from infergrid.settle.chain import Chain, EmbeddedEVM

MODEL = "tiny-fuzz"
# Small enough that any max_tokens a fuzzer finds valid generates quickly on the tiny model.
CONTEXT_LENGTH = 256
# Small enough that a "huge" string within it is cheap; the default is 16 MiB.
MAX_BODY_BYTES = 1024 * 1024
PRICES = (3, 5)  # wei per prompt token, per completion token
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# A metric whose name says something went wrong; after a fuzz run every one must read 0.
_TROUBLE = re.compile(r"fail|error|reject|drop|isolat|skip|poison|overflow", re.IGNORECASE)


class _Errors(logging.Handler):
    """Keeps every ERROR (and worse) record: a logged exception is a defect here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


@dataclass
class Counts:
    """Responses the fuzzers saw, by where they went; the receipt checks add them up."""

    gateway_ok: int = 0
    miner_ok: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def saw(self, status: int, *, direct: bool) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == 200:
            if direct:
                self.miner_ok += 1
            else:
                self.gateway_ok += 1


@dataclass
class Stack:
    gateway_url: str
    miner_url: str
    api_key: str
    payer: str
    gateway: Gateway
    traces: TraceStore
    receipts: ReceiptStore
    receipt_log: ReceiptLog
    errors: _Errors
    counts: Counts = field(default_factory=Counts)

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


class KeepAlive:
    """One HTTP/1.1 connection that is never silently reopened: if the server drops it, the
    next request raises instead of dialling again."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.conn.connect()
        self.conn.auto_open = 0  # type: ignore[attr-defined]
        self.sock = self.conn.sock

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        all_headers = {"content-type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=body, headers=all_headers)
        resp = self.conn.getresponse()
        data = resp.read()
        assert not resp.will_close, f"{method} {path}: the server closes the connection"
        assert self.conn.sock is self.sock, f"{method} {path}: the connection was dropped"
        return resp.status, resp.headers, data

    def still_usable(self) -> None:
        """The connection answers another request, so the last response did not break it."""
        status, _, _ = self.request("GET", "/health")
        assert status == 200, f"GET /health on the same connection answered {status}"

    def close(self) -> None:
        self.conn.close()


def check_error_shape(status: int, body: bytes) -> dict[str, Any]:
    """A 4xx body is OpenAI's error object, exactly; returns it."""
    parsed = json.loads(body)
    assert isinstance(parsed, dict) and set(parsed) == {"error"}, parsed
    error = parsed["error"]
    assert isinstance(error, dict), parsed
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def _wait_healthy(url: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        conn = http.client.HTTPConnection(*urlsplit(url).netloc.split(":"), timeout=5)
        try:
            conn.request("GET", "/health")
            body = json.loads(conn.getresponse().read())
            if body.get("miners", {}).get("healthy") == 1:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > end:
            raise TimeoutError("the gateway never saw the miner healthy")
        time.sleep(0.05)


@contextlib.contextmanager
def running_stack(tmp: Path) -> Iterator[Stack]:
    """The whole network, torn down in order on exit."""
    model_dir = build_tiny_model(tmp / "model", seed=0, name=MODEL, context_length=CONTEXT_LENGTH)
    engine = TransformersEngine.from_dir(model_dir, device="cpu", num_threads=1)
    net = deploy_network(Chain.embedded(EmbeddedEVM(accounts=10)))
    owner = addr(MINER_1)
    offer = ModelOffer(engine.name, engine.model_id, *PRICES)
    attestor = Attestor(net.domain, Signer(KEYS[MINER_1]), owner)
    payer = net.fund_payer(PAYER_A, WEI_PER_BTT)
    keys = KeyStore(tmp / "gateway.db", refresh_s=0.1)
    traces = TraceStore(tmp / "gateway.db", flush_interval_s=0.05)
    api_key = keys.create("fuzz", payer=payer)[1]
    settlement = build_settlement(
        net.chain,
        escrow=net.escrow.address,
        private_key=KEYS[GATEWAY],
        receipts_db=tmp / "gateway.receipts.db",
        escrow_poll_s=0.5,
    )
    config = GatewayConfig(
        db_path=tmp / "gateway.db",
        discovery_interval_s=0.5,
        health_interval_s=0.5,
        health_timeout_s=2.0,
        connect_timeout_s=2.0,
        read_timeout_s=30.0,
        max_body_bytes=MAX_BODY_BYTES,
    )
    with contextlib.ExitStack() as stack:
        stack.callback(keys.close)
        stack.callback(traces.close)
        stack.callback(settlement.close)
        receipt_log = stack.enter_context(ReceiptLog(tmp / "miner.receipts.db"))
        miner_app = create_miner_app(
            engine,
            node_address=owner,
            max_concurrency=1,
            default_max_tokens=4,
            attestor=attestor,
            receipt_log=receipt_log,
            offer=offer,
        )
        miner = stack.enter_context(MinerServerThread(miner_app, log_level="error"))
        net.registry.register(
            KEYS[MINER_1], Role.MINER, miner.url, attestor.signer_address, [offer], MIN_STAKE
        )
        app = create_gateway_app(
            config, discover=net.discover, keys=keys, traces=traces, settlement=settlement
        )
        gateway = stack.enter_context(MinerServerThread(app, log_level="error"))
        _wait_healthy(gateway.url)
        # uvicorn configures its loggers when each server is built: attach afterwards.
        errors = _Errors()
        watched = [logging.getLogger(name) for name in ("infergrid", "uvicorn.error", "uvicorn")]
        for logger in watched:
            logger.addHandler(errors)
        stack.callback(lambda: [logger.removeHandler(errors) for logger in watched])
        yield Stack(
            gateway_url=gateway.url,
            miner_url=miner.url,
            api_key=api_key,
            payer=payer,
            gateway=app.state.gateway,
            traces=traces,
            receipts=settlement.store,
            receipt_log=receipt_log,
            errors=errors,
        )


def _wait_for(what: str, predicate: Any, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {deadline_s} s")
        time.sleep(0.02)


def trouble_metrics(text: str) -> dict[str, float]:
    """Every nonzero sample whose name says failure, and every 5xx the gateway answered."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            name = f"{sample.name}{{{label}}}"
            if sample.name.endswith("_created"):
                continue
            server_error = sample.labels.get("status", "").startswith("5")
            if sample.value and (server_error or _TROUBLE.search(sample.name)):
                found[name] = sample.value
    return found


def assert_healthy(stack: Stack) -> None:
    """After a fuzz run: no writer is stuck or failing, a normal request is still traced,
    receipted and logged by the miner, and gateway and miner agree on what was served."""
    _wait_for("the trace queue draining", lambda: stack.traces.pending == 0)
    conn = KeepAlive(stack.gateway_url)
    try:
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        ).encode()
        status, headers, data = conn.request("POST", CHAT_PATH, body, stack.auth())
        assert status == 200, f"a normal request after fuzzing: {status} {data[:300]!r}"
        stack.counts.saw(200, direct=False)
        rid = headers[REQUEST_ID_HEADER]
        _wait_for(
            "the normal request's trace being stored",
            lambda: stack.traces.get_flushed(rid) is not None,
        )
        _wait_for("the trace queue draining", lambda: stack.traces.pending == 0)
        status, _, data = conn.request("GET", f"/v1/receipts/{rid}", None, stack.auth())
        assert status == 200, f"its receipt: {status} {data[:300]!r}"
        assert json.loads(data)["trace"]["status"] == 200
        status, _, metrics = conn.request("GET", "/metrics")
        assert status == 200
    finally:
        conn.close()

    _wait_for("the receipt writer draining", lambda: stack.receipts.pending == 0)
    receipts, counts = stack.receipts.count(), stack.counts
    assert receipts == counts.gateway_ok, f"{receipts} receipts for {counts.gateway_ok} answers"
    assert stack.receipts.rejected == 0, f"{stack.receipts.rejected} receipts rejected"
    stack.receipt_log.flush()
    logged = stack.receipt_log.responses()
    served = counts.gateway_ok + counts.miner_ok
    assert len(logged) == served, f"the miner logged {len(logged)} of {served} answers"
    assert stack.receipt_log.write_errors == 0, "the miner's receipt log failed to write"
    assert stack.receipt_log.rejected == 0, f"{stack.receipt_log.rejected} log rows rejected"
    assert stack.traces.rejected == 0, f"{stack.traces.rejected} traces rejected"
    gateway_signer = stack.receipts.gateway
    logged_wei = stack.receipt_log.total(stack.payer, gateway_signer)
    charged_wei = stack.receipts.payer_total(stack.payer)
    assert logged_wei == charged_wei, f"miner logged {logged_wei} wei, gateway {charged_wei}"
    trouble = trouble_metrics(metrics.decode())
    assert trouble == {}, f"/metrics: {trouble}"
    assert stack.errors.lines() == [], f"logged errors: {stack.errors.lines()[:5]}"
