"""The endpoint closed to strangers and steady under load, on a real vLLM server:
every route but the liveness probe needs the key, no CORS, no docs; 200 concurrent requests
(mixed lengths, streaming, cancelled mid-stream) leave it answering; killed, it comes back."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

import vllm
from appliance.serve.health import wait
from conftest import REPO, serve_for_test

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


# -- the service under a real systemd ---------------------------------------------------------------

SANDBOX = r"""
set -eu
# Hide the machine's /tmp, /var/tmp, /dev/shm, /run and /home behind fresh tmpfs before systemd starts;
# of them it sees only the test's own store, bind-mounted where a user's store lives.
mount -t tmpfs -o mode=755 tmpfs /run
mkdir /run/store && mount --bind "$STORE_SOURCE" /run/store
for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o mode=1777 tmpfs "$d"; done
mount -t tmpfs -o mode=755 tmpfs /home
mkdir -p "$APPLIANCE_HOME" && mount --move /run/store "$APPLIANCE_HOME" && rmdir /run/store
# Its log goes to a file, never to the machine's console or kernel log.
touch "$MANAGER_LOG" && mount --bind "$MANAGER_LOG" /dev/console && mount --bind "$MANAGER_LOG" /dev/kmsg
# A cgroup tree of its own: the namespace's root is the cgroup the test made for it.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# What a booted systemd leaves in /run: the marker, and the nodes it mounts over paths it hides.
mkdir -p /run/systemd/system /run/systemd/inaccessible
"$PYTHON" -c 'import os, socket; os.chdir("/run/systemd/inaccessible"); os.mkdir("dir"); open("reg", "w").close(); os.mkfifo("fifo"); socket.socket(socket.AF_UNIX).bind("sock"); [os.chmod(n, 0) for n in ("dir", "reg", "fifo", "sock")]'
mkdir -p -m 700 "$XDG_RUNTIME_DIR" && mkdir -p "$XDG_CONFIG_HOME/systemd/user"
printf '[Unit]\nDescription=nothing but what the test starts\n' > "$XDG_CONFIG_HOME/systemd/user/idle.target"
# A journal for the services' output, kept in this /run; then the manager, its own log to /dev/kmsg (the file).
/usr/lib/systemd/systemd-journald &
SYSTEMD_LOG_TARGET=kmsg /usr/lib/systemd/systemd --user --unit=idle.target &
echo ready
wait
"""


def _cgroup2_dir() -> Path:
    """This process's cgroup in the v2 hierarchy (the unified one on a hybrid host)."""
    mounts = [
        Path(line.split(" - ")[0].split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split(" - ")[1].split()[0] == "cgroup2"
    ]
    if not mounts:
        pytest.fail("a systemd user manager needs the cgroup v2 hierarchy, and none is mounted here")
    own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    return mounts[0] / own.lstrip("/")


class UserManager:
    """A real systemd user manager, never PID 1, in its own user, mount, PID and cgroup namespaces.

    systemd runs as a child of a shell that is PID 1 of the namespace, behind fresh tmpfs over /tmp,
    /var/tmp, /dev/shm, /run and /home, so it can neither see nor clean the machine's /tmp. It
    needs a cgroup v2 subtree it may write: root here, or a delegated cgroup. The network is the
    machine's, so the test reaches the service on 127.0.0.1. Commands run inside with `run`.
    """

    HOME = Path("/home/appliance-test")

    def __init__(self, store: Path):
        self.store = store
        missing = [t for t in ("unshare", "nsenter", "systemctl", "/usr/lib/systemd/systemd") if shutil.which(t) is None]
        if missing:
            pytest.fail(f"a real systemd user manager needs {', '.join(missing)} (systemd and util-linux)")
        parent = _cgroup2_dir()
        if not os.access(parent, os.W_OK):
            pytest.fail(f"a systemd user manager needs a cgroup v2 subtree it can write; {parent} is not writable (run as root or in a delegated cgroup)")
        self.cgroup = parent / f"appliance-test-{uuid.uuid4().hex[:8]}"
        self.env = {
            "PATH": os.environ["PATH"],
            "LANG": "C.UTF-8",
            "HOME": str(self.HOME),
            "XDG_CONFIG_HOME": str(self.HOME / ".config"),
            "XDG_RUNTIME_DIR": "/run/user/0",
            "APPLIANCE_HOME": str(self.HOME / ".local/share/appliance"),
        }

    def __enter__(self) -> "UserManager":
        self.cgroup.mkdir()
        launch = f'echo $$ > {self.cgroup}/cgroup.procs && exec unshare --user --map-root-user --mount --pid --fork --mount-proc --cgroup --kill-child sh -c "$0"'
        self.shell = subprocess.Popen(
            ["sh", "-c", launch, SANDBOX],
            env={**self.env, "STORE_SOURCE": str(self.store), "MANAGER_LOG": "/run/systemd-user.log", "PYTHON": sys.executable},
            cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: __import__("ctypes").CDLL(None).prctl(1, signal.SIGKILL),  # PR_SET_PDEATHSIG: dies with pytest
        )
        if self.shell.stdout.readline().strip() != "ready":
            self.__exit__()
            pytest.fail(f"the namespace for systemd could not be set up: {self.shell.stderr.read()}")
        deadline = time.time() + 60
        while (state := self.run("systemctl", "--user", "is-system-running").stdout.strip()) not in ("running", "degraded"):
            if time.time() > deadline:
                pytest.fail(f"the systemd user manager did not come up ({state!r}): {self.log()}")
            time.sleep(0.2)
        return self

    def run(self, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
        import psutil

        pid1 = psutil.Process(self.shell.pid).children()[0].pid  # unshare's child: PID 1 inside
        return subprocess.run(
            ["nsenter", f"--target={pid1}", "--user", "--mount", "--pid", "--cgroup", f"--wd={REPO}", *argv],
            env={**os.environ, **self.env, **(env or {})}, capture_output=True, text=True, timeout=1800,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "appliance", *args)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """The unit's properties as systemd itself reads them."""
        shown = self.run("systemctl", "--user", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)

    def log(self, tail: int = 3000) -> str:
        """systemd's own messages, then the last lines its services wrote (from the journal)."""
        journal = self.run("journalctl", "--no-pager", "--quiet", "-n", "40").stdout
        return self.run("cat", "/run/systemd-user.log").stdout[-tail:] + "\n-- journal --\n" + journal

    def __exit__(self, *exc) -> None:
        self.shell.kill()  # unshare --kill-child takes PID 1 of the namespace, and with it every process inside
        self.shell.wait()
        deadline = time.time() + 60
        while self.cgroup.exists():
            try:
                for folder in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    folder.rmdir()
                self.cgroup.rmdir()
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)


def test_the_service_comes_back_after_its_vllm_is_killed(smollm2, appliance_home):
    """`appliance service install` under a real systemd user manager. SIGKILL its vLLM (the OOM killer,
    say): systemd restarts it and it serves again. `appliance service stop`: it stays stopped. Killed
    at every start: systemd gives up after StartLimitBurst starts."""
    from appliance.serve.service import UNIT_NAME

    url = "http://127.0.0.1:8151"
    with UserManager(appliance_home) as manager:
        installed = manager.cli("service", "install", "smollm2", "--port", "8151")
        assert installed.returncode == 0, installed.stdout + installed.stderr + manager.log()
        unit_file = manager.HOME / ".config/systemd/user" / UNIT_NAME
        verify = manager.run("systemd-analyze", "--user", "verify", str(unit_file))
        assert verify.returncode == 0, verify.stderr
        env_mode = manager.run("stat", "-c", "%a", str(manager.HOME / ".config/appliance/service.env")).stdout.strip()
        assert env_mode == "600"  # it holds the API key

        # The restart policy as systemd itself parsed it from the installed unit.
        policy = manager.show(UNIT_NAME, "Restart", "RestartUSec", "StartLimitBurst", "StartLimitIntervalUSec")
        assert policy == {"Restart": "on-failure", "RestartUSec": "5s", "StartLimitBurst": "5", "StartLimitIntervalUSec": "10min"}
        before = manager.show(UNIT_NAME, "ActiveState", "MainPID", "NRestarts")
        assert before["ActiveState"] == "active" and before["NRestarts"] == "0", before

        killed = manager.run("kill", "-KILL", before["MainPID"])
        assert killed.returncode == 0, killed.stderr
        started = time.time()
        while True:
            after = manager.show(UNIT_NAME, "ActiveState", "SubState", "MainPID", "NRestarts", "Result")
            if after["ActiveState"] == "active" and after["NRestarts"] == "1":
                break
            assert after["ActiveState"] not in ("failed", "inactive"), (after, manager.log())  # not restarted
            assert time.time() - started < 900, (after, manager.log())
            time.sleep(1)
        print(f"\nkilled vLLM (pid {before['MainPID']}); systemd restarted it as pid {after['MainPID']}, active after {time.time() - started:.0f} s")
        assert after["MainPID"] != before["MainPID"]
        assert wait(url, 60)
        key = manager.cli("service", "key").stdout.strip()
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 401
        answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        status = manager.cli("service", "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["systemd"]["NRestarts"] == "1", status.stdout + status.stderr

        # A stop is not a failure: systemd does not bring it back.
        stopped = manager.cli("service", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        time.sleep(15)  # three times RestartSec
        assert manager.show(UNIT_NAME, "ActiveState")["ActiveState"] == "inactive"
        assert not wait(url, 2)

        # Crashing at every start: systemd starts it StartLimitBurst times, then gives up.
        # A fresh start-rate count (a stopped unit nothing needs may also have been unloaded, which does the same).
        manager.run("systemctl", "--user", "reset-failed", UNIT_NAME)
        assert manager.run("systemctl", "--user", "start", "--no-block", UNIT_NAME).returncode == 0
        kills, started = [], time.time()
        while (state := manager.show(UNIT_NAME, "ActiveState", "MainPID", "NRestarts"))["ActiveState"] != "failed":
            assert len(kills) <= 6 and time.time() - started < 600, (kills, state, manager.log())
            if state["MainPID"] not in ("0", *kills):  # a new start: kill all of it, the health poll too
                manager.run("systemctl", "--user", "kill", "--signal=SIGKILL", UNIT_NAME)
                kills.append(state["MainPID"])
            time.sleep(0.2)
        print(f"killed {len(kills)} starts in a row; systemd gave up: {state}")
        assert len(kills) == int(policy["StartLimitBurst"]), (kills, state)
        assert f"{UNIT_NAME}: Start request repeated too quickly." in manager.log(tail=10**7)  # systemd's words
        time.sleep(15)  # three times RestartSec: still down
        assert manager.show(UNIT_NAME, "ActiveState", "MainPID") == {"ActiveState": "failed", "MainPID": "0"}
        assert not wait(url, 2)
        removed = manager.cli("service", "uninstall")
        assert removed.returncode == 0, removed.stdout + removed.stderr
