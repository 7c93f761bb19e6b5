"""Per-domain adapters in a running server, swapped without a restart.

Two ways in, both vLLM's: its runtime LoRA API (`POST /v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, enabled by VLLM_ALLOW_RUNTIME_LORA_UPDATING), used
here: loading is explicit and answers at once (a bad path is an error now, not
a 404 on some later request), adapters can be unloaded, and the API key guards
both routes. And its filesystem resolver, pointed at the store's adapters
(serve.command.vllm_env): a request naming an adapter of the served base loads
it on first use; it offers only adapters whose `base_model_name_or_path` is the
server's `--model` folder, which training writes.

Before anything is sent, the adapter's base fingerprint is compared with the
served base's, and its rank with the server's limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.registry import ModelManifest, Registry
from appliance.serve.command import check_servable
from appliance.serve.endpoint import Endpoint, served_models


@dataclass
class Served:
    base: ModelManifest | None  # the store model the server runs, when it is one of ours
    base_id: str
    adapters: list[str]  # adapter names loaded now


def served(endpoint: Endpoint, registry: Registry) -> Served:
    """What the server at `endpoint` runs, matched to the store by the model's folder."""
    models = served_models(endpoint)
    roots = [m for m in models if not m.get("parent")]
    if not roots:
        raise ApplianceError(f"The server at {endpoint.url} lists no base model.", "check its log")
    root = roots[0]
    base = None
    for manifest in registry.models():
        if root.get("root") and registry.holds_weights_of(manifest, Path(root["root"])):
            base = manifest
            break
    return Served(base, root["id"], [m["id"] for m in models if m.get("parent")])


def _post(endpoint: Endpoint, route: str, payload: dict) -> "httpx.Response":  # noqa: F821
    import httpx

    try:
        return httpx.post(f"{endpoint.url}{route}", json=payload, headers=endpoint.headers, timeout=300)
    except httpx.HTTPError:
        raise ApplianceError(
            f"No server answers at {endpoint.url}.",
            "start it first: `appliance service start` (or `appliance serve MODEL --runtime-adapters`)",
        ) from None


def _explain(response, action: str, name: str, endpoint: Endpoint) -> ApplianceError:
    text = response.text.strip()[:300]
    if response.status_code == 401:
        return ApplianceError(f"The server refused the API key while trying to {action} {name!r}.", "see `appliance service key`")
    if response.status_code == 404 and "load_lora_adapter" in str(response.url):
        return ApplianceError(
            f"The server at {endpoint.url} does not allow loading adapters at runtime.",
            "start it with LoRA enabled: `appliance serve MODEL --runtime-adapters`, or reinstall the service",
        )
    if "rank" in text.lower():
        return ApplianceError(f"The server refused {name!r}: {text}", "reinstall the service with a larger --max-lora-rank")
    return ApplianceError(f"Could not {action} {name!r} ({response.status_code}): {text}", "see the server's log")


def load(endpoint: Endpoint, registry: Registry, name: str, *, max_lora_rank: int | None = None) -> float:
    """Load adapter `name` into the running server; returns the seconds the swap took."""
    adapter = registry.adapter(name)
    now = served(endpoint, registry)
    if now.base is None:
        raise ApplianceError(
            f"The server at {endpoint.url} runs {now.base_id!r}, which is not a model in this store, "
            "so the adapter's base cannot be checked.",
            "serve a model from the store (appliance serve NAME)",
        )
    check_servable(adapter, now.base, max_lora_rank)
    if name in now.adapters:
        raise ApplianceError(f"Adapter {name!r} is already loaded at {endpoint.url}.", f"unload it first: appliance adapters unload {name}")
    started = time.time()
    response = _post(endpoint, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(registry.adapter_dir(name))})
    if response.status_code != 200:
        raise _explain(response, "load", name, endpoint)
    return time.time() - started


def unload(endpoint: Endpoint, registry: Registry, name: str) -> float:
    now = served(endpoint, registry)
    if name not in now.adapters:
        raise ApplianceError(
            f"Adapter {name!r} is not loaded at {endpoint.url}" + (f" (loaded: {', '.join(now.adapters)})." if now.adapters else "."),
            "see `appliance adapters list`",
        )
    started = time.time()
    response = _post(endpoint, "/v1/unload_lora_adapter", {"lora_name": name})
    if response.status_code != 200:
        raise _explain(response, "unload", name, endpoint)
    return time.time() - started
