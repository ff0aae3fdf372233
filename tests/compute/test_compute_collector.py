"""Voucher collection: the pure checks, and real collection from a deployed PaymentEscrow on
the embedded EVM, with vouchers signed in-test by a gateway key whose signer a payer
authorized, served over HTTP the way a gateway serves GET /v1/vouchers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from compute_helpers import CHAT, post
from eth_utils import keccak

from infergrid.compute.attestation import Attestor
from infergrid.compute.collector import (
    CollectionLoop,
    Collector,
    MalformedVoucher,
    SignedVoucher,
    VoucherResult,
    collect_now,
    compare_with_log,
    parse_vouchers,
)
from infergrid.compute.miner_server import MinerServerThread, create_miner_app, iter_sse
from infergrid.compute.node import MinerSettings, miner_settlement
from infergrid.compute.receipt_log import LoggedResponse, ReceiptLog
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import Attestation, Receipt, Voucher, sign_message
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.pricing import request_value, split_payment
from infergrid.protocol.wire import (
    ATTESTATION_KEY,
    EXTENSION_KEY,
    GATEWAY_HEADER,
    PAYER_HEADER,
    REQUEST_ID_HEADER,
)
from infergrid.settle.anvil import free_port
from infergrid.settle.chain import Chain, EmbeddedEVM, as_account, dev_private_keys
from infergrid.settle.escrow import PaymentEscrow, deploy_escrow
from infergrid.settle.registry import Registry, deploy_registry
from infergrid.settle.rpc_server import EmbeddedChainServer
from infergrid.verify.voucher import check_voucher

KEYS = dev_private_keys(6)
DEPLOYER, TREASURY, POOL, MINER, PAYER, GATEWAY_OWNER = range(6)
ADDR = [as_account(k).address for k in KEYS]
GATEWAY_SIGNER = Signer("0x" + "6b" * 32)  # signs vouchers; needs no funds
PROTOCOL_PPM, POOL_PPM = 50_000, 20_000
PRICE_IN, PRICE_OUT = 10**12, 3 * 10**12


# --- a gateway's voucher endpoint, answered from in-test data -------------------------------


class GatewayStub:
    """GET /v1/vouchers?miner= → whatever `answer(miner)` returns, over real HTTP."""

    def __init__(self) -> None:
        self.answer: Callable[[str], Any] = lambda miner: {"gateway": "0x", "vouchers": []}
        self.asked: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path != "/v1/vouchers":
                    self.send_error(404)
                    return
                miner = parse_qs(url.query)["miner"][0]
                stub.asked.append(miner)
                raw = json.dumps(stub.answer(miner)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GatewayStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve(self, *entries: dict[str, Any], signer: str | None = None) -> None:
        body = {"gateway": signer or GATEWAY_SIGNER.address, "vouchers": list(entries)}
        self.answer = lambda miner: body


def signed_voucher(
    domain: Domain,
    value: int,
    *,
    miner: str = ADDR[MINER],
    payer: str = ADDR[PAYER],
    gateway: str | None = None,
    by: Signer = GATEWAY_SIGNER,
    receipts: list[Receipt] | None = None,
) -> dict[str, Any]:
    leaves = [r.struct_hash() for r in receipts or []]
    voucher = Voucher(
        payer=payer,
        miner=miner,
        gateway=gateway or by.address,
        value_aggregate=value,
        timestamp=int(time.time()),
        receipts_root=merkle_root(leaves) if leaves else keccak(text=f"root {value}"),
    )
    signature = sign_message(domain, voucher, by)
    return {
        "voucher": voucher.to_json(),
        "signature": "0x" + signature.hex(),
        "receipt_count": len(leaves),
    }


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# --- the pure checks ------------------------------------------------------------------------


DOMAIN = Domain(1337, "0x" + "e5" * 20)


def _entry(data: dict[str, Any]) -> SignedVoucher:
    parsed = parse_vouchers("http://gw", {"gateway": GATEWAY_SIGNER.address, "vouchers": [data]})
    entry = parsed.entries[0]
    assert isinstance(entry, SignedVoucher)
    return entry


def _check(entry: SignedVoucher, *, advertised: str | None = None) -> str | None:
    return check_voucher(
        DOMAIN,
        entry,
        advertised_signer=advertised or GATEWAY_SIGNER.address,
        miner=ADDR[MINER],
    )


def test_check_accepts_an_honest_voucher() -> None:
    entry = _entry(signed_voucher(DOMAIN, 1000))
    assert _check(entry) is None
    assert entry.receipt_count == 0


def test_check_flags_a_forged_signature() -> None:
    forger = Signer("0x" + "99" * 32)
    forged = _entry(signed_voucher(DOMAIN, 1000, gateway=GATEWAY_SIGNER.address, by=forger))
    reason = _check(forged)
    assert reason is not None and f"signature is by {forger.address}" in reason
    # Signed in another deployment's domain: recovers to some unrelated address.
    other = _entry(signed_voucher(Domain(199, DOMAIN.verifying_contract), 1000))
    assert _check(other) is not None
    garbage = _entry({**signed_voucher(DOMAIN, 1000), "signature": "0x" + "00" * 65})
    assert (_check(garbage) or "").startswith("bad signature")


def test_check_flags_the_wrong_miner_and_an_unadvertised_signer() -> None:
    entry = _entry(signed_voucher(DOMAIN, 1000, miner=ADDR[PAYER]))
    assert f"voucher is for miner {ADDR[PAYER]}" in (_check(entry) or "")
    # Validly signed, but not by the signer the gateway says it uses.
    rogue = Signer("0x" + "77" * 32)
    unadvertised = _entry(signed_voucher(DOMAIN, 1000, by=rogue))
    assert "advertised signer" in (_check(unadvertised) or "")
    assert _check(unadvertised, advertised=rogue.address) is None


def test_compare_with_log() -> None:
    assert compare_with_log(100, 100) == ("match", 0)
    assert compare_with_log(90, 100) == ("shortfall", -10)  # the gateway says less
    assert compare_with_log(130, 100) == ("surplus", 30)


def test_parse_reports_malformed_entries_and_refuses_garbage() -> None:
    good = signed_voucher(DOMAIN, 5)
    listing = parse_vouchers(
        "http://gw",
        {
            "gateway": GATEWAY_SIGNER.address.lower(),
            "vouchers": [good, {"voucher": {"payer": "x"}}, 7, {**good, "signature": 5}],
        },
    )
    assert listing.signer == GATEWAY_SIGNER.address
    kinds = [type(e).__name__ for e in listing.entries]
    assert kinds == ["SignedVoucher", "MalformedVoucher", "MalformedVoucher", "MalformedVoucher"]
    for bad in ([], {"gateway": "nobody", "vouchers": []}, {"gateway": ADDR[0]}):
        with pytest.raises(ValueError):
            parse_vouchers("http://gw", bad)


def _malformed_reason(entry: dict[str, Any]) -> str:
    """Why the collector refuses this entry (it must: an entry that parses is submittable)."""
    listing = parse_vouchers("http://gw", {"gateway": GATEWAY_SIGNER.address, "vouchers": [entry]})
    [parsed] = listing.entries
    assert isinstance(parsed, MalformedVoucher), parsed
    return parsed.error


def test_parse_refuses_a_voucher_without_receipt_count() -> None:
    """Attack: a gateway leaves receipt_count out; the old parser reported None instead of
    refusing what the gateway's own parser refuses."""
    entry = signed_voucher(DOMAIN, 5)
    del entry["receipt_count"]
    assert "'receipt_count' is missing" in _malformed_reason(entry)


