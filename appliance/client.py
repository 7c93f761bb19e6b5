"""Talking to the endpoint with the official `openai` SDK: one answer, streaming chat, benchmarks.

Where the endpoint is and what it serves comes from appliance.serve.endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from appliance.errors import ApplianceError
from appliance.serve import Endpoint, no_server, served_models


def sdk(endpoint: Endpoint, timeout: float = 300):
    from openai import OpenAI

    return OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "no-key", max_retries=0, timeout=timeout)


def _translate(err: Exception, endpoint: Endpoint, model: str | None = None) -> ApplianceError:
    import openai

    if isinstance(err, openai.APIConnectionError):
        return no_server(endpoint)
    if isinstance(err, openai.AuthenticationError):
        return ApplianceError(
            f"The server at {endpoint.url} refused the API key.",
            "set APPLIANCE_API_KEY (see `appliance service key`) or pass --api-key",
        )
    if isinstance(err, openai.NotFoundError):
        try:  # the names it does serve, so a typo shows at once
            names = ", ".join(m["id"] for m in served_models(endpoint)) or "none"
        except ApplianceError:
            names = "unknown (see GET /v1/models)"
        return ApplianceError(
            f"The server at {endpoint.url} does not serve {model!r}; it serves: {names}.",
            "ask one of those, or an adapter of the served base by its name (it loads on first use); "
            "`appliance adapters load NAME` loads one explicitly",
        )
    if isinstance(err, openai.APIStatusError):
        return ApplianceError(f"The server answered {err.status_code}: {err.message}", "see the server's log")
    return ApplianceError(f"Request to {endpoint.url} failed: {err}", "check the server")


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


class Conversation:
    """The messages of one chat so far, and the slash commands that change them (/exit, /reset, /system TEXT)."""

    def __init__(self, system: str | None = None):
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def take(self, text: str) -> str:
        """What `text` asks for: "exit", "reset" and "system" are done here; "send" adds it as the user's
        turn, to be answered; "skip" is a blank line."""
        command = text.strip()
        if command in ("/exit", "/quit"):
            return "exit"
        if command == "/reset":
            self.messages = [m for m in self.messages if m["role"] == "system"]
            return "reset"
        if text.startswith("/system "):
            self.messages = [{"role": "system", "content": text[8:]}] + [m for m in self.messages if m["role"] != "system"]
            return "system"
        if not command:
            return "skip"
        self.messages.append({"role": "user", "content": text})
        return "send"

    def answered(self, reply: str) -> None:
        self.messages.append({"role": "assistant", "content": reply})


# -- the serving benchmark ----------------------------------------------------------------

# Varied lengths of question, as a chat user asks them.
SERVE_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show the steps.",
    "Give me a short tip for learning a new language.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Translate 'good morning, how are you?' into Spanish.",
]


@dataclass
class RequestTiming:
    ttft_s: float | None  # time to the first content token
    total_s: float
    output_tokens: int
    error: str | None = None


def _timed_request(endpoint, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    import openai

    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = sdk(endpoint).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as err:
        return RequestTiming(None, time.perf_counter() - start, 0, f"{type(err).__name__}: {err}")
    return RequestTiming(first, time.perf_counter() - start, tokens)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load_test(endpoint, model: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` streamed chat requests, `concurrency` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [SERVE_PROMPTS[i % len(SERVE_PROMPTS)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        timings = list(pool.map(lambda p: _timed_request(endpoint, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ok = [t for t in timings if t.error is None]
    ttft = [t.ttft_s for t in ok if t.ttft_s is not None]
    latency = [t.total_s for t in ok]
    rnd = lambda v, n=3: None if v is None else round(v, n)  # noqa: E731
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "errors": len(timings) - len(ok),
        "first_error": next((t.error for t in timings if t.error), None),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tok_per_s": round(sum(t.output_tokens for t in ok) / wall, 1),
        "ttft_p50_s": rnd(percentile(ttft, 50)),
        "ttft_p95_s": rnd(percentile(ttft, 95)),
        "latency_p50_s": rnd(percentile(latency, 50)),
        "latency_p95_s": rnd(percentile(latency, 95)),
    }


def _seconds_to_first_token(endpoint: Endpoint, model: str, since: float, failure: str, fix: str) -> float:
    """Ask `model` one short question; seconds from `since` (a perf_counter reading) to its first token."""
    asked = time.perf_counter()
    first = _timed_request(endpoint, model, SERVE_PROMPTS[0], 8)
    if first.error:
        raise ApplianceError(f"{failure}: {first.error}", fix)
    return asked - since + (first.ttft_s or first.total_s)


def time_swap(endpoint, registry, adapter: str) -> dict[str, Any]:
    """Load `adapter` into the running server and wait for its first token (unloading it first if loaded)."""
    from appliance.serve import adapters

    was_loaded = adapter in adapters.served(endpoint, registry).adapters
    if was_loaded:
        adapters.unload(endpoint, registry, adapter)
    start = time.perf_counter()
    load_s = adapters.load(endpoint, registry, adapter)
    to_first = _seconds_to_first_token(endpoint, adapter, start, f"The adapter {adapter!r} was loaded but its first request failed", "see the server's log")
    return {"adapter": adapter, "load_s": round(load_s, 3), "to_first_token_s": round(to_first, 3), "was_loaded": was_loaded}


RESTART_PORT = 8190  # the fresh server of `time_restart` takes this port, or the next free one


def time_restart(registry, base: str, adapter: str | None, log_dir: Path) -> dict[str, Any]:
    """What a restart costs instead: a fresh server of the same model (and adapter), from launch to first token.

    It runs beside the benchmarked one on a free port and is stopped afterwards, so the
    endpoint under test is never interrupted.
    """
    from appliance.serve import build_spec
    from appliance.serve import free_port, running_server

    spec = build_spec(registry, base, [adapter] if adapter else [], port=free_port(RESTART_PORT))
    start = time.perf_counter()
    with running_server(spec, log_dir / f"bench-restart-{spec.port}.log") as server:
        to_first = _seconds_to_first_token(Endpoint(spec.url), adapter or base, start, "The fresh server answered with an error", f"see {server.log_path}")
    return {"healthy_s": round(server.healthy_s, 1), "to_first_token_s": round(to_first, 1)}


def bench_serve(
    endpoint,
    registry,
    *,
    model: str | None = None,
    adapter: str | None = None,
    concurrency: int = 4,
    requests: int = 32,
    max_tokens: int = 64,
    restart: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    from appliance.serve import served

    result: dict[str, Any] = {"url": endpoint.url}
    if adapter:
        progress(f"swapping in the adapter {adapter}")
        result["swap"] = time_swap(endpoint, registry, adapter)
    target = adapter or model or default_model(endpoint)
    progress(f"{requests} requests to {target}, {concurrency} at a time")
    result["load"] = load_test(endpoint, target, concurrency, requests, max_tokens)
    if restart:
        now = served(endpoint, registry)
        if now.base is None:
            result["restart"] = None
            result["notes"] = [f"restart not timed: the server runs {now.base_id!r}, not a model of this store"]
        else:
            progress(f"timing a fresh server of {now.base.name} (what a restart costs)")
            result["restart"] = time_restart(registry, now.base.name, adapter, registry.store.root / "logs")
            if adapter:
                result["swap_vs_restart"] = round(result["restart"]["to_first_token_s"] / max(result["swap"]["to_first_token_s"], 1e-3), 1)
    return result
