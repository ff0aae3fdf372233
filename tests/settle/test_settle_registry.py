"""NodeRegistry on the embedded EVM: every operation, every reason it refuses."""

from __future__ import annotations

import pytest
from eth_account import Account

from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer, NodeRecord, Role
from infergrid.protocol.pricing import PPM
from infergrid.settle.build import load_artifact
from infergrid.settle.chain import Chain, ContractRevert, as_account
from infergrid.settle.registry import Registry, deploy_registry

MINER_MIN = 1 * WEI_PER_BTT
VERIFIER_MIN = 2 * WEI_PER_BTT
GATEWAY_MIN = WEI_PER_BTT // 2
MIN_STAKES = {Role.MINER: MINER_MIN, Role.VERIFIER: VERIFIER_MIN, Role.GATEWAY: GATEWAY_MIN}
DELAY = 3600
ENDPOINT = "http://127.0.0.1:9001"
ZERO_ADDRESS = "0x" + "00" * 20
ZERO_ID = b"\x00" * 32


def offer(name: str = "SmolLM2-135M-Instruct", fill: str = "11", price: int = 7) -> ModelOffer:
    return ModelOffer(name, "0x" + fill * 32, price, 2 * price)


def raw_offer(name: str = "m", model_id: bytes = b"\x11" * 32) -> tuple[str, bytes, int, int]:
    return (name, model_id, 1, 2)


def reason_of(excinfo: pytest.ExceptionInfo[ContractRevert]) -> str:
    return excinfo.value.reason


def names(registry: Registry, receipt: object) -> list[str]:
    return [e.name for e in registry.events(receipt)]  # type: ignore[arg-type]


def block_time(chain: Chain, receipt: object) -> int:
    """The timestamp of the block that mined `receipt`."""
    return int(chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])  # type: ignore[index]


def register_miner(registry: Registry, key: str, stake: int = MINER_MIN) -> NodeRecord:
    signer = as_account(key).address
    registry.register(key, Role.MINER, ENDPOINT, signer, [offer()], stake)
    record = registry.node(signer)
    assert record is not None
    return record


# --- deployment -----------------------------------------------------------------------------


def test_deploy_sets_parameters_and_admin(
    registry: Registry, addrs: list[str], chain: Chain
) -> None:
    assert registry.min_stake(Role.MINER) == MINER_MIN
    assert registry.min_stake(Role.VERIFIER) == VERIFIER_MIN
    assert registry.min_stake(Role.GATEWAY) == GATEWAY_MIN
    assert registry.unbonding_delay() == DELAY
    assert registry.admin() == addrs[0]
    assert registry.pending_admin() is None
    assert registry.slasher() == addrs[9]
    assert registry.node_count() == 0
    assert registry.nodes() == []
    assert registry.page_size() == 32


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((0, 1, 1, 10), "min stake must be positive"),
        ((1, 0, 1, 10), "min stake must be positive"),
        ((1, 1, 0, 10), "min stake must be positive"),
        ((1, 1, 1, 365 * 86400 + 1), "unbonding delay too long"),
        ((1, 1, 1, 10, 0, 999_999, 0), "early multiplier below 1x"),
        ((1, 1, 1, 10, 0, 10_000_001, 0), "early multiplier above 10x"),
        ((1, 1, 1, 10, 10 * 365 * 86400 + 1, PPM, 0), "early period too long"),
        ((1, 1, 1, 10, 0, PPM, 10 * 365 * 86400 + 1), "early decay too long"),
    ],
)
def test_constructor_rejects_bad_parameters(
    chain: Chain, keys: list[str], args: tuple[int, ...], reason: str
) -> None:
    artifact = load_artifact("NodeRegistry")
    no_early_miners = (0, PPM, 0)
    with pytest.raises(ContractRevert) as exc:
        chain.deploy(keys[0], artifact.abi, artifact.bytecode, *(args + no_early_miners)[:7])
    assert reason_of(exc) == reason


def test_deploy_registry_validates_in_python(chain: Chain, keys: list[str]) -> None:
    with pytest.raises(ValueError, match="gateway"):
        deploy_registry(chain, keys[0], {Role.MINER: 1, Role.VERIFIER: 1}, 10)
    with pytest.raises(ValueError, match="positive"):
        deploy_registry(chain, keys[0], {Role.MINER: 0, Role.VERIFIER: 1, Role.GATEWAY: 1}, 10)
    with pytest.raises(ValueError, match="non-negative"):
        deploy_registry(chain, keys[0], {r: 1 for r in Role}, -1)
    stakes = {r: 1 for r in Role}
    with pytest.raises(ValueError, match="multiplier_ppm must be between"):
        deploy_registry(chain, keys[0], stakes, 10, early_multiplier_ppm=PPM - 1)
    with pytest.raises(ValueError, match="early_period_s"):
        deploy_registry(chain, keys[0], stakes, 10, early_period_s=-1)
    with pytest.raises(ValueError, match="decay_s must be at most"):
        deploy_registry(chain, keys[0], stakes, 10, early_decay_s=10**12)


def test_zero_unbonding_delay_is_allowed(chain: Chain, keys: list[str]) -> None:
    registry = Registry(chain, deploy_registry(chain, keys[0], {r: 1 for r in Role}, 0))
    registry.register(keys[1], Role.GATEWAY, ENDPOINT, as_account(keys[1]).address, [], 5)
    registry.deregister(keys[1])
    registry.withdraw(keys[1])
    assert registry.node(as_account(keys[1]).address) is None


def test_registry_address_must_be_an_address(chain: Chain) -> None:
    with pytest.raises(ValueError, match="registry address"):
        Registry(chain, "0x1234")


# --- registration ---------------------------------------------------------------------------


