"""Talking to the endpoint with the official `openai` SDK: one answer, streaming chat, benchmarks.

The endpoint is found in this order: `--url`, `$APPLIANCE_URL`, the installed
service's settings, then http://127.0.0.1:8000. The API key: `--api-key`,
`$APPLIANCE_API_KEY`, the installed service's env file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from appliance.errors import ApplianceError

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass
class Endpoint:
    url: str
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/") + "/v1"


def find_endpoint(url: str | None = None, api_key: str | None = None) -> Endpoint:
    service_url, service_key = None, None
    try:
        from appliance.serve.service import installed_endpoint

        service_url, service_key = installed_endpoint()
    except ImportError:
        pass
    return Endpoint(
        url or os.environ.get("APPLIANCE_URL") or service_url or DEFAULT_URL,
        api_key or os.environ.get("APPLIANCE_API_KEY") or service_key,
    )


def sdk(endpoint: Endpoint, timeout: float = 300):
    from openai import OpenAI

    return OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "no-key", max_retries=0, timeout=timeout)


def _translate(err: Exception, endpoint: Endpoint, model: str | None = None) -> ApplianceError:
    import openai

    if isinstance(err, openai.APIConnectionError):
        return ApplianceError(
            f"No server answers at {endpoint.url}.",
            "start one with `appliance serve MODEL` (or `appliance service install MODEL`), or pass --url",
        )
    if isinstance(err, openai.AuthenticationError):
        return ApplianceError(
            f"The server at {endpoint.url} refused the API key.",
            "set APPLIANCE_API_KEY (see `appliance service key`) or pass --api-key",
        )
    if isinstance(err, openai.NotFoundError):
        return ApplianceError(
            f"The server at {endpoint.url} does not serve {model!r}.",
            "see the served names with `appliance adapters list` or GET /v1/models; load an adapter with `appliance adapters load NAME`",
        )
    if isinstance(err, openai.APIStatusError):
        return ApplianceError(f"The server answered {err.status_code}: {err.message}", "see the server's log")
    return ApplianceError(f"Request to {endpoint.url} failed: {err}", "check the server")


def served_models(endpoint: Endpoint) -> list[dict[str, Any]]:
    import openai

    try:
        return [m.model_dump() for m in sdk(endpoint, timeout=10).models.list().data]
    except openai.OpenAIError as err:
        raise _translate(err, endpoint) from None


def default_model(endpoint: Endpoint) -> str:
    """The served base (or merged) model: the one entry without a parent."""
    models = served_models(endpoint)
    roots = [m["id"] for m in models if not m.get("parent")]
    if not roots:
        raise ApplianceError(f"The server at {endpoint.url} lists no models.", "check the server's log")
    return roots[0]


@dataclass
class Answer:
    text: str
    model: str
    finish_reason: str | None
    completion_tokens: int
    seconds: float


def ask(
    endpoint: Endpoint,
    question: str,
    *,
    model: str | None = None,
    system: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
) -> Answer:
    import openai

    model = model or default_model(endpoint)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    started = time.time()
    try:
        response = sdk(endpoint).chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=max_tokens
        )
    except openai.OpenAIError as err:
        raise _translate(err, endpoint, model) from None
    choice = response.choices[0]
    tokens = response.usage.completion_tokens if response.usage else 0
    return Answer((choice.message.content or "").strip(), model, choice.finish_reason, tokens, time.time() - started)


def stream_chat(
    endpoint: Endpoint,
    messages: list[dict[str, str]],
    *,
    model: str,
    temperature: float = 0.7,
    max_tokens: int = 512,
) -> Iterator[str]:
    """Text deltas of one assistant reply, as they arrive."""
    import openai

    try:
        stream = sdk(endpoint).chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=max_tokens, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    except openai.OpenAIError as err:
        raise _translate(err, endpoint, model) from None
