"""Constants and small helpers shared by the compute tests (a uniquely named module, since
test folders have no __init__.py and several hold a conftest.py)."""

from __future__ import annotations

TINY_SEED = 7
CHAT = [{"role": "user", "content": "Tell me a story about a dragon. 日本語 ✓ é"}]
MINER_ADDRESS = "0x00000000000000000000000000000000000000aa"


def post(
    host: str, port: int, path: str, raw: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST raw bytes over a fresh connection; (status, headers, body)."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(
            "POST", path, body=raw, headers={"content-type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()
