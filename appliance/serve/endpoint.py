"""Where the server is and what it serves: the endpoint's URL and key, and its model list.

The URL: `--url`, $APPLIANCE_URL, the installed service, a foreground `appliance serve` still
running, then http://127.0.0.1:8000. The key: `--api-key`, $APPLIANCE_API_KEY, the key that
foreground server recorded (only for that server), the installed service's env file.
Plain HTTP (httpx): the clients (appliance.client) build on this; nothing here imports them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError

DEFAULT_URL = "http://127.0.0.1:8000"


def normalize_url(url: str) -> str:
    """What users type as an endpoint: with or without `http://`, with or without the SDK's `/v1`."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


@dataclass
class Endpoint:
    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def find_endpoint(url: str | None = None, api_key: str | None = None) -> Endpoint:
    from appliance.serve.service import installed_endpoint, running_servers

    service_url, service_key = installed_endpoint()
    running = running_servers()
    chosen = normalize_url(url or os.environ.get("APPLIANCE_URL") or service_url or (running[0]["url"] if running else DEFAULT_URL))
    # A foreground server's key goes to that server only.
    here = next((r.get("api_key") for r in running if normalize_url(str(r.get("url", ""))) == chosen), None)
    return Endpoint(chosen, api_key or os.environ.get("APPLIANCE_API_KEY") or here or service_key)


def no_server(endpoint: Endpoint) -> ApplianceError:
    return ApplianceError(
        f"No server answers at {endpoint.url}.",
        "start one with `appliance serve MODEL` (or `appliance service install MODEL`), or pass --url",
    )


def served_models(endpoint: Endpoint) -> list[dict[str, Any]]:
    """GET /v1/models: the served base (no parent) and the adapters loaded on it."""
    import httpx

    try:
        response = httpx.get(f"{endpoint.base_url}/models", headers=endpoint.headers, timeout=10)
    except httpx.HTTPError:
        raise no_server(endpoint) from None
    if response.status_code == 401:
        raise ApplianceError(f"The server at {endpoint.url} refused the API key.", "set APPLIANCE_API_KEY (see `appliance service key`) or pass --api-key")
    try:
        models = response.json()["data"] if response.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        models = None
    if models is None:
        raise ApplianceError(
            f"The server at {endpoint.url} is not an OpenAI-compatible endpoint (GET /v1/models answered {response.status_code}).",
            "pass the URL of a vLLM server started by `appliance serve`, like --url http://127.0.0.1:8000",
        )
    return models


def served_labels(endpoint: Endpoint) -> list[str]:
    """What /v1/models lists, as people read it ("facts (adapter of smollm2)"); none when nothing answers."""
    try:
        models = served_models(endpoint)
    except ApplianceError:
        return []
    return [m["id"] + (f" (adapter of {m['parent']})" if m.get("parent") else "") for m in models]