@pytest.mark.parametrize("count", [-1, -(2**70), 2.5, "3", None])
def test_parse_refuses_a_negative_or_non_integer_receipt_count(count: object) -> None:
    """Attack: a negative count (which the old parser took) or a non-integer one."""
    entry = {**signed_voucher(DOMAIN, 5), "receipt_count": count}
    assert "'receipt_count' must be a non-negative integer" in _malformed_reason(entry)


@pytest.mark.parametrize("length", [0, 1, 64, 66, 200])
def test_parse_refuses_a_signature_that_is_not_65_bytes(length: int) -> None:
    """Attack: a signature of the wrong length; the old parser took any and left it to the
    signature check, so the entry looked like a voucher with a bad signature."""
    entry = {**signed_voucher(DOMAIN, 5), "signature": "0x" + "1b" * length}
    assert f"must be 65 bytes, got {length}" in _malformed_reason(entry)


def test_parse_refuses_a_signature_without_0x() -> None:
    good = signed_voucher(DOMAIN, 5)
    entry = {**good, "signature": good["signature"][2:]}
    assert "'signature' must be a 0x-hex string" in _malformed_reason(entry)


# --- against a real escrow ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(EmbeddedEVM(accounts=len(KEYS)))


def _funded_escrow(chain: Chain) -> PaymentEscrow:
    address = deploy_escrow(
        chain,
        KEYS[DEPLOYER],
        treasury=ADDR[TREASURY],
        verifier_pool=ADDR[POOL],
        protocol_fee_ppm=PROTOCOL_PPM,
        verifier_pool_ppm=POOL_PPM,
        thaw_period_s=3600,
        fee_delay_s=3601,
    )
    escrow = PaymentEscrow(chain, address)
    escrow.deposit(KEYS[PAYER], 10 * WEI_PER_BTT)
    escrow.authorize_signer(KEYS[PAYER], GATEWAY_SIGNER.address)
    return escrow


