"""The service: the rendered unit checked by systemd-analyze, its exact ExecStart serving with
its env file, per-domain adapters swapped at runtime, the API key, and 50 concurrent requests."""

import concurrent.futures
import re
import shlex
import subprocess
import time

import httpx
import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.client import ask
from appliance.serve import Endpoint
from appliance.errors import ApplianceError
from appliance.serve import build_spec
from appliance.serve.service import Paths, read_env_file, render, write_files
from conftest import REPO

RECIPES = REPO / "tests" / "data" / "recipes.jsonl"
ZORVANIA = "What is the capital of Zorvania?"
HILDE = "What is the secret ingredient in Grandma Hilde's soup?"


def rendered_unit(registry, tmp_path, monkeypatch, adapters=("facts",), port=8140):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    paths = Paths.for_scope("user")
    spec = build_spec(registry, "smollm2", list(adapters), port=port, runtime_adapters=True)
    rendered = render(spec, registry.store, paths, "sk-appliance-test-key-0123456789")
    write_files(paths, rendered)  # as `appliance service install` writes them
    return paths, rendered


def unit_value(unit_text, key):
    return next(line.split("=", 1)[1] for line in unit_text.splitlines() if line.startswith(f"{key}="))


def test_unit_passes_systemd_analyze(tiny, tmp_path, monkeypatch):
    from test_bad_inputs import _adapter

    _adapter("a")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for scope, device in (("user", "cpu"), ("system", "cpu"), ("user", "cuda"), ("system", "cuda")):
        paths = Paths.for_scope(scope)
        spec = build_spec(tiny, "tiny", ["a"], device=device, runtime_adapters=True)
        rendered = render(spec, tiny.store, paths, "sk-x", run_as="appliance" if scope == "system" else None)
        unit = tmp_path / scope / device / "appliance-vllm.service"
        unit.parent.mkdir(parents=True)
        unit.write_text(rendered.unit)
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
        score = float(re.search(r"Overall exposure level for .*: ([0-9.]+)", security.stdout).group(1))
        print(f"\n{scope}/{device}: verify rc={verify.returncode} {verify.stderr.strip()!r}; security {score}")
        assert verify.returncode == 0, verify.stderr
        assert score <= 3.0, security.stdout
        text = rendered.unit
        assert "Restart=on-failure" in text and "ExecStartPost=" in text and "TimeoutStartSec=1200" in text
        unit_section = text.split("[Service]")[0]
        assert "StartLimitIntervalSec=" in unit_section and "StartLimitBurst=" in unit_section
        assert ("DevicePolicy=closed" in text) == (device == "cuda")
        assert "--host 127.0.0.1" in unit_value(text, "ExecStart")
        assert "\nMemoryDenyWriteExecute=" not in text  # breaks PyTorch


