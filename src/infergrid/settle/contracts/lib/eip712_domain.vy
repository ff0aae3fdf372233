# pragma version ~=0.4.3
"""
@title eip712_domain
@notice InferGrid's one EIP-712 domain, exactly as protocol/eip712.py computes it:
        EIP712Domain(name "InferGrid", version "1", chainId, verifyingContract), where the
        verifying contract is the network's PaymentEscrow for every signed message.
@dev The separator is cached for the deployment chain and recomputed when a fork changes
     chain.id, so a message signed for one chain is never valid on the other. A contract that
     `initializes:` this module passes the verifying contract to __init__ (the escrow passes
     itself).
"""

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("InferGrid")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")

VERIFYING_CONTRACT: immutable(address)
CACHED_CHAIN_ID: immutable(uint256)
CACHED_SEPARATOR: immutable(bytes32)


@deploy
def __init__(verifying_contract: address):
    assert verifying_contract != empty(address), "eip712_domain: zero verifying contract"
    VERIFYING_CONTRACT = verifying_contract
    CACHED_CHAIN_ID = chain.id
    CACHED_SEPARATOR = self._compute_separator(verifying_contract)


@internal
@view
def _compute_separator(verifying_contract: address) -> bytes32:
    return keccak256(
        abi_encode(
            DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, verifying_contract
        )
    )


@internal
@view
def _separator() -> bytes32:
    if chain.id == CACHED_CHAIN_ID:
        return CACHED_SEPARATOR
    return self._compute_separator(VERIFYING_CONTRACT)


@internal
@view
def _digest(struct_hash: bytes32) -> bytes32:
    """@notice The digest a signer signs for a message with this struct hash."""
    return keccak256(concat(b"\x19\x01", self._separator(), struct_hash))
