"""Constants and small helpers shared by the audit tests (a uniquely named module, since test
folders have no __init__.py and several hold a conftest.py)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from eth_utils import to_checksum_address

from infergrid.compute.attestation import Attestor
from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import request_hash

DOMAIN = Domain(1337, "0x" + "e5" * 20)  # any escrow address: nothing here touches a chain
MINER_KEY = "0x" + "11" * 32
MINER = to_checksum_address("0x" + "00" * 19 + "aa")

Serve = Callable[..., AuditJob]


def request_body(model: str, content: str, *, chat: bool = True, **params: Any) -> bytes:
    """A request body as a gateway forwards it."""
    payload: dict[str, Any] = {"model": model, **params}
    if chat:
        payload["messages"] = [{"role": "user", "content": content}]
    else:
        payload["prompt"] = content
    return json.dumps(payload).encode()


# A crafted job for the model-free checks: a body, ids and an attestation over them.
OTHER_MINER = to_checksum_address("0x" + "bb" * 20)
ATTESTOR = Attestor(DOMAIN, Signer(MINER_KEY), MINER)
MODEL_ID = "0x" + "ab" * 32
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'
PROMPT = (3, 4, 5)
OUTPUT = (10, 11, 12)


def make_job(**change: Any) -> AuditJob:
    """The crafted job, with `change` applied (no re-signing: break one thing at a time)."""
    job = AuditJob(
        request_id="rid",
        endpoint="chat",
        body=BODY,
        miner=MINER,
        model="m",
        prompt_token_ids=PROMPT,
        output_token_ids=OUTPUT,
        output_logprobs=(-0.1, -0.2, -0.3),
        text="abc",
        finish_reason="length",
        usage={"prompt_tokens": 3, "completion_tokens": 3},
        attestation=ATTESTOR.attestation_json(request_hash("rid", BODY), OUTPUT, MODEL_ID, 3),
    )
    return dataclasses.replace(job, **change)
