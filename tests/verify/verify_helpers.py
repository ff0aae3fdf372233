"""Shared parts of the verifier tests (a uniquely named module: test folders have no
__init__.py): a network of real contracts on the embedded EVM (settle.deploy.deploy_network with
DEVNET_PARAMS), a real miner server attesting with its registered signer key, a gateway signer
that receipts its answers, and jobs built from what the miner actually sent, as a gateway
builds them (app.audits).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infergrid.compute.attacks import SubstitutedEngine
from infergrid.compute.attestation import Attestor
from infergrid.compute.miner_server import MinerServerThread, create_miner_app
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.merkle import merkle_root
from infergrid.protocol.messages import Attestation, Receipt, Voucher, sign_message, signed_json
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, Role
from infergrid.protocol.pricing import request_value
from infergrid.protocol.wire import EXTENSION_KEY, GATEWAY_HEADER, PAYER_HEADER, REQUEST_ID_HEADER
from infergrid.settle.chain import Chain, as_account, dev_private_keys
from infergrid.settle.deploy import deploy_network
from infergrid.settle.disputes import DisputeManager
from infergrid.settle.escrow import PaymentEscrow
from infergrid.settle.profiles import DEVNET_PARAMS
from infergrid.settle.registry import Registry

P = DEVNET_PARAMS
KEYS = dev_private_keys(10)
ADDRS = [as_account(k).address for k in KEYS]
DEPLOYER, GATEWAY, MINER, PAYER, V1, V2, V3, TREASURY, OTHER, SPARE = range(10)
GATEWAY_SIGNER = Signer(KEYS[GATEWAY])
MINER_SIGNER = Signer("0x" + "42" * 32)  # the miner's registered signer, apart from its owner
MINER_STAKE = 100 * WEI_PER_BTT
PAYER_DEPOSIT = 10 * WEI_PER_BTT
# Miner prices high enough that a refund is visible next to gas.
PRICE_IN, PRICE_OUT = 10**15, 2 * 10**15
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


def substituted_engine(claimed: TransformersEngine, actual: TransformersEngine) -> Any:
    """A cheating miner's engine (red team, compute.attacks): `claimed`'s identity, tokenizer
    and prompts, `actual`'s tokens."""
    return SubstitutedEngine(claimed, actual)


@dataclass
class Net:
    chain: Chain
    registry: Registry
    escrow: PaymentEscrow
    disputes: DisputeManager
    domain: Domain
    billed: int = 0  # what the payer's vouchers to the miner collected so far


def deploy(chain: Chain, engine: TransformersEngine) -> Net:
    """Fresh contracts: a registered gateway (its dev key signs receipts), a miner staking
    MINER_STAKE whose signer is MINER_SIGNER, offering `engine`'s model, and a payer with
    PAYER_DEPOSIT in the escrow that authorized the gateway."""
    contracts = deploy_network(chain, KEYS[DEPLOYER], P, treasury=ADDRS[TREASURY])
    registry = Registry(chain, contracts.NodeRegistry)
    escrow = PaymentEscrow(chain, contracts.PaymentEscrow)
    net = Net(
        chain, registry, escrow, DisputeManager(chain, contracts.DisputeManager), escrow.domain()
    )
    registry.register(
        KEYS[GATEWAY],
        Role.GATEWAY,
        "http://gateway",
        GATEWAY_SIGNER.address,
        [],
        P.min_stake_gateway_wei,
    )
    registry.register(
        KEYS[MINER], Role.MINER, "http://miner", MINER_SIGNER.address, [offer(engine)], MINER_STAKE
    )
    escrow.deposit(KEYS[PAYER], PAYER_DEPOSIT)
    escrow.authorize_signer(KEYS[PAYER], GATEWAY_SIGNER.address)
    return net


def offer(engine: Any) -> ModelOffer:
    return ModelOffer(engine.name, engine.model_id, PRICE_IN, PRICE_OUT)


