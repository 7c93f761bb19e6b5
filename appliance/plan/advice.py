"""What to change when a run does not fit, in order of cost to quality, each with its new total."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from appliance.plan.constants import ATTENTION_MODULES, MIN_RANK, MLP_TILE_TOKENS, SEQ_STEP
from appliance.plan.memory import _tiled, _with, estimate, max_batch_size, max_seq_len
from appliance.plan.profiles import GpuProfile, ModelShape
from appliance.plan.settings import CONFIG_PATHS, TrainSettings, lora_targets


class Change(BaseModel):
    field: str = Field(description="the TrainSettings field")
    value: Any

    @property
    def config_path(self) -> str | None:
        """Where RunConfig keeps the field; None where a run cannot set it yet."""
        return CONFIG_PATHS.get(self.field)


class Recommendation(BaseModel):
    description: str
    changes: list[Change]
    total_gib: float
    fits: bool

    @property
    def applies_to_config(self) -> bool:
        return all(c.config_path for c in self.changes)

    def config_changes(self) -> dict[str, Any]:
        """The changes as dotted config paths (for RunConfig.with_changes)."""
        missing = [c.field for c in self.changes if c.config_path is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} has no place in a run's configuration")
        return {c.config_path: c.value for c in self.changes}


def _candidates(shape: ModelShape, gpu: GpuProfile, s: TrainSettings) -> list[tuple[str, dict[str, Any]]]:
    """Single changes that lower memory, in order of cost to quality (the issue's order)."""
    out: list[tuple[str, dict[str, Any]]] = []
    longest = max_seq_len(shape, gpu, s) or min(SEQ_STEP, s.seq_len)
    if longest < s.seq_len:
        out.append((f"sequences of at most {longest} tokens (longer examples are dropped or cut)", {"seq_len": longest}))
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing: recompute activations in backward (~30 % slower)", {"gradient_checkpointing": True}))
    if s.batch_size > 1:
        total = s.batch_size * s.grad_accum
        limit = max(1, min(max_batch_size(shape, gpu, s), s.batch_size - 1))
        batch = max(d for d in range(1, limit + 1) if total % d == 0)  # keep the examples per step
        accum = total // batch
        out.append(
            (
                f"micro-batch {batch} with {accum} accumulation steps ({batch * accum} examples per step, was {s.batch_size * s.grad_accum})",
                {"batch_size": batch, "grad_accum": accum},
            )
        )
    if not s.load_in_4bit:
        out.append(("load the base in 4-bit (QLoRA) instead of 16-bit", {"load_in_4bit": True}))
    if s.rank > MIN_RANK:
        ranks = [r for r in (s.rank // 2, s.rank // 4, s.rank // 8) if r >= MIN_RANK] or [MIN_RANK]
        fitting = [r for r in ranks if estimate(shape, gpu, _with(s, rank=r)).fits]
        rank = fitting[0] if fitting else ranks[-1]
        out.append((f"LoRA rank {rank} (learns less than {s.rank})", {"rank": rank}))
    if set(lora_targets(s)) - set(ATTENTION_MODULES):
        out.append(("LoRA on the attention layers only (q, k, v, o): learns less", {"target_modules": ATTENTION_MODULES}))
    offload = s.gradient_checkpointing and not s.offload_activations and gpu.device == "cuda"  # on CPU they are in RAM already
    tile = s.mlp_tile_tokens is None and _tiled(_with(s, mlp_tile_tokens=MLP_TILE_TOKENS))
    offload_what = "offload the checkpointed block inputs to CPU memory (a copy each way per layer)"
    tile_what = f"compute the MLPs {MLP_TILE_TOKENS} tokens at a time (one more MLP forward)"
    if offload:
        out.append((offload_what, {"offload_activations": True}))
    if tile:
        out.append((tile_what, {"mlp_tile_tokens": MLP_TILE_TOKENS}))
    if offload and tile:
        out.append((f"both: {offload_what}, and {tile_what}", {"offload_activations": True, "mlp_tile_tokens": MLP_TILE_TOKENS}))
    if s.optimizer != "paged_adamw_8bit" and gpu.device == "cuda":  # bitsandbytes' paged states need CUDA
        out.append(("paged 8-bit AdamW: a quarter of fp32 AdamW's states, in pages that can move to CPU memory", {"optimizer": "paged_adamw_8bit"}))
    return out


def recommend(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings) -> list[Recommendation]:
    """What to change when a run does not fit, each change alone with its new total."""
    if estimate(shape, gpu, settings).fits:
        return []
    out = []
    for description, changes in _candidates(shape, gpu, settings):
        after = estimate(shape, gpu, _with(settings, **changes))
        out.append(
            Recommendation(
                description=description,
                changes=[Change(field=k, value=v) for k, v in changes.items()],
                total_gib=after.total_gib,
                fits=after.fits,
            )
        )
    return out


