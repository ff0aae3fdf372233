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
    # Longest silence from a miner: before its first byte, and between streamed chunks; also
    # the most a non-streamed answer may take. The deadlines below are tighter.
    read_timeout_s: float = 120.0
    # How long one miner may take to its first token before the request moves to another
    # (app.deadlines has the rule): factor × the model's observed high time to first token,
    # scaled up for prompts longer than usual, within [floor, cap]; the cap until observed.
    # Non-streamed requests add factor × per-token time × max_tokens, up to read_timeout_s.
    # A request with no other miner to go to waits up to the cap (non-streamed: read timeout).
    first_token_timeout_floor_s: float = 10.0
    first_token_timeout_cap_s: float = 60.0
    first_token_timeout_factor: float = 3.0
    # After the first token, a silence this long ends the stream with an error, uncharged.
    stream_stall_timeout_s: float = 30.0
    max_attempts: int = 3  # distinct miners tried before the first token reaches the client
    # A stream whose first token is late (compute.scheduler's hedge_due_at) is also sent to a
    # second miner, within the scheduler's hedge budget; the first to answer serves it.
    hedge_streams: bool = True
    max_body_bytes: int = 16 * 1024 * 1024
    # The most a request body may take to arrive, however slowly it trickles (408 after).
    body_timeout_s: float = 30.0
    key_refresh_s: float = 0.25  # how stale the in-memory key set may get (revocation delay)
    trace_flush_s: float = 0.1
    shutdown_grace_s: float = 10.0
    log_level: str = "warning"
    # Audits (metered gateways, app.audits): a new miner is on probation, and gets only canary
    # traffic, until this many of its responses passed a verifier's audit ...
    qualification_audits: int = 3
    # ... and it served its model at least this fast (completion tokens per second).
    qualification_tokens_per_s: float = 1.0
    audit_timeout_s: float = 30.0  # one verifier's answer to one audit job
    # Per-request records (app.request_status): at most this many, none older than this.
    request_retention_max: int = 100_000
    request_retention_s: float = 7 * 86400.0
