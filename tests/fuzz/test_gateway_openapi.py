"""The gateway's OpenAPI document (/openapi.json) says what it really accepts, and a bounded,
derandomized schemathesis run against a real metered gateway and a real miner finds no 5xx,
no dropped connection and no response outside the document."""

from __future__ import annotations

import json
from typing import Any

import hypothesis.strategies as st
import requests
import schemathesis
from fuzz_stack import MAX_BODY_BYTES, MODEL, KeepAlive, Stack, assert_healthy, check_error_shape
from hypothesis import HealthCheck, given, settings
from pydantic import TypeAdapter
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from starlette.routing import Route

from infergrid.app.config import GatewayConfig
from infergrid.app.gateway import create_gateway_app
from infergrid.app.keys import KeyStore
from infergrid.app.openapi import build_document
from infergrid.app.traces import TraceStore
from infergrid.protocol.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from infergrid.protocol.params import REFUSED

# Enough to cover every operation in both modes a few times, small enough for CI (~15 s).
SCHEMATHESIS_EXAMPLES = 250
# Refusals of a schema-valid request by the model served, which no document of the API can
# state: longer than its context, nothing left after its tokenizer, a conversation its chat
# template rejects, more tokens than its bytes can bill for (a template that adds a long system
# prompt).
MODEL_LIMITS = (
    "context_length_exceeded",
    "empty_prompt",
    "invalid_prompt",
    "prompt_exceeds_billable_tokens",
)


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_request_schemas_are_the_models() -> None:
    """Each operation's body schema is its model's JSON Schema: a change to a model changes
    the document, with nothing copied by hand."""
    doc = build_document(max_body_bytes=MAX_BODY_BYTES)
    schemas = doc["components"]["schemas"]
    for path, model in (
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
    ):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        expected = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
        nested = expected.pop("$defs", {})
        documented = dict(_resolve(doc, body["schema"]))
        properties = dict(documented.pop("properties"))
        # Refused parameters are documented beside the model's own (protocol.params): only
        # their neutral values are accepted.
        for rule in REFUSED:
            prop = dict(properties.pop(rule.name))
            assert rule.neutral(None) == (None in prop.pop("enum"))
            assert prop.pop("description").startswith("Not supported")
            if rule.name in expected["properties"]:
                properties[rule.name] = prop
            else:
                assert prop == {}
        assert {**documented, "properties": properties} == expected
        for name, schema in nested.items():
            assert schemas[name] == schema


def test_document_covers_every_route(tmp_path: Any) -> None:
    """Every route the app serves is in the document, with the methods it takes."""
    keys, traces = KeyStore(tmp_path / "g.db"), TraceStore(tmp_path / "g.db")
    try:
        app = create_gateway_app(GatewayConfig(), discover=list, keys=keys, traces=traces)
    finally:
        traces.close()
        keys.close()
    doc = build_document(max_body_bytes=GatewayConfig().max_body_bytes)
    served = {}
    for route in app.routes:
        assert isinstance(route, Route)
        path = route.path.replace(":path}", "}")
        served[path] = {m.lower() for m in route.methods or ()} - {"head"}
    documented = {path: set(ops) for path, ops in doc["paths"].items()}
    assert served == documented


def test_error_schema_is_error_body() -> None:
    import jsonschema_rs

    doc = build_document(max_body_bytes=1)
    validator = jsonschema_rs.validator_for(doc["components"]["schemas"]["Error"])
    assert validator.is_valid(error_body("m", type="invalid_request_error"))
    assert validator.is_valid(error_body("m", type="t", param="stop", code="invalid_value"))
    assert not validator.is_valid({"error": {"message": "m"}})


def test_served_document(stack: Stack) -> None:
    conn = KeepAlive(stack.gateway_url)
    try:
        status, headers, raw = conn.request("GET", "/openapi.json")
    finally:
        conn.close()
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]  # as on every answer of the gateway
    assert json.loads(raw) == build_document(max_body_bytes=MAX_BODY_BYTES)
    # A valid OpenAPI document that schemathesis can drive.
    schema = schemathesis.openapi.from_dict(json.loads(raw))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(build_document(max_body_bytes=1)["paths"])


def _whole_floats_to_ints(value: Any) -> Any:
    """2.0 as 2. JSON Schema counts 2.0 as an integer (and schemathesis sends it as one); the
    request models take integers only as written without a fraction (strict types), which no
    JSON Schema can say. The document's description says so instead."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_to_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_floats_to_ints(item) for key, item in value.items()}
    return value


def _opened_connections(session: requests.Session) -> int:
    total = 0
    for adapter in session.adapters.values():
        manager = getattr(adapter, "poolmanager", None)
        if manager is None:
            continue
        for key in manager.pools.keys():  # noqa: SIM118 (the container refuses iteration)
            pool = manager.pools.get(key)
            total += pool.num_connections if pool is not None else 0
    return total


def test_schemathesis(stack: Stack) -> None:
    """Requests generated from the served document, valid and invalid by it, against the real
    network: no 5xx, OpenAI's error shape for every 4xx, every response as documented, valid
    requests accepted and invalid ones refused, and one keep-alive connection throughout
    (schemathesis silently resends on a dropped one, so the test counts connections)."""
    conn = KeepAlive(stack.gateway_url)
    try:
        _, _, raw = conn.request("GET", "/openapi.json")
    finally:
        conn.close()
    schema = schemathesis.openapi.from_dict(json.loads(raw))
    cases = st.one_of(
        st.tuples(st.just(True), schema.as_strategy(GenerationMode.POSITIVE)),
        st.tuples(st.just(False), schema.as_strategy(GenerationMode.NEGATIVE)),
    )
    session = requests.Session()
    seen: dict[int, int] = {}

    @settings(
        max_examples=SCHEMATHESIS_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(generated=cases, real_model=st.booleans())
    def run(generated: tuple[bool, schemathesis.Case], real_model: bool) -> None:
        positive, case = generated
        if positive and isinstance(case.body, dict):
            case.body = _whole_floats_to_ints(case.body)
            if case.body.get("top_logprobs"):
                # A rule across two fields, which the document states only in words.
                case.body["logprobs"] = True
            # Reach the miner too: the document cannot name the models the network serves.
            if real_model and "model" in case.body:
                case.body["model"] = MODEL
        response = case.call(base_url=stack.gateway_url, session=session, headers=stack.auth())
        status = response.status_code
        seen[status] = seen.get(status, 0) + 1
        if status == 200 and case.method == "POST":
            stack.counts.saw(200, direct=False)
        assert status < 500, (case.body, response.text)
        excluded = []
        if 400 <= status < 500:
            check_error_shape(status, response.content)
            if response.json()["error"]["code"] in MODEL_LIMITS:
                excluded.append(positive_data_acceptance)
        case.validate_response(response, headers=stack.auth(), excluded_checks=excluded)

    try:
        run()
        assert _opened_connections(session) == 1
    finally:
        session.close()
    print("schemathesis statuses:", dict(sorted(seen.items())))
    assert_healthy(stack)
