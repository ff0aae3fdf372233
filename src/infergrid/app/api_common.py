"""What the gateway's routes and its completion serving share: request ids, OpenAI-shaped
JSON and error responses, and API-key authentication."""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from infergrid.app import relay
from infergrid.app.keys import KeyRecord, KeyStore, mask_secret
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.wire import REQUEST_ID_HEADER

__all__ = [
    "authenticate",
    "error_response",
    "json_response",
    "model_not_found",
    "new_request_id",
    "request_id",
]

_RID_SCOPE_KEY = "infergrid.request_id"

_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header"
    " using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def new_request_id() -> str:
    """A fresh request id: 12 random bytes as hex."""
    return os.urandom(12).hex()


def request_id(scope: Scope) -> str:
    """The id of the request in `scope`, made on first use and the same thereafter."""
    rid = scope.get(_RID_SCOPE_KEY)
    if rid is None:
        rid = scope[_RID_SCOPE_KEY] = new_request_id()
    return rid


def error_response(
    exc: APIError, request_id: str, headers: dict[str, str] | None = None
) -> Response:
    """`exc` as an OpenAI error body, with the request id and the error's own headers."""
    all_headers = {REQUEST_ID_HEADER: request_id, **exc.headers}
    if headers:
        all_headers.update(headers)
    return Response(
        relay.encode(exc.body()), exc.status, headers=all_headers, media_type="application/json"
    )


def json_response(body: Any, request_id: str, status: int = 200) -> Response:
    """`body` as JSON, with the request id."""
    return Response(
        relay.encode(body),
        status,
        headers={REQUEST_ID_HEADER: request_id},
        media_type="application/json",
    )


def authenticate(keys: KeyStore, request: Request) -> KeyRecord:
    """The key record of the request's bearer token; raises APIError 401 without one or for an
    unknown one."""
    header = request.headers.get("authorization")
    if not header:
        raise APIError(401, _MISSING_KEY, code="missing_api_key")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, _MISSING_KEY, code="missing_api_key")
    record = keys.verify(token)
    if record is None:
        raise APIError(
            401,
            f"Incorrect API key provided: {mask_secret(token)}. Ask the gateway's operator"
            " for a key (`infergrid keys create`).",
            code="invalid_api_key",
        )
    return record


def model_not_found(model: str) -> APIError:
    """The 404 for a model no miner in the network serves."""
    return APIError(
        404,
        f"The model `{model}` does not exist or no miner in the network serves it.",
        param="model",
        code="model_not_found",
    )
