"""Will this fine-tune fit this GPU, how long will it take, and what should change if it does not.

Pure arithmetic over a model's shapes (its own config.json in the store, or a profile in
profiles/models) and a GPU profile (profiles/gpus): nothing is loaded, no GPU is needed.

Memory is modelled part by part for two training loops:
- `appliance`, ours (appliance/train): frozen weights stay 16-bit (linear layers 4-bit),
  and the loss never holds full logits: it computes them 256 MiB at a time, only at
  labelled positions (appliance/metrics/lm.py).
- `peer`, the loop every tutorial writes (transformers + peft + bitsandbytes):
  `prepare_model_for_kbit_training` casts every weight that is not 4-bit (embeddings,
  norms, head) to fp32, which makes the residual stream and the logits fp32 too, and
  transformers' loss holds the full logits, their log-softmax and two gradients of that
  size at once.
A step's peak is the largest of three moments: the loss (logits at their widest), the
backward pass through one block (its activations recomputed, gradients in flight) and the
optimizer step (every gradient). The peak is compared with the memory the driver leaves
usable on the card, which is less than the box says (profiles/gpus `usable_gib`).

Checked against measurements: the peer loop's GPU peaks in bench/results
(tests/test_plan.py), and our loop part by part and moment by moment against the live
tensor bytes of real CPU steps (`appliance bench memory`, bench/results/memory-*.json,
tests/test_memory.py).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from appliance.config import DataSpec, LoraSpec, ModelSpec, RunConfig, Task, TrainSpec, nest, profiles_dir, read_yaml
from appliance.errors import ApplianceError
from appliance.registry import Registry

GIB = 2**30
Loop = Literal["appliance", "peer"]
Optimizer = Literal["paged_adamw_8bit", "adamw_8bit", "adamw"]

# bitsandbytes NF4 stores 4 bits per weight plus one fp32 absmax per block of 64 (0.5 bit per
# weight); double quantization stores those absmax values in 8 bits, with one fp32 constant per
# 256 of them: 8/64 + 32/(64·256) ≈ 0.127 bit per weight.
ABSMAX_BITS = 32 / 64
DOUBLE_QUANT_BITS = 8 / 64 + 32 / (64 * 256)
# AdamW keeps two states per trainable parameter: fp32, or 8-bit with one fp32 absmax per 256.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2 + 2 * 4 / 256, "paged_adamw_8bit": 2 + 2 * 4 / 256}
# Mirrors appliance.metrics.lm.LOGITS_BUDGET_BYTES (that module imports torch; a test keeps them equal).
LOGITS_BUDGET_BYTES = 256 * 2**20
# Outside PyTorch's allocator: the CUDA context, cuBLAS handles, the kernels of torch and bitsandbytes.
CUDA_CONTEXT_GIB = 0.5
# The caching allocator reserves more than it hands out (block rounding, fragmentation).
ALLOCATOR_SLACK = 0.10
SEQ_STEP = 128  # max_seq_len is a multiple of this (or the whole context)
MIN_RANK = 8  # the smallest rank the advice goes down to; vLLM serves 8, 16, 32, 64, ...
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
LINEAR_MODULES = [*ATTENTION_MODULES, *MLP_MODULES]
MLP_TILE_TOKENS = 2048  # the tile the advice suggests: big enough to keep a GPU's matmuls efficient
# Linear layers that read the same input tensor (LoRA keeps that one tensor in a fp32 stream, or with shared inputs).
MODULE_INPUT = {
    "q_proj": "attention input",
    "k_proj": "attention input",
    "v_proj": "attention input",
    "o_proj": "attention output",
    "gate_proj": "mlp input",
    "up_proj": "mlp input",
    "down_proj": "mlp product",
}


# -- profiles -------------------------------------------------------------------------


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the name users type (--gpu, --model)")
    aliases: list[str] = Field(default_factory=list, description="other names that find this profile")


class GpuProfile(Profile):
    vram_gib: float = Field(gt=0, description="memory on the card, GiB, as the box says")
    usable_gib: float | None = Field(
        None, gt=0, description="what the driver reports (torch total_memory), less than the box says; unset: vram_gib"
    )
    bf16: bool = Field(description="tensor cores compute bf16 (else training computes in fp16)")
    bf16_tflops: float | None = Field(None, gt=0, description="dense bf16 tensor rate with fp32 accumulate, TFLOP/s (no sparsity); unknown: no time estimate")
    bandwidth_gbps: float | None = Field(None, gt=0, description="memory bandwidth, GB/s")

    held_gib: float = Field(0.0, ge=0, description="held by other processes now (a desktop, a running server): the detected GPU only")

    @property
    def usable(self) -> float:
        """What a plan compares with: the memory a process can have, less what others hold now."""
        return (self.usable_gib or self.vram_gib) - self.held_gib


class ModelShape(Profile):
    hf_id: str | None = Field(None, description="the Hugging Face repository the shapes come from")
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1, description="width of the SwiGLU MLP")
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1, description="fewer than the attention heads: grouped-query attention")
    head_dim: int | None = Field(None, ge=1, description="set where it is not hidden_size / num_attention_heads")
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = Field(description="the output head reuses the embedding matrix")
    max_position_embeddings: int = Field(ge=1, description="the context length")
    end_of_turn: list[str] = Field(default_factory=list, description="tokens that end an assistant turn")

    @model_validator(mode="after")
    def _groups(self) -> "ModelShape":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self

    @property
    def attention_width(self) -> int:
        return self.num_attention_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, a, kv, i = self.hidden_size, self.attention_width, self.kv_width, self.intermediate_size
        return {
            "q_proj": (h, a),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (a, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def name_key(name: str, drop: tuple[str, ...] = ()) -> str:
    """Names compared loosely: case, punctuation, an `org/` prefix and the words in `drop` do not count."""
    key = re.sub(r"[^a-z0-9]", "", name.lower().rsplit("/", 1)[-1])
    for word in drop:
        key = key.replace(word, "")
    return key


GPU_WORDS = ("nvidia", "geforce")  # "NVIDIA GeForce RTX 3060" (what the driver reports) is "RTX 3060"


def _load_profiles(kind: str, cls: type[Profile]) -> list:
    found = []
    for path in sorted((profiles_dir() / kind).glob("*.yaml")):
        try:
            found.append(cls.model_validate(read_yaml(path, "profile")))
        except ValidationError as err:
            raise ApplianceError(
                f"The profile {path} is invalid:",
                "correct the fields named above",
                details=[f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()],
            ) from None
    return found


def gpu_profiles() -> list[GpuProfile]:
    return _load_profiles("gpus", GpuProfile)


def model_profiles() -> list[ModelShape]:
    return _load_profiles("models", ModelShape)


def _match(name: str, profiles: list, drop: tuple[str, ...] = ()):
    wanted = name_key(name, drop)
    for profile in profiles:
        if wanted in {name_key(n, drop) for n in (profile.name, *profile.aliases)}:
            return profile
    return None


def _close_matches(name: str, profiles: list, drop: tuple[str, ...] = ()) -> list[str]:
    by_key = {name_key(n, drop): p.name for p in profiles for n in (p.name, *p.aliases)}
    close = difflib.get_close_matches(name_key(name, drop), list(by_key), n=6, cutoff=0.5)
    return list(dict.fromkeys(by_key[k] for k in close))[:3]


def find_gpu(name: str) -> GpuProfile:
    """A GPU profile by name or alias ("RTX 3060", "3060", "NVIDIA GeForce RTX 3060")."""
    profiles = gpu_profiles()
    found = _match(name, profiles, GPU_WORDS)
    if found is None:
        close = _close_matches(name, profiles, GPU_WORDS)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ApplianceError(
            f"No GPU profile matches {name!r}.",
            f"{hint}use --gpu with one of: {', '.join(p.name for p in profiles)} "
            "(or add profiles/gpus/NAME.yaml for another card)",
        )
    return found


def detected_gpu() -> GpuProfile | None:
    """The GPU of this machine: its profile, with the memory the driver reports as usable; None on CPU."""
    from appliance.hardware import detect

    hw = detect()
    if hw.device != "cuda":
        return None
    reported = round(hw.memory_gib, 2)  # torch total_memory: already what the driver leaves usable
    # What is in use beyond this process's own context (which the plan counts) belongs to others.
    held = round(max(0.0, (hw.memory_bytes - (hw.free_bytes or hw.memory_bytes)) / GIB - CUDA_CONTEXT_GIB), 2)
    profile = _match(hw.name, gpu_profiles(), GPU_WORDS)
    if profile is None:  # a card without a profile: plan memory, no time estimate
        return GpuProfile(name=hw.name, vram_gib=reported, usable_gib=reported, bf16=hw.bf16, held_gib=held)
    if profile.usable_gib is not None and abs(reported - profile.usable_gib) > 1:  # another memory size under one name
        return profile.model_copy(update={"vram_gib": reported, "usable_gib": reported, "held_gib": held})
    return profile.model_copy(update={"usable_gib": reported, "held_gib": held})


def require_gpu() -> GpuProfile:
    gpu = detected_gpu()
    if gpu is None:
        raise ApplianceError(
            "No GPU is detected on this machine.",
            f"name the card the run is for with --gpu, one of: {', '.join(p.name for p in gpu_profiles())}",
        )
    return gpu


def shape_from_config(name: str, config: dict[str, Any]) -> ModelShape:
    """A store model's shapes from its Hugging Face config.json."""
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            name=name,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim"),
            vocab_size=config["vocab_size"],
            # LLaMA-family configs that leave it out have a separate head.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config["max_position_embeddings"],
        )
    except KeyError as err:
        missing = f"it has no {err.args[0]!r}"
    except ValidationError as err:
        missing = str(err).splitlines()[0]
    raise ApplianceError(
        f"The config.json of {name!r} does not give the shapes the planner needs ({missing}).",
        "plan a model profile of the same family instead (--model with one of: "
        f"{', '.join(p.name for p in model_profiles())})",
    )


