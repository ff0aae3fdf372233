"""Signed attestations on the miner's responses, the equivocation guard and the receipt log,
through a real miner HTTP server on 127.0.0.1 over the tiny model."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from compute_helpers import CHAT, post
from eth_utils import keccak, to_checksum_address

from infergrid.compute.attestation import AttestedRequests, Attestor, seed_for
from infergrid.compute.engine import GeneratedToken, SamplingParams
from infergrid.compute.miner_server import MinerServerThread, create_miner_app, iter_sse
from infergrid.compute.receipt_log import ReceiptLog
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.eip712 import ZERO32, Domain, Signer
from infergrid.protocol.messages import Attestation, recover_signer, request_hash, response_hash
from infergrid.protocol.nodes import ModelOffer
from infergrid.protocol.pricing import request_value
from infergrid.protocol.wire import (
    ATTESTATION_KEY,
    EXTENSION_KEY,
    GATEWAY_HEADER,
    PAYER_HEADER,
    REQUEST_ID_HEADER,
)

SIGNER_KEY = "0x" + "5a" * 32
OWNER = to_checksum_address("0x" + "bb" * 20)
DOMAIN = Domain(1337, "0x" + "e5" * 20)  # any escrow address: nothing here touches a chain
PAYER = "0x" + "11" * 20
GATEWAY = "0x" + "22" * 20
PRICE_IN, PRICE_OUT = 3 * 10**12, 7 * 10**12


@pytest.fixture(scope="module")
def attestor() -> Attestor:
    return Attestor(DOMAIN, Signer(SIGNER_KEY), OWNER)


def offer_for(engine: TransformersEngine) -> ModelOffer:
    return ModelOffer(engine.name, engine.model_id, PRICE_IN, PRICE_OUT)


@pytest.fixture
def receipts(tmp_path: Path) -> Iterator[ReceiptLog]:
    with ReceiptLog(tmp_path / "receipts.db", flush_interval_s=0.01) as log:
        yield log


@pytest.fixture
def attesting_miner(
    tiny_engine: TransformersEngine, attestor: Attestor, receipts: ReceiptLog
) -> Iterator[MinerServerThread]:
    app = create_miner_app(
        tiny_engine,
        node_address=OWNER,
        attestor=attestor,
        receipt_log=receipts,
        offer=offer_for(tiny_engine),
    )
    with MinerServerThread(app) as server:
        yield server


def _body(engine: TransformersEngine, **extra: Any) -> bytes:
    # Sent byte for byte: the request hash covers these exact bytes, spacing included.
    body = {"model": engine.name, "messages": CHAT, "max_tokens": 10, "seed": 5, **extra}
    return json.dumps(body, indent=1).encode()


def _send(
    server: MinerServerThread,
    raw: bytes,
    request_id: str | None,
    path: str = "/v1/chat/completions",
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    all_headers = dict(headers)
    if request_id is not None:
        all_headers[REQUEST_ID_HEADER] = request_id
    return post(server.host, server.port, path, raw, all_headers)


def _check(
    signed: dict[str, Any],
    *,
    request_id: str,
    raw: bytes,
    output_ids: list[int],
    usage: dict[str, int],
    engine: TransformersEngine,
) -> Attestation:
    attestation = Attestation.from_json(signed)
    assert recover_signer(DOMAIN, attestation, signed["signature"]) == Signer(SIGNER_KEY).address
    assert attestation.request_hash == request_hash(request_id, raw)
    assert attestation.response_hash == response_hash(output_ids)
    assert "0x" + attestation.model_id.hex() == engine.model_id
    assert attestation.miner == OWNER
    assert attestation.tokens_in == usage["prompt_tokens"]
    assert attestation.tokens_out == usage["completion_tokens"] == len(output_ids)
    assert attestation.proof_hash == ZERO32
    return attestation


def test_non_streamed_responses_carry_a_valid_attestation(
    attesting_miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    raw = _body(tiny_engine)
    status, _, answer = _send(attesting_miner, raw, "att-1")
    assert status == 200, answer
    body = json.loads(answer)
    ext = body[EXTENSION_KEY]
    _check(
        ext[ATTESTATION_KEY],
        request_id="att-1",
        raw=raw,
        output_ids=ext["output_token_ids"],
        usage=body["usage"],
        engine=tiny_engine,
    )
    # The ids the attestation covers are the engine's, ending token included.
    prompt = tiny_engine.chat_prompt_ids(CHAT)
    direct = list(tiny_engine.generate(prompt, SamplingParams(max_tokens=10, seed=5)))
    assert ext["output_token_ids"] == [t.token_id for t in direct]

    legacy = json.dumps({"model": tiny_engine.name, "prompt": "Once", "max_tokens": 4}).encode()
    status, _, answer = _send(attesting_miner, legacy, "att-legacy", "/v1/completions")
    assert status == 200
    body = json.loads(answer)
    _check(
        body[EXTENSION_KEY][ATTESTATION_KEY],
        request_id="att-legacy",
        raw=legacy,
        output_ids=body[EXTENSION_KEY]["output_token_ids"],
        usage=body["usage"],
        engine=tiny_engine,
    )
    # No seed in the request: the miner derives it from the request hash, so that a replay
    # would sample the same tokens.
    assert body[EXTENSION_KEY]["seed"] == seed_for(request_hash("att-legacy", legacy))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_responses_attest_in_the_usage_chunk(
    attesting_miner: MinerServerThread, tiny_engine: TransformersEngine, path: str
) -> None:
    if path == "/v1/completions":
        raw = json.dumps(
            {"model": tiny_engine.name, "prompt": "Once upon", "max_tokens": 9, "stream": True}
        ).encode()
    else:
        raw = _body(tiny_engine, stream=True, stream_options={"include_usage": True})
    request_id = "att-stream-" + path.split("/")[-1].replace(".", "-")
    status, _, answer = _send(attesting_miner, raw, request_id, path)
    assert status == 200, answer
    events = list(iter_sse(answer.split(b"\n")))
    usage_chunk = events[-1]
    assert usage_chunk["choices"] == []
    assert all(ATTESTATION_KEY not in e.get(EXTENSION_KEY, {}) for e in events[:-1])
    ids = [i for e in events[:-1] if EXTENSION_KEY in e for i in e[EXTENSION_KEY]["token_ids"]]
    _check(
        usage_chunk[EXTENSION_KEY][ATTESTATION_KEY],
        request_id=request_id,
        raw=raw,
        output_ids=ids,
        usage=usage_chunk["usage"],
        engine=tiny_engine,
    )


def test_without_a_request_id_the_generated_one_is_hashed(
    attesting_miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    raw = _body(tiny_engine)
    status, headers, answer = _send(attesting_miner, raw, None)
    assert status == 200
    generated = headers[REQUEST_ID_HEADER]  # the miner tells the client the id it chose
    body = json.loads(answer)
    assert body["id"] == "chatcmpl-" + generated
    attestation = Attestation.from_json(body[EXTENSION_KEY][ATTESTATION_KEY])
    assert attestation.request_hash == request_hash(generated, raw)


def test_a_request_hash_is_attested_once(
    attesting_miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    raw = _body(tiny_engine, seed=None)  # seedless: a second answer could differ
    assert _send(attesting_miner, raw, "once")[0] == 200
    for _ in range(2):
        status, headers, answer = _send(attesting_miner, raw, "once")
        assert status == 409
        error = json.loads(answer)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "duplicate_request"
        assert headers[REQUEST_ID_HEADER] == "once"
    # Another body under the same id, or the same body under another id, is another request.
    assert _send(attesting_miner, _body(tiny_engine, seed=6), "once")[0] == 200
    assert _send(attesting_miner, raw, "twice")[0] == 200
    streamed = _body(tiny_engine, stream=True)
    assert _send(attesting_miner, streamed, "s-once")[0] == 200
    assert _send(attesting_miner, streamed, "s-once")[0] == 409
    # A request refused before generation (400) reserves nothing.
    bad = _body(tiny_engine, temperature=9)
    assert _send(attesting_miner, bad, "bad-once")[0] == 400
    assert _send(attesting_miner, bad, "bad-once")[0] == 400


def test_log_records_values_at_the_miners_prices(
    attesting_miner: MinerServerThread, tiny_engine: TransformersEngine, receipts: ReceiptLog
) -> None:
    offer = offer_for(tiny_engine)
    expected: dict[tuple[str | None, str | None], int] = {}
    sent: list[tuple[str, Attestation]] = []
    for n, (payer, gateway) in enumerate(
        [(PAYER, GATEWAY), (PAYER, GATEWAY), (GATEWAY, PAYER), (None, None)]
    ):
        headers = {}
        if payer is not None:
            headers = {PAYER_HEADER: payer.lower(), GATEWAY_HEADER: gateway.upper()[2:]}
        raw = _body(tiny_engine, seed=n, max_tokens=4 + n, stream=n % 2 == 1)
        status, _, answer = _send(attesting_miner, raw, f"log-{n}", **headers)
        assert status == 200
        if n % 2:
            signed = list(iter_sse(answer.split(b"\n")))[-1][EXTENSION_KEY][ATTESTATION_KEY]
        else:
            signed = json.loads(answer)[EXTENSION_KEY][ATTESTATION_KEY]
        attestation = Attestation.from_json(signed)
        sent.append((f"log-{n}", attestation))
        key = (
            None if payer is None else to_checksum_address(payer),
            None if gateway is None else to_checksum_address(gateway),
        )
        value = request_value(attestation.tokens_in, attestation.tokens_out, offer)
        expected[key] = expected.get(key, 0) + value
    receipts.flush()
    totals = {(t.payer, t.gateway): t.value_wei for t in receipts.totals()}
    assert totals == expected
    pair = (to_checksum_address(PAYER), to_checksum_address(GATEWAY))
    assert receipts.total(PAYER, GATEWAY) == expected[pair] > 0
    logged = {r.request_id: r for r in receipts.responses()}
    for request_id, attestation in sent:
        row = logged[request_id]
        assert row.request_hash == attestation.request_hash
        assert (row.tokens_in, row.tokens_out) == (attestation.tokens_in, attestation.tokens_out)
        assert row.model_id == tiny_engine.model_id
        assert row.value_wei == request_value(row.tokens_in, row.tokens_out, offer)
    assert logged["log-3"].payer is None and logged["log-3"].gateway is None


def test_bad_payer_header_is_a_400(
    attesting_miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    status, _, answer = _send(
        attesting_miner, _body(tiny_engine), "bad-payer", **{PAYER_HEADER: "alice"}
    )
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_header"


def test_the_guard_survives_a_restart_through_the_log(
    tiny_engine: TransformersEngine, attestor: Attestor, tmp_path: Path
) -> None:
    raw = _body(tiny_engine)
    path = tmp_path / "restart.db"
    offer = offer_for(tiny_engine)
    with ReceiptLog(path) as log:
        app = create_miner_app(
            tiny_engine, node_address=OWNER, attestor=attestor, receipt_log=log, offer=offer
        )
        with MinerServerThread(app) as server:
            assert _send(server, raw, "r-1")[0] == 200
    with ReceiptLog(path) as log:
        # remembered=1: the second answer pushes the first out of memory; the log remembers.
        app = create_miner_app(
            tiny_engine,
            node_address=OWNER,
            attestor=attestor,
            receipt_log=log,
            offer=offer,
            remembered=1,
        )
        with MinerServerThread(app) as server:
            assert _send(server, raw, "r-1")[0] == 409
            assert _send(server, raw, "r-2")[0] == 200
            assert _send(server, raw, "r-3")[0] == 200
            log.flush()
            assert _send(server, raw, "r-2")[0] == 409
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            conn.request("GET", "/health")
            assert json.loads(conn.getresponse().read())["signer"] == attestor.signer_address
            conn.close()


class _FailsOnce:
    """The real engine, except that its first generation fails after one token."""

    def __init__(self, engine: TransformersEngine) -> None:
        self._engine = engine
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
        for token in self._engine.generate(prompt_ids, params):
            if not self.failed:
                self.failed = True
                raise RuntimeError("GPU fell off the bus")
            yield token


def test_a_failed_generation_frees_its_request_hash(
    tiny_engine: TransformersEngine, attestor: Attestor
) -> None:
    app = create_miner_app(_FailsOnce(tiny_engine), node_address=OWNER, attestor=attestor)
    raw = _body(tiny_engine)
    with MinerServerThread(app) as server:
        status, _, answer = _send(server, raw, "retry-me")
        assert status == 500
        # Nothing was signed, so serving the retry cannot conflict with anything.
        status, _, answer = _send(server, raw, "retry-me")
        assert status == 200
        assert ATTESTATION_KEY in json.loads(answer)[EXTENSION_KEY]
        assert _send(server, raw, "retry-me")[0] == 409
    assert app.state.miner.settlement.guard.in_flight == 0


def test_guard_reservations() -> None:
    seen = {keccak(text="old")}
    guard = AttestedRequests(durable=seen.__contains__, remembered=2)
    a, b, c = (keccak(text=x) for x in "abc")
    assert guard.reserve(a)
    assert not guard.reserve(a)  # a concurrent twin while the first is generating
    guard.release(a)
    assert guard.reserve(a)
    guard.signed(a)
    assert not guard.reserve(a)
    assert not guard.reserve(keccak(text="old"))  # only the durable record knows it
    for h in (b, c):
        assert guard.reserve(h)
        guard.signed(h)
    assert a not in guard  # pushed out of memory (and not in the durable set here)
    assert guard.in_flight == 0

    def broken(_: bytes) -> bool:
        raise OSError("disk gone")

    failing = AttestedRequests(durable=broken)
    with pytest.raises(OSError):
        failing.reserve(a)
    assert failing.in_flight == 0


def test_settlement_arguments_are_checked(
    tiny_engine: TransformersEngine, attestor: Attestor, receipts: ReceiptLog
) -> None:
    with pytest.raises(ValueError, match="attestor"):
        create_miner_app(tiny_engine, node_address=OWNER, receipt_log=receipts)
    with pytest.raises(ValueError, match="ModelOffer"):
        create_miner_app(tiny_engine, node_address=OWNER, attestor=attestor, receipt_log=receipts)
    wrong = ModelOffer(tiny_engine.name, "0x" + "00" * 32, 1, 1)
    with pytest.raises(ValueError, match="offer"):
        create_miner_app(
            tiny_engine, node_address=OWNER, attestor=attestor, receipt_log=receipts, offer=wrong
        )
