"""The settlement protocol code (protocol/eip712, messages, merkle, pricing) against
independent references: eth_account's generic EIP-712 encoder, eth_keys' recovery, a naive
Merkle tree, and exact integer arithmetic."""

from __future__ import annotations

import re
from typing import Any

import pytest
from eth_abi import encode
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys import keys as eth_keys
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.protocol.eip712 import (
    DOMAIN_TYPE,
    SECP256K1_HALF_N,
    SECP256K1_N,
    ZERO32,
    Domain,
    InvalidSignature,
    Signer,
    recover,
    to_bytes32,
    word,
)
from infergrid.protocol.merkle import (
    MAX_PROOF_LENGTH,
    hash_pair,
    merkle_proof,
    merkle_root,
    reward_leaf,
    verify_proof,
)
from infergrid.protocol.messages import (
    ATTESTATION_TYPE,
    RECEIPT_TYPE,
    SIGNATURE_KEY,
    VOUCHER_TYPE,
    Attestation,
    Message,
    Receipt,
    Voucher,
    recover_signer,
    request_hash,
    response_hash,
    sign_message,
    signed_json,
)
from infergrid.protocol.nodes import WEI_PER_BTT, ModelOffer
from infergrid.protocol.pricing import PPM, request_value, split_payment, wei_to_btt

KEY = "0x" + "21" * 32
SIGNER = Signer(KEY)
DOMAIN = Domain(1337, "0x" + "ab" * 20)
UINT256_MAX = 2**256 - 1

# --- strategies -------------------------------------------------------------------------------

addresses = st.binary(min_size=20, max_size=20).map(to_checksum_address)
hashes = st.binary(min_size=32, max_size=32)
uints = st.integers(0, UINT256_MAX)
domains = st.builds(Domain, st.integers(1, 2**64), addresses)
attestations = st.builds(Attestation, hashes, hashes, hashes, addresses, uints, uints, hashes)
receipts = st.builds(
    Receipt, hashes, addresses, addresses, addresses, hashes, uints, uints, uints, uints, hashes
)
vouchers = st.builds(Voucher, addresses, addresses, addresses, uints, uints, hashes)
messages = st.one_of(attestations, receipts, vouchers)


def sample_attestation() -> Attestation:
    return Attestation(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, "0x" + "04" * 20, 10, 20)


def sample_receipt() -> Receipt:
    return Receipt(
        b"\x01" * 32,
        "0x" + "05" * 20,
        "0x" + "04" * 20,
        SIGNER.address,
        b"\x03" * 32,
        10,
        20,
        700,
        1_700_000_000,
        sample_attestation().struct_hash(),
    )


def sample_voucher() -> Voucher:
    return Voucher("0x" + "05" * 20, "0x" + "04" * 20, SIGNER.address, 700, 1_700_000_000, ZERO32)


# --- the reference: eth_account's generic typed-data encoder ----------------------------------


def type_fields(type_string: str) -> tuple[str, list[dict[str, str]]]:
    name, body = re.fullmatch(r"(\w+)\((.*)\)", type_string).groups()  # type: ignore[union-attr]
    return name, [
        {"name": member.split()[1], "type": member.split()[0]} for member in body.split(",")
    ]


TYPE_OF: dict[type, str] = {
    Attestation: ATTESTATION_TYPE,
    Receipt: RECEIPT_TYPE,
    Voucher: VOUCHER_TYPE,
}


def typed_data(domain: Domain, message: Message) -> SignableMessage:
    primary, fields = type_fields(TYPE_OF[type(message)])
    _, domain_fields = type_fields(DOMAIN_TYPE)
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": domain_fields, primary: fields},
            "primaryType": primary,
            "domain": {
                "name": "InferGrid",
                "version": "1",
                "chainId": domain.chain_id,
                "verifyingContract": domain.verifying_contract,
            },
            "message": message.to_json(),
        }
    )


def reference_digest(domain: Domain, message: Message) -> bytes:
    signable = typed_data(domain, message)
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


# --- EIP-712 digests --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [sample_attestation, sample_receipt, sample_voucher])
def test_type_strings_name_the_json_fields_in_order(make: Any) -> None:
    message = make()
    name, fields = type_fields(TYPE_OF[type(message)])
    assert name == type(message).__name__
    assert [f["name"] for f in fields] == list(message.to_json())


@pytest.mark.parametrize("make", [sample_attestation, sample_receipt, sample_voucher])
def test_digest_matches_eth_account_for_each_struct(make: Any) -> None:
    message = make()
    assert DOMAIN.digest(message.struct_hash()) == reference_digest(DOMAIN, message)


