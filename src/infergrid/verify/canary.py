"""Canaries: the verifier as an ordinary paying developer.

With an API key of its own at a gateway (its own escrow deposit behind it), a verifier sends
short chat prompts through the gateway's public `/v1/chat/completions`, like any client: varied
and seeded (`seed` picks the sequence, not the requests' sampling seeds), a mix of greedy and
sampled, a few tokens each. For every answer it reads the `x-infergrid-request` header
(protocol.wire.REQUEST_STATUS_HEADER), fetches that status with its key (`GET
/v1/requests/{id}`), checks that the audit job the gateway recorded has exactly the text the
verifier received (a gateway that shows verifiers another answer than the client got is caught
here), and audits the job itself (VerifierService.audit_now); a failure goes on like any failed
audit (confirmed, then disputed by the duties). So neither a miner nor a gateway that skips
audits can tell canaries from traffic.

`CanaryLoop` sends one every `canary_interval_s` (0: none), and every `qualification_interval_s`
while the gateway's `GET /v1/miners` shows a miner on "probation" (those miners get only canary
traffic until they qualify).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from infergrid.protocol.audits import AuditJob
from infergrid.protocol.wire import REQUEST_STATUS_HEADER
from infergrid.verify.server import VerifierService

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 12
HTTP_TIMEOUT_S = 60.0
# The gateway stores the request's job right after its receipt; a status read can race it.
STATUS_ATTEMPTS = 5
STATUS_RETRY_S = 0.2
# While canaries are off, how often the loop looks for miners on probation.
PROBATION_POLL_S = 5.0

_SUBJECTS = (
    "the sea", "a lighthouse", "bread", "rain on a tin roof", "a chess opening", "winter",
    "the moon", "an old bicycle", "a library", "coffee", "a mountain path", "fireflies",
    "a train station", "honey bees", "the number seven", "a paper boat",
)  # fmt: skip
_ASKS = (
    "Write one sentence about {}.",
    "Describe {} in a few words.",
    "What comes to mind when you think of {}?",
    "Give me a short fact about {}.",
    "Say something kind about {}.",
    "Start a story about {}.",
)


class GatewayError(Exception):
    """The gateway answered with an error status, or not at all."""


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any = None,
    timeout: float = HTTP_TIMEOUT_S,
) -> HttpAnswer:
    """One HTTP exchange (JSON body if given); an error status is an answer, not a raise;
    GatewayError when there is no answer."""
    if not url.startswith(("http://", "https://")):
        raise GatewayError(f"{url} is not an HTTP URL")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers_in = {k.lower(): v for k, v in response.headers.items()}
            return HttpAnswer(response.status, headers_in, response.read())
    except urllib.error.HTTPError as exc:
        return HttpAnswer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())
    except (urllib.error.URLError, OSError) as exc:
        raise GatewayError(f"{method} {url}: {exc}") from None


def _ok(answer: HttpAnswer, what: str) -> HttpAnswer:
    if answer.status != 200:
        raise GatewayError(f"{what} answered {answer.status}: {answer.body[:300]!r}")
    return answer


@dataclass(frozen=True)
class CanaryResult:
    request_id: str | None
    model: str
    miner: str | None
    outcome: str  # "passed", "failed", "mismatch", "cannot_audit", "error"
    detail: str = ""

    def line(self) -> str:
        who = f" miner {self.miner}" if self.miner else ""
        rid = self.request_id or "?"
        return f"canary {rid} ({self.model}){who}: {self.outcome}" + (
            f": {self.detail}" if self.detail else ""
        )


def canary_request(rng: random.Random, model: str, max_tokens: int) -> dict[str, Any]:
    """One canary chat request: a varied short prompt, greedy half the time, else sampled
    at a temperature in [0.5, 1.2] (sometimes with top_p), at most `max_tokens` tokens."""
    prompt = rng.choice(_ASKS).format(rng.choice(_SUBJECTS))
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens),
    }
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body["temperature"] = round(rng.uniform(0.5, 1.2), 2)
        if rng.random() < 0.3:
            body["top_p"] = round(rng.uniform(0.8, 1.0), 2)
    return body


class CanarySender:
    """Sends canaries through one gateway with one API key and audits each."""

    def __init__(
        self,
        gateway_url: str,
        api_key: str,
        *,
        service: VerifierService,
        models: Sequence[str],
        seed: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        log: Callable[[str], None] = logger.info,
    ) -> None:
        if not models:
            raise ValueError("canaries need at least one model")
        # Either the root URL or the base URL clients use (ending in /v1) names the gateway.
        self.gateway_url = gateway_url.rstrip("/").removesuffix("/v1")
        self.service = service
        self.models = list(models)
        self.rng = random.Random(seed)
        self.max_tokens = max_tokens
        self.log = log
        self._headers = {"authorization": f"Bearer {api_key}"}
        self.results: list[CanaryResult] = []

    def probation_miners(self) -> list[str]:
        """Addresses of the gateway's miners on probation (GET /v1/miners)."""
        url = f"{self.gateway_url}/v1/miners"
        rows = _ok(http("GET", url, self._headers), url).json().get("data") or []
        return [row["address"] for row in rows if row.get("state") == "probation"]

    def _status(self, path: str) -> dict[str, Any]:
        url = self.gateway_url + path if path.startswith("/") else path
        for attempt in range(STATUS_ATTEMPTS):
            answer = http("GET", url, self._headers)
            if answer.status == 200:
                data = answer.json()
                if data.get("job"):
                    return dict(data)
            elif answer.status != 404:
                _ok(answer, url)
            if attempt + 1 < STATUS_ATTEMPTS:
                time.sleep(STATUS_RETRY_S)
        raise ValueError(f"the gateway has no audit job at {path}")

    def send_one(self) -> CanaryResult:
        """Send one canary, fetch its job, check and audit it; never raises."""
        from infergrid.verify.recompute import CannotAudit

        model = self.rng.choice(self.models)
        body = canary_request(self.rng, model, self.max_tokens)
        request_id: str | None = None
        miner: str | None = None
        try:
            url = f"{self.gateway_url}/v1/chat/completions"
            answer = _ok(http("POST", url, self._headers, body), url)
            text = answer.json()["choices"][0]["message"]["content"] or ""
            path = answer.headers.get(REQUEST_STATUS_HEADER)
            if not path:
                raise ValueError(f"the gateway's answer has no {REQUEST_STATUS_HEADER} header")
            request_id = path.rstrip("/").rsplit("/", 1)[-1]
            status = self._status(path)
            miner = status.get("miner")
            job = AuditJob.from_json(status["job"])
            if job.text != text:
                result = CanaryResult(
                    request_id,
                    model,
                    miner,
                    "mismatch",
                    f"the gateway's job text {job.text!r} is not the answer received {text!r}",
                )
            else:
                outcome = self.service.audit_now(job)
                report = outcome.report
                result = CanaryResult(
                    request_id,
                    model,
                    miner,
                    "passed" if report.passed else "failed",
                    "" if report.passed else report.reason,
                )
        except CannotAudit as exc:
            result = CanaryResult(request_id, model, miner, "cannot_audit", str(exc))
        except (GatewayError, ValueError, KeyError, TypeError, IndexError) as exc:
            result = CanaryResult(request_id, model, miner, "error", f"{type(exc).__name__}: {exc}")
        self.results.append(result)
        self.log(result.line())
        return result