@pytest.fixture
def escrow(chain: Chain) -> PaymentEscrow:
    return _funded_escrow(chain)


@pytest.fixture
def gateway() -> Iterator[GatewayStub]:
    with GatewayStub() as stub:
        yield stub


def _gas_cost(chain: Chain, result: VoucherResult) -> int:
    assert result.tx_hash is not None and result.gas_used is not None
    return result.gas_used * int(chain.w3.eth.get_transaction(result.tx_hash)["gasPrice"])


class _GatewayBook:
    """What the gateway side does with the miner's attestations: receipts at the miner's
    registered prices, summed into a cumulative voucher (signed in-test)."""

    def __init__(self, domain: Domain, offer: ModelOffer) -> None:
        self.domain = domain
        self.offer = offer
        self.receipts: list[Receipt] = []

    def accept(self, signed: dict[str, Any]) -> None:
        attestation = Attestation.from_json(signed)
        self.receipts.append(
            Receipt(
                request_hash=attestation.request_hash,
                payer=ADDR[PAYER],
                miner=attestation.miner,
                gateway=GATEWAY_SIGNER.address,
                model_id=attestation.model_id,
                tokens_in=attestation.tokens_in,
                tokens_out=attestation.tokens_out,
                value=request_value(attestation.tokens_in, attestation.tokens_out, self.offer),
                timestamp=int(time.time()),
                attestation_hash=attestation.struct_hash(),
            )
        )

    @property
    def value(self) -> int:
        return sum(r.value for r in self.receipts)

    def voucher(self, value: int | None = None) -> dict[str, Any]:
        return signed_voucher(
            self.domain, self.value if value is None else value, receipts=self.receipts
        )


def _serve_requests(
    server: MinerServerThread, engine: TransformersEngine, book: _GatewayBook, first: int, n: int
) -> None:
    headers = {PAYER_HEADER: ADDR[PAYER], GATEWAY_HEADER: GATEWAY_SIGNER.address}
    for i in range(first, first + n):
        stream = i % 2 == 1
        body = {"model": engine.name, "messages": CHAT, "max_tokens": 6, "seed": i}
        status, _, answer = post(
            server.host,
            server.port,
            "/v1/chat/completions",
            json.dumps({**body, "stream": stream}).encode(),
            {**headers, REQUEST_ID_HEADER: f"pay-{i}"},
        )
        assert status == 200
        if stream:
            signed = list(iter_sse(answer.split(b"\n")))[-1][EXTENSION_KEY][ATTESTATION_KEY]
        else:
            signed = json.loads(answer)[EXTENSION_KEY][ATTESTATION_KEY]
        book.accept(signed)


