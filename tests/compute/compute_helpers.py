"""Constants and small helpers shared by the compute tests (a uniquely named module, since
test folders have no __init__.py and several hold a conftest.py)."""

from __future__ import annotations

TINY_SEED = 7
CHAT = [{"role": "user", "content": "Tell me a story about a dragon. 日本語 ✓ é"}]
MINER_ADDRESS = "0x00000000000000000000000000000000000000aa"