@settings(max_examples=60, deadline=None)
@given(domain=domains, message=messages)
def test_digest_matches_eth_account_for_any_values(domain: Domain, message: Message) -> None:
    assert domain.digest(message.struct_hash()) == reference_digest(domain, message)


def test_domain_separator_by_hand() -> None:
    expected = keccak(
        keccak(text=DOMAIN_TYPE)
        + keccak(text="InferGrid")
        + keccak(text="1")
        + (1337).to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex("ab" * 20)
    )
    assert DOMAIN.separator == expected


def test_domain_normalises_and_validates() -> None:
    lower = Domain(5, "0x" + "ab" * 20)
    assert lower.verifying_contract == to_checksum_address("0x" + "ab" * 20)
    assert lower == Domain(5, to_checksum_address("0x" + "ab" * 20))
    assert Domain(6, lower.verifying_contract).separator != lower.separator
    assert Domain(5, "0x" + "ac" * 20).separator != lower.separator
    for chain_id in (0, -1):
        with pytest.raises(ValueError, match="chain id"):
            Domain(chain_id, lower.verifying_contract)


# --- signing and recovery ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(message=messages, key=st.integers(1, SECP256K1_N - 1))
def test_sign_recover_round_trip(message: Message, key: int) -> None:
    signer = Signer(key.to_bytes(32, "big"))
    signature = sign_message(DOMAIN, message, signer)
    assert len(signature) == 65 and signature[64] in (27, 28)
    assert int.from_bytes(signature[32:64], "big") <= SECP256K1_HALF_N
    assert recover_signer(DOMAIN, message, signature) == signer.address
    assert recover_signer(DOMAIN, message, "0x" + signature.hex()) == signer.address
    # eth_account recovers the same signer from the same signature.
    assert Account.recover_message(typed_data(DOMAIN, message), signature=signature) == (
        signer.address
    )


def test_signatures_equal_eth_accounts() -> None:
    # Both sign deterministically (RFC 6979) and canonically (low s).
    for message in (sample_attestation(), sample_receipt(), sample_voucher()):
        theirs = Account.sign_message(typed_data(DOMAIN, message), KEY).signature
        assert sign_message(DOMAIN, message, SIGNER) == bytes(theirs)


def test_signer_address_and_key_forms() -> None:
    assert SIGNER.address == Account.from_key(KEY).address
    assert Signer(bytes.fromhex("21" * 32)).address == SIGNER.address
    with pytest.raises(ValueError, match="32 bytes"):
        Signer("0x1234")
    with pytest.raises(ValueError, match="32 bytes"):
        SIGNER.sign(b"\x00" * 31)


def test_a_signature_binds_domain_and_content() -> None:
    message = sample_voucher()
    signature = sign_message(DOMAIN, message, SIGNER)
    for other in (Domain(1338, DOMAIN.verifying_contract), Domain(1337, "0x" + "ac" * 20)):
        assert recover_signer(other, message, signature) != SIGNER.address
    changed = Voucher(*message.as_tuple()[:3], message.value_aggregate + 1, *message.as_tuple()[4:])
    assert recover_signer(DOMAIN, changed, signature) != SIGNER.address


def _rsv(signature: bytes) -> tuple[int, int, int]:
    return (
        int.from_bytes(signature[:32], "big"),
        int.from_bytes(signature[32:64], "big"),
        signature[64],
    )


def _pack(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


DIGEST = keccak(b"a digest")
GOOD = SIGNER.sign(DIGEST)
R, S, V = _rsv(GOOD)


def test_the_malleable_twin_is_refused_though_it_recovers() -> None:
    twin = _pack(R, SECP256K1_N - S, 55 - V)
    # A perfectly valid signature by the same key, as a permissive verifier sees it.
    loose = eth_keys.Signature(vrs=(twin[64] - 27, R, SECP256K1_N - S))
    assert loose.recover_public_key_from_msg_hash(DIGEST).to_checksum_address() == SIGNER.address
    with pytest.raises(InvalidSignature, match="malleable"):
        recover(DIGEST, twin)


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (_pack(R, S, 0), "v must be 27 or 28"),
        (_pack(R, S, 1), "v must be 27 or 28"),
        (_pack(R, S, 29), "v must be 27 or 28"),
        (_pack(0, S, V), "out of range"),
        (_pack(R, 0, V), "out of range"),
        (_pack(SECP256K1_N, S, V), "out of range"),
        (_pack(R, SECP256K1_HALF_N + 1, V), "out of range"),
        (_pack(5, S, V), "does not recover"),  # x = 5 is on no point of secp256k1
        (GOOD[:64], "65 bytes"),
        (GOOD + b"\x00", "65 bytes"),
        (b"", "65 bytes"),
        ("0xnothex", "not hex"),
    ],
)
def test_bad_signatures_are_refused(signature: bytes | str, message: str) -> None:
    with pytest.raises(InvalidSignature, match=message):
        recover(DIGEST, signature)