def test_register_stores_node_emits_event_and_holds_stake(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    models = [offer(), offer("Qwen2.5-7B-Instruct", "aB", 3)]
    before = chain.balance(registry.address)
    receipt = registry.register(keys[1], Role.MINER, ENDPOINT, addrs[2], models, 3 * MINER_MIN)
    events = registry.events(receipt)
    assert [e.name for e in events] == ["NodeRegistered"]
    assert events[0].args == {
        "owner": addrs[1],
        "role": 1,
        "endpoint": ENDPOINT,
        "signer": addrs[2],
        "stake": 3 * MINER_MIN,
    }
    assert chain.balance(registry.address) == before + 3 * MINER_MIN
    record = registry.node(addrs[1])
    assert record == NodeRecord(
        owner=addrs[1],
        role=Role.MINER,
        endpoint=ENDPOINT,
        signer=addrs[2],
        models=(
            offer(),
            ModelOffer("Qwen2.5-7B-Instruct", "0x" + "ab" * 32, 3, 6),
        ),
        stake_wei=3 * MINER_MIN,
        active=True,
    )
    assert record.serves("Qwen2.5-7B-Instruct")
    assert registry.node(addrs[3]) is None
    assert registry.node_count() == 1


@pytest.mark.parametrize(
    ("role", "minimum"),
    [(Role.MINER, MINER_MIN), (Role.VERIFIER, VERIFIER_MIN), (Role.GATEWAY, GATEWAY_MIN)],
)
def test_each_role_has_its_own_minimum(
    registry: Registry, keys: list[str], addrs: list[str], role: Role, minimum: int
) -> None:
    with pytest.raises(ContractRevert) as exc:
        registry.register(keys[1], role, ENDPOINT, addrs[1], [], minimum - 1)
    assert reason_of(exc) == "stake below minimum"
    registry.register(keys[1], role, ENDPOINT, addrs[1], [], minimum)
    record = registry.node(addrs[1])
    assert record is not None and record.role == role and record.stake_wei == minimum


def test_stake_below_minimum_reverts_with_reason(
    registry: Registry, keys: list[str], addrs: list[str]
) -> None:
    for stake in (0, 1, MINER_MIN - 1):
        with pytest.raises(ContractRevert, match="stake below minimum") as exc:
            registry.register(keys[1], Role.MINER, ENDPOINT, addrs[1], [offer()], stake)
        assert reason_of(exc) == "stake below minimum"
    assert registry.node(addrs[1]) is None
    assert registry.node_count() == 0


def test_register_twice_is_refused(registry: Registry, keys: list[str], addrs: list[str]) -> None:
    register_miner(registry, keys[1])
    with pytest.raises(ContractRevert) as exc:
        registry.register(keys[1], Role.GATEWAY, ENDPOINT, addrs[1], [], GATEWAY_MIN)
    assert reason_of(exc) == "already registered"
    assert registry.node_count() == 1


@pytest.mark.parametrize(
    ("role", "endpoint", "signer", "models", "reason"),
    [
        (0, ENDPOINT, "0x" + "22" * 20, [], "bad role"),
        (4, ENDPOINT, "0x" + "22" * 20, [], "bad role"),
        (255, ENDPOINT, "0x" + "22" * 20, [], "bad role"),
        (1, "", "0x" + "22" * 20, [], "empty endpoint"),
        (1, ENDPOINT, ZERO_ADDRESS, [], "zero signer"),
        (1, ENDPOINT, "0x" + "22" * 20, [raw_offer(name="")], "empty model name"),
        (1, ENDPOINT, "0x" + "22" * 20, [raw_offer(model_id=ZERO_ID)], "zero model id"),
        (1, ENDPOINT, "0x" + "22" * 20, [raw_offer("a"), raw_offer("b")], "duplicate model"),
        (
            1,
            ENDPOINT,
            "0x" + "22" * 20,
            [
                raw_offer("a", b"\x01" * 32),
                raw_offer("b", b"\x02" * 32),
                raw_offer("c"),
                raw_offer("d", b"\x02" * 32),
            ],
            "duplicate model",
        ),
    ],
)
def test_contract_rejects_bad_registrations(
    registry: Registry,
    chain: Chain,
    keys: list[str],
    role: int,
    endpoint: str,
    signer: str,
    models: list[tuple[str, bytes, int, int]],
    reason: str,
) -> None:
    # Straight to the contract, past the Python checks, to prove the contract holds the line.
    with pytest.raises(ContractRevert) as exc:
        chain.send(
            keys[1],
            registry.contract,
            "register",
            role,
            endpoint,
            chain.w3.to_checksum_address(signer),
            models,
            value=10 * VERIFIER_MIN,
        )
    assert reason_of(exc) == reason


def test_sixteen_models_fit(registry: Registry, keys: list[str], addrs: list[str]) -> None:
    models = [offer(f"model-{i}", f"{i + 1:02x}") for i in range(16)]
    registry.register(keys[1], Role.MINER, "h" * 256, addrs[1], models, MINER_MIN)
    record = registry.node(addrs[1])
    assert record is not None
    assert list(record.models) == models
    assert record.endpoint == "h" * 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": ""}, "endpoint is empty"),
        ({"endpoint": "x" * 257}, "over 256 bytes"),
        ({"signer": "0x1234"}, "signer"),
        ({"signer": "not an address"}, "signer"),
        ({"models": [offer(name="")]}, "model name is empty"),
        ({"models": [offer(name="n" * 65)]}, "over 64 bytes"),
        ({"models": [ModelOffer("m", "0x1234", 1, 1)]}, "not 32 bytes"),
        ({"models": [ModelOffer("m", "zz" * 32, 1, 1)]}, "not hex"),
        ({"models": [ModelOffer("m", "0x" + "11" * 32, -1, 1)]}, "out of range"),
        ({"models": [ModelOffer("m", "0x" + "11" * 32, 1, 2**256)]}, "out of range"),
        ({"models": [ModelOffer("m", "0x" + "11" * 32, 1.5, 1)]}, "must be an int"),  # type: ignore[arg-type]
        ({"models": [offer(), offer("other")]}, "offered twice"),
        ({"models": [offer(f"m{i}", f"{i + 1:02x}") for i in range(17)]}, "at most 16"),
        ({"stake": -1}, "out of range"),
        ({"stake": 2**256}, "out of range"),
        ({"stake": True}, "must be an int"),
    ],
)
def test_python_side_rejects_bad_input_before_sending(
    registry: Registry, chain: Chain, keys: list[str], kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "role": Role.MINER,
        "endpoint": ENDPOINT,
        "signer": as_account(keys[1]).address,
        "models": [offer()],
        "stake": MINER_MIN,
    }
    args.update(kwargs)
    nonce = chain.w3.eth.get_transaction_count(as_account(keys[1]).address)
    with pytest.raises(ValueError, match=message):
        registry.register(
            keys[1],
            args["role"],  # type: ignore[arg-type]
            args["endpoint"],  # type: ignore[arg-type]
            args["signer"],  # type: ignore[arg-type]
            args["models"],  # type: ignore[arg-type]
            args["stake"],  # type: ignore[arg-type]
        )
    assert chain.w3.eth.get_transaction_count(as_account(keys[1]).address) == nonce


def test_python_side_rejects_unknown_role(registry: Registry, keys: list[str]) -> None:
    with pytest.raises(ValueError):
        registry.register(keys[1], 4, ENDPOINT, as_account(keys[1]).address, [], MINER_MIN)  # type: ignore[arg-type]


def test_a_key_without_funds_gets_a_clear_error(registry: Registry) -> None:
    pauper = Account.create()
    with pytest.raises(Exception, match=r"(?i)funds|afford|balance"):
        registry.register(pauper.key, Role.MINER, ENDPOINT, pauper.address, [], MINER_MIN)


# --- staking and updates --------------------------------------------------------------------


def test_stake_tops_up(registry: Registry, keys: list[str], addrs: list[str]) -> None:
    register_miner(registry, keys[1])
    receipt = registry.stake(keys[1], 5)
    events = registry.events(receipt)
    assert [(e.name, e.args["amount"], e.args["total"]) for e in events] == [
        ("Staked", 5, MINER_MIN + 5)
    ]
    record = registry.node(addrs[1])
    assert record is not None and record.stake_wei == MINER_MIN + 5


def test_stake_refusals(registry: Registry, keys: list[str]) -> None:
    with pytest.raises(ContractRevert) as exc:
        registry.stake(keys[1], MINER_MIN)
    assert reason_of(exc) == "node not active"
    register_miner(registry, keys[1])
    with pytest.raises(ContractRevert) as exc:
        registry.stake(keys[1], 0)
    assert reason_of(exc) == "zero amount"
    with pytest.raises(ValueError):
        registry.stake(keys[1], -5)


def test_update_replaces_details(registry: Registry, keys: list[str], addrs: list[str]) -> None:
    register_miner(registry, keys[1])
    models = [offer("Llama-3.1-8B-Instruct", "cd", 11)]
    receipt = registry.update(keys[1], "https://miner.example:8443", addrs[5], models)
    events = registry.events(receipt)
    assert [e.name for e in events] == ["SignerRetired", "NodeUpdated"]
    assert events[0].args["signer"] == addrs[1]
    assert events[1].args["model_count"] == 1
    record = registry.node(addrs[1])
    assert record is not None
    assert (record.endpoint, record.signer, record.models) == (
        "https://miner.example:8443",
        addrs[5],
        tuple(models),
    )
    assert record.stake_wei == MINER_MIN
    registry.update(keys[1], ENDPOINT, addrs[5], [])
    record = registry.node(addrs[1])
    assert record is not None and record.models == ()


