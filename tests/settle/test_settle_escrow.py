"""PaymentEscrow on the embedded EVM: every operation, every reason it refuses, the vouchers it
must never pay (forged, replayed, malleable, from another domain), and the admin powers it
bounds (fees capped at 10 % and changed only after a delay longer than the thaw period, the
admin handed over in two steps)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode as abi_encode
from eth_keys import keys as eth_keys
from eth_utils import keccak, to_checksum_address
from web3.contract import Contract

from infergrid.protocol.eip712 import SECP256K1_N, Domain, Signer
from infergrid.protocol.messages import Voucher, sign_message
from infergrid.protocol.pricing import PPM, split_payment
from infergrid.settle.build import CONTRACTS_DIR, MODULES_DIR, load_artifact
from infergrid.settle.chain import Chain, ContractRevert, EmbeddedEVM
from infergrid.settle.escrow import (
    FEES_CHANGE,
    MAX_FEE_PPM,
    Collection,
    EscrowAccount,
    PaymentEscrow,
    PendingFees,
    deploy_escrow,
)

PROTOCOL_PPM = 20_000  # 2 %
POOL_PPM = 50_000  # 5 %
THAW = 3600
FEE_DELAY = 2 * THAW
YEAR = 365 * 86400
ADMIN, PAYER, OTHER_PAYER, SUBMITTER, TREASURY, POOL = 0, 1, 2, 3, 8, 9  # dev key indexes
ZERO_ADDRESS = "0x" + "00" * 20
ROOT = b"\x42" * 32

# Gateways sign and never send; miners only receive. Keys outside the dev set keep the
# miners' balances exactly what the escrow paid them.
GATEWAY = Signer("0x" + "21" * 32)
OTHER_GATEWAY = Signer("0x" + "22" * 32)
MINER = Signer("0x" + "31" * 32).address
OTHER_MINER = Signer("0x" + "32" * 32).address


def reason_of(excinfo: pytest.ExceptionInfo[ContractRevert]) -> str:
    return excinfo.value.reason


def deploy(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    *,
    protocol_ppm: int = PROTOCOL_PPM,
    pool_ppm: int = POOL_PPM,
    thaw: int = THAW,
    fee_delay: int = FEE_DELAY,
    treasury: str | None = None,
) -> PaymentEscrow:
    address = deploy_escrow(
        chain,
        keys[ADMIN],
        treasury=treasury or addrs[TREASURY],
        verifier_pool=addrs[POOL],
        protocol_fee_ppm=protocol_ppm,
        verifier_pool_ppm=pool_ppm,
        thaw_period_s=thaw,
        fee_delay_s=fee_delay,
    )
    return PaymentEscrow(chain, address)


@pytest.fixture
def escrow(chain: Chain, keys: list[str], addrs: list[str]) -> PaymentEscrow:
    return deploy(chain, keys, addrs)


@pytest.fixture
def funded(escrow: PaymentEscrow, keys: list[str]) -> PaymentEscrow:
    """An escrow where the payer deposited 10**6 wei and authorized GATEWAY."""
    escrow.deposit(keys[PAYER], 10**6)
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    return escrow


def voucher(
    payer: str,
    value: int,
    *,
    miner: str = MINER,
    gateway: str = GATEWAY.address,
    timestamp: int = 1,
) -> Voucher:
    return Voucher(payer, miner, gateway, value, timestamp, ROOT)


def sign(escrow: PaymentEscrow, v: Voucher, signer: Signer = GATEWAY) -> bytes:
    return sign_message(escrow.domain(), v, signer)


def rsv(signature: bytes) -> tuple[int, int, int]:
    return (
        int.from_bytes(signature[:32], "big"),
        int.from_bytes(signature[32:64], "big"),
        signature[64],
    )


def pack(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


def names(escrow: PaymentEscrow, receipt: Any) -> list[str]:
    return [e.name for e in escrow.events(receipt)]


def fees_hash(protocol_ppm: int, pool_ppm: int) -> bytes:
    """The change the escrow hands its fee timelock: keccak256(abi_encode(protocol, pool))."""
    return keccak(abi_encode(["uint256", "uint256"], [protocol_ppm, pool_ppm]))


def block_time(chain: Chain, receipt: Any) -> int:
    return int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def tx_fee(receipt: Any) -> int:
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def snapshot(escrow: PaymentEscrow, chain: Chain, payer: str) -> tuple[Any, ...]:
    """Everything a refused collect must leave unchanged."""
    return (
        escrow.account(payer),
        escrow.collected(payer, GATEWAY.address, MINER),
        escrow.gateway_collected(payer, GATEWAY.address),
        escrow.fees_owed(escrow.treasury()),
        escrow.fees_owed(escrow.verifier_pool()),
        chain.balance(escrow.address),
        chain.balance(MINER),
    )


# --- deployment and parameters ----------------------------------------------------------------


def test_deploy_sets_parameters(escrow: PaymentEscrow, chain: Chain, addrs: list[str]) -> None:
    assert escrow.admin() == addrs[ADMIN]
    assert escrow.treasury() == addrs[TREASURY]
    assert escrow.verifier_pool() == addrs[POOL]
    assert escrow.protocol_fee_ppm() == PROTOCOL_PPM
    assert escrow.verifier_pool_ppm() == POOL_PPM
    assert escrow.thaw_period() == THAW
    assert escrow.fee_delay() == FEE_DELAY
    assert escrow.max_fee_ppm() == MAX_FEE_PPM == 100_000
    assert escrow.pending_fees() is None
    assert escrow.pending_admin() is None
    assert escrow.domain() == Domain(chain.chain_id, escrow.address)
    assert escrow.account(addrs[PAYER]) == EscrowAccount(0, 0, 0)
    assert not escrow.is_authorized(addrs[PAYER], GATEWAY.address)


def test_domain_and_digest_match_the_protocol_code(escrow: PaymentEscrow, addrs: list[str]) -> None:
    functions = escrow.contract.functions
    assert escrow.chain.call(functions.domain_separator()) == escrow.domain().separator
    for v in (
        voucher(addrs[PAYER], 0, timestamp=0),
        voucher(addrs[PAYER], 12345, timestamp=1_700_000_000),
        Voucher(ZERO_ADDRESS, OTHER_MINER, OTHER_GATEWAY.address, 2**256 - 1, 2**64, b"\xff" * 32),
    ):
        digest = escrow.chain.call(functions.voucher_digest(v.as_tuple()))
        assert digest == escrow.domain().digest(v.struct_hash())


def test_separator_follows_the_chain_id_after_a_fork(keys: list[str], addrs: list[str]) -> None:
    # A private EVM whose chain id can be changed under a deployed contract, as a fork would.
    evm = EmbeddedEVM(accounts=10, chain_id=199)
    chain = Chain.embedded(evm)
    escrow = deploy(chain, keys, addrs)
    separator = escrow.contract.functions.domain_separator()
    assert chain.call(separator) == Domain(199, escrow.address).separator
    type(evm.tester.backend.chain).chain_id = 4242
    assert chain.call(separator) == Domain(4242, escrow.address).separator


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((ZERO_ADDRESS, "pool", 0, 0, 0, 1), "zero treasury"),
        (("treasury", ZERO_ADDRESS, 0, 0, 0, 1), "zero verifier pool"),
        (("treasury", "pool", 0, 0, YEAR + 1, YEAR + 2), "thaw period too long"),
        (("treasury", "pool", 0, 0, THAW, THAW), "fee delay must outlast the thaw period"),
        (("treasury", "pool", 0, 0, THAW, THAW - 1), "fee delay must outlast the thaw period"),
        (("treasury", "pool", 0, 0, 0, 0), "fee delay must outlast the thaw period"),
        (("treasury", "pool", 0, 0, 0, YEAR + 1), "timelock: delay too long"),
        # A year's thaw leaves no room for a longer fee delay.
        (("treasury", "pool", 0, 0, YEAR, YEAR + 1), "timelock: delay too long"),
    ],
)
def test_constructor_rejects_bad_parameters(
    chain: Chain, keys: list[str], addrs: list[str], args: tuple[Any, ...], reason: str
) -> None:
    stand_ins = {"treasury": addrs[TREASURY], "pool": addrs[POOL]}
    values = [stand_ins.get(a, a) if isinstance(a, str) else a for a in args]
    artifact = load_artifact("PaymentEscrow")
    with pytest.raises(ContractRevert) as exc:
        chain.deploy(keys[ADMIN], artifact.abi, artifact.bytecode, *values)
    assert reason_of(exc) == reason


def test_constructor_accepts_the_limits(chain: Chain, keys: list[str], addrs: list[str]) -> None:
    escrow = deploy(
        chain, keys, addrs, protocol_ppm=MAX_FEE_PPM, pool_ppm=0, thaw=YEAR - 1, fee_delay=YEAR
    )
    assert (escrow.protocol_fee_ppm(), escrow.thaw_period(), escrow.fee_delay()) == (
        MAX_FEE_PPM,
        YEAR - 1,
        YEAR,
    )
    escrow = deploy(chain, keys, addrs, protocol_ppm=0, pool_ppm=MAX_FEE_PPM, thaw=0, fee_delay=1)
    assert escrow.verifier_pool_ppm() == MAX_FEE_PPM
    assert (escrow.protocol_fee_ppm(), escrow.thaw_period(), escrow.fee_delay()) == (0, 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"treasury": "0x12"}, "treasury"),
        ({"verifier_pool": "nope"}, "verifier pool"),
        ({"protocol_fee_ppm": -1}, "protocol fee"),
        ({"verifier_pool_ppm": 1.5}, "verifier pool share"),
        ({"protocol_fee_ppm": 50_000, "verifier_pool_ppm": 50_001}, "more than 100,000"),
        ({"protocol_fee_ppm": MAX_FEE_PPM + 1}, r"more than 100,000 ppm \(10 %\)"),
        ({"thaw_period_s": -1}, "thaw period"),
        ({"thaw_period_s": YEAR + 1, "fee_delay_s": YEAR + 2}, "thaw period"),
        ({"thaw_period_s": True}, "thaw period"),
        ({"fee_delay_s": 0}, "fee delay must outlast the thaw period"),
        ({"thaw_period_s": 60, "fee_delay_s": 60}, "fee delay must outlast the thaw period"),
        ({"fee_delay_s": YEAR + 1}, "fee delay"),
        ({"fee_delay_s": 2.5}, "fee delay"),
    ],
)
def test_deploy_escrow_validates_in_python(
    chain: Chain, keys: list[str], addrs: list[str], kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {
        "treasury": addrs[TREASURY],
        "verifier_pool": addrs[POOL],
        "protocol_fee_ppm": 0,
        "verifier_pool_ppm": 0,
        "thaw_period_s": 0,
        "fee_delay_s": 1,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        deploy_escrow(chain, keys[ADMIN], **args)


def test_escrow_address_must_be_an_address(chain: Chain) -> None:
    with pytest.raises(ValueError, match="escrow address"):
        PaymentEscrow(chain, "0x1234")


# --- deposits ---------------------------------------------------------------------------------


def test_deposit_and_deposit_for(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    receipt = escrow.deposit(keys[PAYER], 700)
    events = escrow.events(receipt)
    assert [(e.name, e.args) for e in events] == [
        (
            "Deposited",
            {"payer": addrs[PAYER], "sender": addrs[PAYER], "amount": 700, "balance": 700},
        )
    ]
    receipt = escrow.deposit(keys[OTHER_PAYER], 300, payer=addrs[PAYER])
    assert escrow.events(receipt)[0].args == {
        "payer": addrs[PAYER],
        "sender": addrs[OTHER_PAYER],
        "amount": 300,
        "balance": 1000,
    }
    assert escrow.account(addrs[PAYER]) == EscrowAccount(1000, 0, 0)
    assert escrow.account(addrs[OTHER_PAYER]) == EscrowAccount(0, 0, 0)
    assert chain.balance(escrow.address) == 1000


def test_deposit_refusals(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        escrow.deposit(keys[PAYER], 0)
    assert reason_of(exc) == "zero deposit"
    with pytest.raises(ContractRevert) as exc:
        escrow.deposit(keys[PAYER], 0, payer=addrs[OTHER_PAYER])
    assert reason_of(exc) == "zero deposit"
    with pytest.raises(ContractRevert) as exc:
        escrow.deposit(keys[PAYER], 5, payer=ZERO_ADDRESS)
    assert reason_of(exc) == "zero payer"
    # Plain transfers are refused: every wei held must belong to an account.
    with pytest.raises(ContractRevert):
        chain.transact(keys[PAYER], escrow.address, b"", value=5)
    assert chain.balance(escrow.address) == 0


# --- thawing and withdrawal -------------------------------------------------------------------


def test_thaw_withdraw_after_the_delay(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    escrow.deposit(keys[PAYER], 1000)
    receipt = escrow.thaw(keys[PAYER], 400)
    started = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("ThawStarted", {"payer": addrs[PAYER], "amount": 400, "thaw_end": started + THAW})
    ]
    account = escrow.account(addrs[PAYER])
    assert account == EscrowAccount(1000, 400, started + THAW)
    assert account.available_wei == 600

    chain.increase_time(THAW - 120)
    with pytest.raises(ContractRevert) as exc:
        escrow.withdraw(keys[PAYER])
    assert reason_of(exc) == "thaw not matured"

    chain.increase_time(120)
    before = chain.balance(addrs[PAYER])
    receipt = escrow.withdraw(keys[PAYER])
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("Withdrawn", {"payer": addrs[PAYER], "amount": 400})
    ]
    assert chain.balance(addrs[PAYER]) == before + 400 - tx_fee(receipt)
    assert escrow.account(addrs[PAYER]) == EscrowAccount(600, 0, 0)
    assert chain.balance(escrow.address) == 600
    with pytest.raises(ContractRevert) as exc:
        escrow.withdraw(keys[PAYER])
    assert reason_of(exc) == "nothing thawing"


def test_thaw_refusals_and_replacement(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        escrow.thaw(keys[PAYER], 1)
    assert reason_of(exc) == "amount exceeds balance"
    escrow.deposit(keys[PAYER], 1000)
    with pytest.raises(ContractRevert) as exc:
        escrow.thaw(keys[PAYER], 0)
    assert reason_of(exc) == "zero amount"
    with pytest.raises(ContractRevert) as exc:
        escrow.thaw(keys[PAYER], 1001)
    assert reason_of(exc) == "amount exceeds balance"

    escrow.thaw(keys[PAYER], 1000)
    chain.increase_time(THAW - 600)
    # A new thaw replaces the old one, amount and clock both.
    receipt = escrow.thaw(keys[PAYER], 250)
    started = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert escrow.account(addrs[PAYER]) == EscrowAccount(1000, 250, started + THAW)
    chain.increase_time(THAW // 2)
    with pytest.raises(ContractRevert, match="thaw not matured"):
        escrow.withdraw(keys[PAYER])
    chain.increase_time(THAW)
    escrow.withdraw(keys[PAYER])
    assert escrow.account(addrs[PAYER]) == EscrowAccount(750, 0, 0)


def test_cancel_thaw(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        escrow.cancel_thaw(keys[PAYER])
    assert reason_of(exc) == "nothing thawing"
    escrow.deposit(keys[PAYER], 1000)
    escrow.thaw(keys[PAYER], 300)
    receipt = escrow.cancel_thaw(keys[PAYER])
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("ThawCancelled", {"payer": addrs[PAYER], "amount": 300})
    ]
    assert escrow.account(addrs[PAYER]) == EscrowAccount(1000, 0, 0)
    chain.increase_time(THAW)
    with pytest.raises(ContractRevert, match="nothing thawing"):
        escrow.withdraw(keys[PAYER])


def test_thawing_funds_stay_collectable(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    payer = addrs[PAYER]
    funded.thaw(keys[PAYER], 900_000)
    chain.increase_time(THAW)
    # The matured thaw is still in the balance: a voucher takes from it first come, first
    # served, and the thaw shrinks to what is left.
    v = voucher(payer, 400_000)
    funded.collect(keys[SUBMITTER], v, sign(funded, v))
    assert funded.account(payer).balance_wei == 600_000
    assert funded.account(payer).thawing_wei == 600_000
    receipt = funded.withdraw(keys[PAYER])
    assert funded.events(receipt)[0].args["amount"] == 600_000
    assert funded.account(payer) == EscrowAccount(0, 0, 0)


def test_collect_below_the_thaw_leaves_it_alone(
    funded: PaymentEscrow, keys: list[str], addrs: list[str]
) -> None:
    funded.thaw(keys[PAYER], 100_000)
    before = funded.account(addrs[PAYER])
    v = voucher(addrs[PAYER], 50_000)
    funded.collect(keys[SUBMITTER], v, sign(funded, v))
    assert funded.account(addrs[PAYER]) == EscrowAccount(950_000, 100_000, before.thaw_end)


def test_zero_thaw_period_withdraws_at_once(
    chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    escrow = deploy(chain, keys, addrs, thaw=0)
    escrow.deposit(keys[PAYER], 10)
    escrow.thaw(keys[PAYER], 10)
    escrow.withdraw(keys[PAYER])
    assert escrow.account(addrs[PAYER]) == EscrowAccount(0, 0, 0)


# --- signers ----------------------------------------------------------------------------------


def test_authorize_and_revoke_with_delay(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    payer, signer = addrs[PAYER], GATEWAY.address
    receipt = escrow.authorize_signer(keys[PAYER], signer)
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("SignerAuthorized", {"payer": payer, "signer": signer})
    ]
    assert escrow.is_authorized(payer, signer)
    assert not escrow.is_authorized(addrs[OTHER_PAYER], signer)
    assert escrow.revoke_at(payer, signer) == 0

    receipt = escrow.revoke_signer(keys[PAYER], signer)
    started = chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("SignerRevocationStarted", {"payer": payer, "signer": signer, "revoke_at": started + THAW})
    ]
    assert escrow.revoke_at(payer, signer) == started + THAW
    assert escrow.is_authorized(payer, signer)  # until the delay has passed
    with pytest.raises(ContractRevert) as exc:
        escrow.revoke_signer(keys[PAYER], signer)
    assert reason_of(exc) == "revocation pending"

    chain.increase_time(THAW)
    assert not escrow.is_authorized(payer, signer)
    with pytest.raises(ContractRevert) as exc:
        escrow.revoke_signer(keys[PAYER], signer)
    assert reason_of(exc) == "signer not authorized"
    # Authorizing again after a completed revocation starts afresh.
    escrow.authorize_signer(keys[PAYER], signer)
    assert escrow.is_authorized(payer, signer)
    assert escrow.revoke_at(payer, signer) == 0


def test_reauthorizing_cancels_a_pending_revocation(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    escrow.revoke_signer(keys[PAYER], GATEWAY.address)
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    chain.increase_time(2 * THAW)
    assert escrow.is_authorized(addrs[PAYER], GATEWAY.address)
    assert escrow.revoke_at(addrs[PAYER], GATEWAY.address) == 0


def test_signer_refusals(escrow: PaymentEscrow, keys: list[str]) -> None:
    with pytest.raises(ContractRevert) as exc:
        escrow.authorize_signer(keys[PAYER], ZERO_ADDRESS)
    assert reason_of(exc) == "zero signer"
    with pytest.raises(ContractRevert) as exc:
        escrow.revoke_signer(keys[PAYER], GATEWAY.address)
    assert reason_of(exc) == "signer not authorized"
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    with pytest.raises(ContractRevert) as exc:
        escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    assert reason_of(exc) == "already authorized"
    # Authorizations are per payer.
    with pytest.raises(ContractRevert, match="signer not authorized"):
        escrow.revoke_signer(keys[OTHER_PAYER], GATEWAY.address)


# --- collecting vouchers ----------------------------------------------------------------------


def test_collect_pays_the_miner_and_credits_fees(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    payer = addrs[PAYER]
    v = voucher(payer, 123_457)
    signature = sign(funded, v)
    submitter_before = chain.balance(addrs[SUBMITTER])
    miner_before = chain.balance(MINER)
    # The return value, by simulation, before the real thing.
    simulated = funded.contract.functions.collect(v.as_tuple(), signature)
    assert chain.call(simulated) == 123_457

    collection = funded.collect(keys[SUBMITTER], v, signature)
    split = split_payment(123_457, PROTOCOL_PPM, POOL_PPM)
    assert collection.paid_wei == 123_457
    assert (collection.miner_wei, collection.protocol_fee_wei, collection.verifier_fee_wei) == (
        split.miner,
        split.protocol,
        split.verifier_pool,
    )
    assert collection.miner_wei + collection.protocol_fee_wei + collection.verifier_fee_wei == (
        123_457
    )
    receipt = chain.w3.eth.get_transaction_receipt(collection.tx_hash)
    assert collection.gas_used == receipt["gasUsed"]
    assert [(e.name, e.args) for e in funded.events(receipt)] == [
        (
            "Collected",
            {
                "payer": payer,
                "miner": MINER,
                "gateway": GATEWAY.address,
                "value_aggregate": 123_457,
                "paid": 123_457,
                "miner_amount": split.miner,
                "protocol_fee": split.protocol,
                "verifier_fee": split.verifier_pool,
                "receipts_root": ROOT,
            },
        )
    ]
    # Anyone may submit; the money goes to the miner and the submitter only pays gas.
    assert chain.balance(MINER) == miner_before + split.miner
    assert chain.balance(addrs[SUBMITTER]) == submitter_before - tx_fee(receipt)
    assert funded.fees_owed(addrs[TREASURY]) == split.protocol
    assert funded.fees_owed(addrs[POOL]) == split.verifier_pool
    assert funded.account(payer) == EscrowAccount(10**6 - 123_457, 0, 0)
    assert funded.collected(payer, GATEWAY.address, MINER) == 123_457
    assert funded.gateway_collected(payer, GATEWAY.address) == 123_457
    assert chain.balance(funded.address) == 10**6 - split.miner


def test_vouchers_are_cumulative_and_pay_each_wei_once(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    payer = addrs[PAYER]
    first = voucher(payer, 100_000, timestamp=1)
    second = voucher(payer, 250_000, timestamp=2)
    assert funded.collect(keys[SUBMITTER], first, sign(funded, first)).paid_wei == 100_000
    assert funded.collect(keys[SUBMITTER], second, sign(funded, second)).paid_wei == 150_000
    for stale in (second, first, voucher(payer, 200_000, timestamp=3)):
        with pytest.raises(ContractRevert) as exc:
            funded.collect(keys[SUBMITTER], stale, sign(funded, stale))
        assert reason_of(exc) == "nothing to collect"
    assert funded.collected(payer, GATEWAY.address, MINER) == 250_000
    assert funded.account(payer).balance_wei == 10**6 - 250_000


def test_collect_never_exceeds_the_balance(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    payer = addrs[PAYER]
    big = voucher(payer, 3 * 10**6)
    signature = sign(funded, big)
    assert funded.collect(keys[SUBMITTER], big, signature).paid_wei == 10**6
    assert funded.account(payer) == EscrowAccount(0, 0, 0)
    with pytest.raises(ContractRevert) as exc:
        funded.collect(keys[SUBMITTER], big, signature)
    assert reason_of(exc) == "payer balance empty"
    # After a top-up the same voucher pays the rest, and no more.
    funded.deposit(keys[PAYER], 5 * 10**6)
    assert funded.collect(keys[SUBMITTER], big, signature).paid_wei == 2 * 10**6
    assert funded.collected(payer, GATEWAY.address, MINER) == 3 * 10**6
    assert funded.account(payer).balance_wei == 3 * 10**6
    with pytest.raises(ContractRevert, match="nothing to collect"):
        funded.collect(keys[SUBMITTER], big, signature)


def test_each_gateway_and_miner_has_its_own_tally(
    funded: PaymentEscrow, keys: list[str], addrs: list[str]
) -> None:
    payer = addrs[PAYER]
    funded.authorize_signer(keys[PAYER], OTHER_GATEWAY.address)
    plan = [
        (GATEWAY, MINER, 100),
        (GATEWAY, OTHER_MINER, 200),
        (OTHER_GATEWAY, MINER, 400),
        (OTHER_GATEWAY, OTHER_MINER, 800),
    ]
    for gateway, miner, value in plan:
        v = voucher(payer, value, miner=miner, gateway=gateway.address)
        assert funded.collect(keys[SUBMITTER], v, sign(funded, v, gateway)).paid_wei == value
    for gateway, miner, value in plan:
        assert funded.collected(payer, gateway.address, miner) == value
    assert funded.gateway_collected(payer, GATEWAY.address) == 300
    assert funded.gateway_collected(payer, OTHER_GATEWAY.address) == 1200
    # Another payer's vouchers from the same gateway draw on that payer alone.
    funded.deposit(keys[OTHER_PAYER], 50)
    funded.authorize_signer(keys[OTHER_PAYER], GATEWAY.address)
    v = voucher(addrs[OTHER_PAYER], 100)
    assert funded.collect(keys[SUBMITTER], v, sign(funded, v)).paid_wei == 50
    assert funded.account(payer).balance_wei == 10**6 - 1500


@pytest.mark.parametrize(
    ("protocol_ppm", "pool_ppm", "value"),
    [
        (0, 0, 999_999),
        (MAX_FEE_PPM, 0, 999_999),
        (0, MAX_FEE_PPM, 7),
        (33_333, 66_667, 999_999),
        (1, 1, 999_999),
        (12_345, 65_432, 1),
        (50_000, 50_000, 19),
    ],
)
def test_fee_split_is_exact(
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    protocol_ppm: int,
    pool_ppm: int,
    value: int,
) -> None:
    funded = deploy(chain, keys, addrs, protocol_ppm=protocol_ppm, pool_ppm=pool_ppm)
    funded.deposit(keys[PAYER], 10**6)
    funded.authorize_signer(keys[PAYER], GATEWAY.address)
    miner_before = chain.balance(MINER)
    v = voucher(addrs[PAYER], value)
    collection = funded.collect(keys[SUBMITTER], v, sign(funded, v))
    split = split_payment(value, protocol_ppm, pool_ppm)
    assert (collection.miner_wei, collection.protocol_fee_wei, collection.verifier_fee_wei) == (
        split.miner,
        split.protocol,
        split.verifier_pool,
    )
    assert chain.balance(MINER) == miner_before + split.miner
    assert funded.fees_owed(addrs[TREASURY]) == split.protocol
    assert funded.fees_owed(addrs[POOL]) == split.verifier_pool


def test_fees_to_one_address_when_treasury_is_the_pool(
    chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    escrow = deploy(chain, keys, addrs, treasury=addrs[POOL])
    escrow.deposit(keys[PAYER], 10**6)
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    v = voucher(addrs[PAYER], 10**6)
    collection = escrow.collect(keys[SUBMITTER], v, sign(escrow, v))
    assert escrow.fees_owed(addrs[POOL]) == 70_000
    assert collection.protocol_fee_wei + collection.verifier_fee_wei == 70_000


# --- vouchers that must pay nothing -------------------------------------------------------------


def _forged(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
    return v, sign(escrow, v, OTHER_GATEWAY)


def _tampered(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
    signature = sign(escrow, v)
    return voucher(v.payer, v.value_aggregate * 10), signature


def _other_chain(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
    domain = Domain(escrow.chain.chain_id + 1, escrow.address)
    return v, sign_message(domain, v, GATEWAY)


def _other_contract(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
    return v, sign_message(Domain(escrow.chain.chain_id, MINER), v, GATEWAY)


def _malleable_twin(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
    r, s, rec = rsv(sign(escrow, v))
    twin = pack(r, SECP256K1_N - s, 55 - rec)  # 27 <-> 28
    # The twin is a valid signature by the gateway; only the low-s rule refuses it.
    signature = eth_keys.Signature(vrs=(twin[64] - 27, r, SECP256K1_N - s))
    public = signature.recover_public_key_from_msg_hash(escrow.domain().digest(v.struct_hash()))
    assert public.to_checksum_address() == GATEWAY.address
    return v, twin


def _with_v(v_byte: int) -> Callable[[PaymentEscrow, Voucher], tuple[Voucher, bytes]]:
    def make(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
        r, s, _ = rsv(sign(escrow, v))
        return v, pack(r, s, v_byte)

    return make


def _with_rs(
    r_of: Callable[[int], int], s_of: Callable[[int], int]
) -> Callable[[PaymentEscrow, Voucher], tuple[Voucher, bytes]]:
    def make(escrow: PaymentEscrow, v: Voucher) -> tuple[Voucher, bytes]:
        r, s, rec = rsv(sign(escrow, v))
        return v, pack(r_of(r), s_of(s), rec)

    return make


def _keep(x: int) -> int:
    return x


BAD_SIGNATURES: list[tuple[str, Callable[..., tuple[Voucher, bytes]], str]] = [
    ("forged by another key", _forged, "signer is not the gateway"),
    ("voucher changed after signing", _tampered, "signer is not the gateway"),
    ("signed for another chain id", _other_chain, "signer is not the gateway"),
    ("signed for another contract", _other_contract, "signer is not the gateway"),
    ("malleable high-s twin", _malleable_twin, "signatures: malleable"),
    ("v = 0", _with_v(0), "signatures: bad v"),
    ("v = 1", _with_v(1), "signatures: bad v"),
    ("v = 29", _with_v(29), "signatures: bad v"),
    ("r = 0", _with_rs(lambda _: 0, _keep), "signatures: invalid"),
    ("s = 0", _with_rs(_keep, lambda _: 0), "signatures: invalid"),
    ("r = n", _with_rs(lambda _: SECP256K1_N, _keep), "signatures: invalid"),
    # x = 5 is no point's x coordinate on secp256k1: 5**3 + 7 is not a square mod p.
    ("r off the curve", _with_rs(lambda _: 5, _keep), "signatures: invalid"),
]


@pytest.mark.parametrize(
    ("make", "reason"),
    [(m, r) for _, m, r in BAD_SIGNATURES],
    ids=[i for i, _, _ in BAD_SIGNATURES],
)
def test_bad_signatures_pay_nothing(
    funded: PaymentEscrow,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    make: Callable[[PaymentEscrow, Voucher], tuple[Voucher, bytes]],
    reason: str,
) -> None:
    v, signature = make(funded, voucher(addrs[PAYER], 5000))
    before = snapshot(funded, chain, addrs[PAYER])
    with pytest.raises(ContractRevert) as exc:
        funded.collect(keys[SUBMITTER], v, signature)
    assert reason_of(exc) == reason
    assert snapshot(funded, chain, addrs[PAYER]) == before


def test_signature_length_is_checked_by_the_contract(
    funded: PaymentEscrow, keys: list[str], addrs: list[str]
) -> None:
    v = voucher(addrs[PAYER], 5000)
    signature = sign(funded, v)
    for short in (b"", signature[:64]):
        with pytest.raises(ContractRevert) as exc:
            funded.chain.send(keys[SUBMITTER], funded.contract, "collect", v.as_tuple(), short)
        assert reason_of(exc) == "signatures: bad length"
    # Longer than Bytes[65] does not even decode.
    with pytest.raises(ContractRevert):
        funded.chain.send(
            keys[SUBMITTER], funded.contract, "collect", v.as_tuple(), signature + b"\x00"
        )
    assert funded.collected(addrs[PAYER], GATEWAY.address, MINER) == 0


def test_a_signature_for_one_escrow_is_worthless_on_another(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    other = deploy(chain, keys, addrs)
    other.deposit(keys[PAYER], 10**6)
    other.authorize_signer(keys[PAYER], GATEWAY.address)
    v = voucher(addrs[PAYER], 5000)
    with pytest.raises(ContractRevert, match="signer is not the gateway"):
        other.collect(keys[SUBMITTER], v, sign(funded, v))
    assert other.collect(keys[SUBMITTER], v, sign(other, v)).paid_wei == 5000


def test_unauthorized_and_revoked_gateways_pay_nothing(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    payer = addrs[PAYER]
    stranger = voucher(payer, 5000, gateway=OTHER_GATEWAY.address)
    with pytest.raises(ContractRevert) as exc:
        funded.collect(keys[SUBMITTER], stranger, sign(funded, stranger, OTHER_GATEWAY))
    assert reason_of(exc) == "gateway not authorized"

    # Revoked: collectable through the delay, so receipts signed before still get paid.
    funded.revoke_signer(keys[PAYER], GATEWAY.address)
    early = voucher(payer, 1000)
    assert funded.collect(keys[SUBMITTER], early, sign(funded, early)).paid_wei == 1000
    chain.increase_time(THAW)
    late = voucher(payer, 2000)
    before = snapshot(funded, chain, payer)
    with pytest.raises(ContractRevert, match="gateway not authorized"):
        funded.collect(keys[SUBMITTER], late, sign(funded, late))
    assert snapshot(funded, chain, payer) == before


def test_zero_payer_miner_or_gateway(
    funded: PaymentEscrow, keys: list[str], addrs: list[str]
) -> None:
    cases = [
        (voucher(ZERO_ADDRESS, 10), "zero payer"),
        (voucher(addrs[PAYER], 10, miner=ZERO_ADDRESS), "zero miner"),
        # ecrecover never yields the zero address for a signature that passes the checks.
        (voucher(addrs[PAYER], 10, gateway=ZERO_ADDRESS), "signer is not the gateway"),
    ]
    for v, reason in cases:
        with pytest.raises(ContractRevert) as exc:
            funded.collect(keys[SUBMITTER], v, sign(funded, v))
        assert reason_of(exc) == reason


# --- fees ---------------------------------------------------------------------------------------


def test_claim_fees(funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]) -> None:
    v = voucher(addrs[PAYER], 10**6)
    collection = funded.collect(keys[SUBMITTER], v, sign(funded, v))
    for index, owed in (
        (TREASURY, collection.protocol_fee_wei),
        (POOL, collection.verifier_fee_wei),
    ):
        before = chain.balance(addrs[index])
        receipt = funded.claim_fees(keys[index])
        assert [(e.name, e.args) for e in funded.events(receipt)] == [
            ("FeesClaimed", {"recipient": addrs[index], "amount": owed})
        ]
        assert chain.balance(addrs[index]) == before + owed - tx_fee(receipt)
        assert funded.fees_owed(addrs[index]) == 0
        with pytest.raises(ContractRevert) as exc:
            funded.claim_fees(keys[index])
        assert reason_of(exc) == "nothing to claim"
    assert chain.balance(funded.address) == 0


# --- fees: capped, and changed only after a delay ----------------------------------------------


def _pay(escrow: PaymentEscrow, keys: list[str], payer: str, value: int) -> Collection:
    """Collect a voucher worth `value` more than GATEWAY's vouchers for `payer` so far."""
    v = voucher(payer, escrow.collected(payer, GATEWAY.address, MINER) + value)
    return escrow.collect(keys[SUBMITTER], v, sign(escrow, v))


