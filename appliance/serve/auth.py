"""The API key: which one a server runs with, and the guard that asks for it.

`RequireKey` is an ASGI middleware that vLLM loads (`--middleware appliance.serve.auth.RequireKey`).
vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere;
/tokenize, /detokenize, /metrics, /version, /invocations (which generates text)
and others stay open. This guard asks for the same key on every path but the
liveness probe /health. It runs inside the vLLM process and imports only starlette.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

# The liveness probe alone. /ping (SageMaker's probe) stays closed: nothing here uses it, and
# "every route but /health" is the rule users are told.
OPEN_PATHS = frozenset({"/health"})


class RequireKey:
    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.key_hash = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.key_hash)
        return False

    async def __call__(self, scope, receive, send):
        if self.key_hash is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        await JSONResponse({"error": "Unauthorized: send 'Authorization: Bearer <key>'"}, status_code=401)(scope, receive, send)


# -- which key a foreground server runs with -------------------------------------------------


@dataclass(frozen=True)
class ServerKey:
    key: str | None
    source: str  # given (--api-key or $APPLIANCE_API_KEY), service (its env file), generated, none
    warning: str | None = None


def server_key(host: str, *, lora: bool, given: str | None, opt_out: bool, service_key: str | None) -> ServerKey:
    """The key a foreground `appliance serve` requires: the one given, else the installed service's
    (clients that know it keep working), else a new one. Without a key any process that reaches
    the port can generate text and, with LoRA on, load adapters from any path into the server;
    so running without one takes an explicit --no-api-key, and only on a loopback address."""
    from appliance.errors import ApplianceError
    from appliance.serve.command import LOCAL_HOSTS

    if opt_out:
        if given:
            raise ApplianceError(
                "--no-api-key was given together with a key (--api-key or $APPLIANCE_API_KEY).",
                "drop --no-api-key to require that key, or unset APPLIANCE_API_KEY to serve without one",
            )
        if host not in LOCAL_HOSTS:
            raise ApplianceError(
                f"--no-api-key on {host} would let anyone who can reach this machine use the server"
                + (" and load adapters into it." if lora else "."),
                "serve on 127.0.0.1 to go without a key, or drop --no-api-key (a key is generated and printed)",
            )
        what = "use the server and load adapters into it" if lora else "use the server"
        return ServerKey(None, "none", f"no API key: any process on this machine can {what}")
    if given:
        return ServerKey(given, "given")
    if service_key:
        return ServerKey(service_key, "service")
    from appliance.serve.service import new_api_key

    return ServerKey(new_api_key(), "generated")
