"""A verifier's evidence bundles on disk, by hash.

Every job a verifier failed is kept as its evidence bytes (protocol.audits.evidence_bytes) in
`<directory>/<64 hex>.json`, named by keccak of those bytes, so that GET /v1/evidence/0x<hash>
can serve the exact bytes a dispute names long after the audit, across restarts. Files are
written to a temporary name and renamed, so a reader never sees half a bundle; writing the
same bundle twice is harmless (same name, same bytes).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from infergrid.protocol.audits import AuditJob, evidence_hash

_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_hash(text: str) -> bytes | None:
    """The 32 bytes of `0x<64 hex>` (either case); None for anything else."""
    if not text.startswith(("0x", "0X")):
        return None
    digits = text[2:].lower()
    if not _HEX64.fullmatch(digits):
        return None
    return bytes.fromhex(digits)


class EvidenceStore:
    """Evidence bundles under one directory (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, digest: bytes) -> Path:
        return self.directory / f"{digest.hex()}.json"

    def put(self, job: AuditJob) -> bytes:
        """Keep `job`'s evidence bundle; returns its hash (job.evidence_hash())."""
        return self.put_bytes(job.evidence_bytes())

    def put_bytes(self, bundle: bytes) -> bytes:
        digest = evidence_hash(bundle)
        path = self._path(digest)
        if path.exists():
            return digest
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(bundle)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: bytes) -> bytes | None:
        """The bundle whose keccak is `digest`, or None if this store has none."""
        try:
            return self._path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def __contains__(self, digest: bytes) -> bool:
        return self._path(digest).exists()

    def hashes(self) -> list[bytes]:
        """The hashes of every bundle kept, oldest file first."""
        if not self.directory.is_dir():
            return []
        paths = [p for p in self.directory.glob("*.json") if _HEX64.fullmatch(p.stem)]
        paths.sort(key=lambda p: p.stat().st_mtime)
        return [bytes.fromhex(p.stem) for p in paths]

    def __len__(self) -> int:
        return len(self.hashes())
