"""protocol/merkle is the one Merkle tree (layered tree, incremental root, merkle_root and
merkle_proof all agree with an independent recursive reference), and messages.response_hash
the one response hash (one struct.pack; ValueError for any id that is not a uint32)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from infergrid.protocol.eip712 import ZERO32
from infergrid.protocol.merkle import (
    MerkleAccumulator,
    MerkleTree,
    hash_pair,
    merkle_proof,
    merkle_root,
    verify_proof,
)
from infergrid.protocol.messages import response_hash

hashes = st.binary(min_size=32, max_size=32)
uint32s = st.integers(0, 2**32 - 1)


def leaves_of(n: int) -> list[bytes]:
    return [keccak(i.to_bytes(4, "big")) for i in range(n)]


def naive_root(nodes: list[bytes]) -> bytes:
    """The tree, written recursively: split off the largest power of two on the left (the
    shape a layer that carries its odd last node up builds); ZERO32 for no leaves."""
    if not nodes:
        return ZERO32
    if len(nodes) == 1:
        return nodes[0]
    half = 1
    while half * 2 < len(nodes):
        half *= 2
    return hash_pair(naive_root(nodes[:half]), naive_root(nodes[half:]))


# -- one tree ------------------------------------------------------------------------------------


def test_tree_accumulator_and_merkle_root_agree_for_0_to_200_leaves() -> None:
    """For every size 0..200: the layered tree's root, the incremental root after the same
    appends and merkle_root are the reference root, and every leaf's tree proof verifies."""
    leaves = leaves_of(200)
    acc = MerkleAccumulator()
    for n in range(201):
        prefix = leaves[:n]
        tree = MerkleTree(prefix)
        expected = naive_root(prefix)
        assert tree.root == acc.root() == merkle_root(prefix) == expected
        assert len(tree) == acc.count == n and tree.leaves == prefix
        for index, leaf in enumerate(prefix):
            proof = tree.proof(index)
            assert len(proof) <= max(1, n - 1).bit_length()
            assert verify_proof(leaf, proof, expected)
        if n:  # merkle_proof rebuilds the tree per call: the ends and the middle suffice here
            for index in {0, n // 2, n - 1}:
                assert merkle_proof(prefix, index) == tree.proof(index)
        if n < 200:
            acc.append(leaves[n])


@settings(max_examples=60, deadline=None)
@given(leaves=st.lists(hashes, max_size=200), data=st.data())
def test_random_trees_agree_everywhere(leaves: list[bytes], data: st.DataObject) -> None:
    """Any leaves (ties and duplicates included): the three roots agree with the reference,
    and the tree's proof of any leaf is merkle_proof's and verifies."""
    tree = MerkleTree(leaves)
    acc = MerkleAccumulator()
    for leaf in leaves:
        acc.append(leaf)
    assert tree.root == acc.root() == merkle_root(leaves) == naive_root(leaves)
    if leaves:
        index = data.draw(st.integers(0, len(leaves) - 1))
        assert tree.proof(index) == merkle_proof(leaves, index)
        assert verify_proof(leaves[index], tree.proof(index), tree.root)


@settings(max_examples=30, deadline=None)
@given(leaves=st.lists(hashes, max_size=70))
def test_the_incremental_root_is_right_after_every_append(leaves: list[bytes]) -> None:
    """Reading the root does not disturb the peaks: it is merkle_root of each prefix."""
    acc = MerkleAccumulator()
    assert acc.root() == ZERO32
    for n, leaf in enumerate(leaves, 1):
        acc.append(leaf)
        assert acc.root() == merkle_root(leaves[:n])


def test_the_empty_tree_has_the_zero_root_and_no_proofs() -> None:
    tree = MerkleTree([])
    assert tree.root == ZERO32 and len(tree) == 0 and tree.layers == [[]]
    with pytest.raises(IndexError):
        tree.proof(0)


def test_tree_arguments_are_checked() -> None:
    tree = MerkleTree(leaves_of(3))
    for index in (-1, 3):
        with pytest.raises(IndexError, match="out of range for 3 leaves"):
            tree.proof(index)
    for bad in (b"\x00" * 31, b"\x00" * 33, b""):
        with pytest.raises(ValueError, match="32 bytes"):
            MerkleTree([*leaves_of(2), bad])


def test_the_tree_keeps_its_layers_with_odd_nodes_carried_up() -> None:
    """13 leaves: layers of 13, 7, 4, 2, 1 nodes; the 13th leaf is carried up unchanged to
    the third layer, so its proof has only two siblings."""
    leaves = leaves_of(13)
    tree = MerkleTree(leaves)
    assert [len(layer) for layer in tree.layers] == [13, 7, 4, 2, 1]
    assert tree.layers[1][6] == tree.layers[2][3] == leaves[12]
    assert tree.proof(12) == [tree.layers[2][2], tree.layers[3][0]]
    assert all(verify_proof(leaf, tree.proof(i), tree.root) for i, leaf in enumerate(tree.leaves))


# -- one response hash ---------------------------------------------------------------------------


def reference_response_hash(ids: list[int]) -> bytes:
    """The definition: keccak over each id as 4 bytes big-endian."""
    return keccak(b"".join(i.to_bytes(4, "big") for i in ids))


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(uint32s, max_size=300))
def test_response_hash_is_the_definition(ids: list[int]) -> None:
    assert response_hash(ids) == reference_response_hash(ids)
    assert response_hash(tuple(ids)) == response_hash(iter(ids)) == response_hash(ids)


def test_response_hash_edges() -> None:
    assert response_hash([]) == keccak(b"")
    assert response_hash([0, 2**32 - 1]) == keccak(b"\x00" * 4 + b"\xff" * 4)
    # numpy ids (what a tokenizer may return) are integers: same hash as plain ints.
    assert response_hash(np.array([7, 151643], dtype=np.int64)) == response_hash([7, 151643])


class _IndexRaises:
    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def __index__(self) -> int:
        raise self.error("no index")

    def __repr__(self) -> str:  # a stable test id, the same in every pytest-xdist worker
        return f"IndexRaises({self.error.__name__})"


@pytest.mark.parametrize(
    "bad",
    [
        -1,
        2**32,
        2**64,
        2**256,
        1.0,
        "5",
        b"\x05",
        None,
        [1],
        _IndexRaises(TypeError),
        _IndexRaises(OverflowError),
    ],
    ids=repr,
)
def test_response_hash_refuses_ids_that_are_not_uint32(bad: Any) -> None:
    """Attack: a miner attests ids that are not uint32 (a float 1.0 or a string "5" once
    hashed as the id 1 or 5; -1 and 2**32 raised OverflowError). Each is a ValueError now,
    wherever it is in the list, which the gateway turns into AttestationRejected."""
    for ids in ([bad], [1, 2, bad], [bad, 3]):
        with pytest.raises(ValueError, match="must be uint32"):
            response_hash(ids)


def test_response_hash_of_something_not_iterable_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        response_hash(5)  # type: ignore[arg-type]