def test_admin_raising_fees_right_before_a_collect_does_not_change_it(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack: the admin sees a miner's collect coming and raises the fees to take its pay
    (the old set_fees applied at once, up to 100 %). Now the most it can announce is 10 %, and
    that collect, and every other until the delay has passed, pays the fees in force before."""
    miner_before = chain.balance(MINER)
    funded.schedule_fees(keys[ADMIN], MAX_FEE_PPM, 0)
    collection = _pay(funded, keys, addrs[PAYER], 500_000)
    split = split_payment(500_000, PROTOCOL_PPM, POOL_PPM)
    assert (collection.miner_wei, collection.protocol_fee_wei, collection.verifier_fee_wei) == (
        split.miner,
        split.protocol,
        split.verifier_pool,
    )
    assert chain.balance(MINER) == miner_before + split.miner
    with pytest.raises(ContractRevert) as exc:
        funded.apply_fees(keys[ADMIN])
    assert reason_of(exc) == "timelock: not ready"
    assert (funded.protocol_fee_ppm(), funded.verifier_pool_ppm()) == (PROTOCOL_PPM, POOL_PPM)
    # Nor can it get there in two quick steps: raising twice restarts the clock each time.
    chain.increase_time(FEE_DELAY - 600)
    funded.schedule_fees(keys[ADMIN], MAX_FEE_PPM - 1, 1)
    chain.increase_time(600)
    with pytest.raises(ContractRevert, match="timelock: not ready"):
        funded.apply_fees(keys[ADMIN])
    collection = _pay(funded, keys, addrs[PAYER], 100_000)
    assert collection.miner_wei == split_payment(100_000, PROTOCOL_PPM, POOL_PPM).miner


@pytest.mark.parametrize(
    ("protocol_ppm", "pool_ppm"),
    [
        (MAX_FEE_PPM + 1, 0),
        (0, MAX_FEE_PPM + 1),
        (MAX_FEE_PPM, 1),
        (50_000, 50_001),
        (PPM, 0),
        # Sums that overflow uint256 are refused with the reason too, not a bare revert.
        (1, 2**256 - 1),
        (2**256 - 1, 2**256 - 1),
    ],
)
def test_fees_above_ten_percent_are_refused(
    escrow: PaymentEscrow,
    chain: Chain,
    keys: list[str],
    addrs: list[str],
    protocol_ppm: int,
    pool_ppm: int,
) -> None:
    """Attack: fees that take (nearly) all of a miner's pay. The cap holds at deployment and
    for every change, whatever the Python side lets through."""
    artifact = load_artifact("PaymentEscrow")
    with pytest.raises(ContractRevert) as exc:
        chain.deploy(
            keys[ADMIN],
            artifact.abi,
            artifact.bytecode,
            addrs[TREASURY],
            addrs[POOL],
            protocol_ppm,
            pool_ppm,
            THAW,
            FEE_DELAY,
        )
    assert reason_of(exc) == "fees exceed 10%"
    with pytest.raises(ContractRevert) as exc:
        chain.send(keys[ADMIN], escrow.contract, "schedule_fees", protocol_ppm, pool_ppm)
    assert reason_of(exc) == "fees exceed 10%"
    assert escrow.pending_fees() is None
    with pytest.raises(ValueError, match="more than 100,000 ppm"):
        escrow.schedule_fees(keys[ADMIN], protocol_ppm, pool_ppm)


def test_scheduled_fees_apply_after_the_delay_by_anyone(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        funded.apply_fees(keys[SUBMITTER])
    assert reason_of(exc) == "timelock: nothing pending"

    receipt = funded.schedule_fees(keys[ADMIN], 40_000, 60_000)
    ready_at = block_time(chain, receipt) + FEE_DELAY
    assert [(e.name, e.args) for e in funded.events(receipt)] == [
        (
            "ChangeScheduled",
            {"kind": FEES_CHANGE, "change": fees_hash(40_000, 60_000), "ready_at": ready_at},
        ),
        (
            "FeesScheduled",
            {"protocol_fee_ppm": 40_000, "verifier_pool_ppm": 60_000, "ready_at": ready_at},
        ),
    ]
    assert funded.pending_fees() == PendingFees(40_000, 60_000, ready_at)
    call = funded.contract.functions
    assert chain.call(call.pending_protocol_fee_ppm()) == 40_000
    assert chain.call(call.pending_verifier_pool_ppm()) == 60_000

    chain.increase_time(FEE_DELAY - 60)
    with pytest.raises(ContractRevert) as exc:
        funded.apply_fees(keys[SUBMITTER])
    assert reason_of(exc) == "timelock: not ready"
    chain.increase_time(60)
    # Anyone may apply a change that is due: the admin cannot hold it back to pick its moment.
    receipt = funded.apply_fees(keys[SUBMITTER])
    assert [(e.name, e.args) for e in funded.events(receipt)] == [
        ("ChangeApplied", {"kind": FEES_CHANGE, "change": fees_hash(40_000, 60_000)}),
        ("FeesSet", {"protocol_fee_ppm": 40_000, "verifier_pool_ppm": 60_000}),
    ]
    assert (funded.protocol_fee_ppm(), funded.verifier_pool_ppm()) == (40_000, 60_000)
    assert funded.pending_fees() is None
    assert chain.call(call.pending_protocol_fee_ppm()) == 0
    with pytest.raises(ContractRevert, match="timelock: nothing pending"):
        funded.apply_fees(keys[SUBMITTER])

    collection = _pay(funded, keys, addrs[PAYER], 123_457)
    split = split_payment(123_457, 40_000, 60_000)
    assert (collection.protocol_fee_wei, collection.verifier_fee_wei) == (
        split.protocol,
        split.verifier_pool,
    )
    # Lowering them takes the same route.
    funded.schedule_fees(keys[ADMIN], 0, 0)
    chain.increase_time(FEE_DELAY)
    funded.apply_fees(keys[PAYER])
    assert _pay(funded, keys, addrs[PAYER], 1000).miner_wei == 1000


def test_rescheduling_replaces_the_change_and_restarts_the_clock(
    escrow: PaymentEscrow, chain: Chain, keys: list[str]
) -> None:
    first = escrow.schedule_fees(keys[ADMIN], 10_000, 0)
    chain.increase_time(FEE_DELAY // 2)
    second = escrow.schedule_fees(keys[ADMIN], 0, 10_000)
    assert escrow.pending_fees() == PendingFees(0, 10_000, block_time(chain, second) + FEE_DELAY)
    chain.increase_time(block_time(chain, first) + FEE_DELAY + 60 - chain.timestamp())
    with pytest.raises(ContractRevert, match="timelock: not ready"):
        escrow.apply_fees(keys[ADMIN])
    chain.increase_time(FEE_DELAY)
    escrow.apply_fees(keys[ADMIN])
    assert (escrow.protocol_fee_ppm(), escrow.verifier_pool_ppm()) == (0, 10_000)


def test_only_the_admin_schedules_and_cancels_fee_changes(
    escrow: PaymentEscrow, chain: Chain, keys: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        escrow.schedule_fees(keys[PAYER], 1, 1)
    assert reason_of(exc) == "admin: only admin"
    with pytest.raises(ContractRevert) as exc:
        escrow.cancel_fees(keys[ADMIN])
    assert reason_of(exc) == "timelock: nothing pending"

    escrow.schedule_fees(keys[ADMIN], MAX_FEE_PPM, 0)
    with pytest.raises(ContractRevert) as exc:
        escrow.cancel_fees(keys[PAYER])
    assert reason_of(exc) == "admin: only admin"
    receipt = escrow.cancel_fees(keys[ADMIN])
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("ChangeCancelled", {"kind": FEES_CHANGE, "change": fees_hash(MAX_FEE_PPM, 0)})
    ]
    assert escrow.pending_fees() is None
    chain.increase_time(FEE_DELAY)
    with pytest.raises(ContractRevert, match="timelock: nothing pending"):
        escrow.apply_fees(keys[SUBMITTER])
    assert (escrow.protocol_fee_ppm(), escrow.verifier_pool_ppm()) == (PROTOCOL_PPM, POOL_PPM)


def test_a_payer_who_thaws_when_fees_are_scheduled_withdraws_before_they_apply(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """A payer who does not accept the announced fees thaws at once and is out, money in
    hand, while the old fees are still in force: the fee delay outlasts the thaw period."""
    payer = addrs[PAYER]
    funded.schedule_fees(keys[ADMIN], MAX_FEE_PPM, 0)
    pending = funded.pending_fees()
    assert pending is not None
    funded.thaw(keys[PAYER], funded.account(payer).balance_wei)
    chain.increase_time(THAW)
    receipt = funded.withdraw(keys[PAYER])
    assert block_time(chain, receipt) < pending.ready_at
    assert funded.events(receipt)[0].args["amount"] == 10**6
    assert funded.account(payer) == EscrowAccount(0, 0, 0)
    with pytest.raises(ContractRevert, match="timelock: not ready"):
        funded.apply_fees(keys[SUBMITTER])


def test_schedule_fees_validates_in_python(escrow: PaymentEscrow, keys: list[str]) -> None:
    with pytest.raises(ValueError, match="more than 100,000"):
        escrow.schedule_fees(keys[ADMIN], MAX_FEE_PPM, 1)
    with pytest.raises(ValueError, match="protocol fee"):
        escrow.schedule_fees(keys[ADMIN], -1, 0)
    with pytest.raises(ValueError, match="verifier pool share"):
        escrow.schedule_fees(keys[ADMIN], 0, True)  # type: ignore[arg-type]


# --- administration: a two-step handover --------------------------------------------------------


def test_admin_handed_to_a_wrong_address_is_not_lost(
    escrow: PaymentEscrow, keys: list[str], addrs: list[str]
) -> None:
    """Attack (or accident): the admin is handed to a mistyped or unreachable address. The
    old single-step transfer_admin made it admin at once, locking the fees forever; now it
    only becomes pending, and the admin stays in charge and can name someone else."""
    typo = "0x" + "de" * 19 + "ad"
    escrow.transfer_admin(keys[ADMIN], typo)
    assert escrow.admin() == addrs[ADMIN]
    assert escrow.pending_admin() == to_checksum_address(typo)
    escrow.schedule_fees(keys[ADMIN], 1, 1)  # still the admin's to run
    escrow.transfer_admin(keys[ADMIN], addrs[5])
    escrow.accept_admin(keys[5])
    assert escrow.admin() == addrs[5]


def test_two_step_admin_handover(
    escrow: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    with pytest.raises(ContractRevert) as exc:
        escrow.accept_admin(keys[5])
    assert reason_of(exc) == "admin: no pending admin"
    with pytest.raises(ContractRevert) as exc:
        escrow.transfer_admin(keys[PAYER], addrs[PAYER])
    assert reason_of(exc) == "admin: only admin"
    with pytest.raises(ContractRevert) as exc:
        escrow.transfer_admin(keys[ADMIN], addrs[ADMIN])
    assert reason_of(exc) == "admin: already admin"

    receipt = escrow.transfer_admin(keys[ADMIN], addrs[5])
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("AdminTransferStarted", {"admin": addrs[ADMIN], "pending_admin": addrs[5]})
    ]
    assert (escrow.admin(), escrow.pending_admin()) == (addrs[ADMIN], addrs[5])
    with pytest.raises(ContractRevert) as exc:
        escrow.accept_admin(keys[PAYER])
    assert reason_of(exc) == "admin: only pending admin"
    # The zero address withdraws the nomination.
    escrow.transfer_admin(keys[ADMIN], ZERO_ADDRESS)
    assert escrow.pending_admin() is None
    with pytest.raises(ContractRevert, match="admin: no pending admin"):
        escrow.accept_admin(keys[5])

    escrow.transfer_admin(keys[ADMIN], addrs[5])
    receipt = escrow.accept_admin(keys[5])
    assert [(e.name, e.args) for e in escrow.events(receipt)] == [
        ("AdminTransferred", {"admin": addrs[5]})
    ]
    assert (escrow.admin(), escrow.pending_admin()) == (addrs[5], None)
    # The fee powers moved with it.
    with pytest.raises(ContractRevert, match="admin: only admin"):
        escrow.schedule_fees(keys[ADMIN], 0, 0)
    escrow.schedule_fees(keys[5], 0, 0)
    with pytest.raises(ContractRevert, match="admin: only admin"):
        escrow.cancel_fees(keys[ADMIN])
    escrow.cancel_fees(keys[5])


# --- Python-side validation ---------------------------------------------------------------------


def test_python_side_rejects_bad_input_before_sending(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    v = voucher(addrs[PAYER], 10)
    signature = sign(funded, v)
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: funded.deposit(keys[PAYER], -1), "amount"),
        (lambda: funded.deposit(keys[PAYER], 2**256), "out of range"),
        (lambda: funded.deposit(keys[PAYER], True), "int"),  # type: ignore[arg-type]
        (lambda: funded.deposit(keys[PAYER], 1, payer="0x12"), "payer"),
        (lambda: funded.thaw(keys[PAYER], -5), "amount"),
        (lambda: funded.authorize_signer(keys[PAYER], "gateway"), "signer"),
        (lambda: funded.revoke_signer(keys[PAYER], "0x"), "signer"),
        (lambda: funded.collect(keys[PAYER], v, signature[:64]), "65 bytes"),
        (lambda: funded.collect(keys[PAYER], v, "0xzz"), "signature is not hex"),
        (lambda: funded.collect(keys[PAYER], v.to_json(), signature), "Voucher"),  # type: ignore[arg-type]
        (lambda: funded.transfer_admin(keys[ADMIN], "admin"), "admin"),
        (lambda: funded.schedule_fees(keys[ADMIN], MAX_FEE_PPM + 1, 0), "100,000"),
    ]
    nonces = [chain.w3.eth.get_transaction_count(a) for a in addrs]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
    assert [chain.w3.eth.get_transaction_count(a) for a in addrs] == nonces

    reads: list[tuple[Callable[[], object], str]] = [
        (lambda: funded.account("0x12"), "payer"),
        (lambda: funded.collected(addrs[PAYER], "x", MINER), "gateway"),
        (lambda: funded.collected(addrs[PAYER], GATEWAY.address, "x"), "miner"),
        (lambda: funded.gateway_collected("x", GATEWAY.address), "payer"),
        (lambda: funded.is_authorized(addrs[PAYER], "x"), "signer"),
        (lambda: funded.revoke_at("x", GATEWAY.address), "payer"),
        (lambda: funded.fees_owed("x"), "address"),
    ]
    for read, message in reads:
        with pytest.raises(ValueError, match=message):
            read()


def test_collect_accepts_a_hex_signature(
    funded: PaymentEscrow, keys: list[str], addrs: list[str]
) -> None:
    v = voucher(addrs[PAYER], 10)
    assert funded.collect(keys[SUBMITTER], v, "0x" + sign(funded, v).hex()).paid_wei == 10


# --- payouts to contracts -----------------------------------------------------------------------

# A payer, miner or fee recipient that is a contract: it accepts, refuses, or, when paid,
# calls the escrow again with prepared calldata (once).
ACTOR_CONTRACT = """
# pragma version ~=0.4.3
# pragma evm-version london

target: public(address)
reentry: public(Bytes[1024])
strict: public(bool)  # a failed re-entry fails the payment that triggered it
refuse: public(bool)
reentered: public(bool)
reentry_ok: public(bool)
received: public(uint256)

@external
def configure(target: address, reentry: Bytes[1024], strict: bool, refuse: bool):
    self.target = target
    self.reentry = reentry
    self.strict = strict
    self.refuse = refuse
    self.reentered = False

@external
@payable
def forward(data: Bytes[1024]):
    raw_call(self.target, data, value=msg.value)

@external
@payable
def __default__():
    assert not self.refuse, "refused"
    self.received += msg.value
    if len(self.reentry) > 0 and not self.reentered:
        self.reentered = True
        ok: bool = raw_call(self.target, self.reentry, revert_on_failure=False)
        self.reentry_ok = ok
        assert ok or not self.strict, "reentry failed"
"""


class Actor:
    """A deployed ACTOR_CONTRACT, driven by the dev key that deployed it."""

    def __init__(self, chain: Chain, key: str, escrow: PaymentEscrow) -> None:
        import vyper

        out = vyper.compile_code(ACTOR_CONTRACT, output_formats=["abi", "bytecode"])
        self.chain, self.key = chain, key
        self.address = chain.deploy(key, out["abi"], out["bytecode"])
        self.contract: Contract = chain.contract(self.address, out["abi"])
        self.configure(escrow)

    def calldata(self, function: str, *args: object) -> bytes:
        return bytes.fromhex(self.escrow.contract.encode_abi(function, args=list(args))[2:])

    def configure(
        self,
        escrow: PaymentEscrow | None = None,
        reentry: bytes = b"",
        *,
        strict: bool = False,
        refuse: bool = False,
    ) -> None:
        """Point the actor at `escrow` (unchanged if None) and set how it behaves when paid."""
        if escrow is not None:
            self.escrow = escrow
        self.chain.send(
            self.key, self.contract, "configure", self.escrow.address, reentry, strict, refuse
        )

    def forward(self, function: str, *args: object, value: int = 0) -> None:
        data = self.calldata(function, *args)
        self.chain.send(self.key, self.contract, "forward", data, value=value)

    def view(self, name: str) -> Any:
        return self.chain.call(getattr(self.contract.functions, name)())


@pytest.fixture
def actor(funded: PaymentEscrow, chain: Chain, keys: list[str]) -> Actor:
    """A contract that is its own payer (1000 wei, 400 thawed and matured, GATEWAY
    authorized) and a miner, so that one payout can try to re-enter either way."""
    actor = Actor(chain, keys[4], funded)
    actor.forward("deposit", value=1000)
    actor.forward("authorize_signer", GATEWAY.address)
    actor.forward("thaw", 400)
    chain.increase_time(THAW)
    return actor


def actor_voucher(actor: Actor, value: int) -> tuple[tuple[Any, ...], bytes]:
    v = voucher(actor.address, value, miner=actor.address)
    return v.as_tuple(), sign(actor.escrow, v)


def escrow_total(escrow: PaymentEscrow, payers: list[str]) -> int:
    return (
        sum(escrow.account(p).balance_wei for p in payers)
        + escrow.fees_owed(escrow.treasury())
        + escrow.fees_owed(escrow.verifier_pool())
    )


@pytest.mark.parametrize("outer", ["collect", "withdraw"])
@pytest.mark.parametrize("inner", ["collect", "withdraw"])
def test_reentrant_payee_cannot_be_paid_twice(
    actor: Actor, chain: Chain, keys: list[str], addrs: list[str], outer: str, inner: str
) -> None:
    escrow = actor.escrow
    small, small_sig = actor_voucher(actor, 100)
    big, big_sig = actor_voucher(actor, 300)
    reentry = (
        actor.calldata("collect", big, big_sig)
        if inner == "collect"
        else actor.calldata("withdraw")
    )
    actor.configure(reentry=reentry)
    if outer == "collect":
        escrow.collect(keys[SUBMITTER], Voucher(*small), small_sig)
        expected = split_payment(100, PROTOCOL_PPM, POOL_PPM).miner
    else:
        actor.forward("withdraw")
        expected = 400
    # The call back was made and refused; the payout happened once.
    assert actor.view("reentered") and not actor.view("reentry_ok")
    assert actor.view("received") == expected == chain.balance(actor.address)
    payers = [addrs[PAYER], actor.address]
    assert chain.balance(escrow.address) == escrow_total(escrow, payers)

    # What the re-entry tried was otherwise valid (bar withdrawing twice): done properly,
    # it pays.
    actor.configure()
    if inner == "collect":
        paid = escrow.collect(keys[SUBMITTER], Voucher(*big), big_sig).paid_wei
        assert paid == 300 - (100 if outer == "collect" else 0)
    elif outer == "collect":
        actor.forward("withdraw")
        assert escrow.account(actor.address) == EscrowAccount(500, 0, 0)
    assert chain.balance(escrow.address) == escrow_total(escrow, payers)


def test_strict_reentrant_miner_only_fails_its_own_collect(
    actor: Actor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    escrow = actor.escrow
    small, small_sig = actor_voucher(actor, 100)
    big, big_sig = actor_voucher(actor, 300)
    actor.configure(reentry=actor.calldata("collect", big, big_sig), strict=True)
    before = escrow.account(actor.address)
    with pytest.raises(ContractRevert) as exc:
        escrow.collect(keys[SUBMITTER], Voucher(*small), small_sig)
    assert reason_of(exc) == "transfer failed"
    assert escrow.account(actor.address) == before
    assert escrow.collected(actor.address, GATEWAY.address, actor.address) == 0
    assert chain.balance(actor.address) == 0


def test_a_miner_that_refuses_payment_fails_only_its_own_collect(
    actor: Actor, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    escrow = actor.escrow
    actor.configure(refuse=True)
    to_actor = voucher(addrs[PAYER], 500, miner=actor.address)
    before = snapshot(escrow, chain, addrs[PAYER])
    with pytest.raises(ContractRevert) as exc:
        escrow.collect(keys[SUBMITTER], to_actor, sign(escrow, to_actor))
    assert reason_of(exc) == "transfer failed"
    assert snapshot(escrow, chain, addrs[PAYER]) == before
    # The same payer and gateway still pay every other miner.
    to_miner = voucher(addrs[PAYER], 500)
    assert escrow.collect(keys[SUBMITTER], to_miner, sign(escrow, to_miner)).paid_wei == 500
    # A payer contract that refuses keeps its thawed funds in the escrow.
    with pytest.raises(ContractRevert, match="transfer failed"):
        actor.forward("withdraw")
    assert escrow.account(actor.address).thawing_wei == 400


def test_fee_recipient_contracts_claim_once(
    chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    # The treasury is a contract that tries to claim again from inside the payment. It is
    # deployed first, aimed at a stand-in, because the escrow needs its address.
    treasury = Actor(chain, keys[4], deploy(chain, keys, addrs))
    escrow = deploy(chain, keys, addrs, treasury=treasury.address)
    escrow.deposit(keys[PAYER], 10**6)
    escrow.authorize_signer(keys[PAYER], GATEWAY.address)
    v = voucher(addrs[PAYER], 10**6)
    owed = escrow.collect(keys[SUBMITTER], v, sign(escrow, v)).protocol_fee_wei

    treasury.configure(escrow, refuse=True)
    with pytest.raises(ContractRevert) as exc:
        treasury.forward("claim_fees")
    assert reason_of(exc) == "transfer failed"
    assert escrow.fees_owed(treasury.address) == owed

    treasury.configure(escrow, treasury.calldata("claim_fees"))
    treasury.forward("claim_fees")
    assert treasury.view("reentered") and not treasury.view("reentry_ok")
    assert chain.balance(treasury.address) == owed
    assert escrow.fees_owed(treasury.address) == 0


# --- gas and the contract source ---------------------------------------------------------------


def test_gas_is_recorded(
    funded: PaymentEscrow, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    first = voucher(addrs[PAYER], 1000)
    cold = funded.collect(keys[SUBMITTER], first, sign(funded, first))
    second = voucher(addrs[PAYER], 2000)
    warm = funded.collect(keys[SUBMITTER], second, sign(funded, second))
    for collection in (cold, warm):
        assert isinstance(collection, Collection)
        receipt = chain.w3.eth.get_transaction_receipt(collection.tx_hash)
        assert collection.gas_used == receipt["gasUsed"] > 21_000
    # The first payment to a pair writes fresh storage slots; later ones only update them.
    assert warm.gas_used < cold.gas_used


# Reasons of the shared modules that no call into this escrow can reach, and why.
UNREACHABLE_MODULE_REASONS = {
    # The escrow passes itself as the verifying contract.
    "eip712_domain: zero verifying contract",
    # The constructor requires a fee delay above the thaw period, so above zero.
    "timelock: zero delay",
    # The change is a keccak256 hash, never 32 zero bytes.
    "timelock: empty change",
    # apply_fees() hashes the values schedule_fees() stored with the change it announced.
    "timelock: not the announced change",
}


def _reasons(source: str) -> set[str]:
    asserts = [line.strip() for line in source.splitlines() if line.strip().startswith("assert ")]
    reasons = set()
    for line in asserts:
        match = re.search(r', "([^"]+)"$', line)
        assert match, f"assert without a reason: {line}"
        reasons.add(match.group(1))
    return reasons


def test_every_assert_has_a_reason_and_every_reason_is_tested() -> None:
    """Every revert the escrow can give, its own and its modules', is one a test expects."""
    source = (CONTRACTS_DIR / "PaymentEscrow.vy").read_text()
    reasons = _reasons(source)
    modules = re.findall(r"^from lib import (\w+)$", source, flags=re.MULTILINE)
    assert sorted(modules) == ["eip712_domain", "signatures", "timelock", "two_step_admin"]
    for module in modules:
        reasons |= _reasons((MODULES_DIR / f"{module}.vy").read_text())
    assert reasons >= UNREACHABLE_MODULE_REASONS
    this_module = Path(__file__).read_text()
    untested = sorted(
        r for r in reasons - UNREACHABLE_MODULE_REASONS if f'"{r}"' not in this_module
    )
    assert not untested, f"revert reasons no test expects: {untested}"