def test_s_at_exactly_half_n_is_not_malleable() -> None:
    # The boundary the contracts use too: s <= n/2 passes the check and recovers (to some
    # key: any s recovers once r is a point's x coordinate).
    assert recover(DIGEST, _pack(R, SECP256K1_HALF_N, V)) != SIGNER.address


# --- messages ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(message=messages)
def test_json_round_trip(message: Message) -> None:
    data = message.to_json()
    assert type(message).from_json(data) == message
    signed = signed_json(message, GOOD)
    assert signed[SIGNATURE_KEY] == "0x" + GOOD.hex()
    assert {k: v for k, v in signed.items() if k != SIGNATURE_KEY} == data


def test_struct_hash_by_hand() -> None:
    v = sample_voucher()
    expected = keccak(
        keccak(text=VOUCHER_TYPE)
        + encode(
            ["address", "address", "address", "uint256", "uint256", "bytes32"],
            [v.payer, v.miner, v.gateway, v.value_aggregate, v.timestamp, v.receipts_root],
        )
    )
    assert v.struct_hash() == expected


def test_messages_normalise_their_fields() -> None:
    a = Attestation("0x" + "01" * 32, "0x" + "02" * 32, "0x" + "03" * 32, "0x" + "aa" * 20, 1, 2)
    assert a.request_hash == b"\x01" * 32
    assert a.miner == to_checksum_address("0x" + "aa" * 20)
    assert a.proof_hash == ZERO32
    data = a.to_json()
    del data["proofHash"]  # optional on the wire
    assert Attestation.from_json(data) == a


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"payer": "0x1234"}, "payer"),
        ({"miner": 5}, "miner"),
        ({"valueAggregate": -1}, "valueAggregate"),
        ({"valueAggregate": 2**256}, "valueAggregate"),
        ({"valueAggregate": True}, "valueAggregate"),
        ({"timestamp": "7"}, "timestamp"),
        ({"receiptsRoot": "0x1234"}, "32 bytes"),
        ({"receiptsRoot": "zz"}, "not hex"),
    ],
)
def test_bad_fields_are_refused(change: dict[str, Any], message: str) -> None:
    data = {**sample_voucher().to_json(), **change}
    with pytest.raises(ValueError, match=message):
        Voucher.from_json(data)


@pytest.mark.parametrize("cls", [Attestation, Receipt, Voucher])
def test_missing_fields_are_refused(cls: type) -> None:
    with pytest.raises(ValueError, match="missing field"):
        cls.from_json({})


def test_request_and_response_hashes() -> None:
    assert request_hash("req-1", b'{"a":1}') == keccak(b'req-1\n{"a":1}')
    # The separator keeps an id and a body from running into each other (for ids without a
    # newline, which gateways never generate).
    assert request_hash("req-1", b"2") != request_hash("req-", b"12")
    assert response_hash([]) == keccak(b"")
    assert response_hash([1, 256, 2**32 - 1]) == keccak(bytes.fromhex("0000000100000100ffffffff"))


def test_words_are_checked() -> None:
    assert word("uint256", 1) == bytes(31) + b"\x01"
    assert word("address", "0x" + "ab" * 20) == bytes(12) + b"\xab" * 20
    for bad in (-1, 2**256, True, "1"):
        with pytest.raises(ValueError, match="uint256"):
            word("uint256", bad)
    with pytest.raises(ValueError, match="20 bytes"):
        word("address", "0x1234")
    with pytest.raises(ValueError, match="32 bytes"):
        to_bytes32(b"\x00" * 33, "thing")


# --- Merkle trees -----------------------------------------------------------------------------


def leaves_of(n: int) -> list[bytes]:
    return [keccak(i.to_bytes(4, "big")) for i in range(n)]


def naive_root(nodes: list[bytes]) -> bytes:
    """The tree, written recursively: split off the largest power of two on the left.

    A layer that carries its odd last node up unchanged builds exactly this shape."""
    if len(nodes) == 1:
        return nodes[0]
    half = 1
    while half * 2 < len(nodes):
        half *= 2
    return hash_pair(naive_root(nodes[:half]), naive_root(nodes[half:]))


