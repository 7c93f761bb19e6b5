"""Will this fine-tune fit this GPU, how long will it take, and what should change if it does not.

Pure arithmetic over a model's shapes (its own config.json in the store, or a profile in
profiles/models) and a GPU profile (profiles/gpus): nothing is loaded, no GPU is needed.

    profiles    GPU and model profiles, the detected GPU and what others hold of it
    settings    what a step's memory and time depend on (a flat subset of RunConfig)
    constants   the figures the memory model is built from, with their sources
    memory      peak memory by part at the loss, in backward, at the optimizer step
    advice      what to change when a run does not fit, in order of cost to quality
    timing      time per token, calibrated on measured runs (bench/results)

This module puts them together: `make_plan` and `plan_run` (what `appliance plan` and
`appliance train` check first).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from appliance.config import RunConfig, nest
from appliance.plan.advice import Recommendation, recommend
from appliance.plan.constants import LINEAR_MODULES, LOGITS_BUDGET_BYTES, MLP_TILE_TOKENS, SEQ_STEP, Loop
from appliance.plan.memory import (
    Estimate,
    chunk_rows,
    estimate,
    layer_activation_bytes,
    lora_parameters,
    max_batch_size,
    max_seq_len,
    mlp_activation_bytes,
    packed_mask,
    _lora_kept_bytes,
)
from appliance.plan.profiles import (
    GpuProfile,
    ModelShape,
    detected_gpu,
    find_gpu,
    find_model,
    gpu_profiles,
    model_profiles,
    require_gpu,
    cpu_profile,
    gpu_with_memory,
    shape_from_config,
)
from appliance.plan.settings import TrainSettings, settings_from_config
from appliance.plan.timing import Measurement, TimeEstimate, estimate_time, flops_per_token, load_measurements, longest_measured_seq_len
from appliance.registry import Registry

__all__ = [
    "LINEAR_MODULES",
    "LOGITS_BUDGET_BYTES",
    "MLP_TILE_TOKENS",
    "SEQ_STEP",
    "Estimate",
    "FitPlan",
    "GpuProfile",
    "Measurement",
    "ModelShape",
    "Recommendation",
    "TimeEstimate",
    "TrainSettings",
    "chunk_rows",
    "cpu_profile",
    "gpu_with_memory",
    "longest_measured_seq_len",
    "detected_gpu",
    "estimate",
    "estimate_time",
    "find_gpu",
    "find_model",
    "flops_per_token",
    "gpu_profiles",
    "layer_activation_bytes",
    "load_measurements",
    "lora_parameters",
    "make_plan",
    "max_batch_size",
    "max_seq_len",
    "mlp_activation_bytes",
    "model_profiles",
    "packed_mask",
    "plan_run",
    "recommend",
    "require_gpu",
    "settings_from_config",
    "shape_from_config",
    "_lora_kept_bytes",
]


class FitPlan(BaseModel):
    """Everything `appliance plan` shows."""

    estimate: Estimate
    max_seq_len: int
    max_batch_size: int
    measured_seq_len: int = Field(description="the longest sequence a saved run measured memory at: longer ones are extrapolated")
    time: TimeEstimate | None
    recommendations: list[Recommendation]

    @property
    def cheapest_fit(self) -> Recommendation | None:
        """The first change that fits and that a run can apply (`appliance train --fit`)."""
        return next((r for r in self.recommendations if r.fits and r.applies_to_config), None)

    def to_json(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "model": e.model,
            "gpu": e.gpu,
            "loop": e.loop,
            "settings": e.settings.model_dump(mode="json"),
            "total_gib": round(e.total_gib, 3),
            "margin_gib": round(e.margin_gib, 3),
            "allocated_gib": round(e.allocated_gib, 3),
            "host_load_gib": round(e.host_load_gib, 3),
            "gpu_gib": e.gpu_gib,
            "nominal_gib": e.nominal_gib,
            "held_gib": e.held_gib,
            "fits": e.fits,
            "peak_moment": e.peak_moment,
            "moments": {m: round(sum(parts.values()), 3) for m, parts in e.moments.items()},
            "parts": {name: round(p.gib, 3) for name, p in e.parts.items()},
            "parts_what": {name: p.what for name, p in e.parts.items()},
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
            "measured_seq_len": self.measured_seq_len,
            "time": self.time.model_dump(mode="json") if self.time else None,
            "recommendations": [
                {
                    "description": r.description,
                    "changes": {c.field: c.value for c in r.changes},
                    "config": nest(r.config_changes()) if r.applies_to_config else None,
                    "total_gib": round(r.total_gib, 3),
                    "fits": r.fits,
                }
                for r in self.recommendations
            ],
        }


def make_plan(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, steps: int, loop: Loop = "appliance") -> FitPlan:
    """The plan of a run; advice is for the appliance's own loop (the peer loop is planned for comparison)."""
    return FitPlan(
        estimate=estimate(shape, gpu, settings, loop),
        max_seq_len=max_seq_len(shape, gpu, settings, loop),
        max_batch_size=max_batch_size(shape, gpu, settings, loop),
        measured_seq_len=longest_measured_seq_len(),
        time=estimate_time(shape, gpu, settings, steps, loop),
        recommendations=recommend(shape, gpu, settings) if loop == "appliance" else [],
    )


def plan_run(cfg: RunConfig, registry: Registry, gpu_name: str | None, steps: int, data_parallel: int = 1) -> FitPlan | None:
    """The plan `appliance train` checks first: against --gpu, else the GPU detected (None on CPU);
    under torchrun for one of `data_parallel` GPUs."""
    registry.model(cfg.model.name or "")  # a run needs the model in the store, not only a profile
    gpu = find_gpu(gpu_name) if gpu_name else detected_gpu()
    if gpu is None:
        return None
    settings = settings_from_config(cfg, gpu.device).model_copy(update={"data_parallel": data_parallel})
    return make_plan(find_model(cfg.model.name or "", registry), gpu, settings, steps)