def find_model(name: str, registry: Registry | None = None) -> ModelShape:
    """The shapes of a model: a store model's own config.json first, else a profile."""
    registry = registry or Registry()
    if name in registry.store.names("models"):
        config_path = registry.model_dir(name) / "config.json"
        try:
            return shape_from_config(name, json.loads(config_path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            raise ApplianceError(f"Cannot read {config_path}: {err}.", f"import {name!r} again") from None
    profiles = model_profiles()
    found = _match(name, profiles)
    if found is None:
        close = _close_matches(name, profiles) + difflib.get_close_matches(name, registry.store.names("models"), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ApplianceError(
            f"Model {name!r} has no config and no profile: it is not in the store and no profile in "
            "profiles/models has that name.",
            f"{hint}import it (`appliance models import SOURCE --name {name}`) or plan a profile: "
            f"{', '.join(p.name for p in profiles)}",
        )
    return found


# -- the settings a plan depends on -----------------------------------------------------


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
    double_quant: bool = _default(ModelSpec, "double_quant")
    gradient_checkpointing: bool = Field(True, description="model.gradient_checkpointing 'auto' is on for a GPU")
    offload_activations: bool = Field(False, description="keep the checkpointed layer inputs in CPU memory")
    lora_shared_inputs: bool = Field(_default(LoraSpec, "shared_inputs"), description="LoRA keeps the base layer's input, not an fp32 copy")
    mlp_tile_tokens: int | None = Field(None, description="compute each MLP over this many tokens at a time")
    optimizer: Optimizer = Field("paged_adamw_8bit", description="what train.optimizer 'auto' picks on CUDA")
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
    "double_quant": "model.double_quant",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "offload_activations": "model.offload_activations",
    "mlp_tile_tokens": "model.mlp_tile_tokens",
    "optimizer": "train.optimizer",
}


def settings_from_config(cfg: RunConfig) -> TrainSettings:
    values = {}
    for field, path in CONFIG_PATHS.items():
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        values[field] = node
    if values["gradient_checkpointing"] == "auto":
        values["gradient_checkpointing"] = True
    if values["optimizer"] == "auto":
        values["optimizer"] = "paged_adamw_8bit"
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


# -- memory ------------------------------------------------------------------------------


def _stream_bytes(settings: TrainSettings, loop: Loop) -> int:
    """Bytes per element of the residual stream and the activations around it.

    The peer loop's fp32 embeddings make the stream fp32, and bitsandbytes returns each
    4-bit layer's output in its input's dtype, so every activation stays fp32 there.
    """
    return 4 if loop == "peer" and settings.load_in_4bit else 2


def _rows(settings: TrainSettings) -> int:
    """Sequences per micro-batch: a DPO example is a chosen and a rejected answer."""
    return settings.batch_size * (2 if settings.task == "dpo" else 1)


def lora_parameters(shape: ModelShape, settings: TrainSettings) -> int:
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(settings.rank * sum(shapes[m]) for m in lora_targets(settings))


def _linear_parameters(shape: ModelShape) -> int:
    return shape.num_hidden_layers * sum(i * o for i, o in shape.linear_shapes().values())


def _kept_parameters(shape: ModelShape) -> int:
    """Weights that are never quantized: embeddings, the head when untied, the RMSNorms."""
    matrices = 1 if shape.tie_word_embeddings else 2
    return matrices * shape.vocab_size * shape.hidden_size + (2 * shape.num_hidden_layers + 1) * shape.hidden_size


def _lora_kept_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop, modules: list[str]) -> float:
    """Bytes per token LoRA keeps for backward on those of `modules` it adapts."""
    targets = [m for m in lora_targets(settings) if m in modules]
    shapes = shape.linear_shapes()
    a = _stream_bytes(settings, loop)
    if a == 4 or (loop == "appliance" and settings.lora_shared_inputs):
        # Each LoRA matmul keeps the layer's own input tensor, shared by the layers that read it
        # (a fp32 stream needs no cast; appliance.train.lora keeps a 16-bit input uncast).
        kept = a * sum({MODULE_INPUT[m]: shapes[m][0] for m in targets}.values())
    else:
        # bf16 stream: peft casts the input to the adapter's fp32 once per adapted layer, and keeps each copy.
        kept = 4 * sum(shapes[m][0] for m in targets)
    return kept + 4 * settings.rank * len(targets)  # lora_A outputs, for lora_B's weight gradient


def mlp_activation_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop) -> float:
    """Bytes per token one MLP keeps for backward: gate, up and silu(gate) (the SwiGLU
    product's inputs), and LoRA's."""
    return 3 * _stream_bytes(settings, loop) * shape.intermediate_size + _lora_kept_bytes(shape, settings, loop, MLP_MODULES)


