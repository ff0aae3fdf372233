"""A client's GET against a gateway's API, with one rule for its errors: what `infergrid trace`,
`infergrid status`, `infergrid up`, the receipt proof and verifier pay read from a gateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any


def get_gateway_json(
    base_url: str,
    path: str,
    api_key: str,
    *,
    query: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Any:
    """GET {base_url}{path} (base_url ends in /v1, path starts with /) with the API key and the
    JSON it answers. RuntimeError with the gateway's own message for an HTTP error;
    ConnectionError when it cannot be reached or does not answer JSON."""
    url = base_url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise RuntimeError(f"the gateway answered: {message}") from None
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot reach the gateway at {base_url}: {exc}") from None


def quoted(segment: str) -> str:
    """One path segment (a request id), escaped."""
    return urllib.parse.quote(segment, safe="")
