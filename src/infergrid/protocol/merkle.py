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

# The contracts accept proofs up to this long: trees of up to 2**32 leaves.
MAX_PROOF_LENGTH = 32


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a <= b else keccak(b + a)


def _layers(leaves: Sequence[bytes]) -> list[list[bytes]]:
    for leaf in leaves:
        if len(leaf) != 32:
            raise ValueError("merkle leaves are 32 bytes")
    layers = [list(leaves)]
    while len(layers[-1]) > 1:
        below = layers[-1]
        above = [hash_pair(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        layers.append(above)
    return layers


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return ZERO32
    return _layers(leaves)[-1][0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf `index` up to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
    proof = []
    for layer in _layers(leaves)[:-1]:
        sibling = index ^ 1
        if sibling < len(layer):
            proof.append(layer[sibling])
        index //= 2
    return proof


def verify_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root


def reward_leaf(account: str, amount: int) -> bytes:
    """The leaf of an epoch reward: keccak(keccak(abi.encode(address account, uint256 amount)))."""
    return keccak(keccak(encode(["address", "uint256"], [to_checksum_address(account), amount])))