def add_verifier(
    net: Net,
    index: int,
    endpoint: str = "http://verifier",
    engines: Sequence[Any] = (),
    stake: int | None = None,
) -> None:
    """Register dev account `index` as a verifier auditing `engines` (zero-price offers, as
    verify.node registers one)."""
    net.registry.register(
        KEYS[index],
        Role.VERIFIER,
        endpoint,
        ADDRS[index],
        [ModelOffer(e.name, e.model_id, 0, 0) for e in engines],
        P.min_stake_verifier_wei if stake is None else stake,
    )


@contextlib.contextmanager
def attesting_miner(engine: Any, domain: Domain) -> Iterator[MinerServerThread]:
    """The real miner server over `engine`, attesting as ADDRS[MINER] with MINER_SIGNER."""
    app = create_miner_app(
        engine, node_address=ADDRS[MINER], attestor=Attestor(domain, MINER_SIGNER, ADDRS[MINER])
    )
    with MinerServerThread(app) as server:
        yield server


def post(
    url: str, raw: bytes, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=raw, method="POST", headers=dict(headers or {}))
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def served_job(
    miner: MinerServerThread,
    net: Net,
    *,
    model: str,
    request_id: str | None = None,
    messages: Sequence[Mapping[str, str]] = QUESTION,
    max_tokens: int = 8,
    temperature: float = 0.0,
    seed: int | None = None,
    collect: bool = True,
    payer: int = PAYER,
) -> AuditJob:
    """One request answered by `miner` as a gateway forwards it, receipted by GATEWAY_SIGNER at
    the miner's prices and (with `collect`) paid through the escrow by a voucher; the job a
    gateway would send a verifier for it."""
    request_id = request_id or os.urandom(8).hex()
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if seed is not None:
        body["seed"] = seed
    raw = json.dumps(body).encode()
    status, _, answer = post(
        miner.url + "/v1/chat/completions",
        raw,
        {
            REQUEST_ID_HEADER: request_id,
            PAYER_HEADER: ADDRS[payer],
            GATEWAY_HEADER: GATEWAY_SIGNER.address,
        },
    )
    assert status == 200, answer
    data = json.loads(answer)
    ext = data[EXTENSION_KEY]
    signed_attestation = ext["attestation"]
    attestation = Attestation.from_json(signed_attestation)
    value = request_value(
        attestation.tokens_in,
        attestation.tokens_out,
        ModelOffer("m", "0x" + "00" * 32, PRICE_IN, PRICE_OUT),
    )
    receipt = Receipt(
        request_hash=attestation.request_hash,
        payer=ADDRS[payer],
        miner=ADDRS[MINER],
        gateway=GATEWAY_SIGNER.address,
        model_id=attestation.model_id,
        tokens_in=attestation.tokens_in,
        tokens_out=attestation.tokens_out,
        value=value,
        timestamp=net.chain.timestamp(),
        attestation_hash=attestation.struct_hash(),
    )
    if collect:
        net.billed += value
        voucher = Voucher(
            ADDRS[payer],
            ADDRS[MINER],
            GATEWAY_SIGNER.address,
            net.billed,
            receipt.timestamp,
            merkle_root([receipt.struct_hash()]),
        )
        net.escrow.collect(KEYS[MINER], voucher, sign_message(net.domain, voucher, GATEWAY_SIGNER))
    choice = data["choices"][0]
    return AuditJob(
        request_id=request_id,
        endpoint="chat",
        body=raw,
        miner=ADDRS[MINER],
        model=model,
        prompt_token_ids=tuple(ext["prompt_token_ids"]),
        output_token_ids=tuple(ext["output_token_ids"]),
        output_logprobs=tuple(ext["output_logprobs"]),
        text=choice["message"]["content"] or "",
        finish_reason=choice["finish_reason"],
        usage={
            "prompt_tokens": data["usage"]["prompt_tokens"],
            "completion_tokens": data["usage"]["completion_tokens"],
        },
        attestation=signed_attestation,
        receipt=signed_json(receipt, sign_message(net.domain, receipt, GATEWAY_SIGNER)),
    )
