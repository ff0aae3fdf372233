"""The protocol's one rule for an address: what counts as one, and its EIP-55 form.

Every message, report and contract call names accounts by 20-byte addresses; a value that is
not one is refused with the same words everywhere ("<what> <value> is not an address"), and
a valid one is always carried checksummed, so two spellings of one account never count as
two. Checksumming costs a keccak, and a gateway checks the same few payer, miner and gateway
addresses on every request, so the result is cached.
"""

from __future__ import annotations

from functools import lru_cache

from eth_utils import is_address, to_checksum_address

__all__ = ["checked_address", "checksummed"]


@lru_cache(maxsize=4096)
def checksummed(value: str) -> str | None:
    """The EIP-55 form of `value`, or None when it is not an address."""
    return to_checksum_address(value) if is_address(value) else None


def checked_address(value: object, what: str) -> str:
    """`value` checksummed; ValueError "{what} {value!r} is not an address" otherwise."""
    found = checksummed(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError(f"{what} {value!r} is not an address")
    return found