class CanaryLoop:
    """Canaries on a daemon thread: every `interval_s` (0: none), and every
    `qualification_interval_s` (0: never faster) while a miner is on probation."""

    def __init__(
        self, sender: CanarySender, interval_s: float, qualification_interval_s: float
    ) -> None:
        self.sender = sender
        self.interval_s = interval_s
        self.qualification_interval_s = qualification_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verifier-canaries", daemon=True)
        self._probation_logged = False

    def start(self) -> CanaryLoop:
        self._thread.start()
        return self

    def _probation(self) -> bool:
        if self.qualification_interval_s <= 0:
            return False
        try:
            miners = self.sender.probation_miners()
        except (GatewayError, ValueError, KeyError, TypeError) as exc:
            self.sender.log(f"canaries: cannot read the gateway's miners: {exc}")
            return False
        if miners and not self._probation_logged:
            self.sender.log(f"canaries: {len(miners)} miner(s) on probation: qualifying them")
        self._probation_logged = bool(miners)
        return bool(miners)

    def next_wait(self, probation: bool, since_last: float) -> tuple[bool, float]:
        """(send now?, seconds to wait after) for a loop round."""
        if probation:
            return since_last >= self.qualification_interval_s, self.qualification_interval_s
        if self.interval_s > 0:
            due = since_last >= self.interval_s
            wait = self.interval_s if due else self.interval_s - since_last
            return due, min(wait, PROBATION_POLL_S)
        return False, PROBATION_POLL_S

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            send, wait = self.next_wait(self._probation(), time.monotonic() - last)
            if send:
                self.sender.send_one()
                last = time.monotonic()
            self._stop.wait(wait)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
