"""The appliance as a systemd service: render, install, inspect, remove.

The unit runs the same vLLM command line as `appliance serve` (one function
builds both), with the API key in an env file (mode 0600), hardened sandboxing,
`Restart=on-failure`, and a start-up health poll because vLLM never notifies
systemd. A small JSON record in the store remembers what was installed, so
clients find the endpoint and key without flags.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template

from appliance.errors import ApplianceError
from appliance.serve.command import LOCAL_HOSTS, ServeSpec, shell_line, vllm_command, vllm_env
from appliance.serve.process import check_port, require_ray, require_vllm
from appliance.store import Store, atomic_write, atomic_write_json, read_json

UNIT_NAME = "appliance-vllm.service"
TEMPLATE = "appliance-vllm.service.in"
RAY_UNIT_NAME = "appliance-ray.service"  # one Ray node a machine: the head, or a worker joining it
RAY_TEMPLATE = "appliance-ray.service.in"
RAY_PORT = 6379  # Ray's default GCS port
START_TIMEOUT_S = 1200  # a cold load of a big model from a slow disk
KEY_VAR = "VLLM_API_KEY"


def systemd_dir() -> Path:
    """Unit templates: inside the installed wheel, else the repository's top level."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "systemd", here.parent / "systemd"):
        if (candidate / TEMPLATE).is_file():
            return candidate
    raise ApplianceError("The systemd unit template is missing from this installation.", "reinstall appliance")


@dataclass(frozen=True)
class Paths:
    scope: str  # "user" or "system"
    unit: Path
    env: Path

    @staticmethod
    def for_scope(scope: str) -> "Paths":
        if scope == "system":
            return Paths("system", Path("/etc/systemd/system") / UNIT_NAME, Path("/etc/appliance/service.env"))
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return Paths("user", config / "systemd" / "user" / UNIT_NAME, config / "appliance" / "service.env")


@dataclass
class Rendered:
    unit: str
    env: str
    exec_start: list[str]


def new_api_key() -> str:
    return "sk-appliance-" + secrets.token_urlsafe(24)


def redact(key: str) -> str:
    return key[:13] + "…" + "•" * 6


def _gpu_device_lines(dev: Path = Path("/dev")) -> str:
    # Closed device policy with only the NVIDIA nodes: the GPU, nothing else. Under WSL2 the GPU is
    # /dev/dxg (the Linux nodes do not exist there).
    allow = ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw"]
    allow += [f"/dev/{p.name} rw" for p in sorted(dev.glob("nvidia[0-9]*"))]
    if (dev / "dxg").exists():
        allow.append("/dev/dxg rw")
    return "DevicePolicy=closed\n" + "".join(f"DeviceAllow={a}\n" for a in allow)