def layer_activation_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop) -> float:
    """Bytes per token one decoder layer keeps for its backward pass (with LoRA on its targets).

    Frozen base matmuls keep nothing (no weight gradient), so what stays is the elementwise
    work around them and LoRA's inputs.
    """
    a, h = _stream_bytes(settings, loop), shape.hidden_size
    kept = 2 * 4 * h  # each RMSNorm keeps its input upcast to fp32
    # SDPA keeps q after RoPE, k and v, its output and an fp32 log-sum-exp per head. transformers
    # repeats k and v to every head when SDPA gets a mask; without one our bf16 SDPA reads them
    # grouped (enable_gqa).
    kv = shape.kv_width if loop == "appliance" and not packed_mask(settings) else shape.attention_width
    kept += a * (shape.attention_width + 2 * kv) + 4 * shape.num_attention_heads
    # Its output is o_proj's input: LoRA with shared inputs keeps that very storage (flash and
    # memory-efficient kernels write it token-major, so no copy is made; measured).
    if not (loop == "appliance" and settings.lora_shared_inputs and "o_proj" in lora_targets(settings)):
        kept += a * shape.attention_width
    kept += _lora_kept_bytes(shape, settings, loop, ATTENTION_MODULES)
    return kept + mlp_activation_bytes(shape, settings, loop)


