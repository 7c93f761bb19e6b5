"""How long a run takes: FLOPs per token ÷ (the GPU's bf16 rate × an efficiency measured on
saved runs, interpolated by model size); and the measurements themselves (bench/results)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ApplianceError
from appliance.plan.constants import MLP_MODULES, Loop
from appliance.plan.memory import _linear_parameters, _rows, _tiled, lora_parameters
from appliance.plan.profiles import GPU_WORDS, GpuProfile, ModelShape, _match, gpu_profiles, model_profiles
from appliance.plan.settings import TrainSettings, lora_targets
from appliance.results import results_dir


# -- measurements and time ---------------------------------------------------------------


class Measurement(BaseModel):
    """One measured training run (bench/results/README.md)."""

    model_config = ConfigDict(extra="forbid")

    date: str = Field(description="when it was measured, YYYY-MM-DD")
    machine: str = Field(description="the machine in words")
    gpu: str = Field(description="a GPU profile name or alias")
    versions: dict[str, str] = Field(default_factory=dict, description="torch, transformers, peft, bitsandbytes, ...")
    model: str = Field(description="a model profile name or alias: the shapes measured")
    loop: Loop
    settings: TrainSettings
    peak_gib: float = Field(gt=0, description="torch.cuda.max_memory_allocated() / 2**30 over the run")
    tokens_per_s: float | None = Field(None, gt=0, description="trained tokens per second after warm-up")
    notes: str = ""


def load_measurements(folder: Path | None = None) -> list[Measurement]:
    """Every measurement in the *.json files of `folder` (bench/results/README.md gives the format)."""
    folder = folder or results_dir()
    if folder is None:
        return []
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, dict) or not isinstance(records.get("measurements", []), list):
                raise ValueError("the file must hold a JSON object whose 'measurements' is a list")
            found += [Measurement.model_validate(r) for r in records.get("measurements", [])]
        except (ValueError, OSError) as err:  # ValidationError and JSONDecodeError are ValueErrors
            raise ApplianceError(f"The measurements in {path} cannot be read: {err}", "fix the file (bench/results/README.md gives the format)") from None
    return found


def flops_per_token(shape: ModelShape, settings: TrainSettings) -> float:
    """Matmul FLOPs of one trained token: forward, backward and recompute.

    The base is frozen, so its backward computes input gradients only (2 FLOPs per weight,
    not 4): ≈ 4·N per token, 6·N with gradient checkpointing's second forward. Causal
    attention adds 2·width·seq per layer forward (QKᵀ and AV over half the positions on
    average), twice that in backward. The head's logits and their gradient cost 4·H·V.
    """
    s, layers = settings, shape.num_hidden_layers
    base = 2 * _linear_parameters(shape)
    attention = 2 * layers * shape.attention_width * s.seq_len
    adapters = 2 * lora_parameters(shape, s)
    head = 2 * shape.hidden_size * shape.vocab_size
    forward = base + attention + adapters + head
    backward = base + 2 * attention + 2 * adapters + head
    recompute = base + attention + adapters if s.gradient_checkpointing else 0
    if _tiled(s):
        # The tiled MLP's extra forward, tile by tile in backward.
        shapes = shape.linear_shapes()
        recompute += 2 * layers * sum(i * o + (s.rank * (i + o) if m in lora_targets(s) else 0) for m, (i, o) in shapes.items() if m in MLP_MODULES)
    reference = base + attention + head if s.task == "dpo" else 0  # DPO's adapter-off reference pass
    return forward + backward + recompute + reference


class Calibration(BaseModel):
    efficiency: float = Field(description="achieved FLOP/s ÷ the GPU's dense bf16 peak")
    basis: list[str] = Field(description="the measurements it comes from")


def _efficiency_points(measurements: list[Measurement]) -> list[tuple[Measurement, float, float]]:
    """(measurement, FLOPs per token, efficiency) of every measurement with a throughput and known profiles."""
    gpus, shapes = gpu_profiles(), model_profiles()
    points = []
    for m in measurements:
        gpu, shape = _match(m.gpu, gpus, GPU_WORDS), _match(m.model, shapes)
        if m.tokens_per_s is None or gpu is None or gpu.bf16_tflops is None or shape is None:
            continue
        flops = flops_per_token(shape, m.settings)
        points.append((m, flops, m.tokens_per_s * flops / (gpu.bf16_tflops * 1e12)))
    return points


def calibrate(flops: float, gpu: GpuProfile, settings: TrainSettings, loop: Loop, measurements: list[Measurement]) -> Calibration | None:
    """The efficiency of the measurements most like this run, interpolated by model size.

    Preference: the same loop (until the appliance loop has measurements, the peer loop stands
    in: a conservative figure, since ours does the same matmuls in bf16 rather than fp32), then
    the same GPU, then the same weight precision. Between measured sizes the efficiency is
    interpolated in log(FLOPs per token) (bigger matmuls use a GPU better); outside them, the
    nearest measured size's efficiency holds. Measured on an H100, it is low (5-11 % of peak):
    consumer cards, with less compute per byte of bandwidth, likely reach a higher share.
    """
    points = _efficiency_points(measurements)
    for keep in (
        lambda m: m.loop == loop,
        lambda m: _match(m.gpu, [gpu], GPU_WORDS) is not None,
        lambda m: m.settings.load_in_4bit == settings.load_in_4bit,
    ):
        points = [p for p in points if keep(p[0])] or points
    if not points:
        return None
    points.sort(key=lambda p: p[1])
    below = [p for p in points if p[1] <= flops] or points[:1]
    above = [p for p in points if p[1] >= flops] or points[-1:]
    low, high = below[-1], above[0]
    if high[1] == low[1]:
        used = [p for p in points if p[1] == low[1]]
        efficiency = sum(p[2] for p in used) / len(used)
    else:
        used = [low, high]
        share = math.log(flops / low[1]) / math.log(high[1] / low[1])
        efficiency = low[2] + share * (high[2] - low[2])
    basis = [f"{m.loop} loop, {m.model}, {m.gpu}, {'4-bit' if m.settings.load_in_4bit else '16-bit'}: {m.tokens_per_s:g} tok/s" for m, _, _ in used]
    return Calibration(efficiency=efficiency, basis=basis)


class TimeEstimate(BaseModel):
    tokens_per_s: float
    step_s: float = Field(description="one optimizer step: grad_accum micro-batches")
    steps: int
    run_tokens: int = Field(description="tokens of the run, rows full (packing makes them nearly so)")
    run_s: float
    calibration: Calibration


def estimate_time(
    shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, steps: int, loop: Loop = "appliance", measurements: list[Measurement] | None = None
) -> TimeEstimate | None:
    """Tokens × FLOPs per token ÷ (the GPU's TFLOP/s × a measured efficiency); None without measurements."""
    if gpu.bf16_tflops is None:
        return None
    flops = flops_per_token(shape, settings)
    calibration = calibrate(flops, gpu, settings, loop, load_measurements() if measurements is None else measurements)
    if calibration is None:
        return None
    tokens_per_s = gpu.bf16_tflops * 1e12 * calibration.efficiency / flops
    step_tokens = settings.grad_accum * _rows(settings) * settings.seq_len
    return TimeEstimate(
        tokens_per_s=tokens_per_s,
        step_s=step_tokens / tokens_per_s,
        steps=steps,
        run_tokens=steps * step_tokens,
        run_s=steps * step_tokens / tokens_per_s,
        calibration=calibration,
    )


