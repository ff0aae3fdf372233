"""How one attempt at a call fails, shared by the gateway's forwarding, metering and relay.

The class names keep their leading underscore: a stream that breaks records
`type(exc).__name__` in its trace, and the split of app/gateway.py changed no trace.
"""

from __future__ import annotations

import asyncio

import aiohttp

__all__ = [
    "RECEIPT_FAILED",
    "UPSTREAM_ERRORS",
    "_MinerFailed",
    "_ReceiptFailed",
    "_Stalled",
    "_Unverified",
]

# Failures that mean the miner, not the request, is the problem.
UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)

RECEIPT_FAILED = (
    "The gateway could not record the receipt for this request, so it was not charged;"
    " please retry."
)


class _MinerFailed(Exception):
    """This miner could not serve this request; another one may."""


class _Unverified(Exception):
    """The miner's attestation does not vouch for the streamed response (after output)."""


class _ReceiptFailed(Exception):
    """The gateway could not store the receipt: its own failure, not the miner's."""


class _Stalled(_MinerFailed):
    """The miner sent nothing for longer than the stall timeout after the first token."""
