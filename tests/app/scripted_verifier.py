"""ScriptedVerifier: a scripted stand-in for a verifier node (verify.server), so the gateway's
audit dispatch and verdict intake can be tested without a model.

It serves `POST /v1/audits` on a free 127.0.0.1 port, keeps every job it is sent (as JSON),
and answers with a verdict it signs in the escrow's EIP-712 domain with its key, scripted by
`mode` — it does not audit anything: "pass" and "fail" say so whatever the job holds;
"garbage" answers a body that is no verdict; "wrong_hash" signs a verdict about another
request; "impostor" signs with a key that is not the registered verifier's; "http_500" fails.
With `hold` set, every audit waits until `release()` is called (a slow verifier).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from eth_utils import keccak
from scripted_miner import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infergrid.protocol.audits import AuditJob
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.messages import Attestation
from infergrid.protocol.verdicts import Verdict, sign_verdict

VerifierMode = Literal["pass", "fail", "garbage", "wrong_hash", "impostor", "http_500"]
IMPOSTOR_KEY = "0x" + "77" * 32
FAIL_REASON = "sampler: step 0 emitted a token that lost by 3.5 logits (scripted)"


@dataclass
class ScriptedVerifier:
    key: str  # the registered verifier's owner key (it signs verdicts)
    domain: Domain
    mode: VerifierMode = "pass"
    hold: bool = False
    jobs: list[dict[str, Any]] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""

    @property
    def address(self) -> str:
        return Signer(self.key).address

    def release(self) -> None:
        self._released.set()

    def verdict_for(self, job: dict[str, Any]) -> dict[str, Any]:
        parsed = AuditJob.from_json(job)
        attestation = Attestation.from_json(parsed.attestation)
        signer = Signer(IMPOSTOR_KEY if self.mode == "impostor" else self.key)
        passed = self.mode != "fail"
        verdict = Verdict(
            request_hash=(
                keccak(b"another request")
                if self.mode == "wrong_hash"
                else attestation.request_hash
            ),
            attestation_hash=attestation.struct_hash(),
            miner=parsed.miner,
            verifier=signer.address,
            passed=passed,
            worst_margin_deficit=0 if passed else 3_500_000,
            worst_logprob_error=0,
            reason="" if passed else FAIL_REASON,
            evidence_hash=parsed.evidence_hash(),
            timestamp=1,
        )
        return sign_verdict(self.domain, verdict, signer).to_json()

    async def _audit(self, request: Request) -> Response:
        job = await request.json()
        self.jobs.append(job)
        self.received.set()
        if self.hold:
            await self._released.wait()
        if self.mode == "http_500":
            return JSONResponse({"error": {"message": "scripted failure"}}, 500)
        if self.mode == "garbage":
            return JSONResponse({"verdict": {"passed": True}, "report": {}})
        return JSONResponse({"verdict": self.verdict_for(job), "report": {"passed": True}})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/audits", self._audit, methods=["POST"])])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedVerifier]:
        async with serve(self.app()) as url:
            self.base_url = url
            try:
                yield self
            finally:
                self.release()  # a held audit must not keep the server from stopping
