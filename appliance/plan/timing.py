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


def longest_measured_seq_len(folder: Path | None = None) -> int:
    """The longest sequence any saved run measured memory at: our loops' GPU runs, our step's
    live memory (memory-*.json), the runs published in GPU profiles. Beyond it a plan extrapolates."""
    folder = folder or results_dir()
    lengths = [m.settings.seq_len for m in load_measurements(folder)]
    lengths += [p.settings.seq_len for gpu in gpu_profiles() for p in gpu.published if p.peak_gib]
    for path in sorted(Path(folder).glob("memory-*.json")) if folder else []:
        try:
            lengths.append(int(json.loads(path.read_text(encoding="utf-8"))["memory"]["settings"]["seq_len"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # tests/test_memory.py reads these files strictly
    return max(lengths, default=0)


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
    reference = base + attention + head if s.task in ("dpo", "kto") else 0  # the adapter-off reference pass
    return forward + backward + recompute + reference


class Point(BaseModel):
    """One measured throughput, as the calibration uses it."""

    run: str = Field(description="what ran: 'peer loop', 'appliance loop', or another tool")
    loop: Loop | None = Field(description="our loop or the peer loop; None: another tool's published run")
    gpu: GpuProfile
    model: str
    settings: TrainSettings
    tokens_per_s: float
    source: str = Field(description="a file under bench/results, or where the run is published")
    flops: float = Field(description="FLOPs per trained token of that run")
    efficiency: float = Field(description="achieved FLOP/s ÷ the GPU's dense bf16 peak")

    def describe(self) -> str:
        weights = "4-bit" if self.settings.load_in_4bit else "16-bit"
        shape = f"seq {self.settings.seq_len} × batch {self.settings.batch_size}, r{self.settings.rank}"
        return f"{self.run}, {self.model}, {self.gpu.name}, {weights}, {shape}: {self.tokens_per_s:,.0f} tok/s ({self.source})"


def efficiency_points(measurements: list[Measurement], published: bool = True) -> list[Point]:
    """Every measured throughput with known shapes and GPU rate: our measurements, then (with
    `published`) the runs published in the GPU profiles."""
    gpus, shapes = gpu_profiles(), model_profiles()
    raw: list[tuple[str, Loop | None, GpuProfile | None, str, TrainSettings, float | None, str]] = [
        (f"{m.loop} loop", m.loop, _match(m.gpu, gpus, GPU_WORDS), m.model, m.settings, m.tokens_per_s, f"bench/results, {m.date}") for m in measurements
    ]
    if published:
        raw += [(p.tool, None, gpu, p.model, p.settings, p.tokens_per_s, p.source) for gpu in gpus for p in gpu.published]
    points = []
    for run, loop, gpu, model, settings, tokens_per_s, source in raw:
        shape = _match(model, shapes)
        if tokens_per_s is None or gpu is None or gpu.bf16_tflops is None or shape is None:
            continue
        flops = flops_per_token(shape, settings)
        points.append(Point(run=run, loop=loop, gpu=gpu, model=model, settings=settings, tokens_per_s=tokens_per_s,
                            source=source, flops=flops, efficiency=tokens_per_s * flops / (gpu.bf16_tflops * 1e12)))
    return points


class Calibration(BaseModel):
    efficiency: float = Field(description="achieved FLOP/s ÷ the GPU's dense bf16 peak")
    spread: tuple[float, float] = Field(description="the lowest and highest efficiency the other measured runs that qualify give")
    basis: list[str] = Field(description="the measurements it comes from")
    caveats: list[str] = Field(default_factory=list, description="how the basis differs from the run planned")


def _interpolate(points: list[Point], flops: float) -> tuple[float, list[Point]]:
    """The efficiency at `flops` per token: between the measured sizes in log(FLOPs), the nearest outside them."""
    points = sorted(points, key=lambda p: p.flops)
    below = [p for p in points if p.flops <= flops] or points[:1]
    above = [p for p in points if p.flops >= flops] or points[-1:]
    low, high = below[-1], above[0]
    if high.flops == low.flops:
        used = [p for p in points if p.flops == low.flops]
        return sum(p.efficiency for p in used) / len(used), used
    share = math.log(flops / low.flops) / math.log(high.flops / low.flops)
    return low.efficiency + share * (high.efficiency - low.efficiency), [low, high]


def calibrate(flops: float, gpu: GpuProfile, settings: TrainSettings, loop: Loop, points: list[Point]) -> Calibration | None:
    """The efficiency of the measured runs most like this one, interpolated by model size.

    Preference: the same GPU (a share of peak does not carry across cards: the peer loop
    reached 11 % of an H100's, torchtune's compiled loop 67 % of an RTX 4090's, on the same
    model), and on it the same loop; on a card without runs, the card whose compute per byte of
    bandwidth is nearest, whatever loop ran there (our loop on an H200 spends most of a 1B
    step launching kernels: 108 ms of GPU work in a 307 ms step, bench/results/
    gpu-profile-20261129-223100.txt, a share of peak that says little of a 3060's); then the
    same weight precision. Between measured sizes the efficiency is interpolated in
    log(FLOPs per token) (bigger matmuls use a GPU better); outside them the nearest measured
    size's holds. The spread is what each other group of runs that passes the same
    preferences (another tool, another card) would have given.
    """
    def same_card(p: Point) -> bool:
        return _match(p.gpu.name, [gpu], GPU_WORDS) is not None

    on_card = [p for p in points if same_card(p)]
    if on_card:
        points = [p for p in on_card if p.loop == loop] or on_card
    points = [p for p in points if p.settings.load_in_4bit == settings.load_in_4bit] or points
    if not points:
        return None
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.run, p.gpu.name), []).append(p)

    def likeness(key: tuple[str, str]) -> tuple[float, bool]:
        """The card whose compute per byte of bandwidth is nearest this one's, then our loop."""
        card = groups[key][0].gpu
        known = gpu.bandwidth_gbps and card.bandwidth_gbps and gpu.bf16_tflops
        distance = abs(math.log(card.bf16_tflops / card.bandwidth_gbps / (gpu.bf16_tflops / gpu.bandwidth_gbps))) if known else 0.0
        return distance, key[0] != f"{loop} loop"

    best = min(groups, key=likeness)
    efficiency, used = _interpolate(groups[best], flops)
    others = [_interpolate(g, flops)[0] for g in groups.values()]
    caveats = []
    if used[0].loop != loop:
        caveats.append(f"the {loop} loop is not measured{' on this card' if same_card(used[0]) else ''}: {used[0].run} stands in")
    if not same_card(used[0]):
        caveats.append(f"measured on {used[0].gpu.name}, not {gpu.name}: a share of one card's peak is a rough guide to another's")
    if used[0].settings.load_in_4bit != settings.load_in_4bit:
        caveats.append(f"measured with {'4-bit' if used[0].settings.load_in_4bit else '16-bit'} weights")
    sizes = sorted(p.flops for p in groups[best])
    if not sizes[0] * 0.9 <= flops <= sizes[-1] * 1.1:  # within 10 %: the same size, for a GPU's matmuls
        measured = f"{sizes[0] / 1e9:.1f}" if sizes[0] == sizes[-1] else f"{sizes[0] / 1e9:.1f}-{sizes[-1] / 1e9:.1f}"
        caveats.append(f"this run does {flops / 1e9:.1f} GFLOP per token, the runs measured {measured}: the nearest size's efficiency holds")
    return Calibration(efficiency=efficiency, spread=(min(others), max(others)), basis=[p.describe() for p in used], caveats=caveats)


class TimeEstimate(BaseModel):
    tokens_per_s: float
    tokens_per_s_range: tuple[float, float] = Field(description="the estimate from each other group of measured runs that qualifies")
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
    points = efficiency_points(load_measurements(), published=True) if measurements is None else efficiency_points(measurements, published=False)
    calibration = calibrate(flops, gpu, settings, loop, points)
    if calibration is None:
        return None
    rate = gpu.bf16_tflops * 1e12 / flops
    tokens_per_s = rate * calibration.efficiency
    step_tokens = settings.grad_accum * _rows(settings) * settings.seq_len
    if settings.data_parallel > 1:
        # Each rank computes a one-GPU step on its own batch; only the all-reduce is added, and no
        # multi-GPU run of ours has been measured, so the estimate is the ideal and says so.
        tokens_per_s *= settings.data_parallel
        step_tokens *= settings.data_parallel
        mib = 4 * lora_parameters(shape, settings) / 2**20
        calibration = calibration.model_copy(update={"caveats": [*calibration.caveats,
            f"{settings.data_parallel} GPUs data-parallel: assumed {settings.data_parallel}× one GPU's speed; "
            f"the all-reduce of {mib:.0f} MiB of gradients a step is not measured"
            + (" nor FSDP's gathering of every layer's weights, twice a step" if settings.fsdp else "")]})
    return TimeEstimate(
        tokens_per_s=tokens_per_s,
        tokens_per_s_range=(rate * calibration.spread[0] * settings.data_parallel, rate * calibration.spread[1] * settings.data_parallel),
        step_s=step_tokens / tokens_per_s,
        steps=steps,
        run_tokens=steps * step_tokens,
        run_s=steps * step_tokens / tokens_per_s,
        calibration=calibration,
    )