def _dequantized_bytes(shape: ModelShape, settings: TrainSettings, modules: list[str]) -> float:
    """bitsandbytes dequantizes a 4-bit layer's weight to bf16 for each matmul: the widest of `modules`."""
    if not settings.load_in_4bit:
        return 0.0
    return 2 * max(i * o for m, (i, o) in shape.linear_shapes().items() if m in modules)


def _mlp_backward(shape: ModelShape, settings: TrainSettings, loop: Loop, tokens: int) -> float:
    """Bytes of the MLP's gradients in flight over `tokens`, the widest part of a layer's backward.

    Ours (measured, bench/results/memory-*): down_proj's input gradient comes from two branches
    the autograd engine runs one after the other: LoRA's (an fp32 gradient and its cast to the
    stream's dtype), then the base layer's (its gradient beside LoRA's, and the weight
    dequantized for the matmul), by which time LoRA's backward has freed the input it kept.
    The peer's: the fp32 gradient of LoRA's input copy and two of the stream's, with a
    dequantized weight.
    """
    a, i = _stream_bytes(settings, loop), shape.intermediate_size
    if loop == "peer":
        return tokens * (4 + 2 * a) * i + _dequantized_bytes(shape, settings, LINEAR_MODULES)
    dequantized = _dequantized_bytes(shape, settings, MLP_MODULES)
    if "down_proj" not in lora_targets(settings):
        return tokens * a * i + dequantized
    lora_branch = tokens * (4 + a) * i
    kept_input = (a if settings.lora_shared_inputs else 4) * i  # what LoRA kept of down_proj's input, per token
    base_branch = tokens * (2 * a * i - kept_input) + dequantized
    return max(lora_branch, base_branch)


