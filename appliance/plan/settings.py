"""What a training step's memory and time depend on: a flat, typed subset of RunConfig."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.config import DataSpec, LoraSpec, ModelSpec, RunConfig, Task, TrainSpec
from appliance.errors import ApplianceError
from appliance.plan.constants import LINEAR_MODULES, Optimizer

if TYPE_CHECKING:  # profiles types its published runs with TrainSettings
    from appliance.plan.profiles import ModelShape


def _default(spec: type[BaseModel], field: str) -> Any:
    """The planner's defaults are the run configuration's."""
    return spec.model_fields[field].default


class TrainSettings(BaseModel):
    """What a training step's memory and time depend on: a flat subset of RunConfig."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task = "sft"
    seq_len: int = Field(_default(DataSpec, "seq_len"), description="tokens per row (packed rows are this wide)")
    batch_size: int = Field(_default(TrainSpec, "batch_size"), description="examples per micro-batch")
    grad_accum: int = Field(_default(TrainSpec, "grad_accum"), description="micro-batches per optimizer step")
    rank: int = Field(_default(LoraSpec, "rank"), description="LoRA rank")
    target_modules: list[str] | Literal["all-linear"] = Field(_default(LoraSpec, "target_modules"))
    load_in_4bit: bool = _default(ModelSpec, "load_in_4bit")
    quant_type: Literal["nf4", "fp4"] = Field(_default(ModelSpec, "quant_type"), description="4-bit data type (the same memory either way)")
    double_quant: bool = _default(ModelSpec, "double_quant")
    gradient_checkpointing: bool = Field(True, description="model.gradient_checkpointing 'auto' is on for a GPU")
    offload_activations: bool = Field(False, description="keep the checkpointed layer inputs in CPU memory")
    lora_shared_inputs: bool = Field(_default(LoraSpec, "shared_inputs"), description="LoRA keeps the base layer's input, not an fp32 copy")
    mlp_tile_tokens: int | None = Field(None, description="compute each MLP over this many tokens at a time")
    optimizer: Optimizer = Field("paged_adamw_8bit", description="what train.optimizer 'auto' picks on CUDA")
    group_size: int | None = Field(None, ge=2, description="grpo: answers sampled per prompt (each a sequence in the step)")
    data_parallel: int = Field(1, ge=1, description="torchrun ranks, a GPU each; each holds the whole 4-bit base (DDP), batch_size is per rank")
    fsdp: bool = Field(False, description="with data_parallel > 1: the decoder layers' frozen weights sharded between the GPUs (FSDP2)")
    packed: bool | None = Field(
        None,
        description="rows hold several examples or end in padding, so transformers builds a (rows, 1, W, W) attention mask; "
        "None: whenever a micro-batch has several rows (examples differ in length), except cpt's full blocks",
    )


# TrainSettings field → where RunConfig keeps it (fields absent here cannot be set in a run yet).
CONFIG_PATHS = {
    "task": "task",
    "seq_len": "data.seq_len",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "rank": "lora.rank",
    "target_modules": "lora.target_modules",
    "lora_shared_inputs": "lora.shared_inputs",
    "load_in_4bit": "model.load_in_4bit",
    "quant_type": "model.quant_type",
    "double_quant": "model.double_quant",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "offload_activations": "model.offload_activations",
    "mlp_tile_tokens": "model.mlp_tile_tokens",
    "optimizer": "train.optimizer",
    "fsdp": "train.fsdp",
}


def settings_from_config(cfg: RunConfig, device: str = "cuda") -> TrainSettings:
    """The settings a run of `cfg` trains with on `device`: 'auto' resolved as the training loop resolves it."""
    values = {}
    for field, path in CONFIG_PATHS.items():
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        values[field] = node
    if values["gradient_checkpointing"] == "auto":
        # On CPU the loop keeps activations unless they would take a large share of the RAM
        # (appliance.train.model.checkpointing_for); the plan's advice says when to turn it on.
        values["gradient_checkpointing"] = device == "cuda"
    if values["optimizer"] == "auto":
        values["optimizer"] = "paged_adamw_8bit" if device == "cuda" else "adamw"
    if cfg.grpo is not None:
        values["group_size"] = cfg.grpo.group_size
    if cfg.lora.dropout > 0:  # dropout's mask would have to be kept: peft's own forward runs (appliance.train.lora)
        values["lora_shared_inputs"] = False
    return TrainSettings(**values)


def lora_targets(settings: TrainSettings) -> list[str]:
    return LINEAR_MODULES if settings.target_modules == "all-linear" else list(settings.target_modules)


def check_settings(shape: ModelShape, settings: TrainSettings) -> None:
    """Every impossible number at once, each with what would be possible."""
    problems, fixes = [], []
    if settings.seq_len > shape.max_position_embeddings:
        problems.append(f"  seq_len {settings.seq_len} is longer than the context of {shape.name} ({shape.max_position_embeddings} tokens)")
        fixes.append(f"--seq-len {shape.max_position_embeddings} or less")
    for field, least, fix in (
        ("seq_len", 1, "--seq-len 128 or more"),
        ("rank", 1, "--rank 8, 16 or more"),
        ("batch_size", 1, "--batch-size 1 or more"),
        ("grad_accum", 1, "train.grad_accum 1 or more"),
    ):
        value = getattr(settings, field)
        if value < least:
            problems.append(f"  {field} {value}: it must be at least {least}")
            fixes.append(fix)
    unknown = sorted(set(lora_targets(settings)) - set(LINEAR_MODULES))
    if unknown:
        problems.append(f"  target_modules {', '.join(unknown)}: the planner knows {', '.join(LINEAR_MODULES)}")
        fixes.append("lora.target_modules all-linear or a list of those names")
    if settings.offload_activations and not settings.gradient_checkpointing:
        problems.append("  offload_activations without gradient checkpointing: only checkpointed layer inputs are offloaded")
        fixes.append("turn gradient checkpointing on")
    if problems:
        raise ApplianceError("These settings cannot be trained:", "; ".join(fixes), details=problems)