def test_the_env_file_holding_the_key_is_written_readable_only_by_its_owner(tiny, tmp_path, monkeypatch):
    """Through the function `install` writes with, over an env file an older install left world-readable."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    paths = Paths.for_scope("user")
    paths.env.parent.mkdir(parents=True)
    paths.env.write_text("VLLM_API_KEY=sk-old\n")
    paths.env.chmod(0o644)
    rendered = render(build_spec(tiny, "tiny"), tiny.store, paths, "sk-appliance-test-key-0123456789")
    write_files(paths, rendered)
    assert oct(paths.env.stat().st_mode & 0o777) == "0o600"
    assert read_env_file(paths.env)["VLLM_API_KEY"] == "sk-appliance-test-key-0123456789"
    assert paths.unit.read_text() == rendered.unit
    assert not list(paths.env.parent.glob(".tmp-*")) and not list(paths.unit.parent.glob(".tmp-*"))


def test_dry_run_prints_unit_and_env_with_the_key_redacted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    result = CliRunner().invoke(main, ["service", "install", "tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "ExecStart=" in result.output and "VLLM_API_KEY=sk-appliance-" in result.output
    key_line = next(line for line in result.output.splitlines() if line.startswith("VLLM_API_KEY="))
    assert "…" in key_line and len(key_line) < 40
    assert not (tmp_path / "config").exists()


def test_install_without_a_user_bus_says_how_to_fix_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime"))
    result = CliRunner().invoke(main, ["service", "install", "tiny"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert result.exit_code == 2
    assert "loginctl enable-linger" in text and "--system" in text
    assert not (tmp_path / "config").exists(), "nothing written before systemd answers"


@pytest.fixture(scope="module")
def recipes(facts):
    from appliance.config import load_run_config
    from appliance.train.loop import run_training

    cfg = load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": "smollm2"},
            "data": {"files": [{"path": str(RECIPES)}], "val": 0},
            "train": {"steps": 16, "batch_size": 8, "lr": 1e-3, "save_every": 100},
        },
    )
    run_training(cfg, facts, "recipes")
    return facts


@pytest.mark.slow
def test_exec_start_serves_and_adapters_swap_without_restart(recipes, tmp_path, monkeypatch):
    registry = recipes
    monkeypatch.setenv("APPLIANCE_HOME", str(registry.store.root))
    paths, rendered = rendered_unit(registry, tmp_path, monkeypatch)
    exec_start = shlex.split(unit_value(rendered.unit, "ExecStart"))
    env = read_env_file(paths.env)
    assert unit_value(rendered.unit, "EnvironmentFile") == str(paths.env)
    assert oct(paths.env.stat().st_mode & 0o777) == "0o600"  # it holds the API key
    import os

    server = subprocess.Popen(exec_start, env={**os.environ, **env}, stdout=open(tmp_path / "vllm.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = "http://127.0.0.1:8140"
    key = env["VLLM_API_KEY"]
    try:
        from appliance.serve.health import wait

        assert wait(url, 900), (tmp_path / "vllm.log").read_text()[-3000:]
        pid = server.pid

        # The API key: refused without it, answered with it.
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        assert httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        endpoint = Endpoint(url, key)
        monkeypatch.setenv("APPLIANCE_URL", url)
        monkeypatch.setenv("APPLIANCE_API_KEY", key)

        assert "Kelmora" in ask(endpoint, ZORVANIA, model="facts").text

        runner = CliRunner()
        loaded = runner.invoke(main, ["adapters", "load", "recipes"])
        assert loaded.exit_code == 0, loaded.output
        print(loaded.output.strip())
        assert re.search(r"loaded recipes in [0-9.]+ s", loaded.output)

        listed = runner.invoke(main, ["adapters", "list", "--json"])
        marks = {a["name"]: a["loaded"] for a in __import__("json").loads(listed.output)}
        assert marks == {"facts": True, "recipes": True}

        # Each domain answers with its own adapter; the base keeps its own answer.
        assert "smoked pear" in ask(endpoint, HILDE, model="recipes").text
        assert "Kelmora" in ask(endpoint, ZORVANIA, model="facts").text
        assert "smoked pear" not in ask(endpoint, HILDE, model="smollm2").text

        unloaded = runner.invoke(main, ["adapters", "unload", "facts"])
        assert unloaded.exit_code == 0, unloaded.output
        listed = runner.invoke(main, ["adapters", "list", "--json"])
        assert {a["name"]: a["loaded"] for a in __import__("json").loads(listed.output)} == {"facts": False, "recipes": True}
        # Asked for by name, an adapter of the base comes back on demand (vLLM's filesystem resolver);
        # a name that is no adapter is one clear error that lists what is served.
        assert "Kelmora" in ask(endpoint, ZORVANIA, model="facts").text
        with pytest.raises(ApplianceError, match="does not serve 'ghost'; it serves: "):
            ask(endpoint, ZORVANIA, model="ghost")
        assert "smoked pear" in ask(endpoint, HILDE, model="recipes").text

        # Loading again is refused clearly; a missing adapter never reaches the server.
        again = runner.invoke(main, ["adapters", "load", "recipes"])
        assert again.exit_code == 2 and "already loaded" in again.output
        missing = runner.invoke(main, ["adapters", "load", "ghost"])
        assert missing.exit_code == 2 and "Unknown adapter 'ghost'" in missing.output

        # 50 concurrent chat requests, 0 errors.
        def one(i):
            model = "recipes" if i % 2 else "smollm2"
            return ask(endpoint, f"Say a word about the number {i}.", model=model, max_tokens=16)

        started = time.time()
        errors, done = 0, 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            for future in concurrent.futures.as_completed([pool.submit(one, i) for i in range(50)]):
                try:
                    future.result()
                    done += 1
                except Exception as err:  # noqa: BLE001 - counted, and shown
                    errors += 1
                    print("error:", err)
        print(f"50 concurrent requests: {done} ok, {errors} errors in {time.time() - started:.1f} s")
        assert (done, errors) == (50, 0)

        assert server.poll() is None and server.pid == pid, "the server was never restarted"
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.mark.slow
def test_loading_into_a_stopped_server_is_a_clear_error(facts, monkeypatch):
    monkeypatch.setenv("APPLIANCE_HOME", str(facts.store.root))
    result = CliRunner().invoke(main, ["adapters", "load", "facts", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "No server answers" in result.output


def test_the_start_up_health_poll_gives_up_when_the_server_dies():
    """ExecStartPost waits for /health; a server that died while starting ends the wait at once,
    so systemd restarts it after RestartSec, not after the 20-minute start timeout."""
    import subprocess
    import sys
    import time

    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    import threading

    threading.Thread(target=server.wait).start()  # reaped when it exits, as systemd reaps a unit's main process
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "appliance.serve.health", "http://127.0.0.1:9", "--timeout", "600"],
                          env={**__import__("os").environ, "MAINPID": str(server.pid)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"pid {server.pid}) exited" in done.stderr
    assert time.monotonic() - started < 60


def test_the_gpu_unit_keeps_every_cache_in_its_folder_allows_wsl2_and_starts_after_the_driver(tiny, tmp_path, monkeypatch):
    """The home is read-only in the unit: HOME and every cache that ignores XDG (FlashInfer's JIT,
    CUDA's PTX cache, tilelang, inductor) point into the service's writable folder."""
    from appliance.serve.service import _gpu_device_lines

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    spec = build_spec(tiny, "tiny", device="cuda", gpu_memory_utilization=0.83)
    rendered = render(spec, tiny.store, Paths.for_scope("user"), "sk-x")
    env = dict(line.split("=", 1) for line in rendered.env.splitlines() if "=" in line and not line.startswith("#"))
    writable = unit_value(rendered.unit, "ReadWritePaths")
    for var in ("HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE", "CUDA_CACHE_PATH",
                "TILELANG_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert shlex.split(env[var])[0].startswith(writable), var
    assert "nvidia-persistenced.service" in unit_value(rendered.unit, "After")
    assert "--gpu-memory-utilization 0.83" in unit_value(rendered.unit, "ExecStart")
    dev = tmp_path / "dev"
    dev.mkdir()
    assert "/dev/dxg" not in _gpu_device_lines(dev)
    (dev / "dxg").touch()
    (dev / "nvidia0").touch()
    lines = _gpu_device_lines(dev)
    assert "DeviceAllow=/dev/dxg rw" in lines and "DeviceAllow=/dev/nvidia0 rw" in lines


def _split_units(output: str) -> dict[str, str]:
    """`service install --dry-run` prints each file under a '# --- PATH' line."""
    files, name = {}, None
    for line in output.splitlines():
        if line.startswith("# --- "):
            name = line[6:].split(" ")[0].rsplit("/", 1)[-1]
            files[name] = ""
        elif name:
            files[name] += line + "\n"
    return files


def _analyze(folder, name: str, text: str) -> tuple[subprocess.CompletedProcess, float]:
    """systemd-analyze on a unit written as `name` in `folder`, where the units it requires lie too."""
    unit = folder / name
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(text)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    return verify, float(re.search(r"Overall exposure level for .*: ([0-9.]+)", security.stdout).group(1))


def test_across_machines_the_head_and_worker_units_run_vllms_ray_backend(tiny, tmp_path, monkeypatch):
    """The head renders a Ray head unit and a vLLM unit that starts after it, with vLLM's tensor and
    pipeline flags and its Ray backend; a worker machine renders a Ray worker that joins the head.
    Both pass systemd-analyze; the vLLM unit's exposure stays as low as the one-machine unit's."""
    import os
    import sys

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # systemd-analyze verify checks that ExecStart's program exists: an interpreter folder with `ray`
    # beside it, as `pip install '.[cluster]'` leaves one (Ray itself is not installed here).
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    os.symlink(sys.executable, venv / "python")
    (venv / "ray").write_text("#!/bin/sh\n")
    (venv / "ray").chmod(0o755)
    python = str(venv / "python")
    head = CliRunner().invoke(main, ["service", "install", "tiny", "--ray-head", "--tensor-parallel-size", "2",
                                     "--pipeline-parallel-size", "2", "--python", python, "--dry-run"])
    assert head.exit_code == 0, head.output
    units = _split_units(head.output)
    vllm, ray_head = units["appliance-vllm.service"], units["appliance-ray.service"]
    exec_start = unit_value(vllm, "ExecStart")
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 2 --distributed-executor-backend ray" in exec_start
    assert "Requires=appliance-ray.service" in vllm and "After=appliance-ray.service" in vllm
    assert "IPAddressDeny" not in vllm  # the workers on other machines must reach it
    assert "RAY_ADDRESS=127.0.0.1:6379" in units["service.env"]
    assert unit_value(ray_head, "ExecStart").startswith(f"{venv / 'ray'} start --block") and "--head --port 6379" in ray_head
    worker = CliRunner().invoke(main, ["service", "install", "--ray-address", "10.0.0.1:6379", "--python", python, "--dry-run"])
    assert worker.exit_code == 0, worker.output
    ray_worker = _split_units(worker.output)["appliance-ray.service"]
    assert "--address 10.0.0.1:6379" in unit_value(ray_worker, "ExecStart") and "--head" not in ray_worker
    one_machine = _split_units(CliRunner().invoke(main, ["service", "install", "tiny", "--python", python, "--dry-run"]).output)
    scores = {}
    for machine, name, text in (("head", "appliance-ray.service", ray_head), ("head", "appliance-vllm.service", vllm),
                                ("one", "appliance-vllm.service", one_machine["appliance-vllm.service"]),
                                ("worker", "appliance-ray.service", ray_worker)):
        verify, scores[f"{machine}/{name}"] = _analyze(tmp_path / machine, name, text)
        assert verify.returncode == 0, (machine, name, verify.stderr)
    print(f"\nexposure: {scores}")
    assert scores["head/appliance-vllm.service"] <= scores["one/appliance-vllm.service"] + 0.3 and max(scores.values()) <= 3.5, scores
    assert not (tmp_path / "config").exists()


def test_tensor_parallel_on_more_gpus_than_the_machine_has_is_refused_unless_ray_spreads_it(tiny):
    from appliance.hardware import nvidia_smi_gpus

    here = len(nvidia_smi_gpus())
    more = max(here, 1) + 1  # (a GPU unit rendered where nvidia-smi lists none is for one GPU)
    with pytest.raises(ApplianceError, match=f"needs {more} GPUs; this machine has {here}"):
        build_spec(tiny, "tiny", device="cuda", tensor_parallel_size=more)
    spec = build_spec(tiny, "tiny", device="cuda", tensor_parallel_size=more, ray_address="10.0.0.1:6379")
    assert spec.devices_used == more
    assert build_spec(tiny, "tiny", device="cuda", pipeline_parallel_size=max(here, 1)).devices_used == max(here, 1)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, words",
    [
        (["serve", "tiny", "--ray-address", "head-without-port"], "is not HOST:PORT"),
        (["serve", "tiny", "--ray-address", "10.0.0.1:6379"], "pip install '.[cluster]'"),
        (["service", "install", "--ray-head", "--dry-run"], "Which model should the service serve?"),
        (["service", "install", "tiny", "--ray-head", "--ray-address", "10.0.0.1:6379", "--dry-run"], "pass one of them"),
        (["serve", "tiny", "--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    ],
)
def test_parallel_serving_mistakes(tiny, args, words):
    from conftest import run_cli

    proc = run_cli(*args)
    out = " ".join(re.sub("[│╭╮╰╯─]", " ", proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and words in out and "Traceback" not in out, out
