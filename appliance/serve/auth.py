"""An ASGI middleware that vLLM loads (`--middleware appliance.serve.auth.RequireKey`).

vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere;
/tokenize, /detokenize, /metrics, /version, /invocations (which generates text)
and others stay open. This guard asks for the same key on every path but the
liveness probes. It runs inside the vLLM process and imports only starlette.
"""

from __future__ import annotations

import hashlib
import hmac
import os

OPEN_PATHS = frozenset({"/health", "/ping"})  # liveness only: no model state


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
