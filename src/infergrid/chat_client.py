"""`infergrid chat`: one question through a gateway, with the official `openai` client."""

from __future__ import annotations

from typing import Any

import openai
from rich.console import Console


def ask(
    *,
    base_url: str,
    api_key: str,
    prompt: str,
    model: str | None,
    max_tokens: int,
    temperature: float,
    stream: bool,
    out: Console,
    err: Console,
) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    try:
        if model is None:
            models = client.models.list().data
            if not models:
                raise RuntimeError("the gateway serves no model yet: are its miners up?")
            model = models[0].id
        messages = [{"role": "user", "content": prompt}]
        if stream:
            chunks = client.chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
                stream_options={"include_usage": True},
            )
            request_id = chunks.response.headers.get("x-request-id", "?")
            usage = None
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    out.print(chunk.choices[0].delta.content, end="", highlight=False, markup=False)
                if chunk.usage is not None:
                    usage = chunk.usage
            out.print()
        else:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
            )
            request_id = raw.headers.get("x-request-id", "?")
            completion = raw.parse()
            out.print(completion.choices[0].message.content or "", highlight=False, markup=False)
            usage = completion.usage
    except openai.APIStatusError as exc:
        raise RuntimeError(f"gateway answered {exc.status_code}: {_message(exc)}") from None
    except openai.APIConnectionError:
        raise ConnectionError(f"cannot reach the gateway at {base_url}") from None
    if usage is not None:
        err.print(
            f"[dim]{model} · {usage.prompt_tokens} prompt + {usage.completion_tokens} completion "
            f"tokens{cost_text(usage)} · request {request_id}[/dim]",
            highlight=False,
            soft_wrap=True,
        )


def cost_text(usage: Any) -> str:
    """' · cost 0.000042 BTT' from the usage a metered gateway returns (cost_wei, exact), or ''
    when the gateway does not bill."""
    from infergrid.protocol.pricing import format_btt

    extra = getattr(usage, "model_extra", None) or {}
    cost_wei = extra.get("cost_wei")
    try:
        value = int(cost_wei) if cost_wei is not None else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        return ""
    return f" · cost {format_btt(value)} BTT ({value} wei)"


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
    return str(exc.message)
