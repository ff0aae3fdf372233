"""The verdict a verifier signs for every audit it runs.

An EIP-712 struct in the network's one domain (eip712, the escrow's), so a verdict can be
checked by anyone who knows the deployment:

    Verdict(bytes32 requestHash,bytes32 attestationHash,address miner,address verifier,
            bool passed,uint256 worstMarginDeficit,uint256 worstLogprobError,
            bytes32 reasonHash,bytes32 evidenceHash,uint256 timestamp)

- `worstMarginDeficit`: how far the emitted token lost at the audit's worst step, in millionths
  of a logit (0 when every emitted token won its step, as an honest miner's do);
- `worstLogprobError`: the largest |reported − recomputed| log-probability, in millionths;
- `reasonHash`: keccak of the UTF-8 reason text ("" when it passed), which travels beside the
  struct in JSON as `reason`;
- `evidenceHash`: keccak of the audited job's evidence bytes (audits.AuditJob.evidence_hash);
- `timestamp`: unix seconds when the verifier signed.

JSON form: the struct's fields by name (bytes32 as 0x-hex, addresses checksummed, uint256 as
integers, `passed` a boolean), plus `reason` and, when signed, `signature`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_utils import keccak

from infergrid.protocol.eip712 import (
    Domain,
    Signer,
    hex32,
    recover,
    signature_bytes,
    struct_hash,
    to_bytes32,
)
from infergrid.protocol.messages import SIGNATURE_KEY, _address, _field, _uint

VERDICT_TYPE = (
    "Verdict(bytes32 requestHash,bytes32 attestationHash,address miner,address verifier,"
    "bool passed,uint256 worstMarginDeficit,uint256 worstLogprobError,bytes32 reasonHash,"
    "bytes32 evidenceHash,uint256 timestamp)"
)
VERDICT_TYPEHASH = keccak(text=VERDICT_TYPE)
MICRO = 1_000_000
MAX_REASON_CHARS = 2000


def to_micro(value: float) -> int:
    """A non-negative measure in millionths, rounded up (so a nonzero deficit never reads 0)."""
    if value != value or value < 0:  # NaN or negative
        raise ValueError(f"expected a non-negative number, got {value!r}")
    if value == float("inf"):
        return 2**256 - 1
    micro = value * MICRO
    whole = int(micro)
    return min(whole + (1 if micro > whole else 0), 2**256 - 1)


@dataclass(frozen=True)
class Verdict:
    request_hash: bytes
    attestation_hash: bytes
    miner: str
    verifier: str
    passed: bool
    worst_margin_deficit: int  # millionths of a logit
    worst_logprob_error: int  # millionths
    reason: str
    evidence_hash: bytes
    timestamp: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_hash", to_bytes32(self.request_hash, "requestHash"))
        object.__setattr__(
            self, "attestation_hash", to_bytes32(self.attestation_hash, "attestationHash")
        )
        object.__setattr__(self, "evidence_hash", to_bytes32(self.evidence_hash, "evidenceHash"))
        object.__setattr__(self, "miner", _address(self.miner, "miner"))
        object.__setattr__(self, "verifier", _address(self.verifier, "verifier"))
        if not isinstance(self.passed, bool):
            raise ValueError(f"passed must be a boolean, got {self.passed!r}")
        _uint(self.worst_margin_deficit, "worstMarginDeficit")
        _uint(self.worst_logprob_error, "worstLogprobError")
        _uint(self.timestamp, "timestamp")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON_CHARS:
            raise ValueError(f"reason must be a string of at most {MAX_REASON_CHARS} characters")

    @property
    def reason_hash(self) -> bytes:
        return keccak(self.reason.encode())

    def struct_hash(self) -> bytes:
        return struct_hash(
            VERDICT_TYPEHASH,
            [
                ("bytes32", self.request_hash),
                ("bytes32", self.attestation_hash),
                ("address", self.miner),
                ("address", self.verifier),
                ("uint256", int(self.passed)),  # EIP-712 encodes bool as a uint256 word
                ("uint256", self.worst_margin_deficit),
                ("uint256", self.worst_logprob_error),
                ("bytes32", self.reason_hash),
                ("bytes32", self.evidence_hash),
                ("uint256", self.timestamp),
            ],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "requestHash": hex32(self.request_hash),
            "attestationHash": hex32(self.attestation_hash),
            "miner": self.miner,
            "verifier": self.verifier,
            "passed": self.passed,
            "worstMarginDeficit": self.worst_margin_deficit,
            "worstLogprobError": self.worst_logprob_error,
            "reason": self.reason,
            "evidenceHash": hex32(self.evidence_hash),
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verdict:
        if not isinstance(data, Mapping):
            raise ValueError("verdict: expected a JSON object")
        return cls(
            request_hash=_field(data, "requestHash"),
            attestation_hash=_field(data, "attestationHash"),
            miner=_field(data, "miner"),
            verifier=_field(data, "verifier"),
            passed=_field(data, "passed"),
            worst_margin_deficit=_field(data, "worstMarginDeficit"),
            worst_logprob_error=_field(data, "worstLogprobError"),
            reason=_field(data, "reason"),
            evidence_hash=_field(data, "evidenceHash"),
            timestamp=_field(data, "timestamp"),
        )


@dataclass(frozen=True)
class SignedVerdict:
    verdict: Verdict
    signature: bytes

    def signer(self, domain: Domain) -> str:
        """Who signed it; raises eip712.InvalidSignature."""
        return recover(domain.digest(self.verdict.struct_hash()), self.signature)

    def to_json(self) -> dict[str, Any]:
        return {**self.verdict.to_json(), SIGNATURE_KEY: "0x" + self.signature.hex()}

    @classmethod
    def from_json(cls, data: Any) -> SignedVerdict:
        if not isinstance(data, Mapping):
            raise ValueError("verdict: expected a JSON object")
        return cls(
            Verdict.from_json(data), signature_bytes(_field(data, SIGNATURE_KEY), "signature")
        )


def sign_verdict(domain: Domain, verdict: Verdict, signer: Signer) -> SignedVerdict:
    if signer.address != verdict.verifier:
        raise ValueError(
            f"verdict names verifier {verdict.verifier}, not the signer {signer.address}"
        )
    return SignedVerdict(verdict, signer.sign(domain.digest(verdict.struct_hash())))
