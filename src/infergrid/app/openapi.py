"""The gateway's OpenAPI 3.1 document, served at GET /openapi.json.

The request bodies are generated from the very pydantic models the gateway validates with
(protocol.openai_types), so the document says what is really accepted and follows every change
to them; nothing about a request's shape is written here by hand. What the models cannot say
in JSON Schema (a parameter the network refuses by name, a rule across two fields) is refused
with a 400 in OpenAI's error shape, which every operation documents.

`build_document` is a pure function; the gateway builds the document once (`document_bytes`),
when it is created, and serves the same bytes to every request.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import models_json_schema

from infergrid import __version__
from infergrid.protocol.openai_types import ChatCompletionRequest, CompletionRequest
from infergrid.protocol.params import REFUSED, Refused

OPENAPI_PATH = "/openapi.json"
_REF = "#/components/schemas/{model}"
_JSON = "application/json"

# OpenAI's error shape, as protocol.openai_types.error_body writes it.
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERRORS = {
    400: "The body is not valid JSON, or a parameter is invalid or not supported (named in"
    " `error.param`).",
    401: "No API key, or an unknown or revoked one.",
    402: "Metered gateways: the key has no payer, the payer has not authorized this gateway,"
    " or the payer's escrow cannot cover the request's worst case.",
    404: "Not found: no miner in the network serves the model, or no such object.",
    405: "The path does not take this method.",
    409: "A miner already answered a request with this id and body (passed through).",
    413: "The request body is larger than the gateway accepts.",
    500: "The gateway failed (for example, it could not store the receipt; nothing was charged).",
    502: "A miner's answer could not be relayed.",
    503: "No miner can take the request right now, or the registry has not been read yet;"
    " retry (see `retry-after`).",
}

_COMPLETION_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {
            "type": "object",
            "description": "Token counts; on a metered gateway also `cost_wei`, the charge in"
            " wei as a decimal string.",
        },
    },
}

_MODEL: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

_MODEL_LIST: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
    },
}

_HEALTH: dict[str, Any] = {
    "type": "object",
    "required": ["status", "miners", "models"],
    "properties": {
        "status": {"type": "string"},
        "miners": {
            "type": "object",
            "required": ["registered", "healthy"],
            "properties": {"registered": {"type": "integer"}, "healthy": {"type": "integer"}},
        },
        "models": {"type": "array", "items": {"type": "string"}},
        "discovery_error": {"type": ["string", "null"]},
        "settlement": {"type": "object"},
    },
}

_RECEIPT: dict[str, Any] = {
    "type": "object",
    "required": ["anchor", "trace"],
    "properties": {
        "anchor": {"type": ["object", "null"]},
        "trace": {"type": "object"},
    },
    "description": "The signed receipt (its fields at the top level), its anchor proof once"
    " anchored, and the request's trace.",
}

_VOUCHERS: dict[str, Any] = {
    "type": "object",
    "required": ["gateway", "vouchers"],
    "properties": {
        "gateway": {"type": "string"},
        "vouchers": {"type": "array", "items": {"type": "object"}},
    },
}

# What a refused parameter's `neutral` rule is asked about: the values that ask for nothing
# in OpenAI's API and the extensions protocol.params lists.
_NEUTRAL_CANDIDATES: tuple[Any, ...] = (
    None,
    False,
    True,
    0,
    1,
    "",
    "none",
    "auto",
    "default",
    [],
    {},
    ["text"],
    {"type": "text"},
)

_COMPLETION_ROUTES = (
    (
        "/v1/chat/completions",
        "createChatCompletion",
        "ChatCompletionRequest",
        "Creates a model response for the given chat conversation.",
    ),
    (
        "/v1/completions",
        "createCompletion",
        "CompletionRequest",
        "Creates a completion for the given prompt (the legacy API).",
    ),
)


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/Error{s}"} for s in statuses}


def _ok(description: str, schema: dict[str, Any], media_type: str = _JSON) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _window_params(*defaults: tuple[str, str]) -> list[dict[str, Any]]:
    """The `since` / `until` query parameters of a windowed lookup, with their defaults."""
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "number", "minimum": 0},
            "description": f"Unix time in seconds; default: {default}.",
        }
        for name, default in defaults
    ]


def _neutral_values(rule: Refused) -> list[Any]:
    """The values among _NEUTRAL_CANDIDATES that `rule` lets through (None included if so).

    The rule is a predicate, not a schema, so it is asked: a neutral value it has that is not
    among the candidates goes undocumented, which leaves the document stricter than the
    gateway, never looser.
    """
    return [value for value in _NEUTRAL_CANDIDATES if rule.neutral(value)]


def _document_refused(schema: dict[str, Any]) -> None:
    """Add each refused parameter to a request body's schema as what it is: accepted only
    with a value that asks for nothing, refused by name (400) otherwise."""
    properties = schema.setdefault("properties", {})
    for rule in REFUSED:
        hint = f"; send {rule.neutral_hint} or omit it" if rule.neutral_hint else "; omit it"
        note = f"Not supported: {rule.why}{hint} (anything else is a 400 naming it)."
        prop = properties.setdefault(rule.name, {})
        # Beside the model's own schema, if it has one: a value must satisfy both.
        prop["enum"] = _neutral_values(rule)
        prop["description"] = note


def _request_schemas() -> dict[str, Any]:
    """The request models' JSON Schemas, their nested models hoisted into components, with
    the parameters the network refuses (protocol.params) documented as refused."""
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
        ref_template=_REF,
    )
    schemas = dict(defs.get("$defs", {}))
    for model in (ChatCompletionRequest, CompletionRequest):
        _document_refused(schemas[model.__name__])
    return schemas


def _completion_operation(op_id: str, schema_name: str, summary: str) -> dict[str, Any]:
    return {
        "operationId": op_id,
        "summary": summary,
        "description": "Unknown fields are accepted and ignored; a known parameter the network"
        " cannot honour is refused with 400 `unsupported_parameter`, naming it.",
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": {"$ref": _REF.format(model=schema_name)}}},
        },
        "responses": {
            "200": {
                "description": "The completion; a stream of server-sent events when `stream`"
                " is true.",
                "content": {
                    _JSON: {"schema": _COMPLETION_RESPONSE},
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            },
            **_errors(400, 401, 402, 404, 405, 409, 413, 500, 502, 503),
        },
    }


# One server-sent event: in OpenAPI 3.1 the schema of an event stream describes each event.
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "description": (
        "One server-sent event. `data` is a JSON chunk (as the non-streamed body, with `delta`"
        " in place of `message`; an error event carries OpenAI's error object), then the"
        " literal `[DONE]`."
    ),
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def build_document(*, max_body_bytes: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway that accepts bodies up to `max_body_bytes`."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {}
    for path, op_id, schema_name, summary in _COMPLETION_ROUTES:
        paths[path] = {"post": _completion_operation(op_id, schema_name, summary)}
    paths["/v1/models"] = {
        "get": {
            "operationId": "listModels",
            "summary": "The models some registered miner serves.",
            "responses": {
                "200": _ok("The models.", {"$ref": "#/components/schemas/ModelList"}),
                **_errors(401, 405),
            },
        }
    }
    paths["/v1/models/{model}"] = {
        "get": {
            "operationId": "retrieveModel",
            "summary": "One model, if some registered miner serves it.",
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _ok("The model.", {"$ref": "#/components/schemas/Model"}),
                **_errors(401, 404, 405),
            },
        }
    }
    paths["/v1/receipts/{request_id}"] = {
        "get": {
            "operationId": "retrieveReceipt",
            "summary": "The receipt of one of this key's requests (metered gateways).",
            "parameters": [
                {
                    "name": "request_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "The request's `x-request-id` response header.",
                }
            ],
            "responses": {
                "200": _ok("The receipt.", {"$ref": "#/components/schemas/Receipt"}),
                **_errors(401, 404, 405),
            },
        }
    }
    paths["/v1/requests/{request_id}"] = {
        "get": {
            "operationId": "retrieveRequestStatus",
            "summary": "The verification status of one of this key's requests: audit state,"
            " verdicts, dispute, refund (the x-infergrid-request header points here).",
            "parameters": [
                {
                    "name": "request_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "The request's `x-request-id` response header.",
                }
            ],
            "responses": {
                "200": _ok("The request's status.", {"type": "object"}),
                **_errors(401, 404, 405),
            },
        }
    }
    paths["/v1/miners"] = {
        "get": {
            "operationId": "listMiners",
            "summary": "Every registered miner: its state (probation, active, frozen,"
            " slashed), requests served and audit record.",
            "responses": {
                "200": _ok("The miners.", {"type": "object"}),
                **_errors(401, 405),
            },
        }
    }
    paths["/v1/miners/epoch"] = {
        "get": {
            "operationId": "listMinerEpoch",
            "summary": "Per miner, what this gateway observed over requests it received in"
            " [since, until): requests, errors, verified tokens, latency against the model's"
            " typical, health checks, audit verdicts. The verifiers' input to epoch scores.",
            "parameters": _window_params(("since", "0"), ("until", "now (exclusive)")),
            "responses": {
                "200": _ok("The miners' counts.", {"type": "object"}),
                **_errors(400, 401, 405),
            },
        }
    }
    paths["/v1/verifiers"] = {
        "get": {
            "operationId": "listVerifiers",
            "summary": "Per verifier: the verdicts this gateway recorded (passed, failed) for"
            " requests it received in [since, until): the audits verifier pay counts.",
            "parameters": _window_params(
                ("since", "the oldest request kept"),
                ("until", "no upper bound (exclusive)"),
            ),
            "responses": {
                "200": _ok("The verifiers.", {"type": "object"}),
                **_errors(400, 401, 405),
            },
        }
    }
    paths["/v1/network"] = {
        "get": {
            "operationId": "retrieveNetwork",
            "summary": "Per model: its miners and slots now, and over [since, until) its"
            " requests, shed requests (429), tokens asked for and served, slot time busy and"
            " offered, utilization, median price and its share of the miners' emission.",
            "parameters": _window_params(
                ("since", "`until` less 300 s"),
                ("until", "now (exclusive)"),
            ),
            "responses": {
                "200": _ok("Demand against supply, per model.", {"type": "object"}),
                **_errors(400, 401, 405),
            },
        }
    }
    paths["/v1/vouchers"] = {
        "get": {
            "operationId": "listVouchers",
            "summary": "A miner's cumulative vouchers, one per payer (metered gateways).",
            "security": [],
            "parameters": [
                {
                    "name": "miner",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                    "description": "The miner's address: checksummed, or all in one case.",
                }
            ],
            "responses": {
                "200": _ok("The vouchers.", {"$ref": "#/components/schemas/Vouchers"}),
                **_errors(400, 404, 405),
            },
        }
    }
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "summary": "Whether the gateway serves, and what it knows of the network.",
            "security": [],
            "responses": {
                "200": _ok("The gateway's state.", {"$ref": "#/components/schemas/Health"}),
                **_errors(405),
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics.",
            "security": [],
            "responses": {
                "200": _ok("Prometheus text format.", {"type": "string"}, "text/plain"),
                **_errors(405),
            },
        }
    }
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "security": [],
            "responses": {
                "200": _ok("The OpenAPI document.", {"type": "object"}),
                **_errors(405),
            },
        }
    }
    schemas = {
        **_request_schemas(),
        "Error": _ERROR_SCHEMA,
        "Model": _MODEL,
        "ModelList": _MODEL_LIST,
        "Health": _HEALTH,
        "Receipt": _RECEIPT,
        "Vouchers": _VOUCHERS,
    }
    responses = {
        f"Error{status}": {
            "description": description
            + (f" The limit is {max_body_bytes} bytes." if status == 413 else ""),
            "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status, description in _ERRORS.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "InferGrid gateway",
            "version": __version__,
            "description": "An OpenAI-compatible API in front of InferGrid's miners. Types"
            " are strict: an integer is written without a fraction (2, not 2.0, though JSON"
            " Schema counts both as integers), a string is not a number.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": bearer,
    }


def document_bytes(*, max_body_bytes: int) -> bytes:
    """The document as the gateway serves it: built once, when the gateway is created."""
    return json.dumps(build_document(max_body_bytes=max_body_bytes)).encode()