def test_small_trees_by_hand() -> None:
    a, b, c, d, e = leaves_of(5)
    assert merkle_root([]) == ZERO32
    assert merkle_root([a]) == a and merkle_proof([a], 0) == []
    assert merkle_root([a, b]) == keccak(min(a, b) + max(a, b))
    assert merkle_root([a, b, c]) == hash_pair(hash_pair(a, b), c)
    assert merkle_proof([a, b, c], 2) == [hash_pair(a, b)]
    assert merkle_root([a, b, c, d, e]) == hash_pair(hash_pair(hash_pair(a, b), hash_pair(c, d)), e)
    assert merkle_proof([a, b, c, d, e], 4) == [hash_pair(hash_pair(a, b), hash_pair(c, d))]
    assert hash_pair(a, b) == hash_pair(b, a)


@pytest.mark.parametrize("n", range(18))
def test_every_leaf_proves_against_the_root(n: int) -> None:
    leaves = leaves_of(n)
    root = merkle_root(leaves)
    if n:
        assert root == naive_root(leaves)
    for index, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, index)
        assert len(proof) <= max(1, n - 1).bit_length() <= MAX_PROOF_LENGTH
        assert verify_proof(leaf, proof, root)


@pytest.mark.parametrize("n", range(2, 18))
def test_proofs_fail_for_anything_else(n: int) -> None:
    leaves = leaves_of(n)
    root = merkle_root(leaves)
    outsider = keccak(b"not in the tree")
    for index, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, index)
        assert not verify_proof(outsider, proof, root)
        assert not verify_proof(leaf, proof, outsider)
        assert not verify_proof(leaf, proof[:-1], root)
        assert not verify_proof(leaf, [*proof, outsider], root)
        assert not verify_proof(leaf, [outsider, *proof[1:]], root)
        assert not verify_proof(leaves[(index + 1) % n], proof, root)


def test_proof_arguments_are_checked() -> None:
    leaves = leaves_of(3)
    for index in (-1, 3):
        with pytest.raises(IndexError):
            merkle_proof(leaves, index)
    with pytest.raises(IndexError):
        merkle_proof([], 0)
    with pytest.raises(ValueError, match="32 bytes"):
        merkle_root([b"\x00" * 31])


@settings(max_examples=40, deadline=None)
@given(leaves=st.lists(hashes, min_size=1, max_size=40), data=st.data())
def test_random_trees(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    assert root == naive_root(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    assert verify_proof(leaves[index], merkle_proof(leaves, index), root)


def test_reward_leaf_is_double_hashed_abi_encoding() -> None:
    account = "0x" + "cd" * 20
    inner = keccak(bytes(12) + bytes.fromhex("cd" * 20) + (10**18).to_bytes(32, "big"))
    assert reward_leaf(account, 10**18) == keccak(inner)
    assert reward_leaf(account.upper().replace("0X", "0x"), 10**18) == keccak(inner)


# --- pricing ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    amount=st.integers(0, 2**200),
    protocol=st.integers(0, PPM),
    pool=st.integers(0, PPM),
)
def test_split_payment_adds_up_exactly(amount: int, protocol: int, pool: int) -> None:
    pool = min(pool, PPM - protocol)
    split = split_payment(amount, protocol, pool)
    assert split.miner + split.protocol + split.verifier_pool == amount
    assert split.protocol == amount * protocol // PPM
    assert split.verifier_pool == amount * pool // PPM
    assert split.miner >= 0


def test_split_payment_edges() -> None:
    assert split_payment(0, 10, 10) == split_payment(0, 0, 0)
    all_fees = split_payment(999, PPM, 0)
    assert (all_fees.miner, all_fees.protocol, all_fees.verifier_pool) == (0, 999, 0)
    # Rounding down favours the miner: 3 wei at 50 % + 50 % leaves it 1 wei.
    halves = split_payment(3, PPM // 2, PPM // 2)
    assert (halves.miner, halves.protocol, halves.verifier_pool) == (1, 1, 1)
    for args in ((-1, 0, 0), (1, -1, 0), (1, 0, -1), (1, PPM, 1)):
        with pytest.raises(ValueError):
            split_payment(*args)


def test_request_value_and_display() -> None:
    offer = ModelOffer("m", "0x" + "11" * 32, 3, 7)
    assert request_value(10, 20, offer) == 10 * 3 + 20 * 7
    assert request_value(0, 0, offer) == 0
    for tokens in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            request_value(*tokens, offer)
    assert wei_to_btt(WEI_PER_BTT // 4) == 0.25
