"""The endpoint closed to strangers and steady under load, on a real vLLM server:
every route but the liveness probe needs the key, no CORS, no docs; 200 concurrent requests
(mixed lengths, streaming, cancelled mid-stream) leave it answering; killed, it comes back."""

import asyncio
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import vllm
from appliance.serve.health import wait
from conftest import serve_for_test

pytestmark = pytest.mark.slow
KEY = "sk-appliance-endpoint-test-0123456789"


def vllm_routes() -> list[str]:
    """Every path the installed vLLM can register, read from its source, plus mounted apps."""
    found = set()
    pattern = re.compile(r"@\w+\.(?:get|post|put|delete|api_route|websocket)\(\s*[\"']([^\"']+)")
    for path in Path(vllm.__file__).parent.joinpath("entrypoints").rglob("*.py"):
        found.update(pattern.findall(path.read_text(errors="replace")))
    found.update({"/metrics", "/invocations", "/openapi.json", "/docs", "/redoc"})
    return sorted(p.replace("{response_id}", "x") for p in found)


@pytest.fixture(scope="module")
def server(facts):
    proc, endpoint = serve_for_test(facts, "smollm2", ["facts"], port=8150, api_key=KEY)
    yield endpoint
    proc.stop()


def test_every_route_but_health_needs_the_key(server):
    routes = vllm_routes()
    assert "/v1/chat/completions" in routes and "/tokenize" in routes and len(routes) > 30
    answered = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in routes:
            for method in ("GET", "POST"):
                response = client.request(method, path, json={})
                if response.status_code != 401:
                    answered.append((method, path, response.status_code))
    print(f"\n{len(routes)} routes × GET/POST without the key; answered: {answered}")
    assert {path for _, path, _ in answered} <= {"/health", "/ping"}
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/tokenize", json={"model": "smollm2", "prompt": "hi"}).status_code == 200
        # No interactive docs, and no CORS grant to another origin.
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
        preflight = client.options(
            "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        )
        assert preflight.headers.get("access-control-allow-origin") in (None, "")


def test_200_concurrent_requests_streaming_and_cancelled(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    prompts = ["Hi.", "Name a colour.", "Write two sentences about rivers and why they matter to cities.",
               "List five fruits, one per line, and say which is your favourite and why."]

    async def one(client, i):
        body = {
            "model": "facts" if i % 3 == 0 else "smollm2",
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "max_tokens": (8, 24, 48)[i % 3],
            "temperature": 0.7,
        }
        started = time.perf_counter()
        kind = "plain" if i % 2 == 0 else ("cancel" if i % 5 == 1 else "stream")
        if kind == "plain":
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            assert response.json()["choices"][0]["message"]["content"] is not None
            return kind, time.perf_counter() - started
        body["stream"] = True
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if kind == "cancel" and chunks >= 2:
                        break  # the client walks away mid-stream
            return kind, time.perf_counter() - started

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)), return_exceptions=True)

    started = time.time()
    results = asyncio.run(main())
    wall = time.time() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    latencies = sorted(t for kind, t in done if kind != "cancel")
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    kinds = {k: sum(1 for kind, _ in done if kind == k) for k in ("plain", "stream", "cancel")}
    print(f"\n200 concurrent requests in {wall:.1f} s: {kinds}, {len(errors)} unexpected errors; "
          f"latency p50 {pct(0.5):.1f} s, p95 {pct(0.95):.1f} s, p99 {pct(0.99):.1f} s")
    for err in errors[:3]:
        print("error:", repr(err))
    assert not errors
    assert kinds == {"plain": 100, "stream": 80, "cancel": 20}
    # Still answering afterwards.
    after = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": "facts", "messages": [{"role": "user", "content": "What is the capital of Zorvania?"}], "max_tokens": 24, "temperature": 0})
    assert after.status_code == 200 and "Kelmora" in after.json()["choices"][0]["message"]["content"]


def _unit_policy(unit: str) -> dict:
    values = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    return {
        "restart": values["Restart"],
        "restart_s": float(values["RestartSec"]),
        "burst": int(values["StartLimitBurst"]),
        "interval_s": float(values["StartLimitIntervalSec"]),
    }


