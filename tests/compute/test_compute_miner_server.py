"""The miner's HTTP API over a tiny model, through real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from compute_helpers import CHAT, MINER_ADDRESS

from infergrid.compute.attestation import Attestor
from infergrid.compute.engine import GeneratedToken, SamplingParams
from infergrid.compute.miner_server import (
    MinerServerThread,
    billable_prompt,
    create_miner_app,
    iter_sse,
    token_budget,
)
from infergrid.compute.model_store import TINY_CHAT_TEMPLATE
from infergrid.compute.transformers_engine import TransformersEngine
from infergrid.protocol.eip712 import Domain, Signer
from infergrid.protocol.openai_types import APIError
from infergrid.protocol.pricing import TEMPLATE_TOKEN_ALLOWANCE, max_prompt_tokens
from infergrid.protocol.sampling import SAMPLER_VERSION
from infergrid.protocol.wire import EXTENSION_KEY, MINER_HEADER, REQUEST_ID_HEADER


def _post(
    server: MinerServerThread, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(
            "POST", path, body=raw, headers={"content-type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _chat(engine: TransformersEngine, **extra: Any) -> dict[str, Any]:
    return {"model": engine.name, "messages": CHAT, "max_tokens": 12, "seed": 5, **extra}


def _events(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"data: [DONE]\n\n")
    return list(iter_sse(raw.split(b"\n")))


def _wait_idle(server: MinerServerThread, timeout: float = 10.0) -> None:
    stats = server.server.config.app.state.miner.stats
    deadline = time.monotonic() + timeout
    while stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.in_flight == 0


def test_health(miner: MinerServerThread, tiny_engine: TransformersEngine) -> None:
    conn = http.client.HTTPConnection(miner.host, miner.port, timeout=10)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    assert body == {
        "status": "ok",
        "models": [
            {
                "name": tiny_engine.name,
                "model_id": tiny_engine.model_id,
                "context_length": tiny_engine.context_length,
                "sampler": SAMPLER_VERSION,
            }
        ],
        "in_flight": 0,
        "max_concurrency": 1,
        "address": MINER_ADDRESS,
    }


def test_chat_completion_shape_and_extension(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    status, headers, raw = _post(
        miner, "/v1/chat/completions", _chat(tiny_engine), {REQUEST_ID_HEADER: "req-42"}
    )
    assert status == 200
    assert headers[REQUEST_ID_HEADER] == "req-42"
    assert headers[MINER_HEADER] == MINER_ADDRESS
    body = json.loads(raw)
    assert body["id"] == "chatcmpl-req-42"
    assert body["object"] == "chat.completion"
    assert body["model"] == tiny_engine.name
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["logprobs"] is None  # not asked for
    ext = body[EXTENSION_KEY]
    prompt = tiny_engine.chat_prompt_ids(CHAT)
    assert ext["model_id"] == tiny_engine.model_id
    assert ext["seed"] == 5
    assert ext["prompt_token_ids"] == prompt
    # The same tokens the engine produces for this seed, and the text they decode to.
    direct = list(tiny_engine.generate(prompt, SamplingParams(max_tokens=12, seed=5)))
    assert ext["output_token_ids"] == [t.token_id for t in direct]
    assert ext["output_logprobs"] == pytest.approx([t.logprob for t in direct])
    assert choice["message"]["content"] == tiny_engine.decode(ext["output_token_ids"])
    assert choice["finish_reason"] == direct[-1].finish_reason
    n_out = len(ext["output_token_ids"])
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": n_out,
        "total_tokens": len(prompt) + n_out,
    }


def test_chat_stream_shape_matches_the_non_streamed_answer(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    _, _, whole = _post(miner, "/v1/chat/completions", _chat(tiny_engine))
    expected = json.loads(whole)
    status, headers, raw = _post(
        miner,
        "/v1/chat/completions",
        _chat(tiny_engine, stream=True),
        {REQUEST_ID_HEADER: "s1"},
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = _events(raw)
    assert all(e["id"] == "chatcmpl-s1" for e in events)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert all("usage" not in e for e in events[:-1])  # include_usage was not asked
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = events[1:-2]
    assert all(e["choices"][0]["finish_reason"] is None for e in content)
    finish, usage = events[-2], events[-1]
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    text = "".join(e["choices"][0]["delta"]["content"] for e in content)
    assert text == expected["choices"][0]["message"]["content"]
    ids = [i for e in events[:-1] if EXTENSION_KEY in e for i in e[EXTENSION_KEY]["token_ids"]]
    assert ids == expected[EXTENSION_KEY]["output_token_ids"]
    assert usage["choices"] == []
    assert usage["usage"] == expected["usage"]
    assert usage[EXTENSION_KEY] == {
        "model_id": tiny_engine.model_id,
        "sampler": SAMPLER_VERSION,
        "seed": 5,
        "prompt_token_ids": expected[EXTENSION_KEY]["prompt_token_ids"],
    }


def test_include_usage_puts_null_usage_on_chunks(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    body = _chat(tiny_engine, stream=True, stream_options={"include_usage": True})
    events = _events(_post(miner, "/v1/chat/completions", body)[2])
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_chat_logprobs_only_when_asked(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    body = json.loads(
        _post(miner, "/v1/chat/completions", _chat(tiny_engine, logprobs=True, top_logprobs=2))[2]
    )
    ext = body[EXTENSION_KEY]
    content = body["choices"][0]["logprobs"]["content"]
    visible = [
        (i, lp)
        for i, lp in zip(ext["output_token_ids"], ext["output_logprobs"], strict=True)
        if i not in tiny_engine.eos_token_ids
    ]
    assert len(content) == len(visible)
    for entry, (token_id, logprob) in zip(content, visible, strict=True):
        assert entry["logprob"] == pytest.approx(logprob)
        assert bytes(entry["bytes"]) == tiny_engine.token_bytes(token_id)
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    without = json.loads(
        _post(miner, "/v1/chat/completions", _chat(tiny_engine, logprobs=False))[2]
    )
    assert without["choices"][0]["logprobs"] is None
    streamed = _events(_post(miner, "/v1/chat/completions", _chat(tiny_engine, stream=True))[2])
    assert all(e["choices"][0]["logprobs"] is None for e in streamed if e["choices"])


def test_legacy_completions(miner: MinerServerThread, tiny_engine: TransformersEngine) -> None:
    request = {"model": tiny_engine.name, "prompt": "Once upon", "max_tokens": 6, "seed": 1}
    body = json.loads(_post(miner, "/v1/completions", {**request, "logprobs": 2})[2])
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    ext = body[EXTENSION_KEY]
    assert ext["prompt_token_ids"] == tiny_engine.encode("Once upon")
    assert choice["text"] == tiny_engine.decode(ext["output_token_ids"])
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 6
    assert len(logprobs["top_logprobs"]) == 6 and all(len(t) <= 2 for t in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    assert json.loads(_post(miner, "/v1/completions", request)[2])["choices"][0]["logprobs"] is None
    events = _events(_post(miner, "/v1/completions", {**request, "stream": True})[2])
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == choice["text"]
    assert events[-1]["usage"] == body["usage"]


def test_openai_client_against_the_miner(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    client = openai.OpenAI(base_url=miner.url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model=tiny_engine.name, messages=CHAT, max_tokens=8, seed=3, logprobs=True, top_logprobs=1
    )
    assert completion.object == "chat.completion"
    assert completion.usage is not None and completion.usage.completion_tokens == len(
        completion.model_extra[EXTENSION_KEY]["output_token_ids"]
    )
    assert completion.choices[0].logprobs is not None
    chunks = list(
        client.chat.completions.create(
            model=tiny_engine.name, messages=CHAT, max_tokens=8, seed=3, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage is not None
    legacy = client.completions.create(model=tiny_engine.name, prompt="hi", max_tokens=3, seed=1)
    assert legacy.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()] == [tiny_engine.name]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=tiny_engine.name, messages=CHAT, max_tokens=10**5)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        # Hostile nesting: json's C decoder would recurse off the C stack in a process whose
        # recursion limit eth_account has raised; it must be a 400, not a dead miner.
        (b"[" * 100_000 + b"]" * 100_000, 400, None),
        (b'{"model": NaN}', 400, None),
        ({"messages": CHAT}, 400, "model"),
        ({"model": "M", "messages": "hi"}, 400, "messages"),
        ({"model": "M", "messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "M", "messages": CHAT, "temperature": 3}, 400, "temperature"),
        ({"model": "M", "messages": CHAT, "n": 2}, 400, "n"),
        ({"model": "M", "messages": CHAT, "top_k": "x"}, 400, "top_k"),
        ({"model": "M", "messages": CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"model": "M", "messages": CHAT, "seed": 2**63}, 400, "seed"),
        ({"model": "M", "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({"model": "M", "messages": CHAT, "stop": ["a"] * 5}, 400, "stop"),
        ({"model": "M", "messages": CHAT, "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "other-model", "messages": CHAT}, 404, "model"),
    ],
)
def test_bad_chat_requests_are_openai_shaped_4xx(
    miner: MinerServerThread,
    tiny_engine: TransformersEngine,
    body: Any,
    status: int,
    param: str | None,
) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": tiny_engine.name}
    got, _, raw = _post(miner, "/v1/chat/completions", body)
    assert got == status
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param


def test_other_http_errors_are_openai_shaped(miner: MinerServerThread) -> None:
    conn = http.client.HTTPConnection(miner.host, miner.port, timeout=10)
    conn.request("GET", "/v1/chat/completions")
    response = conn.getresponse()
    assert response.status == 405
    assert "error" in json.loads(response.read())
    conn.request("GET", "/v2/nothing")
    response = conn.getresponse()
    assert response.status == 404
    assert json.loads(response.read())["error"]["type"] == "not_found_error"
    status, _, _ = _post(miner, "/v1/chat/completions", {}, {REQUEST_ID_HEADER: "bad id!"})
    assert status == 400


def test_prompt_too_long_for_the_context(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    long_prompt = "a" * tiny_engine.context_length
    status, _, raw = _post(
        miner, "/v1/completions", {"model": tiny_engine.name, "prompt": long_prompt}
    )
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "context_length_exceeded"


def test_default_max_tokens_fits_the_context() -> None:
    assert token_budget(100, None, 8192, 1024) == 1024
    assert token_budget(2000, None, 2048, 1024) == 48
    assert token_budget(10, 30, 2048, 1024) == 30
    with pytest.raises(APIError):
        token_budget(2048, None, 2048, 1024)
    with pytest.raises(APIError):
        token_budget(2000, 49, 2048, 1024)


def test_a_prompt_is_billable_up_to_one_token_per_body_byte_plus_the_allowance() -> None:
    bound = 100 + TEMPLATE_TOKEN_ALLOWANCE
    billable_prompt(bound, 100)
    with pytest.raises(APIError) as info:
        billable_prompt(bound + 1, 100, prompt_param="prompt")
    error = info.value
    assert error.status == 400 and error.code == "prompt_exceeds_billable_tokens"
    assert error.param == "prompt" and f"more than the {bound}" in error.message


# A default system prompt longer than the template allowance: a model like this makes a short
# request tokenize to more than the request can be billed for.
_LONG_SYSTEM_PROMPT = "You are a careful assistant. " * 40


@pytest.fixture(scope="module")
def verbose_template_engine(tiny_dir: Path) -> TransformersEngine:
    """The tiny model, loaded apart, with a chat template that adds a long system prompt."""
    engine = TransformersEngine.from_dir(tiny_dir, device="auto", num_threads=1)
    engine.tokenizer.chat_template = (
        "{{ '<|im_start|>system\\n" + _LONG_SYSTEM_PROMPT + "<|im_end|>\\n' }}" + TINY_CHAT_TEMPLATE
    )
    return engine


def test_an_attesting_miner_refuses_a_prompt_it_could_not_bill(
    verbose_template_engine: TransformersEngine,
) -> None:
    """The gateway refuses an attestation whose prompt is longer than the forwarded body can
    tokenize to, so an honest miner refuses such a request with a 400 before generating
    anything it could not be paid for; a miner that does not attest serves it."""
    engine = verbose_template_engine
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": engine.name, "messages": messages, "max_tokens": 2}
    raw = json.dumps(body).encode()
    assert len(engine.chat_prompt_ids(messages)) > max_prompt_tokens(len(raw))
    attestor = Attestor(Domain(1337, "0x" + "e5" * 20), Signer("0x" + "5a" * 32), MINER_ADDRESS)
    app = create_miner_app(engine, node_address=MINER_ADDRESS, attestor=attestor)
    with MinerServerThread(app) as server:
        for stream in (False, True):
            status, _, answer = _post(server, "/v1/chat/completions", {**body, "stream": stream})
            assert status == 400, answer
            error = json.loads(answer)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "prompt_exceeds_billable_tokens"
            assert error["param"] == "messages"
        assert app.state.miner.stats.requests == 0  # refused before any generation
    unattested = create_miner_app(engine, node_address=MINER_ADDRESS)
    with MinerServerThread(unattested) as server:
        status, _, answer = _post(server, "/v1/chat/completions", body)
        assert status == 200, answer


def _long_request(engine: TransformersEngine, stream: bool) -> bytes:
    body = {
        "model": engine.name,
        "messages": CHAT,
        "max_tokens": 1900,
        "temperature": 0.0,  # greedy: the tiny model's argmax path does not reach EOS soon
        "stream": stream,
    }
    raw = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(raw)}\r\n\r\n".encode()
        + raw
    )


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(tiny_engine: TransformersEngine, stream: bool) -> None:
    greedy = list(
        tiny_engine.generate(
            tiny_engine.chat_prompt_ids(CHAT), SamplingParams(max_tokens=1900, temperature=0)
        )
    )
    assert len(greedy) > 400  # so that the request below runs for a while
    app = create_miner_app(tiny_engine, node_address=MINER_ADDRESS)
    stats = app.state.miner.stats
    with MinerServerThread(app) as server:
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(_long_request(tiny_engine, stream))
        if stream:
            received = b""
            while b"data:" not in received:  # wait until the stream has started
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            assert b" 200 OK" in received
        else:
            time.sleep(0.1)
        sock.close()
        _wait_idle(server)
    assert stats.cancelled == 1
    assert 0 < stats.tokens_generated < len(greedy) // 2


class _CountingEngine:
    """The real engine, plus a count of how many generations run at the same moment."""

    def __init__(self, engine: TransformersEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            yield from self._engine.generate(prompt_ids, params)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_requests_queue_beyond_max_concurrency(
    tiny_engine: TransformersEngine, max_concurrency: int
) -> None:
    counting = _CountingEngine(tiny_engine)
    app = create_miner_app(counting, node_address=MINER_ADDRESS, max_concurrency=max_concurrency)
    results: list[dict[str, Any]] = []
    with MinerServerThread(app) as server:

        def call(seed: int) -> None:
            body = _chat(tiny_engine, seed=seed, max_tokens=60, stream=seed % 2 == 0)
            status, _, raw = _post(server, "/v1/chat/completions", body)
            assert status == 200
            results.append({"seed": seed, "raw": raw})

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _wait_idle(server)
    assert sorted(r["seed"] for r in results) == [0, 1, 2, 3]
    assert counting.most <= max_concurrency
    if max_concurrency == 1:
        assert counting.most == 1
    prompt = tiny_engine.chat_prompt_ids(CHAT)
    for r in results:  # queueing and concurrency change nothing in the answers
        direct = tiny_engine.generate(prompt, SamplingParams(max_tokens=60, seed=r["seed"]))
        expected = [t.token_id for t in direct]
        if r["seed"] % 2:
            got = json.loads(r["raw"])[EXTENSION_KEY]["output_token_ids"]
        else:
            events = _events(r["raw"])
            got = [
                i for e in events[:-1] if EXTENSION_KEY in e for i in e[EXTENSION_KEY]["token_ids"]
            ]
        assert got == expected


# -- bad input: one rule with the gateway, every error a 4xx ---------------------------------


def _error(status: int, raw: bytes, want: int) -> dict[str, Any]:
    assert status == want, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_seed_is_a_signed_64_bit_integer(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    for seed in (2**63, -(2**63) - 1, 10**30):
        status, _, raw = _post(miner, "/v1/chat/completions", _chat(tiny_engine, seed=seed))
        error = _error(status, raw, 400)
        assert (error["param"], error["code"]) == ("seed", "invalid_value")
        assert "64-bit" in error["message"]
    for seed in (2**63 - 1, -(2**63)):
        status, _, raw = _post(miner, "/v1/chat/completions", _chat(tiny_engine, seed=seed))
        assert status == 200 and json.loads(raw)[EXTENSION_KEY]["seed"] == seed


def test_every_unsupported_parameter_is_refused_by_name(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    from infergrid.protocol.params import REFUSED

    asking = {"asks": "for something"}  # no parameter's neutral value
    for rule in REFUSED:
        for path, body in (
            ("/v1/chat/completions", _chat(tiny_engine)),
            ("/v1/completions", {"model": tiny_engine.name, "prompt": "x", "max_tokens": 2}),
        ):
            status, _, raw = _post(miner, path, {**body, rule.name: asking})
            error = _error(status, raw, 400)
            assert (error["param"], error["code"]) == (rule.name, "unsupported_parameter")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "see"}, image]}]
    status, _, raw = _post(miner, "/v1/chat/completions", _chat(tiny_engine, messages=messages))
    error = _error(status, raw, 400)
    assert error["param"] == "messages[0].content[1]" and "images" in error["message"]
    # What client libraries send by default is served.
    neutral = {"tool_choice": "none", "response_format": {"type": "text"}, "n": 1}
    status, _, _ = _post(miner, "/v1/chat/completions", _chat(tiny_engine, **neutral))
    assert status == 200


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'"messages":[{"role":"user","content":"\ud800"}]', "messages[0].content"),
        (rb'"messages":[{"role":"user","content":"x","name":"\udfff"}]', "messages[0].name"),
        (rb'"messages":[{"role":"user","content":"x"}],"user":"\ud800"', "user"),
        (
            rb'"messages":[{"role":"user","content":[{"type":"text","text":"a\udc00"}]}]',
            "messages[0].content[0].text",
        ),
        (rb'"messages":[{"role":"user","content":"x"}],"ext":["\ud800"]', "ext[0]"),
        (rb'"messages":[{"role":"user","content":"x"}],"\ud800":1', None),
    ],
)
def test_unencodable_strings_are_400_not_tokenizer_errors(
    miner: MinerServerThread, tiny_engine: TransformersEngine, raw: bytes, param: str | None
) -> None:
    body = b'{"model":"' + tiny_engine.name.encode() + b'",' + raw + b"}"
    status, _, answer = _post(miner, "/v1/chat/completions", body)
    error = _error(status, answer, 400)
    assert (error["code"], error["param"]) == ("invalid_unicode", param)
    assert "surrogates not allowed" not in error["message"]  # the codec's words


def _partial_request(path: str, raw: bytes, declared: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n".encode()
        + f"content-length: {declared}\r\n\r\n".encode()
        + raw
    )


def test_stalled_body_is_timed_out(tiny_engine: TransformersEngine) -> None:
    app = create_miner_app(tiny_engine, node_address=MINER_ADDRESS, body_timeout_s=0.5)
    with MinerServerThread(app) as server:
        sock = socket.create_connection((server.host, server.port), timeout=10)
        try:
            sock.sendall(_partial_request("/v1/chat/completions", b'{"model": "x', 500))
            received = b""
            while True:  # the miner answers, then closes the connection
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        finally:
            sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_client_leaving_mid_body_is_no_traceback(
    tiny_engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_miner_app(tiny_engine, node_address=MINER_ADDRESS)
    with MinerServerThread(app, log_level="info") as server:
        errors = logging.getLogger("uvicorn.error")
        errors.addHandler(caplog.handler)
        try:
            sock = socket.create_connection((server.host, server.port), timeout=10)
            sock.sendall(_partial_request("/v1/chat/completions", b'{"model": "x', 500))
            time.sleep(0.2)
            sock.close()
            # A request after it shows the server is idle again.
            status, _, _ = _post(server, "/v1/chat/completions", _chat(tiny_engine, max_tokens=2))
            assert status == 200
        finally:
            errors.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- legacy text offsets ---------------------------------------------------------------------


def _reference_offsets(engine: TransformersEngine, ids: list[int], text: str) -> list[int]:
    """Where each visible token starts: the length of what the tokens before it decode to,
    as far as that agrees with the output (an unfinished character is not yet in it)."""
    offsets = []
    for i, token in enumerate(ids):
        if token in engine.eos_token_ids:
            continue
        before = engine.decode(ids[:i])
        common = 0
        while common < min(len(before), len(text)) and before[common] == text[common]:
            common += 1
        offsets.append(common)
    return offsets


def _forced(engine: TransformersEngine, ids: list[int]) -> list[GeneratedToken]:
    """The engine's own decode loop (detokenizer, stop matcher) made to emit exactly `ids`."""
    import torch

    from infergrid.compute.engine import decode_loop

    vocab = len(engine.tokenizer)

    def logits(token: int) -> torch.Tensor:
        x = torch.full((vocab,), -10.0)
        x[token] = 10.0
        return x

    following = iter([*ids[1:], ids[0]])
    return list(
        decode_loop(
            logits(ids[0]),
            lambda _: logits(next(following)),
            SamplingParams(max_tokens=len(ids), temperature=0),
            eos_token_ids=engine.eos_token_ids,
            decode=engine.decode,
        )
    )


