"""The miner's signed attestations, and the guard that keeps it from ever equivocating.

Every response a miner serves with settlement on ends with an EIP-712 `Attestation` (see
protocol.messages) signed by its registered signer key: the gateway checks it before it signs
a receipt, and a verifier audits it. Two attestations by one miner for one request hash with
different response hashes are slashable without a vote (DisputeManager.slash_equivocation),
so the miner must never sign twice for one request hash, whoever asks: a gateway replaying a
seedless request would otherwise get two different answers signed. `AttestedRequests` holds
that line: a request hash is reserved before generation starts, refused (HTTP 409) while
reserved or once signed, and freed only when the generation ended without a signature.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from infergrid.protocol.eip712 import ZERO32, Domain, Signer

# seed_for lives with the other rules of how a request is sampled; re-exported here.
from infergrid.protocol.generation import seed_for as seed_for
from infergrid.protocol.messages import (
    Attestation,
    response_hash,
    sign_message,
    signed_json,
)

# How many signed request hashes stay in memory. With a receipt log the older ones are
# found there (see AttestedRequests); without one this is the whole memory of the guard.
DEFAULT_REMEMBERED = 100_000


@dataclass(frozen=True)
class Attestor:
    """Signs attestations for one miner in one deployment's domain.

    `miner` is the registry owner address the attestation names; `signer` holds the key the
    registry lists as the node's signer (the owner key itself, as run_miner registers it).
    """

    domain: Domain
    signer: Signer
    miner: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "miner", to_checksum_address(self.miner))

    @property
    def signer_address(self) -> str:
        return self.signer.address

    def attest(
        self,
        request_hash_: bytes,
        output_token_ids: Sequence[int],
        model_id: str | bytes,
        tokens_in: int,
    ) -> tuple[Attestation, bytes]:
        """The attestation for one finished response, and its 65-byte signature."""
        attestation = Attestation(
            request_hash=request_hash_,
            response_hash=response_hash(output_token_ids),
            model_id=model_id,
            miner=self.miner,
            tokens_in=tokens_in,
            tokens_out=len(output_token_ids),
            proof_hash=ZERO32,  # no activation commitment yet (DESIGN.md §6, check 4)
        )
        return attestation, sign_message(self.domain, attestation, self.signer)

    def attestation_json(
        self,
        request_hash_: bytes,
        output_token_ids: Sequence[int],
        model_id: str | bytes,
        tokens_in: int,
    ) -> dict[str, Any]:
        """What goes under wire.ATTESTATION_KEY in the response's extension."""
        return signed_json(*self.attest(request_hash_, output_token_ids, model_id, tokens_in))


class AttestedRequests:
    """The request hashes this miner has signed for, or is generating for right now.

    Reservations (in flight) and the most recent `remembered` signed hashes live in memory;
    `durable(h)`, when given, answers for the older ones (the receipt log's index), so the
    set stays bounded without forgetting what matters. Thread-safe: the event loop reserves
    and releases, and signing may happen wherever the response is finished.
    """

    def __init__(
        self,
        durable: Callable[[bytes], bool] | None = None,
        remembered: int = DEFAULT_REMEMBERED,
    ) -> None:
        if remembered < 1:
            raise ValueError("remembered must be >= 1")
        self._durable = durable
        self._remembered = remembered
        self._in_flight: set[bytes] = set()
        self._signed: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, request_hash_: bytes) -> bool:
        """Claim a request hash before generating; False if it is taken or was signed."""
        with self._lock:
            if request_hash_ in self._in_flight or request_hash_ in self._signed:
                return False
            self._in_flight.add(request_hash_)
        # The durable lookup runs outside the lock (it is I/O); the reservation already
        # stops a concurrent twin, and is undone if the hash turns out to be old.
        # A lookup that fails raises: the request is refused as a server error, since
        # serving it blind could mean signing twice.
        if self._durable is not None:
            try:
                seen = self._durable(request_hash_)
            except BaseException:
                self.release(request_hash_)
                raise
            if seen:
                self.release(request_hash_)
                return False
        return True

    def signed(self, request_hash_: bytes) -> None:
        """Record that an attestation for this hash was signed: it is never released."""
        with self._lock:
            self._in_flight.discard(request_hash_)
            self._signed[request_hash_] = None
            self._signed.move_to_end(request_hash_)
            while len(self._signed) > self._remembered:
                self._signed.popitem(last=False)

    def release(self, request_hash_: bytes) -> None:
        """Give a reservation back: the generation ended without a signature."""
        with self._lock:
            self._in_flight.discard(request_hash_)

    def __contains__(self, request_hash_: object) -> bool:
        with self._lock:
            return request_hash_ in self._in_flight or request_hash_ in self._signed

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)
