# pragma version ~=0.4.3
"""
@title signatures
@notice The one rule every InferGrid contract applies to a 65-byte secp256k1 signature, the
        same as protocol/eip712.recover: r ‖ s ‖ v, v in {27, 28}, 0 < r, 0 < s <= n/2 (the
        high-s twin of a signature is refused), and a signature that recovers at all.
@dev Stateless: contracts `import` it and call `signatures._recover`; nothing to initialize.
"""

# The half order of secp256k1 (0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
# a 64-digit hex literal would be a bytes32 in Vyper).
SECP256K1_HALF_N: constant(uint256) = (
    57896044618658097711785492504343953926418782139537452191302581570759080747168
)


@internal
@pure
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    """@notice The address that signed `digest`; reverts on any signature outside the rule."""
    assert len(signature) == 65, "signatures: bad length"
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "signatures: bad v"
    assert s <= SECP256K1_HALF_N, "signatures: malleable"
    assert r != 0 and s != 0, "signatures: invalid"
    signer: address = ecrecover(digest, v, r, s)
    # The precompile returns nothing (the zero address) for r or s off the curve order.
    assert signer != empty(address), "signatures: invalid"
    return signer