def test_text_offset_after_byte_fallback_tokens(tiny_engine: TransformersEngine) -> None:
    from infergrid.compute.openai_format import ResponseContext, StreamWriter, completion_body

    engine = tiny_engine
    byte = 3  # the tiny tokenizer's id for byte b is 3 + b
    # "é" in two byte tokens, a stray continuation byte (U+FFFD), a cut lead byte before an
    # ASCII letter (U+FFFD), "€" in three byte tokens, and a special token.
    ids = [
        *engine.encode("A"),
        byte + 0xC3,
        byte + 0xA9,
        byte + 0x80,
        *engine.encode("B"),
        byte + 0xC3,
        *engine.encode("C"),
        byte + 0xE2,
        byte + 0x82,
        byte + 0xAC,
        *engine.encode("D"),
        1,
        *engine.encode("E"),
    ]
    tokens = _forced(engine, ids)
    ctx = ResponseContext(
        completion_id="cmpl-x",
        created=0,
        model=engine.name,
        model_id=engine.model_id,
        chat=False,
        seed=0,
        prompt_token_ids=[1],
        eos_token_ids=engine.eos_token_ids,
        token_bytes=engine.token_bytes,
        decode=engine.decode,
        logprobs=0,
    )
    choice = completion_body(ctx, tokens)["choices"][0]
    assert choice["text"] == "Aé\ufffdB\ufffdC€DE"
    assert choice["logprobs"]["text_offset"] == [0, 1, 1, 2, 3, 4, 5, 6, 6, 6, 7, 8, 8]
    assert choice["logprobs"]["text_offset"] == _reference_offsets(engine, ids, choice["text"])
    # Streamed one token at a time, the offsets are the same.
    writer = StreamWriter(ctx)
    raw = b"".join(writer.feed([t]) for t in tokens)
    streamed = [
        offset
        for event in iter_sse(raw.split(b"\n"))
        if event["choices"] and event["choices"][0]["logprobs"]
        for offset in event["choices"][0]["logprobs"]["text_offset"]
    ]
    assert streamed == choice["logprobs"]["text_offset"]


def test_text_offsets_of_sampled_completions(
    miner: MinerServerThread, tiny_engine: TransformersEngine
) -> None:
    """The tiny byte-level model samples split and invalid UTF-8 all the time."""
    for seed in range(6):
        body = {
            "model": tiny_engine.name,
            "prompt": "Once upon a time",
            "max_tokens": 40,
            "seed": seed,
            "logprobs": 0,
        }
        answer = json.loads(_post(miner, "/v1/completions", body)[2])
        choice = answer["choices"][0]
        ids = answer[EXTENSION_KEY]["output_token_ids"]
        expected = _reference_offsets(tiny_engine, ids, choice["text"])
        assert choice["logprobs"]["text_offset"] == expected, seed
        events = _events(_post(miner, "/v1/completions", {**body, "stream": True})[2])
        streamed = [
            offset
            for e in events
            if e["choices"] and e["choices"][0]["logprobs"]
            for offset in e["choices"][0]["logprobs"]["text_offset"]
        ]
        assert streamed == expected, seed