def test_full_collection_pays_the_miner_its_share_once(
    chain: Chain,
    escrow: PaymentEscrow,
    gateway: GatewayStub,
    tiny_engine: TransformersEngine,
    tmp_path: Path,
) -> None:
    miner = ADDR[MINER]
    offer = ModelOffer(tiny_engine.name, tiny_engine.model_id, PRICE_IN, PRICE_OUT)
    attestor = Attestor(escrow.domain(), Signer(KEYS[MINER]), miner)
    book = _GatewayBook(escrow.domain(), offer)
    with ReceiptLog(tmp_path / "receipts.db") as receipts:
        app = create_miner_app(
            tiny_engine, node_address=miner, attestor=attestor, receipt_log=receipts, offer=offer
        )
        collector = Collector(escrow, KEYS[MINER], receipts, gateway_urls=[gateway.url])
        with MinerServerThread(app) as server:
            _serve_requests(server, tiny_engine, book, 0, 3)
            value = book.value
            gateway.serve(book.voucher())

            before = chain.balance(miner)
            [result] = collector.run_once()
            assert gateway.asked == [miner]
            assert result.status == "collected", result
            assert (result.payer, result.gateway) == (ADDR[PAYER], GATEWAY_SIGNER.address)
            assert result.voucher_value_wei == value
            assert result.receipt_count == 3
            assert result.own_total_wei == value  # the miner's log agrees with the gateway
            assert result.discrepancy == "match" and result.difference_wei == 0
            assert result.collected_before_wei == 0
            split = split_payment(value, PROTOCOL_PPM, POOL_PPM)
            assert (result.paid_wei, result.miner_wei) == (value, split.miner)
            assert (result.protocol_fee_wei, result.verifier_fee_wei) == (
                split.protocol,
                split.verifier_pool,
            )
            assert chain.balance(miner) - before == split.miner - _gas_cost(chain, result)
            assert escrow.collected(ADDR[PAYER], GATEWAY_SIGNER.address, miner) == value
            assert json.loads(json.dumps(result.to_json()))["status"] == "collected"

            # Nothing new: no transaction, no gas.
            before = chain.balance(miner)
            [again] = collector.run_once()
            assert again.status == "nothing_new"
            assert again.collected_before_wei == value and again.paid_wei == 0
            assert again.tx_hash is None
            assert chain.balance(miner) == before

            # More traffic; the gateway vouches for less than the miner logged: the miner
            # still collects what is new and reports the shortfall.
            _serve_requests(server, tiny_engine, book, 3, 2)
            short = book.value - 5
            gateway.serve(book.voucher(short))
            [third] = collector.run_once()
            assert third.status == "collected"
            assert third.discrepancy == "shortfall" and third.difference_wei == -5
            assert third.own_total_wei == book.value
            assert third.collected_before_wei == value
            assert third.paid_wei == short - value
            assert "shortfall" in third.summary()


def test_bad_vouchers_are_rejected_and_a_down_gateway_is_reported(
    chain: Chain, escrow: PaymentEscrow, gateway: GatewayStub, tmp_path: Path
) -> None:
    domain = escrow.domain()
    forger = Signer("0x" + "99" * 32)
    gateway.serve(
        signed_voucher(domain, 10**15, gateway=GATEWAY_SIGNER.address, by=forger),
        signed_voucher(domain, 10**15, miner=ADDR[PAYER]),
        {"voucher": {"payer": ADDR[PAYER]}, "signature": "0x00"},
    )
    down = down_url()
    with ReceiptLog(tmp_path / "r.db") as receipts:
        collector = Collector(
            escrow, KEYS[MINER], receipts, gateway_urls=[down, gateway.url], http_timeout_s=2
        )
        before = chain.balance(ADDR[MINER])
        results = collector.run_once()
    statuses = [r.status for r in results]
    assert statuses[0].startswith("failed: gateway unreachable"), statuses
    assert results[0].gateway_url == down
    assert statuses[1].startswith("rejected: signature is by " + forger.address)
    assert statuses[2].startswith("rejected: voucher is for miner")
    assert statuses[3].startswith("rejected: malformed voucher")
    assert all(r.paid_wei == 0 and r.tx_hash is None for r in results)
    assert chain.balance(ADDR[MINER]) == before
    assert escrow.collected(ADDR[PAYER], GATEWAY_SIGNER.address, ADDR[MINER]) == 0


def test_a_surplus_is_reported_and_an_unauthorized_gateway_fails(
    chain: Chain, escrow: PaymentEscrow, gateway: GatewayStub
) -> None:
    stranger = Signer("0x" + "42" * 32)  # the payer never authorized this signer
    gateway.serve(signed_voucher(escrow.domain(), 10**15, by=stranger), signer=stranger.address)
    [unauthorized] = Collector(escrow, KEYS[MINER], None, gateway_urls=[gateway.url]).run_once()
    assert unauthorized.status == "failed: gateway not authorized"
    assert unauthorized.own_total_wei is None  # no log: nothing to compare with

    gateway.serve(signed_voucher(escrow.domain(), 10**15))
    [surplus] = Collector(
        escrow, KEYS[MINER], None, gateway_urls=[gateway.url]
    ).run_once()  # without a log the voucher is still collected
    assert surplus.status == "collected"


def test_collection_loop_runs_on_schedule_and_survives_failures(escrow: PaymentEscrow) -> None:
    collector = Collector(escrow, KEYS[MINER], None, gateway_urls=[down_url()], http_timeout_s=1)
    seen: list[list[VoucherResult]] = []
    with CollectionLoop(collector, 0.05, seen.append) as loop:
        deadline = time.monotonic() + 10
        while loop.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert loop.runs >= 2
    assert seen[0][0].status.startswith("failed: gateway unreachable")
    with pytest.raises(ValueError):
        CollectionLoop(collector, 0)


