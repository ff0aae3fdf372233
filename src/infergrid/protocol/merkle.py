"""Merkle trees over 32-byte leaves, as the contracts verify them.

Pairs are hashed sorted (keccak(min ‖ max)), so a proof is just the list of sibling hashes
with no left/right bits, as in OpenZeppelin's MerkleProof. A layer with an odd count carries
its last node up unchanged. The root of no leaves is 32 zero bytes; of one leaf, the leaf.

Leaves must not be 64-byte preimages of an internal node: receipt leaves are EIP-712 struct
hashes (keccak of 352 bytes) and reward leaves are hashed twice, as OpenZeppelin's standard
tree does.
"""

from __future__ import annotations

from collections.abc import Sequence

from eth_abi import encode
from eth_utils import keccak, to_checksum_address

from infergrid.protocol.eip712 import ZERO32
from infergrid.protocol.hashing import keccak256

# The contracts accept proofs up to this long: trees of up to 2**32 leaves.
MAX_PROOF_LENGTH = 32


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak256(a + b) if a <= b else keccak256(b + a)


class MerkleTree:
    """The tree over `leaves`, kept as its layers (leaves first, root last) so that any number
    of proofs cost no hashing after the one build: n - 1 hashes for n leaves.

    Raises ValueError unless every leaf is 32 bytes. The tree of no leaves has the root
    ZERO32 and no proofs. This is the one tree: merkle_root and merkle_proof read it.
    """

    __slots__ = ("layers",)

    def __init__(self, leaves: Sequence[bytes]) -> None:
        for leaf in leaves:
            if len(leaf) != 32:
                raise ValueError("merkle leaves are 32 bytes")
        layers = [list(leaves)]
        while len(layers[-1]) > 1:
            below = layers[-1]
            above = [hash_pair(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            if len(below) % 2:
                above.append(below[-1])  # an odd node is carried up unchanged
            layers.append(above)
        self.layers: list[list[bytes]] = layers

    def __len__(self) -> int:
        return len(self.layers[0])

    @property
    def leaves(self) -> list[bytes]:
        return self.layers[0]

    @property
    def root(self) -> bytes:
        top = self.layers[-1]
        return top[0] if top else ZERO32

    def proof(self, index: int) -> list[bytes]:
        """The sibling hashes from leaf `index` up to the root; IndexError outside the tree."""
        if not 0 <= index < len(self.layers[0]):
            raise IndexError(f"leaf index {index} out of range for {len(self)} leaves")
        proof = []
        for layer in self.layers[:-1]:
            sibling = index ^ 1
            if sibling < len(layer):
                proof.append(layer[sibling])
            index //= 2
        return proof


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root of the tree over `leaves`: ZERO32 for none, the leaf itself for one."""
    return MerkleTree(leaves).root


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf `index` up to the root (builds the tree: to prove many
    leaves of one tree, build a MerkleTree once and call its proof)."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
    return MerkleTree(leaves).proof(index)


class MerkleAccumulator:
    """merkle_root over a growing list of leaves, in O(log n) memory and O(1) amortised
    hashes per leaf.

    With "odd node carried up", the tree over n leaves is the perfect subtrees of n's binary
    decomposition, largest first, joined right to left: root = h(P_big, h(..., h(P_2, P_1))).
    (Pairs are hashed sorted, so the order inside each h does not matter.) Appending a leaf
    merges equal-height peaks as in a binary counter. Leaves are not length-checked here (the
    append is on the gateway's hot path); callers append 32-byte hashes.
    """

    __slots__ = ("count", "peaks")

    def __init__(self) -> None:
        self.peaks: list[tuple[int, bytes]] = []  # (height, root of a perfect subtree)
        self.count = 0

    def append(self, leaf: bytes) -> None:
        peaks = self.peaks
        height, node = 0, leaf
        while peaks and peaks[-1][0] == height:
            node = hash_pair(peaks.pop()[1], node)
            height += 1
        peaks.append((height, node))
        self.count += 1

    def root(self) -> bytes:
        """merkle_root of the leaves appended so far."""
        if not self.peaks:
            return ZERO32
        node = self.peaks[-1][1]
        for _, peak in reversed(self.peaks[:-1]):
            node = hash_pair(peak, node)
        return node


def verify_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root


def reward_leaf(account: str, amount: int) -> bytes:
    """The leaf of an epoch reward: keccak(keccak(abi.encode(address account, uint256 amount)))."""
    return keccak(keccak(encode(["address", "uint256"], [to_checksum_address(account), amount])))