def cache_env(store: Store) -> dict[str, str]:
    """The caches of a unit, inside the service's own writable folder."""
    cache = store.root / "service" / "cache"
    return {
        # vLLM, PyTorch and the GPU libraries write caches; the home is read-only in the unit, so HOME
        # itself and every cache that ignores XDG (FlashInfer's JIT, CUDA's PTX cache, tilelang,
        # inductor) point inside the service's own writable folder.
        "HOME": str(cache / "home"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "XDG_CACHE_HOME": str(cache),
        "HF_HOME": str(cache / "huggingface"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "FLASHINFER_WORKSPACE_BASE": str(cache / "flashinfer"),
        "CUDA_CACHE_PATH": str(cache / "nv-compute"),
        "TILELANG_CACHE_DIR": str(cache / "tilelang"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "PYTHONUNBUFFERED": "1",
    }


def render(spec: ServeSpec, store: Store, paths: Paths, api_key: str, run_as: str | None = None, ray_head: bool = False) -> Rendered:
    """The unit and env file text for `spec` (nothing written); `ray_head`: this machine's Ray head unit starts first."""
    cmd = vllm_command(spec)
    cache = store.root / "service" / "cache"
    env = {**vllm_env(spec), KEY_VAR: api_key, **cache_env(store)}
    if spec.ray_address is not None:
        env["RAY_TMPDIR"] = str(cache / "ray")  # where the Ray node on this machine keeps its sockets
    health = shell_line([spec.python, "-m", "appliance.serve.health", spec.url, "--timeout", str(START_TIMEOUT_S)])
    local = spec.host in LOCAL_HOSTS and spec.ray_address is None  # a Ray cluster talks to other machines
    values = {
        "model": spec.model.name,
        "user_line": f"User={run_as}\n" if paths.scope == "system" and run_as else "",
        "env_file": str(paths.env),
        "store_root": str(store.root),
        "exec_start": shell_line(cmd),
        "health_check": health,
        "start_timeout": str(START_TIMEOUT_S),
        "writable_paths": str(cache),
        "device_lines": _gpu_device_lines() if spec.on_gpu else "PrivateDevices=yes\n",
        "ip_lines": "IPAddressDeny=any\nIPAddressAllow=localhost\n" if local else "",
        "wanted_by": "multi-user.target" if paths.scope == "system" else "default.target",
        # With a Ray head on this machine, vLLM starts after it (its workers are Ray's).
        "ray_lines": f"Requires={RAY_UNIT_NAME}\nAfter={RAY_UNIT_NAME}\n" if ray_head else "",
    }
    unit = Template((systemd_dir() / TEMPLATE).read_text()).substitute(values)
    env_text = "# appliance service environment (mode 0600: holds the API key)\n" + "".join(
        f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items())
    )
    return Rendered(unit, env_text, cmd)


def ray_unit_path(paths: Paths) -> Path:
    return paths.unit.with_name(RAY_UNIT_NAME)


def ray_env_path(paths: Paths) -> Path:
    return paths.env.with_name("ray.env")


def ray_command(python: str, store: Store, *, head_port: int | None = None, address: str | None = None) -> list[str]:
    """`ray start` for a head (listening on head_port) or a worker (joining address), in the foreground."""
    ray = str(Path(python).with_name("ray"))  # the console script of the interpreter that has vLLM
    cmd = [ray, "start", "--block", "--disable-usage-stats", "--temp-dir", str(store.root / "service" / "cache" / "ray")]
    if head_port is not None:
        # The dashboard would listen on every address; it is not needed to serve.
        return cmd + ["--head", "--port", str(head_port), "--include-dashboard=false"]
    return cmd + ["--address", str(address)]


def render_ray(python: str, store: Store, paths: Paths, *, head_port: int | None = None, address: str | None = None,
               on_gpu: bool = True, run_as: str | None = None) -> Rendered:
    """The Ray node's unit and env file (nothing written): the head with head_port, else a worker of address."""
    role = "head" if head_port is not None else "worker"
    cmd = ray_command(python, store, head_port=head_port, address=address)
    env = {**cache_env(store), "RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    values = {
        "role": role,
        "install_flags": "MODEL --ray-head" if role == "head" else f"--ray-address {address}",
        "user_line": f"User={run_as}\n" if paths.scope == "system" and run_as else "",
        "env_file": str(ray_env_path(paths)),
        "store_root": str(store.root),
        "exec_start": shell_line(cmd),
        "exec_stop": shell_line([cmd[0], "stop"]),
        "writable_paths": str(store.root / "service" / "cache"),
        "device_lines": _gpu_device_lines() if on_gpu else "PrivateDevices=yes\n",
        "wanted_by": "multi-user.target" if paths.scope == "system" else "default.target",
    }
    unit = Template((systemd_dir() / RAY_TEMPLATE).read_text()).substitute(values)
    env_text = "# appliance Ray node environment\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    return Rendered(unit, env_text, cmd)


def install_ray(rendered: Rendered, store: Store, paths: Paths) -> Path:
    """Write the Ray node's unit and env file, enable and start it; return the unit's path."""
    require_systemd(paths.scope)
    (store.root / "service" / "cache" / "ray").mkdir(parents=True, exist_ok=True)
    unit = ray_unit_path(paths)
    atomic_write(ray_env_path(paths), rendered.env, mode=0o600)
    atomic_write(unit, rendered.unit, mode=0o644)
    systemctl(paths.scope, "daemon-reload")
    systemctl(paths.scope, "enable", "--now", RAY_UNIT_NAME)
    return unit


def uninstall_ray(paths: Paths) -> bool:
    """Stop and remove this machine's Ray node unit, if there is one."""
    unit = ray_unit_path(paths)
    if not unit.is_file():
        return False
    systemctl(paths.scope, "disable", "--now", RAY_UNIT_NAME, check=False)
    unit.unlink(missing_ok=True)
    ray_env_path(paths).unlink(missing_ok=True)
    systemctl(paths.scope, "daemon-reload", check=False)
    return True


# -- the installed record -------------------------------------------------------------


def record_path(store: Store | None = None) -> Path:
    return (store or Store()).root / "service" / "installed.json"


def installed(store: Store | None = None) -> dict | None:
    path = record_path(store)
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            parts = shlex.split(value)
            out[key.strip()] = parts[0] if parts else ""
    return out


def installed_endpoint() -> tuple[str | None, str | None]:
    """(url, api key) of the installed service, when there is one and its env file is readable."""
    record = installed()
    if not record:
        return None, None
    key = None
    try:
        key = read_env_file(Path(record["env_file"])).get(KEY_VAR)
    except OSError:
        pass
    return record.get("url"), key


# -- systemctl ------------------------------------------------------------------------------


def systemctl(scope: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("systemctl") is None:
        raise ApplianceError("systemd is not available here (no systemctl).", "run `appliance serve` in the foreground instead")
    cmd = ["systemctl"] + (["--user"] if scope == "user" else []) + list(args)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise _systemd_error(scope, result.stderr.strip() or result.stdout.strip(), " ".join(cmd))
    return result


def _systemd_error(scope: str, text: str, cmd: str) -> ApplianceError:
    lowered = text.lower()
    if scope == "user" and ("bus" in lowered or "xdg_runtime_dir" in lowered or "not been booted" in lowered or "offline" in lowered):
        user = pwd.getpwuid(os.getuid()).pw_name
        return ApplianceError(
            f"There is no systemd user session for {user} ({text.splitlines()[0] if text else 'no bus'}).",
            f"log in through a normal session, and to keep the service running after logout: "
            f"`sudo loginctl enable-linger {user}`; or install a system unit with `sudo appliance service install --system`",
        )
    if "not been booted with systemd" in lowered or "system has not been booted" in lowered:
        return ApplianceError("This machine does not run systemd.", "run `appliance serve` in the foreground instead")
    return ApplianceError(f"`{cmd}` failed: {text}", "see `appliance service logs`")


def require_systemd(scope: str) -> None:
    """Fail early, before writing anything, when the service manager cannot be reached."""
    if scope == "system" and os.geteuid() != 0:
        raise ApplianceError("Installing a system unit needs root.", "run it with sudo, or drop --system for a user unit")
    systemctl(scope, "show-environment")


def write_files(paths: Paths, rendered: Rendered) -> None:
    """The env file, readable only by its owner (it holds the API key), and the unit; each written atomically."""
    atomic_write(paths.env, rendered.env, mode=0o600)
    atomic_write(paths.unit, rendered.unit, mode=0o644)


@dataclass(frozen=True)
class InstallPlan:
    """What `service install` writes on this machine, checked and rendered; nothing written yet."""

    paths: Paths
    python: str
    spec: ServeSpec | None  # None on a Ray worker: the head's vLLM places its GPU workers there
    serving: Rendered | None  # vLLM's unit and env file
    api_key: str | None
    ray: Rendered | None  # this machine's Ray node: the head (vLLM starts after it) or a worker
    ray_address: str | None = None

    def preview(self) -> str:
        """The exact file contents, key redacted, for --dry-run."""
        parts = [f"# --- {ray_unit_path(self.paths)}\n{self.ray.unit}"] if self.ray else []
        if self.serving and self.api_key:
            parts += [f"# --- {self.paths.unit}\n{self.serving.unit}",
                      f"# --- {self.paths.env} (mode 0600)\n{self.serving.env.replace(self.api_key, redact(self.api_key))}"]
        return "\n".join(parts)


def _run_as(scope: str, run_as: str | None) -> str | None:
    return (run_as or os.environ.get("SUDO_USER") or None) if scope == "system" else run_as


def plan_install(spec: ServeSpec, store: Store, *, scope: str = "user", run_as: str | None = None, ray_head_port: int | None = None) -> InstallPlan:
    """Check and render a serving install; with ray_head_port this machine is also the head of a Ray cluster."""
    if scope == "user" and spec.port < 1024:
        raise ApplianceError(f"Port {spec.port} is privileged: a user unit cannot bind it.", "use a port from 1024 up, or install a system unit (--system)")
    check_port(spec.host, spec.port)  # a unit on a taken port would restart until its start limit, serving nothing
    paths = Paths.for_scope(scope)
    run_as = _run_as(scope, run_as)
    key = existing_key(paths) or new_api_key()
    ray = None if ray_head_port is None else render_ray(spec.python, store, paths, head_port=ray_head_port, on_gpu=spec.on_gpu, run_as=run_as)
    serving = render(spec, store, paths, key, run_as, ray_head=ray is not None)
    return InstallPlan(paths, spec.python, spec, serving, key, ray, spec.ray_address)


def plan_ray_worker(python: str, store: Store, *, address: str, on_gpu: bool, scope: str = "user", run_as: str | None = None) -> InstallPlan:
    """A machine that only joins the Ray cluster at `address`: it serves nothing itself."""
    paths = Paths.for_scope(scope)
    ray = render_ray(python, store, paths, address=address, on_gpu=on_gpu, run_as=_run_as(scope, run_as))
    return InstallPlan(paths, python, None, None, None, ray, address)


def install(plan: InstallPlan, store: Store, *, force: bool = False) -> dict | None:
    """Write the plan's files, reload systemd, enable and start; return the serving record (None on a Ray worker)."""
    paths, spec = plan.paths, plan.spec
    if plan.ray_address:
        require_ray(plan.python)
    if spec is None:
        install_ray(plan.ray, store, paths)
        return None
    require_vllm(spec.python)
    existing = installed(store)
    if (existing or paths.unit.exists()) and not force:
        what = f"serving {existing['model']} at {existing['url']}" if existing else f"at {paths.unit}"
        raise ApplianceError(f"The appliance service is already installed ({what}).", "see `appliance service status`; pass --force to replace it")
    require_systemd(paths.scope)
    if plan.ray is not None:
        install_ray(plan.ray, store, paths)
    (store.root / "service" / "cache" / "home").mkdir(parents=True, exist_ok=True)
    write_files(paths, plan.serving)
    record = {
        "unit": str(paths.unit),
        "unit_name": UNIT_NAME,
        "scope": paths.scope,
        "env_file": str(paths.env),
        "url": spec.url,
        "host": spec.host,
        "port": spec.port,
        "model": spec.model.name,
        "model_fingerprint": spec.model.fingerprint,
        "adapters": [a.name for a, _ in spec.adapters],
        "max_lora_rank": spec.max_lora_rank,
        "exec_start": plan.serving.exec_start,
    }
    atomic_write_json(record_path(store), record)
    systemctl(paths.scope, "daemon-reload")
    systemctl(paths.scope, "enable", "--now", UNIT_NAME)
    return record


def existing_key(paths: Paths) -> str | None:
    """Keep the key across reinstalls, so clients keep working."""
    try:
        return read_env_file(paths.env).get(KEY_VAR)
    except OSError:
        return None


def uninstall(store: Store) -> dict:
    record = installed(store)
    if record is None:
        raise ApplianceError("No appliance service is installed.", "install one with `appliance service install MODEL`")
    scope = record["scope"]
    systemctl(scope, "disable", "--now", UNIT_NAME, check=False)
    for path in (record["unit"], record["env_file"]):
        Path(path).unlink(missing_ok=True)
    systemctl(scope, "daemon-reload", check=False)
    record_path(store).unlink(missing_ok=True)
    record["ray_unit_removed"] = uninstall_ray(Paths.for_scope(scope))
    return record


def require_installed(store: Store) -> dict:
    record = installed(store)
    if record is None:
        raise ApplianceError("No appliance service is installed.", "install one with `appliance service install MODEL`")
    return record


def status(store: Store) -> dict:
    """Unit state, PID, uptime and memory from systemd; served models from the endpoint."""
    record = require_installed(store)
    props = "ActiveState,SubState,MainPID,ActiveEnterTimestamp,MemoryCurrent,NRestarts,Result"
    shown = systemctl(record["scope"], "show", UNIT_NAME, "-p", props)
    state = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    return {"record": record, "systemd": state}


def journal(store: Store, lines: int, follow: bool) -> int:
    record = require_installed(store)
    cmd = ["journalctl", "--no-pager", "-n", str(lines)]
    cmd += ["--user-unit", UNIT_NAME] if record["scope"] == "user" else ["-u", UNIT_NAME]
    if follow:
        cmd.append("-f")
    if shutil.which("journalctl") is None:
        raise ApplianceError("journalctl is not available here.", "read the logs with your system's log viewer")
    return subprocess.call(cmd)


def control(store: Store, action: str) -> None:
    record = require_installed(store)
    systemctl(record["scope"], action, UNIT_NAME)



def running_record_path(store: Store, port: int) -> Path:
    return store.root / "service" / f"serving-{port}.json"


def write_running_record(store: Store, spec: ServeSpec, pid: int, api_key: str | None = None) -> Path:
    """What a foreground `appliance serve` runs, for `appliance adapters load` to check against,
    and its key, for clients in another terminal: so the file is private (mode 0600)."""
    record = {"url": spec.url, "pid": pid, "model": spec.model.name, "max_lora_rank": spec.max_lora_rank if spec.lora_enabled else None}
    return atomic_write_json(running_record_path(store, spec.port), {**record, "api_key": api_key}, mode=0o600)


def running_servers(store: Store | None = None) -> list[dict]:
    """Records of foreground servers whose process is still alive, newest first."""
    paths = sorted(((store or Store()).root / "service").glob("serving-*.json"), key=_mtime, reverse=True)
    records = []
    for path in paths:
        try:
            record = read_json(path)
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            os.kill(pid, 0)  # a server killed hard leaves its record behind
        except PermissionError:
            pass  # alive, though not ours to signal
        except OSError:
            continue
        if pid > 0:
            records.append(record)
    return records


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def rank_limit_for(store: Store, url: str) -> int | None:
    """The LoRA rank limit of the server at `url`, if we started it (service or foreground serve)."""
    candidates = [record_path(store)] + sorted((store.root / "service").glob("serving-*.json"))
    for path in candidates:
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        if record.get("url", "").rstrip("/") == url.rstrip("/"):
            return record.get("max_lora_rank")
    return None
