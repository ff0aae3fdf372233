"""Gateway settings; the CLI fills these from its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opens it up on purpose
    port: int = 8080
    # One SQLite file holds the API keys (shared with `infergrid keys`) and the traces.
    db_path: Path = field(default_factory=lambda: Path(".infergrid/gateway.db"))
    discovery_interval_s: float = 10.0
    startup_discovery_timeout_s: float = 15.0
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    connect_timeout_s: float = 2.0
    # Longest silence from a miner: before its first byte, and between streamed chunks.
    read_timeout_s: float = 120.0
    max_attempts: int = 3  # distinct miners tried before the first token reaches the client
    max_body_bytes: int = 16 * 1024 * 1024
    # The most a request body may take to arrive, however slowly it trickles (408 after).
    body_timeout_s: float = 30.0
    key_refresh_s: float = 0.25  # how stale the in-memory key set may get (revocation delay)
    trace_flush_s: float = 0.1
    shutdown_grace_s: float = 10.0
    log_level: str = "warning"