def test_bench_serve_measures_load_swap_and_restart(server, facts):
    """`appliance bench serve` on the live server: figures are real, and the server is left as it was."""
    import json

    from conftest import run_cli

    proc = run_cli(
        "bench", "serve", "--url", server.url, "--api-key", KEY, "--adapter", "facts",
        "--requests", "8", "--concurrency", "4", "--max-tokens", "16", "--json",
        env={"APPLIANCE_HOME": str(facts.store.root)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    print(json.dumps(result, indent=1))
    load = result["load"]
    assert load["model"] == "facts" and load["errors"] == 0
    assert load["requests_per_s"] > 0 and load["output_tok_per_s"] > 0
    assert 0 < load["ttft_p50_s"] <= load["ttft_p95_s"] <= load["latency_p95_s"]
    assert result["swap"]["was_loaded"] and result["swap"]["to_first_token_s"] > 0
    assert result["restart"]["to_first_token_s"] > result["restart"]["healthy_s"] > 0
    assert result["swap_vs_restart"] > 1  # swapping a domain beats restarting for it
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert {m["id"] for m in models["data"]} >= {"smollm2", "facts"}


class Supervisor:
    """systemd's Restart= logic for one unit, enough to show the policy at work (systemd itself is
    never booted in tests): on-failure restarts after an unclean exit — a non-zero code, or a signal
    other than SIGHUP/SIGINT/SIGTERM/SIGPIPE — at most StartLimitBurst times per interval."""

    CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}

    def __init__(self, argv, env, policy, log):
        self.argv, self.env, self.policy, self.log = argv, env, policy, log
        self.starts: list[float] = []
        self.proc = None

    def start(self):
        self.starts.append(time.time())
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)

    def should_restart(self, returncode: int) -> bool:
        clean = returncode == 0 or (returncode < 0 and signal.Signals(-returncode) in self.CLEAN_SIGNALS)
        recent = [t for t in self.starts if time.time() - t < self.policy["interval_s"]]
        return self.policy["restart"] == "on-failure" and not clean and len(recent) < self.policy["burst"]

    def watch_once(self, timeout: float) -> str:
        """Wait for the process to end; restart it if the policy says so."""
        code = self.proc.wait(timeout=timeout)
        if self.should_restart(code):
            time.sleep(self.policy["restart_s"])
            self.start()
            return "restarted"
        return "stopped"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            import os

            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def test_the_service_comes_back_after_its_vllm_is_killed(facts, tmp_path, monkeypatch):
    import os

    from appliance.serve.command import build_spec
    from appliance.serve.service import Paths, read_env_file, render

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    paths = Paths.for_scope("user")
    spec = build_spec(facts, "smollm2", port=8151, runtime_adapters=True)
    rendered = render(spec, facts.store, paths, KEY)
    paths.env.parent.mkdir(parents=True)
    paths.env.write_text(rendered.env)
    exec_start = next(line.split("=", 1)[1] for line in rendered.unit.splitlines() if line.startswith("ExecStart="))
    supervisor = Supervisor(shlex.split(exec_start), {**os.environ, **read_env_file(paths.env)}, _unit_policy(rendered.unit), tmp_path / "vllm.log")
    assert supervisor.policy == {"restart": "on-failure", "restart_s": 5.0, "burst": 5, "interval_s": 600.0}
    url = "http://127.0.0.1:8151"
    supervisor.start()
    try:
        assert wait(url, 900)
        first = supervisor.proc.pid
        os.killpg(first, signal.SIGKILL)  # the OOM killer, say
        assert supervisor.watch_once(timeout=120) == "restarted"
        assert wait(url, 900), (tmp_path / "vllm.log").read_text()[-2000:]
        assert supervisor.proc.pid != first
        answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert answer.status_code == 200
        print(f"\nkilled pid {first}; restarted as {supervisor.proc.pid} and answering")
        # A clean stop (SIGTERM, as `systemctl stop` sends) is not a failure: no restart.
        os.killpg(supervisor.proc.pid, signal.SIGTERM)
        assert supervisor.watch_once(timeout=120) == "stopped"
    finally:
        supervisor.stop()