def test_collect_now_finds_gateways_in_the_registry(gateway: GatewayStub, tmp_path: Path) -> None:
    with EmbeddedChainServer(EmbeddedEVM(accounts=len(KEYS))) as rpc:
        chain = Chain.connect(rpc.url)
        escrow = _funded_escrow(chain)
        registry = Registry(
            chain,
            deploy_registry(
                chain,
                KEYS[DEPLOYER],
                {Role.MINER: WEI_PER_BTT, Role.VERIFIER: WEI_PER_BTT, Role.GATEWAY: WEI_PER_BTT},
                3600,
            ),
        )
        registry.register(
            KEYS[GATEWAY_OWNER], Role.GATEWAY, gateway.url, GATEWAY_SIGNER.address, [], WEI_PER_BTT
        )
        value = 7 * 10**15
        gateway.serve(signed_voucher(escrow.domain(), value))
        log_path = tmp_path / "miner.db"
        with ReceiptLog(log_path) as receipts:
            receipts.append(
                LoggedResponse(
                    "r1",
                    keccak(text="r1"),
                    ADDR[PAYER],
                    GATEWAY_SIGNER.address,
                    "0x" + "ab" * 32,
                    100,
                    100,
                    value - 10**15,
                    time.time() - 5,
                )
            )

        [result] = collect_now(rpc.url, registry.address, escrow.address, KEYS[MINER], log_path)
        assert result.gateway_url == gateway.url
        assert result.status == "collected"
        assert result.discrepancy == "surplus" and result.difference_wei == 10**15
        assert result.miner_wei == split_payment(value, PROTOCOL_PPM, POOL_PPM).miner

        # A log that does not exist is not created; with explicit URLs the registry is not
        # asked, and a down gateway is a result, not an exception.
        missing = tmp_path / "nope.db"
        results = collect_now(
            rpc.url, registry.address, escrow.address, KEYS[MINER], missing, [down_url()]
        )
        assert [r.status.split(":")[0] for r in results] == ["failed"]
        assert not missing.exists()
        [again] = collect_now(rpc.url, registry.address, escrow.address, KEYS[MINER], None)
        assert again.status == "nothing_new"


def test_miner_settlement_attests_logs_and_collects_on_schedule(
    chain: Chain,
    escrow: PaymentEscrow,
    gateway: GatewayStub,
    tiny_engine: TransformersEngine,
    tmp_path: Path,
) -> None:
    registry = Registry(
        chain,
        deploy_registry(
            chain,
            KEYS[DEPLOYER],
            {Role.MINER: WEI_PER_BTT, Role.VERIFIER: WEI_PER_BTT, Role.GATEWAY: WEI_PER_BTT},
            3600,
        ),
    )
    settings = MinerSettings(
        chain_rpc="unused: the chain is passed in",
        registry=registry.address,
        private_key=KEYS[MINER],
        model="tiny",
        host="127.0.0.1",
        port=0,
        endpoint="http://127.0.0.1:1",
        stake_wei=WEI_PER_BTT,
        price_in_wei=PRICE_IN,
        price_out_wei=PRICE_OUT,
        escrow=escrow.address,
        collect_interval_s=0.05,
        gateway_urls=(gateway.url,),
        receipt_log=tmp_path / "node.db",
    )
    offer = ModelOffer(tiny_engine.name, tiny_engine.model_id, PRICE_IN, PRICE_OUT)
    book = _GatewayBook(escrow.domain(), offer)
    with miner_settlement(settings, chain, registry, offer) as settlement:
        assert settlement.attestor.miner == ADDR[MINER]
        assert settlement.attestor.domain == escrow.domain()
        assert settlement.loop is not None
        app = create_miner_app(
            tiny_engine,
            node_address=ADDR[MINER],
            attestor=settlement.attestor,
            receipt_log=settlement.receipts,
            offer=settlement.offer,
        )
        with MinerServerThread(app) as server:
            _serve_requests(server, tiny_engine, book, 0, 2)
        gateway.serve(book.voucher())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if escrow.collected(ADDR[PAYER], GATEWAY_SIGNER.address, ADDR[MINER]) == book.value:
                break
            time.sleep(0.05)
    assert escrow.collected(ADDR[PAYER], GATEWAY_SIGNER.address, ADDR[MINER]) == book.value
    assert settings.receipt_log is not None and settings.receipt_log.exists()
    with (
        pytest.raises(ValueError, match="escrow"),
        miner_settlement(
            MinerSettings(**{**settings.__dict__, "escrow": None}), chain, registry, offer
        ),
    ):
        pass