def _attention_backward(shape: ModelShape, settings: TrainSettings, loop: Loop, tokens: int) -> float:
    """Bytes of attention's gradients in flight: q, k and v (k and v repeated to every head) and
    the fp32 gradient of LoRA's input copy, with a dequantized weight. Narrower than the MLP's,
    so it sets the peak only once the MLP is tiled."""
    per_token = 3 * _stream_bytes(settings, loop) * shape.attention_width + 4 * shape.hidden_size
    return tokens * per_token + _dequantized_bytes(shape, settings, ATTENTION_MODULES)


def _residual_backward_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop) -> float:
    return (_stream_bytes(settings, loop) + 4) * shape.hidden_size


def packed_mask(settings: TrainSettings) -> bool:
    """Whether transformers materialises the (rows, 1, W, W) mask: rows packed with several examples
    or padded (appliance.data.batches.collate_lm restarts position ids there), which happens as soon
    as a micro-batch's examples differ in length. One example per row, all full, needs none."""
    if settings.packed is not None:
        return settings.packed
    return _rows(settings) > 1 and settings.task != "cpt"


def _tiled(settings: TrainSettings) -> bool:
    """Whether the MLP runs in more than one tile (a shorter micro-batch is one tile: untiled)."""
    return settings.mlp_tile_tokens is not None and settings.mlp_tile_tokens < _rows(settings) * settings.seq_len