def test_update_refusals(registry: Registry, chain: Chain, keys: list[str]) -> None:
    signer = as_account(keys[1]).address
    with pytest.raises(ContractRevert) as exc:
        registry.update(keys[1], ENDPOINT, signer, [])
    assert reason_of(exc) == "node not active"
    register_miner(registry, keys[1])
    for endpoint, who, models, reason in [
        ("", signer, [], "empty endpoint"),
        (ENDPOINT, ZERO_ADDRESS, [], "zero signer"),
        (ENDPOINT, signer, [raw_offer(model_id=ZERO_ID)], "zero model id"),
        (ENDPOINT, signer, [raw_offer("a"), raw_offer("b")], "duplicate model"),
    ]:
        with pytest.raises(ContractRevert) as exc:
            chain.send(keys[1], registry.contract, "update", endpoint, who, models)
        assert reason_of(exc) == reason
    with pytest.raises(ValueError):
        registry.update(keys[1], "", signer, [])


# --- unbonding and withdrawal ---------------------------------------------------------------


def test_unbonding_delay_is_enforced(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 3 * MINER_MIN)
    receipt = registry.request_unbonding(keys[1], MINER_MIN)
    (event,) = registry.events(receipt)
    assert event.name == "UnbondingRequested"
    unbond_at = event.args["unbond_at"]
    record = registry.node(addrs[1])
    assert record is not None
    assert (record.stake_wei, record.unbonding_wei, record.unbond_at, record.active) == (
        2 * MINER_MIN,
        MINER_MIN,
        unbond_at,
        True,
    )
    assert unbond_at - chain.timestamp() == DELAY

    with pytest.raises(ContractRevert) as exc:
        registry.withdraw(keys[1])
    assert reason_of(exc) == "unbonding not matured"
    chain.increase_time(DELAY // 2)
    with pytest.raises(ContractRevert) as exc:
        registry.withdraw(keys[1])
    assert reason_of(exc) == "unbonding not matured"

    chain.increase_time(DELAY // 2)
    before = chain.balance(addrs[1])
    receipt = registry.withdraw(keys[1])
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.balance(addrs[1]) == before + MINER_MIN - fee
    assert [(e.name, e.args["amount"]) for e in registry.events(receipt)] == [
        ("Withdrawn", MINER_MIN)
    ]
    record = registry.node(addrs[1])
    assert record is not None
    assert (record.stake_wei, record.unbonding_wei, record.active) == (2 * MINER_MIN, 0, True)
    with pytest.raises(ContractRevert) as exc:
        registry.withdraw(keys[1])
    assert reason_of(exc) == "nothing to withdraw"


def test_new_unbonding_request_restarts_the_clock(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 3 * MINER_MIN)
    registry.request_unbonding(keys[1], MINER_MIN)
    chain.increase_time(DELAY - 10)
    registry.request_unbonding(keys[1], MINER_MIN)
    chain.increase_time(20)
    # The first part would have matured on its own; all unbonding funds share the new clock.
    with pytest.raises(ContractRevert, match="unbonding not matured"):
        registry.withdraw(keys[1])
    record = registry.node(addrs[1])
    assert record is not None and record.unbonding_wei == 2 * MINER_MIN
    chain.increase_time(DELAY)
    registry.withdraw(keys[1])


def test_unbonding_refusals(registry: Registry, keys: list[str]) -> None:
    with pytest.raises(ContractRevert) as exc:
        registry.request_unbonding(keys[1], 1)
    assert reason_of(exc) == "not registered"
    register_miner(registry, keys[1], 2 * MINER_MIN)
    for amount, reason in [
        (0, "zero amount"),
        (2 * MINER_MIN + 1, "amount exceeds stake"),
        (MINER_MIN + 1, "remaining stake below minimum"),
        (2 * MINER_MIN - 1, "remaining stake below minimum"),
    ]:
        with pytest.raises(ContractRevert) as exc:
            registry.request_unbonding(keys[1], amount)
        assert reason_of(exc) == reason
    with pytest.raises(ValueError):
        registry.request_unbonding(keys[1], -1)


def test_unbonding_everything_deactivates(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 2 * MINER_MIN)
    receipt = registry.request_unbonding(keys[1], 2 * MINER_MIN)
    assert names(registry, receipt) == ["UnbondingRequested", "NodeDeactivated"]
    record = registry.node(addrs[1])
    assert record is not None and not record.active and record.stake_wei == 0
    assert registry.nodes() == []
    assert registry.nodes(active_only=False) == [record]
    with pytest.raises(ContractRevert, match="node not active"):
        registry.stake(keys[1], MINER_MIN)
    with pytest.raises(ContractRevert, match="amount exceeds stake"):
        registry.request_unbonding(keys[1], 1)
    chain.increase_time(DELAY)
    receipt = registry.withdraw(keys[1])
    assert names(registry, receipt) == ["Withdrawn", "NodeRemoved"]
    assert registry.node(addrs[1]) is None
    assert registry.node_count() == 0


def test_only_the_owner_withdraws(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 2 * MINER_MIN)
    registry.deregister(keys[1])
    chain.increase_time(DELAY + 1)
    held = chain.balance(registry.address)
    # Every other account, the admin and the slasher included, gets nothing.
    for thief in (keys[0], keys[2], keys[9]):
        with pytest.raises(ContractRevert) as exc:
            registry.withdraw(thief)
        assert reason_of(exc) == "nothing to withdraw"
        with pytest.raises(ContractRevert, match="nothing to claim"):
            registry.claim(thief)
    assert chain.balance(registry.address) == held
    record = registry.node(addrs[1])
    assert record is not None and record.unbonding_wei == 2 * MINER_MIN

    before = chain.balance(addrs[1])
    receipt = registry.withdraw(keys[1])
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.balance(addrs[1]) == before + 2 * MINER_MIN - fee
    assert chain.balance(registry.address) == held - 2 * MINER_MIN


def test_others_cannot_touch_a_node(registry: Registry, keys: list[str], addrs: list[str]) -> None:
    register_miner(registry, keys[1])
    # Every call acts on msg.sender's own node, so a stranger only ever reaches its own.
    with pytest.raises(ContractRevert, match="node not active"):
        registry.deregister(keys[2])
    with pytest.raises(ContractRevert, match="node not active"):
        registry.update(keys[2], "http://evil", addrs[2], [])
    with pytest.raises(ContractRevert, match="not registered"):
        registry.request_unbonding(keys[2], 1)
    record = registry.node(addrs[1])
    assert record is not None and record.active and record.endpoint == ENDPOINT


# --- deregistration -------------------------------------------------------------------------


def test_deregister(registry: Registry, chain: Chain, keys: list[str], addrs: list[str]) -> None:
    register_miner(registry, keys[1], 2 * MINER_MIN)
    register_miner(registry, keys[2])
    receipt = registry.deregister(keys[1])
    (event,) = registry.events(receipt)
    assert event.name == "NodeDeregistered"
    assert event.args["unbonding"] == 2 * MINER_MIN
    assert event.args["unbond_at"] == chain.timestamp() + DELAY
    record = registry.node(addrs[1])
    assert record is not None
    assert (record.active, record.stake_wei, record.unbonding_wei) == (False, 0, 2 * MINER_MIN)
    assert [n.owner for n in registry.nodes()] == [addrs[2]]
    assert {n.owner for n in registry.nodes(active_only=False)} == {addrs[1], addrs[2]}

    with pytest.raises(ContractRevert) as exc:
        registry.deregister(keys[1])
    assert reason_of(exc) == "node not active"
    with pytest.raises(ContractRevert, match="node not active"):
        registry.update(keys[1], ENDPOINT, addrs[1], [])
    with pytest.raises(ContractRevert, match="unbonding not matured"):
        registry.withdraw(keys[1])


def test_reregister_while_unbonding_keeps_the_unbonding_funds(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 2 * MINER_MIN)
    registry.deregister(keys[1])
    registry.register(keys[1], Role.MINER, "http://m2", addrs[1], [offer()], 3 * MINER_MIN)
    record = registry.node(addrs[1])
    assert record is not None
    assert (record.role, record.active, record.stake_wei, record.unbonding_wei) == (
        Role.MINER,
        True,
        3 * MINER_MIN,
        2 * MINER_MIN,
    )
    assert registry.node_count() == 1  # listed once, not twice
    chain.increase_time(DELAY)
    registry.withdraw(keys[1])
    record = registry.node(addrs[1])
    assert record is not None and record.active and record.unbonding_wei == 0


# --- slashing -------------------------------------------------------------------------------


def test_only_the_slasher_slashes(registry: Registry, keys: list[str], addrs: list[str]) -> None:
    register_miner(registry, keys[1])
    for who in (0, 1, 2):  # the admin, the node itself, a stranger
        with pytest.raises(ContractRevert) as exc:
            registry.slash(keys[who], addrs[1], 1, addrs[who])
        assert reason_of(exc) == "only slasher"
    record = registry.node(addrs[1])
    assert record is not None and record.stake_wei == MINER_MIN


def test_slash_refusals(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1])
    slasher = keys[9]
    with pytest.raises(ContractRevert, match="zero recipient"):
        chain.send(slasher, registry.contract, "slash", addrs[1], 1, ZERO_ADDRESS)
    with pytest.raises(ContractRevert, match="zero amount"):
        registry.slash(slasher, addrs[1], 0, addrs[8])
    with pytest.raises(ContractRevert, match="unknown node"):
        registry.slash(slasher, addrs[3], 1, addrs[8])
    with pytest.raises(ValueError):
        registry.slash(slasher, "0xnope", 1, addrs[8])


def test_slash_takes_stake_first_then_unbonding_and_is_bounded(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 3 * MINER_MIN)
    registry.request_unbonding(keys[1], MINER_MIN)  # stake 2, unbonding 1
    slasher, victim, recipient = keys[9], addrs[1], addrs[8]

    receipt = registry.slash(slasher, victim, 3 * MINER_MIN // 2, recipient)
    (event,) = registry.events(receipt)
    assert (event.name, event.args["amount"], event.args["requested"]) == (
        "Slashed",
        3 * MINER_MIN // 2,
        3 * MINER_MIN // 2,
    )
    record = registry.node(victim)
    assert record is not None
    assert (record.stake_wei, record.unbonding_wei) == (MINER_MIN // 2, MINER_MIN)
    # Below the minimum now: still registered and active in the contract, but not offered
    # to gateways.
    assert record.active
    assert registry.nodes() == []
    assert registry.nodes(active_only=False) == [record]

    # Far more than the node holds: takes what there is, stake first, then unbonding.
    receipt = registry.slash(slasher, victim, 100 * MINER_MIN, recipient)
    events = registry.events(receipt)
    assert [e.name for e in events] == ["Slashed", "NodeDeactivated", "NodeRemoved"]
    assert events[0].args["amount"] == 3 * MINER_MIN // 2
    assert registry.node(victim) is None
    assert registry.credits(recipient) == 3 * MINER_MIN

    with pytest.raises(ContractRevert, match="unknown node"):
        registry.slash(slasher, victim, 1, recipient)

    # The recipient pulls its credit; nobody else can.
    with pytest.raises(ContractRevert, match="nothing to claim"):
        registry.claim(keys[2])
    before = chain.balance(recipient)
    receipt = registry.claim(keys[8])
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.balance(recipient) == before + 3 * MINER_MIN - fee
    assert registry.credits(recipient) == 0
    assert chain.balance(registry.address) == 0


def test_slash_reaches_unbonding_funds_and_blocks_withdrawal(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 2 * MINER_MIN)
    registry.deregister(keys[1])
    chain.increase_time(DELAY // 2)
    registry.slash(keys[9], addrs[1], MINER_MIN, addrs[8])
    chain.increase_time(DELAY)
    before = chain.balance(addrs[1])
    receipt = registry.withdraw(keys[1])
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.balance(addrs[1]) == before + MINER_MIN - fee


@pytest.fixture
def bare_registry(chain: Chain, keys: list[str]) -> Registry:
    """A registry as deploy leaves it: admin key 0, no slasher named yet."""
    return Registry(chain, deploy_registry(chain, keys[0], MIN_STAKES, DELAY))


def test_the_slasher_is_named_once_by_the_admin(
    bare_registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    registry = bare_registry
    assert registry.slasher() == ZERO_ADDRESS
    with pytest.raises(ContractRevert) as exc:
        registry.set_slasher(keys[1], addrs[1])
    assert reason_of(exc) == "admin: only admin"
    with pytest.raises(ContractRevert) as exc:
        chain.send(keys[0], registry.contract, "set_slasher", ZERO_ADDRESS)
    assert reason_of(exc) == "zero slasher"
    with pytest.raises(ValueError, match="zero address"):
        registry.set_slasher(keys[0], ZERO_ADDRESS)
    with pytest.raises(ValueError, match="slasher"):
        registry.set_slasher(keys[0], "0x12")
    receipt = registry.set_slasher(keys[0], addrs[7])
    assert [(e.name, e.args["slasher"]) for e in registry.events(receipt)] == [
        ("SlasherSet", addrs[7])
    ]
    assert registry.slasher() == addrs[7]
    register_miner(registry, keys[1])
    with pytest.raises(ContractRevert, match="only slasher"):
        registry.slash(keys[0], addrs[1], 1, addrs[0])
    registry.slash(keys[7], addrs[1], 1, addrs[8])


def test_the_admin_cannot_make_itself_slasher_and_take_the_stake(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack (issue 8, item 6): the admin replaced the slasher with itself, or with the zero
    address, and slashed every stake to itself. The slasher is now fixed once named."""
    register_miner(registry, keys[1], 5 * MINER_MIN)
    held = chain.balance(registry.address)
    for slasher in (addrs[0], addrs[2]):
        with pytest.raises(ContractRevert) as exc:
            registry.set_slasher(keys[0], slasher)
        assert reason_of(exc) == "slasher already set"
    with pytest.raises(ContractRevert) as exc:
        chain.send(keys[0], registry.contract, "set_slasher", ZERO_ADDRESS)
    assert reason_of(exc) == "zero slasher"
    assert registry.slasher() == addrs[9]
    with pytest.raises(ContractRevert, match="only slasher"):
        registry.slash(keys[0], addrs[1], 5 * MINER_MIN, addrs[0])
    # A new admin inherits no more power than the old one had.
    registry.transfer_admin(keys[0], addrs[6])
    registry.accept_admin(keys[6])
    with pytest.raises(ContractRevert) as exc:
        registry.set_slasher(keys[6], addrs[6])
    assert reason_of(exc) == "slasher already set"
    assert chain.balance(registry.address) == held
    assert registry.total_stake_of(addrs[1]) == 5 * MINER_MIN


def test_admin_transfer_takes_two_steps(
    bare_registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack (issue 8, item 6): admin transfer was one step, so a typo'd address became
    admin at once. Now the named successor must accept, and until then cannot act."""
    registry = bare_registry
    with pytest.raises(ContractRevert) as exc:
        registry.transfer_admin(keys[1], addrs[1])
    assert reason_of(exc) == "admin: only admin"
    with pytest.raises(ContractRevert) as exc:
        registry.transfer_admin(keys[0], addrs[0])
    assert reason_of(exc) == "admin: already admin"
    with pytest.raises(ContractRevert) as exc:
        registry.accept_admin(keys[6])
    assert reason_of(exc) == "admin: no pending admin"

    receipt = registry.transfer_admin(keys[0], addrs[6])
    assert [(e.name, e.args) for e in registry.events(receipt)] == [
        ("AdminTransferStarted", {"admin": addrs[0], "pending_admin": addrs[6]})
    ]
    assert (registry.admin(), registry.pending_admin()) == (addrs[0], addrs[6])
    # The pending admin cannot act before it accepts; nobody else can accept for it.
    with pytest.raises(ContractRevert) as exc:
        registry.set_slasher(keys[6], addrs[6])
    assert reason_of(exc) == "admin: only admin"
    with pytest.raises(ContractRevert) as exc:
        registry.accept_admin(keys[5])
    assert reason_of(exc) == "admin: only pending admin"

    # The admin cancels by naming the zero address; the old nominee can no longer accept.
    registry.transfer_admin(keys[0], ZERO_ADDRESS)
    assert registry.pending_admin() is None
    with pytest.raises(ContractRevert) as exc:
        registry.accept_admin(keys[6])
    assert reason_of(exc) == "admin: no pending admin"

    registry.transfer_admin(keys[0], addrs[6])
    receipt = registry.accept_admin(keys[6])
    assert [(e.name, e.args) for e in registry.events(receipt)] == [
        ("AdminTransferred", {"admin": addrs[6]})
    ]
    assert (registry.admin(), registry.pending_admin()) == (addrs[6], None)
    with pytest.raises(ContractRevert) as exc:
        registry.set_slasher(keys[0], addrs[0])
    assert reason_of(exc) == "admin: only admin"
    registry.set_slasher(keys[6], addrs[7])
    assert registry.slasher() == addrs[7]
    with pytest.raises(ValueError, match="admin"):
        registry.transfer_admin(keys[6], "0x12")


# --- single-field views and freezing ----------------------------------------------------------


def test_single_field_views(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    registry.register(keys[1], Role.MINER, ENDPOINT, addrs[2], [offer()], 3 * MINER_MIN)
    registry.request_unbonding(keys[1], MINER_MIN)
    fns = registry.contract.functions
    assert registry.signer_of(addrs[1]) == addrs[2]
    assert registry.total_stake_of(addrs[1]) == 3 * MINER_MIN  # bonded 2 + unbonding 1
    assert chain.call(fns.stake_of(addrs[1])) == 2 * MINER_MIN
    assert chain.call(fns.role_of(addrs[1])) == int(Role.MINER)
    assert chain.call(fns.is_active(addrs[1])) is True
    assert registry.is_frozen(addrs[1]) is False
    # Nobody registered: zeros, and None for the signer.
    assert registry.signer_of(addrs[3]) is None
    assert registry.total_stake_of(addrs[3]) == 0
    assert chain.call(fns.role_of(addrs[3])) == 0
    assert chain.call(fns.is_active(addrs[3])) is False
    registry.deregister(keys[1])
    assert chain.call(fns.is_active(addrs[1])) is False
    assert registry.total_stake_of(addrs[1]) == 3 * MINER_MIN
    for view in (registry.signer_of, registry.total_stake_of, registry.is_frozen):
        with pytest.raises(ValueError, match="owner"):
            view("0x12")


def test_only_the_slasher_freezes_and_unfreezes(
    registry: Registry, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1])
    for who in (0, 1, 2):  # the admin, the node itself, a stranger
        with pytest.raises(ContractRevert) as exc:
            registry.freeze(keys[who], addrs[1])
        assert reason_of(exc) == "only slasher"
    registry.freeze(keys[9], addrs[1])
    for who in (0, 1, 2):
        with pytest.raises(ContractRevert) as exc:
            registry.unfreeze(keys[who], addrs[1])
        assert reason_of(exc) == "only slasher"
    assert registry.is_frozen(addrs[1])
    with pytest.raises(ContractRevert, match="unknown node"):
        registry.freeze(keys[9], addrs[3])
    with pytest.raises(ContractRevert, match="node not frozen"):
        registry.unfreeze(keys[9], addrs[3])


def test_a_frozen_node_cannot_unbond_deregister_or_withdraw(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1], 3 * MINER_MIN)
    registry.request_unbonding(keys[1], MINER_MIN)
    receipt = registry.freeze(keys[9], addrs[1])
    assert [(e.name, e.args) for e in registry.events(receipt)] == [
        ("NodeFrozen", {"owner": addrs[1], "count": 1})
    ]
    record = registry.node(addrs[1])
    assert record is not None and record.frozen and record.active
    chain.increase_time(DELAY)  # the unbonding has matured, and still cannot leave
    for action in (
        lambda: registry.request_unbonding(keys[1], MINER_MIN),
        lambda: registry.deregister(keys[1]),
        lambda: registry.withdraw(keys[1]),
        lambda: registry.update(keys[1], "http://moved", addrs[1], [offer()]),
    ):
        with pytest.raises(ContractRevert) as exc:
            action()
        assert reason_of(exc) == "node frozen"
    # Adding stake is still allowed: it lets no funds escape.
    registry.stake(keys[1], MINER_MIN)
    # A frozen node is still listed as active: the gateway decides to skip it by `frozen`.
    (listed,) = registry.nodes()
    assert listed.owner == addrs[1] and listed.frozen

    receipt = registry.unfreeze(keys[9], addrs[1])
    assert [(e.name, e.args) for e in registry.events(receipt)] == [
        ("NodeUnfrozen", {"owner": addrs[1], "count": 0})
    ]
    record = registry.node(addrs[1])
    assert record is not None and not record.frozen
    registry.withdraw(keys[1])
    registry.deregister(keys[1])
    with pytest.raises(ContractRevert, match="node not frozen"):
        registry.unfreeze(keys[9], addrs[1])


def test_freezes_nest_and_outlive_a_slashed_empty_node(
    registry: Registry, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1])
    registry.freeze(keys[9], addrs[1])
    receipt = registry.freeze(keys[9], addrs[1])
    assert registry.events(receipt)[0].args["count"] == 2
    registry.unfreeze(keys[9], addrs[1])
    assert registry.is_frozen(addrs[1])  # one freeze still open
    with pytest.raises(ContractRevert, match="node frozen"):
        registry.deregister(keys[1])
    # Slashed empty, the node is forgotten, but the open freeze can still be released (the
    # dispute that holds it must be able to finish).
    registry.slash(keys[9], addrs[1], 10 * MINER_MIN, addrs[8])
    assert registry.node(addrs[1]) is None
    assert registry.is_frozen(addrs[1])
    registry.unfreeze(keys[9], addrs[1])
    assert not registry.is_frozen(addrs[1])


# --- history: signing keys, roles, stake over time --------------------------------------------


def test_rotating_the_key_after_equivocating_keeps_the_old_key_slashable(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack (issue 8, item 3): a miner that signed two conflicting attestations with key A
    switched to key B with update(); equivocation slashing accepted only the current signer,
    so the proof signed by A no longer counted and the stake stayed. A now stays `was_signer`
    for one unbonding delay (while stake bonded under it can still be here), and a node under
    dispute cannot rotate at all."""
    old, new = addrs[2], addrs[3]
    registry.register(keys[1], Role.MINER, ENDPOINT, old, [offer()], MINER_MIN)
    assert registry.was_signer(addrs[1], old)
    receipt = registry.update(keys[1], ENDPOINT, new, [offer()])
    retired_at = block_time(chain, receipt)
    retired, _updated = registry.events(receipt)
    assert (retired.name, retired.args) == (
        "SignerRetired",
        {"owner": addrs[1], "signer": old, "retired_at": retired_at},
    )
    fns = registry.contract.functions
    assert registry.signer_of(addrs[1]) == new
    assert chain.call(fns.signer_retired_at(addrs[1], old)) == retired_at
    assert chain.call(fns.signer_retired_at(addrs[1], new)) == 0
    assert registry.was_signer(addrs[1], old) and registry.was_signer(addrs[1], new)
    chain.increase_time(DELAY - 10)
    assert registry.was_signer(addrs[1], old)
    # One unbonding delay after retirement, the old key no longer speaks for the node.
    chain.increase_time(10)
    assert chain.timestamp() >= retired_at + DELAY
    assert not registry.was_signer(addrs[1], old)
    assert registry.was_signer(addrs[1], new)

    # Under dispute, the node cannot rotate again (nor change anything else).
    registry.freeze(keys[9], addrs[1])
    for signer in (addrs[4], new):
        with pytest.raises(ContractRevert) as exc:
            registry.update(keys[1], "http://elsewhere", signer, [])
        assert reason_of(exc) == "node frozen"
    assert registry.signer_of(addrs[1]) == new


def test_was_signer_only_for_keys_the_owner_held(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1])
    registry.update(keys[1], ENDPOINT, addrs[2], [])
    assert not registry.was_signer(addrs[1], ZERO_ADDRESS)
    assert not registry.was_signer(addrs[1], addrs[5])  # never held
    assert not registry.was_signer(addrs[5], addrs[1])  # another owner's key
    assert not registry.was_signer(addrs[5], ZERO_ADDRESS)  # nobody registered
    fns = registry.contract.functions
    assert chain.call(fns.was_signer(addrs[1], ZERO_ADDRESS)) is False
    for bad in (("0x12", addrs[1]), (addrs[1], "nope")):
        with pytest.raises(ValueError):
            registry.was_signer(*bad)


def test_an_old_key_added_again_is_current_again(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    a, b = addrs[2], addrs[3]
    registry.register(keys[1], Role.MINER, ENDPOINT, a, [], MINER_MIN)
    registry.update(keys[1], ENDPOINT, b, [])
    receipt = registry.update(keys[1], ENDPOINT, a, [])
    assert [(e.name, e.args["signer"]) for e in registry.events(receipt)] == [
        ("SignerRetired", b),
        ("NodeUpdated", a),
    ]
    fns = registry.contract.functions
    assert chain.call(fns.signer_retired_at(addrs[1], a)) == 0
    chain.increase_time(DELAY + 1)
    assert registry.was_signer(addrs[1], a)  # current: no window applies
    assert not registry.was_signer(addrs[1], b)
    # The same key again retires nothing.
    receipt = registry.update(keys[1], "http://moved", a, [])
    assert names(registry, receipt) == ["NodeUpdated"]


def test_registering_again_with_another_key_retires_the_old_one(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    registry.register(keys[1], Role.MINER, ENDPOINT, addrs[2], [], MINER_MIN)
    registry.deregister(keys[1])
    receipt = registry.register(keys[1], Role.MINER, ENDPOINT, addrs[3], [], MINER_MIN)
    assert [(e.name, e.args.get("signer")) for e in registry.events(receipt)] == [
        ("SignerRetired", addrs[2]),
        ("NodeRegistered", addrs[3]),
    ]
    assert registry.was_signer(addrs[1], addrs[2]) and registry.was_signer(addrs[1], addrs[3])
    chain.increase_time(DELAY)
    assert not registry.was_signer(addrs[1], addrs[2])
    # A node that left entirely signs with nothing: its stake is gone, so is its key.
    registry.withdraw(keys[1])
    registry.deregister(keys[1])
    chain.increase_time(DELAY)
    registry.withdraw(keys[1])
    assert registry.node(addrs[1]) is None
    assert not registry.was_signer(addrs[1], addrs[3])
    assert registry.signer_of(addrs[1]) is None


def test_changing_role_while_unbonding_does_not_escape_a_dispute(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """Attack (issue 8, item 4): a miner deregistered and registered again as a gateway (or
    verifier); disputes, which only reach miners, then reverted "not a miner" and its old
    stake unbonded untouched. The role cannot change while the old role's funds unbond."""
    register_miner(registry, keys[1], 2 * MINER_MIN)
    registry.deregister(keys[1])
    for role, stake in ((Role.GATEWAY, GATEWAY_MIN), (Role.VERIFIER, VERIFIER_MIN)):
        with pytest.raises(ContractRevert) as exc:
            registry.register(keys[1], role, ENDPOINT, addrs[1], [], stake)
        assert reason_of(exc) == "role change while unbonding"
    fns = registry.contract.functions
    assert chain.call(fns.role_of(addrs[1])) == int(Role.MINER)
    # Still a miner with its funds in place: a dispute can freeze and slash them.
    registry.freeze(keys[9], addrs[1])
    chain.increase_time(DELAY)
    with pytest.raises(ContractRevert, match="node frozen"):
        registry.withdraw(keys[1])
    registry.slash(keys[9], addrs[1], MINER_MIN, addrs[8])
    assert registry.total_stake_of(addrs[1]) == MINER_MIN
    registry.unfreeze(keys[9], addrs[1])
    # The same role again is fine while unbonding (the funds stay a miner's).
    registry.register(keys[1], Role.MINER, ENDPOINT, addrs[1], [], MINER_MIN)
    record = registry.node(addrs[1])
    assert record is not None and (record.role, record.unbonding_wei) == (Role.MINER, MINER_MIN)


def test_any_role_once_the_old_funds_have_left(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    register_miner(registry, keys[1])
    registry.deregister(keys[1])
    chain.increase_time(DELAY)
    registry.withdraw(keys[1])  # forgotten: nothing of the miner is left here
    registry.register(keys[1], Role.GATEWAY, ENDPOINT, addrs[1], [], GATEWAY_MIN)
    record = registry.node(addrs[1])
    assert record is not None and record.role == Role.GATEWAY and record.active


def test_stake_at_follows_every_change_of_bonded_stake(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    owner, key = addrs[1], keys[1]
    assert registry.stake_at(owner, 2**256 - 1) == 0  # never staked
    history: list[tuple[int, int]] = []  # (block time, bonded stake from then on)

    def after(receipt: object, stake: int) -> None:
        history.append((block_time(chain, receipt), stake))

    after(registry.register(key, Role.MINER, ENDPOINT, owner, [], 3 * MINER_MIN), 3 * MINER_MIN)
    chain.increase_time(100)
    after(registry.stake(key, MINER_MIN), 4 * MINER_MIN)
    after(registry.request_unbonding(key, MINER_MIN), 3 * MINER_MIN)
    chain.increase_time(50)
    after(registry.slash(keys[9], owner, MINER_MIN // 2, addrs[8]), 5 * MINER_MIN // 2)
    after(registry.deregister(key), 0)
    # Slashing only unbonding funds and withdrawing leave bonded stake as it was: no entry.
    registry.slash(keys[9], owner, 1, addrs[8])
    chain.increase_time(DELAY)
    registry.withdraw(key)
    assert registry.node(owner) is None  # forgotten; its stake history is not

    assert registry.stake_checkpoints(owner) == history
    first = history[0][0]
    assert registry.stake_at(owner, 0) == 0
    assert registry.stake_at(owner, first - 1) == 0
    ends = [t for t, _ in history[1:]] + [history[-1][0] + 10**6]
    for (t, stake), end in zip(history, ends, strict=True):
        assert registry.stake_at(owner, t) == stake  # changes at exactly t are included
        assert registry.stake_at(owner, end - 1) == stake
    assert registry.stake_at(owner, 2**256 - 1) == 0  # far future: the latest, 0 after exit
    assert registry.stake_at(owner, chain.timestamp()) == 0

    # Registering again continues the same history.
    after(registry.register(key, Role.MINER, ENDPOINT, owner, [], MINER_MIN), MINER_MIN)
    assert registry.stake_checkpoints(owner) == history
    assert registry.stake_at(owner, history[2][0]) == 3 * MINER_MIN
    assert registry.stake_at(owner, 2**256 - 1) == MINER_MIN
    with pytest.raises(ValueError, match="timestamp"):
        registry.stake_at(owner, -1)
    with pytest.raises(ContractRevert, match="index out of range"):
        chain.call(registry.contract.functions.stake_checkpoint(owner, len(history)))


def test_stake_at_searches_a_long_history(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    owner = addrs[1]
    receipt = registry.register(keys[1], Role.MINER, ENDPOINT, owner, [], MINER_MIN)
    history = [(block_time(chain, receipt), MINER_MIN)]
    for i in range(1, 40):
        chain.increase_time(i % 7 * 13)  # uneven gaps, some none at all
        receipt = registry.stake(keys[1], i)
        history.append((block_time(chain, receipt), history[-1][1] + i))
    assert registry.stake_checkpoints(owner) == history
    queries = sorted({t + d for t, _ in history for d in (-1, 0, 1)})
    for query in queries:
        expected = max((s for t, s in history if t <= query), default=0)
        assert registry.stake_at(owner, query) == expected, query


def test_registered_at_marks_the_current_registration(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    owner = addrs[1]
    assert registry.registered_at(owner) == 0
    first = block_time(
        chain, registry.register(keys[1], Role.MINER, ENDPOINT, owner, [], MINER_MIN)
    )
    assert registry.registered_at(owner) == first
    registry.stake(keys[1], 1)
    registry.deregister(keys[1])
    assert registry.registered_at(owner) == first  # inactive but not forgotten
    chain.increase_time(100)
    again = block_time(
        chain, registry.register(keys[1], Role.MINER, ENDPOINT, owner, [], MINER_MIN)
    )
    assert again > first and registry.registered_at(owner) == again
    registry.deregister(keys[1])
    chain.increase_time(DELAY)
    registry.withdraw(keys[1])
    assert registry.node(owner) is None and registry.registered_at(owner) == 0
    with pytest.raises(ValueError, match="owner"):
        registry.registered_at("0x12")


# --- ensure_registered ------------------------------------------------------------------------


def test_ensure_registered_is_idempotent(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    key, owner = keys[1], addrs[1]
    models = [offer()]

    def nonce() -> int:
        return int(chain.w3.eth.get_transaction_count(owner))

    first = registry.ensure_registered(key, Role.MINER, ENDPOINT, addrs[2], models, 2 * MINER_MIN)
    assert first.active and first.stake_wei == 2 * MINER_MIN
    sent = nonce()
    # A restart with the same settings sends nothing.
    again = registry.ensure_registered(key, Role.MINER, ENDPOINT, addrs[2], models, 2 * MINER_MIN)
    assert again == first and nonce() == sent
    # Model ids compare case-insensitively.
    upper = [
        ModelOffer(m.name, "0x" + m.model_id[2:].upper(), m.price_in_wei, m.price_out_wei)
        for m in models
    ]
    registry.ensure_registered(key, Role.MINER, ENDPOINT, addrs[2].lower(), upper, 2 * MINER_MIN)
    assert nonce() == sent
    # Asking for less stake than held changes nothing.
    registry.ensure_registered(key, Role.MINER, ENDPOINT, addrs[2], models, MINER_MIN)
    assert nonce() == sent

    # A new endpoint: one update, no new registration.
    moved = registry.ensure_registered(key, Role.MINER, "http://new:1", addrs[2], models, MINER_MIN)
    assert moved.endpoint == "http://new:1" and nonce() == sent + 1
    # New models and more stake: an update and a top-up.
    more = [offer(), offer("Qwen2.5-7B-Instruct", "22")]
    record = registry.ensure_registered(
        key, Role.MINER, "http://new:1", addrs[3], more, 5 * MINER_MIN
    )
    assert nonce() == sent + 3
    assert (record.signer, record.models, record.stake_wei) == (
        addrs[3],
        tuple(more),
        5 * MINER_MIN,
    )
    assert registry.node_count() == 1


def test_ensure_registered_refuses_a_role_change_and_reregisters_after_exit(
    registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    registry.ensure_registered(keys[1], Role.MINER, ENDPOINT, addrs[1], [offer()], MINER_MIN)
    with pytest.raises(ValueError, match="registered as miner"):
        registry.ensure_registered(keys[1], Role.GATEWAY, ENDPOINT, addrs[1], [], GATEWAY_MIN)
    registry.deregister(keys[1])
    # Still unbonding as a miner: refused in Python, before a transaction is sent.
    nonce = chain.w3.eth.get_transaction_count(addrs[1])
    with pytest.raises(ValueError, match="miner stake unbonding; withdraw it"):
        registry.ensure_registered(keys[1], Role.GATEWAY, ENDPOINT, addrs[1], [], GATEWAY_MIN)
    assert chain.w3.eth.get_transaction_count(addrs[1]) == nonce
    chain.increase_time(DELAY)
    registry.withdraw(keys[1])
    record = registry.ensure_registered(keys[1], Role.GATEWAY, ENDPOINT, addrs[1], [], GATEWAY_MIN)
    assert record.role == Role.GATEWAY and record.active
    assert record.unbonding_wei == 0
    assert registry.node_count() == 1


def test_ensure_registered_validates_before_reading(registry: Registry, keys: list[str]) -> None:
    with pytest.raises(ValueError):
        registry.ensure_registered(keys[1], Role.MINER, "", as_account(keys[1]).address, [], 1)
    with pytest.raises(ValueError):
        registry.ensure_registered(keys[1], Role.MINER, ENDPOINT, "0x12", [], 1)
    with pytest.raises(ContractRevert, match="stake below minimum"):
        registry.ensure_registered(
            keys[1], Role.MINER, ENDPOINT, as_account(keys[1]).address, [], 1
        )


# --- enumeration ------------------------------------------------------------------------------


def test_enumeration_pages_and_removal(registry: Registry, chain: Chain, keys: list[str]) -> None:
    # More nodes than one page: fresh accounts funded from a dev account.
    owners = [Account.from_key(bytes([7]) * 31 + bytes([i + 1])) for i in range(37)]
    for account in owners:
        chain.transfer(keys[3], account.address, 2 * MINER_MIN)
    for i, account in enumerate(owners):
        registry.register(
            account.key, Role.MINER, f"http://n{i}", account.address, [offer()], MINER_MIN + i
        )
    assert registry.node_count() == 37
    listed = registry.nodes()
    assert [n.owner for n in listed] == [a.address for a in owners]
    assert [n.endpoint for n in listed] == [f"http://n{i}" for i in range(37)]
    assert [n.stake_wei for n in listed] == [MINER_MIN + i for i in range(37)]

    fns = registry.contract.functions
    assert len(chain.call(fns.get_nodes(0, 1000))) == 32  # capped at one page
    assert len(chain.call(fns.get_nodes(32, 32))) == 5
    assert chain.call(fns.get_nodes(37, 5)) == []
    assert chain.call(fns.get_nodes(2**256 - 1, 2**256 - 1)) == []
    assert chain.call(fns.get_nodes(0, 0)) == []
    assert [v[0] for v in chain.call(fns.get_nodes(3, 2))] == [owners[3].address, owners[4].address]
    assert chain.call(fns.node_owner(36)) == owners[36].address
    with pytest.raises(ContractRevert, match="index out of range"):
        chain.call(fns.node_owner(37))

    # Filters.
    assert registry.nodes(role=Role.MINER) == listed
    assert registry.nodes(role=Role.GATEWAY) == []

    # Leaving nodes drop out of the list; the last one moves into the gap.
    registry.request_unbonding(owners[0].key, MINER_MIN)
    registry.deregister(owners[5].key)
    chain.increase_time(DELAY)
    registry.withdraw(owners[0].key)
    registry.withdraw(owners[5].key)
    remaining = {a.address for a in owners} - {owners[0].address, owners[5].address}
    assert registry.node_count() == 35
    assert {n.owner for n in registry.nodes()} == remaining
    assert len(registry.nodes(active_only=False)) == 35
    assert chain.call(fns.node_owner(0)) == owners[36].address
    assert chain.call(fns.node_owner(5)) == owners[35].address


def test_views_need_no_gas_and_bad_input_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="owner"):
        registry.node("0x12")
    with pytest.raises(ValueError, match="recipient"):
        registry.credits("x")


# --- payouts to contracts ---------------------------------------------------------------------

# A node owned by a contract, which can accept, refuse or try to re-enter on payment.
OWNER_CONTRACT = """
# pragma version ~=0.4.3
# pragma evm-version london

registry: public(address)
mode: public(uint256)  # 0 accept payments, 1 re-enter withdraw(), 2 refuse

@deploy
def __init__(registry: address):
    self.registry = registry

@external
def set_mode(mode: uint256):
    self.mode = mode

@external
@payable
def forward(data: Bytes[4096]):
    raw_call(self.registry, data, value=msg.value)

@external
@payable
def forward_batch(calls: DynArray[Bytes[4096], 4], values: DynArray[uint256, 4]):
    # Several registry calls in one transaction, hence in one block.
    for i: uint256 in range(4):
        if i >= len(calls):
            break
        raw_call(self.registry, calls[i], value=values[i])

@external
@payable
def __default__():
    if self.mode == 1:
        raw_call(self.registry, method_id("withdraw()"))
    elif self.mode == 2:
        raise "refused"
"""


def test_withdraw_to_a_contract_owner_resists_reentrancy(
    registry: Registry, chain: Chain, keys: list[str]
) -> None:
    import vyper

    out = vyper.compile_code(OWNER_CONTRACT, output_formats=["abi", "bytecode"])
    owner_address = chain.deploy(keys[1], out["abi"], out["bytecode"], registry.address)
    owner = chain.contract(owner_address, out["abi"])
    reg = registry.contract

    def forward(function: str, *args: object, value: int = 0) -> None:
        data = bytes.fromhex(reg.encode_abi(function, args=list(args))[2:])
        chain.send(keys[1], owner, "forward", data, value=value)

    # Reverts inside bubble up with the registry's reason.
    with pytest.raises(ContractRevert, match="stake below minimum"):
        forward("register", 1, ENDPOINT, owner_address, [], value=1)
    forward("register", 1, ENDPOINT, owner_address, [], value=2 * MINER_MIN)
    forward("deregister")
    chain.increase_time(DELAY)
    held = chain.balance(registry.address)

    for mode in (1, 2):  # re-entering, then refusing: the payment fails and nothing moves
        chain.send(keys[1], owner, "set_mode", mode)
        with pytest.raises(ContractRevert, match="transfer failed"):
            forward("withdraw")
        assert chain.balance(registry.address) == held
        record = registry.node(owner_address)
        assert record is not None and record.unbonding_wei == 2 * MINER_MIN

    chain.send(keys[1], owner, "set_mode", 0)
    forward("withdraw")
    assert chain.balance(owner_address) == 2 * MINER_MIN
    assert chain.balance(registry.address) == held - 2 * MINER_MIN
    assert registry.node(owner_address) is None


def test_stake_changes_in_one_block_keep_only_the_last_checkpoint(
    registry: Registry, chain: Chain, keys: list[str]
) -> None:
    import vyper

    out = vyper.compile_code(OWNER_CONTRACT, output_formats=["abi", "bytecode"])
    owner_address = chain.deploy(keys[1], out["abi"], out["bytecode"], registry.address)
    owner = chain.contract(owner_address, out["abi"])
    reg = registry.contract

    def call(function: str, *args: object) -> bytes:
        return bytes.fromhex(reg.encode_abi(function, args=list(args))[2:])

    # Register, top up and unbond part of it, all in one block.
    receipt = chain.send(
        keys[1],
        owner,
        "forward_batch",
        [
            call("register", 1, ENDPOINT, owner_address, []),
            call("stake"),
            call("request_unbonding", MINER_MIN // 2),
        ],
        [2 * MINER_MIN, MINER_MIN, 0],
        value=3 * MINER_MIN,
    )
    t = block_time(chain, receipt)
    assert registry.stake_checkpoints(owner_address) == [(t, 5 * MINER_MIN // 2)]
    assert registry.stake_at(owner_address, t - 1) == 0
    assert registry.stake_at(owner_address, t) == 5 * MINER_MIN // 2
    # A later block adds a checkpoint of its own.
    receipt = chain.send(keys[1], owner, "forward", call("stake"), value=MINER_MIN)
    later = block_time(chain, receipt)
    assert registry.stake_checkpoints(owner_address) == [
        (t, 5 * MINER_MIN // 2),
        (later, 7 * MINER_MIN // 2),
    ]


# --- the early-miner multiplier ---------------------------------------------------------------

EARLY_PERIOD, EARLY_DECAY, EARLY_PPM = 1000, 400, 2_500_000


@pytest.fixture
def early_registry(chain: Chain, keys: list[str]) -> Registry:
    return Registry(
        chain,
        deploy_registry(
            chain,
            keys[0],
            MIN_STAKES,
            DELAY,
            early_period_s=EARLY_PERIOD,
            early_multiplier_ppm=EARLY_PPM,
            early_decay_s=EARLY_DECAY,
        ),
    )


def test_the_early_schedule_is_public(early_registry: Registry, registry: Registry) -> None:
    schedule = early_registry.early_schedule()
    assert (schedule.early_period_s, schedule.multiplier_ppm, schedule.decay_s) == (
        EARLY_PERIOD,
        EARLY_PPM,
        EARLY_DECAY,
    )
    assert schedule.genesis > 0
    # By default nobody is early.
    default = registry.early_schedule()
    assert (default.early_period_s, default.multiplier_ppm, default.decay_s) == (0, PPM, 0)


def test_an_early_miner_earns_the_multiplier_then_it_decays_to_1x(
    early_registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    genesis = early_registry.early_schedule().genesis
    end = genesis + EARLY_PERIOD
    register_miner(early_registry, keys[1])
    owner = addrs[1]
    assert early_registry.early_multiplier_at(owner, chain.timestamp()) == EARLY_PPM
    assert early_registry.early_multiplier_at(owner, end - 1) == EARLY_PPM
    assert early_registry.early_multiplier_at(owner, end) == EARLY_PPM
    # Linear from 2.5x to 1x over the decay, rounded up: a quarter of the way, 2.125x.
    assert early_registry.early_multiplier_at(owner, end + EARLY_DECAY // 4) == 2_125_000
    assert early_registry.early_multiplier_at(owner, end + 1) == EARLY_PPM - 1_500_000 // 400
    assert early_registry.early_multiplier_at(owner, end + EARLY_DECAY - 1) == PPM + 3750
    assert early_registry.early_multiplier_at(owner, end + EARLY_DECAY) == PPM
    assert early_registry.early_multiplier_at(owner, end + 10 * EARLY_DECAY) == PPM
    assert early_registry.early_multiplier_at(addrs[5], end - 1) == PPM  # never registered


def test_late_and_returning_miners_get_no_multiplier(
    early_registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    genesis = early_registry.early_schedule().genesis
    register_miner(early_registry, keys[1])
    chain.increase_time(EARLY_PERIOD + 1)
    register_miner(early_registry, keys[2])  # after the period: a late miner
    now = chain.timestamp()
    assert early_registry.registered_at(addrs[2]) >= genesis + EARLY_PERIOD
    assert early_registry.early_multiplier_at(addrs[2], now) == PPM
    assert early_registry.early_multiplier_at(addrs[1], now) > PPM
    # The early miner leaves and comes back: its new registration is a late one.
    early_registry.deregister(keys[1])
    register_miner(early_registry, keys[1])
    assert early_registry.early_multiplier_at(addrs[1], chain.timestamp()) == PPM
    with pytest.raises(ValueError, match="owner"):
        early_registry.early_multiplier_at("0x12", now)


def test_the_contract_computes_protocol_scorings_multiplier(
    early_registry: Registry, chain: Chain, keys: list[str], addrs: list[str]
) -> None:
    """NodeRegistry.early_multiplier_at is protocol.scoring's rule, second by second across
    the period's end and the decay, for an early miner, a late one and nobody."""
    schedule = early_registry.early_schedule()
    register_miner(early_registry, keys[1])
    chain.increase_time(EARLY_PERIOD)
    register_miner(early_registry, keys[2])
    end = schedule.period_end
    for owner in (addrs[1], addrs[2], addrs[6]):
        registered = early_registry.registered_at(owner)
        for t in [0, end - 1, end, end + 1, end + 7, end + 133, end + EARLY_DECAY - 1]:
            assert early_registry.early_multiplier_at(owner, t) == schedule.multiplier_ppm_at(
                registered, t
            ), (owner, t)