def chunk_rows(vocab_size: int) -> int:
    """Positions whose logits the appliance's loss holds at once (appliance.metrics.lm.chunk_rows)."""
    return max(64, LOGITS_BUDGET_BYTES // (4 * vocab_size))


class Part(BaseModel):
    gib: float
    what: str
    allocated: bool = Field(True, description="handed out by PyTorch's allocator (what torch.cuda.max_memory_allocated() counts)")


class Estimate(BaseModel):
    """Peak GPU memory of one training step, by part."""

    model: str
    gpu: str
    loop: Loop
    settings: TrainSettings
    parts: dict[str, Part]
    peak_moment: Literal["loss", "backward", "optimizer"] = Field(description="when the peak happens: at the loss, in a block's backward, or at the optimizer step")
    moments: dict[str, dict[str, float]] = Field(
        description="what PyTorch allocates at each moment (loss, backward, optimizer), GiB by part; the peak moment's are `parts`"
    )
    gpu_gib: float = Field(description="the memory the plan compares with: what the driver reports usable, less what others hold")
    nominal_gib: float = Field(description="the memory on the box")
    held_gib: float = Field(0.0, description="held by other processes when planned (the detected GPU)")

    @computed_field
    @property
    def total_gib(self) -> float:
        return sum(p.gib for p in self.parts.values())

    @computed_field
    @property
    def allocated_gib(self) -> float:
        """What torch.cuda.max_memory_allocated() reports: the total without the context, the slack and paged states."""
        return sum(p.gib for p in self.parts.values() if p.allocated)

    @computed_field
    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_gib


def estimate(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, loop: Loop = "appliance") -> Estimate:
    """Peak memory of a training step of `shape` with `settings` on `gpu`.

    Three moments are modelled, each with what is alive then: the loss (the model's forward
    done, the logits at their widest), the backward of the top block (one block recomputed, its
    gradients in flight) and the optimizer step (every gradient). The peak is the largest.
    """
    check_settings(shape, settings)
    s, a = settings, _stream_bytes(settings, loop)
    h, layers = shape.hidden_size, shape.num_hidden_layers
    tokens = _rows(s) * s.seq_len
    static: dict[str, Part] = {}

    linear = _linear_parameters(shape)
    if s.load_in_4bit:
        bits = 4 + (DOUBLE_QUANT_BITS if s.double_quant else ABSMAX_BITS)
        quant = "double-quantized constants" if s.double_quant else "fp32 constants"
        static["linear_weights"] = Part(gib=linear * bits / 8 / GIB, what=f"linear layers in 4-bit NF4 + {quant}")
    else:
        static["linear_weights"] = Part(gib=2 * linear / GIB, what="linear layers in 16-bit")
    kept_dtype = "fp32 (prepare_model_for_kbit_training casts them)" if a == 4 else "bf16"
    head = "" if shape.tie_word_embeddings else ", head"
    static["kept_weights"] = Part(gib=a * _kept_parameters(shape) / GIB, what=f"embeddings{head}, norms in {kept_dtype}")

    adapters = lora_parameters(shape, s)
    targets = lora_targets(s)
    static["lora_weights"] = Part(
        gib=4 * adapters / GIB, what=f"LoRA r{s.rank} on {len(targets)} linear layers in each of {layers} blocks, fp32 ({adapters / 1e6:.1f} M parameters)"
    )
    states = OPTIMIZER_STATE_BYTES[s.optimizer] * adapters / GIB
    if s.optimizer == "paged_adamw_8bit":
        # bitsandbytes allocates paged states in CUDA unified memory, outside PyTorch's allocator
        # (max_memory_allocated never counts them). They sit in GPU memory while it has room: the
        # driver moves pages to CPU memory only under pressure, and not at all under WSL2. So they
        # count against the card, not in what PyTorch reports.
        static["optimizer_states"] = Part(
            gib=states, allocated=False, what="paged 8-bit AdamW: in GPU memory while it fits, outside PyTorch's allocator"
        )
    else:
        kind = "8-bit" if s.optimizer == "adamw_8bit" else "fp32"
        static["optimizer_states"] = Part(gib=states, what=f"AdamW, two {kind} states per LoRA parameter")

    # Gradients are set to None after each optimizer step: with one micro-batch per step none
    # exist at the loss, and backward creates them block by block from the top.
    grads = 4 * adapters
    accumulating = s.grad_accum > 1
    grads_what = "their gradients, fp32"

    mask, mask_in_backward = 0.0, 0.0
    if packed_mask(s):
        # transformers' SDPA path builds one (rows, 1, W, W) bool mask per forward (kept to the end
        # of backward); each attention call turns it into an additive mask in the compute dtype,
        # which SDPA keeps for its backward: one more, in the recomputed block (measured).
        mask, mask_in_backward = _rows(s) * s.seq_len**2, a * _rows(s) * s.seq_len**2
    mask_what = f"the packed-sequence mask transformers builds, {_rows(s)} × {s.seq_len}² bool"

    # What a block keeps for all its tokens, and what its backward holds beyond that.
    block = tokens * layer_activation_bytes(shape, s, loop)
    transient = tokens * _residual_backward_bytes(shape, s, loop)
    if _tiled(s):
        # The tiled MLP keeps only its input; one tile at a time is recomputed and backpropagated.
        block += tokens * (a * h - mlp_activation_bytes(shape, s, loop))
        mlp_tile = s.mlp_tile_tokens * mlp_activation_bytes(shape, s, loop) + _mlp_backward(shape, s, loop, s.mlp_tile_tokens)
        transient += max(mlp_tile, _attention_backward(shape, s, loop, tokens))
        mlp_what = f", MLPs {s.mlp_tile_tokens} tokens at a time"
    else:
        transient += _mlp_backward(shape, s, loop, tokens)
        mlp_what = ""
    if s.gradient_checkpointing:
        stored, stored_what = tokens * a * h * layers, f"each block's input, kept for the recompute ({layers} × {tokens} tokens × {h})"
        in_backward, backward_what = block + transient, f"one block recomputed in backward{mlp_what}"
        if s.offload_activations:
            stored, stored_what = 0.0, f"block inputs offloaded to CPU memory ({tokens * a * h * layers / GIB:.2f} GiB there)"
            in_backward += tokens * a * h  # the recomputed block's input, brought back
            backward_what += " from its input brought back"
    else:
        stored, stored_what = layers * block, f"all {layers} blocks' activations{mlp_what}"
        in_backward, backward_what = transient, "none recomputed"

    loss, held_logits, loss_what = _loss_bytes(shape, s, loop, tokens, a)
    # The backward's widest moment: at the top block (every stored input, one block's gradients),
    # or, when a block's gradients outweigh its stored input, at the bottom one (every gradient).
    top = stored + grads / layers
    bottom = stored / layers + grads
    at_top = accumulating or top >= bottom
    backward_grads = grads if accumulating or not at_top else grads / layers
    backward_stored = stored if at_top else stored / layers

    def moment_parts(moment: str) -> dict[str, Part]:
        parts = dict(static)
        if moment == "loss":
            parts["lora_gradients"] = Part(gib=grads / GIB if accumulating else 0.0, what=grads_what + (
                ", from the micro-batches before" if accumulating else ": none yet (set to None after each step)"))
            parts["packed_mask"] = Part(gib=mask / GIB, what=mask_what)
            parts["activations"] = Part(gib=stored / GIB, what=stored_what)
            parts["logits_and_loss"] = Part(gib=loss / GIB, what=loss_what)
        elif moment == "backward":
            where = "" if accumulating else (": the top block's" if at_top else ": all, at the bottom block")
            parts["lora_gradients"] = Part(gib=backward_grads / GIB, what=grads_what + where)
            parts["packed_mask"] = Part(gib=(mask + mask_in_backward) / GIB, what=mask_what + ", and its additive copy in the recomputed block")
            parts["activations"] = Part(gib=(backward_stored + in_backward) / GIB, what=f"{stored_what}; {backward_what}, gradients in flight")
            freed = f"{loss_what}: {loss / GIB:.2f} GiB at the loss, freed before"
            parts["logits_and_loss"] = Part(gib=held_logits / GIB, what="the logits, still held by the model's output" if held_logits else freed)
        else:
            parts["lora_gradients"] = Part(gib=grads / GIB, what=grads_what + ": all of them")
            parts["packed_mask"] = Part(gib=0.0, what="freed with the step's activations")
            # With checkpointing, transformers makes the embeddings' output require a gradient (the
            # recomputed blocks need an input that does); the graph keeps it and its gradient to the
            # step's end (measured).
            leaf = 2 * tokens * a * h if s.gradient_checkpointing else 0.0
            parts["activations"] = Part(gib=leaf / GIB, what="the embeddings' output and its gradient" if leaf else "freed after backward")
            parts["logits_and_loss"] = Part(gib=0.0, what="freed after backward")
        if not packed_mask(s):
            del parts["packed_mask"]
        return parts

    moments = {m: moment_parts(m) for m in ("loss", "backward", "optimizer")}
    allocated = {m: sum(p.gib for p in parts.values() if p.allocated) for m, parts in moments.items()}
    moment = max(allocated, key=allocated.get)
    parts = dict(moments[moment])
    parts["cuda_context"] = Part(gib=CUDA_CONTEXT_GIB, allocated=False, what="CUDA context and kernels, outside PyTorch's allocator")
    parts["allocator_slack"] = Part(
        gib=ALLOCATOR_SLACK * allocated[moment], allocated=False, what=f"allocator slack: reserved, unused blocks ({ALLOCATOR_SLACK:.0%})"
    )
    return Estimate(
        model=shape.name,
        gpu=gpu.name,
        loop=loop,
        settings=s,
        parts=parts,
        peak_moment=moment,
        moments={m: {name: p.gib for name, p in ps.items() if p.allocated} for m, ps in moments.items()},
        gpu_gib=gpu.usable,
        nominal_gib=gpu.vram_gib,
        held_gib=gpu.held_gib,
    )


def _loss_bytes(shape: ModelShape, s: TrainSettings, loop: Loop, tokens: int, a: int) -> tuple[float, float, str]:
    """(bytes at the loss, logits bytes still held during backward, what they are)."""
    h, vocab = shape.hidden_size, shape.vocab_size
    if s.task == "classify":
        return 0.0, 0.0, "a classification head: a few logits per example"
    if loop == "peer":
        # The output keeps the logits (in the head's dtype); cross-entropy's backward holds the
        # fp32 log-softmax, its gradient and the logits' gradient at once. Plus the final norm's tensors.
        loss = tokens * vocab * (a + 3 * 4) + tokens * (4 + a) * h
        return loss, tokens * vocab * a, f"full logits, {tokens} × {vocab}: the logits, their log-softmax and two gradients"
    rows = min(tokens, chunk_rows(vocab))
    # fp32 logits of a chunk, their shifted copy and the softmax. The loop of
    # appliance.metrics.lm keeps the softmax of one chunk until the next chunk's replaces it,
    # so from the second chunk on, the previous chunk's is alive beside the three (measured).
    second = min(rows, tokens - rows)
    chunks = 4 * vocab * max(3 * rows, rows + 3 * second)
    # The final hidden states, the norm's fp32 input, the labelled rows and their gradient.
    loss = chunks + 10 * tokens * h
    return loss, 0.0, f"logits of {rows} positions at a time, never the full {tokens} × {vocab}"


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in 1..high with fits(n), 0 if none (memory only grows with n)."""
    if fits(high):
        return high
    low = 0  # fits(low) or low == 0; not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _with(settings: TrainSettings, **changes: Any) -> TrainSettings:
    return TrainSettings.model_validate({**settings.model_dump(), **changes})


def max_seq_len(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, loop: Loop = "appliance") -> int:
    """The longest sequence that fits: the whole context, else a multiple of SEQ_STEP (0: none)."""
    context = shape.max_position_embeddings
    if estimate(shape, gpu, _with(settings, seq_len=context), loop).fits:
        return context
    steps = _largest(lambda n: estimate(shape, gpu, _with(settings, seq_len=n * SEQ_STEP), loop).fits, context // SEQ_STEP)
    return steps * SEQ_STEP


def max_batch_size(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, loop: Loop = "appliance", limit: int = 1024) -> int:
    """The largest micro-batch that fits at the settings' sequence length (0: not even one)."""
    return _largest(lambda b: estimate(shape, gpu, _with(settings, batch_size=b), loop).fits, limit)


# -- advice ------------------------------------------------------------------------------


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
    offload = s.gradient_checkpointing and not s.offload_activations
    tile = s.mlp_tile_tokens is None and _tiled(_with(s, mlp_tile_tokens=MLP_TILE_TOKENS))
    offload_what = "offload the checkpointed block inputs to CPU memory (a copy each way per layer)"
    tile_what = f"compute the MLPs {MLP_TILE_TOKENS} tokens at a time (one more MLP forward)"
    if offload:
        out.append((offload_what, {"offload_activations": True}))
    if tile:
        out.append((tile_what, {"mlp_tile_tokens": MLP_TILE_TOKENS}))
    if offload and tile:
        out.append((f"both: {offload_what}, and {tile_what}", {"offload_activations": True, "mlp_tile_tokens": MLP_TILE_TOKENS}))
    if s.optimizer != "paged_adamw_8bit":
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


REPO_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"  # where `--save` writes
WHEEL_RESULTS = Path(__file__).resolve().parent / "bench_results"  # the same files, packed into the wheel


def results_dir() -> Path | None:
    """Saved measurements: inside the installed wheel, else the repository's bench/results."""
    for candidate in (WHEEL_RESULTS, REPO_RESULTS):
        if candidate.is_dir():
            return candidate
    return None


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


def save_result(kind: str, payload: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]] = (), folder: Path | None = None) -> Path:
    """bench/results/<kind>-<gpu|cpu>-<time>.json: the machine (hardware.describe()), a benchmark's output,
    and the measurements `load_measurements` will read from it."""
    import datetime as dt

    from appliance.store import atomic_write_json

    folder = folder or REPO_RESULTS
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = "gpu" if env["gpu"] else "cpu"
    return atomic_write_json(folder / f"{kind}-{device}-{stamp}.json", {**env, kind: payload, "measurements": list(records)})


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


# -- the whole plan --------------------------------------------------------------------------


class FitPlan(BaseModel):
    """Everything `appliance plan` shows."""

    estimate: Estimate
    max_seq_len: int
    max_batch_size: int
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
            "allocated_gib": round(e.allocated_gib, 3),
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
        time=estimate_time(shape, gpu, settings, steps, loop),
        recommendations=recommend(shape, gpu, settings) if loop == "appliance" else [],
    )


def plan_run(cfg: RunConfig, registry: Registry, gpu_name: str | None, steps: int) -> FitPlan | None:
    """The plan `appliance train` checks first: against --gpu, else the GPU detected (None on CPU)."""
    registry.model(cfg.model.name or "")  # a run needs the model in the store, not only a profile
    gpu = find_gpu(gpu_name) if gpu_name else detected_gpu()
    if gpu is None:
        return None
    return make_plan(find_model(cfg.model.name or "", registry), gpu, settings_from_config(cfg), steps)
