"""GPU and model profiles (profiles/gpus, profiles/models), found by loose names; a store model's
shapes from its own config.json; the GPU this machine has, with what others hold of it."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.config import profile_files, read_yaml, user_profiles_dir
from appliance.errors import ApplianceError
from appliance.plan.constants import CUDA_CONTEXT_GIB, DRIVER_KEEPS_GIB, GIB
from appliance.plan.settings import TrainSettings
from appliance.registry import Registry


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the name users type (--gpu, --model)")
    aliases: list[str] = Field(default_factory=list, description="other names that find this profile")


class PublishedRun(BaseModel):
    """A training run on this card that another tool's authors measured and published."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tool: str = Field(description="what ran it, with what matters for speed: 'torchtune 0.3, torch.compile, torchao NF4'")
    source: str = Field(description="where it is published, at a fixed commit or date")
    date: str = Field(description="when it was published, YYYY-MM-DD")
    model: str = Field(description="a model profile name or alias: the shapes measured")
    settings: TrainSettings
    tokens_per_s: float = Field(gt=0, description="trained tokens per second, as published")
    peak_gib: float | None = Field(None, gt=0, description="the peak memory published (that tool's, not ours)")


class GpuProfile(Profile):
    vram_gib: float = Field(gt=0, description="memory on the card, GiB, as the box says")
    usable_gib: float | None = Field(
        None, gt=0, description="what the driver reports (torch total_memory), less than the box says; unset: vram_gib"
    )
    bf16: bool = Field(description="tensor cores compute bf16 (else training computes in fp16)")
    bf16_tflops: float | None = Field(None, gt=0, description="dense bf16 tensor rate with fp32 accumulate, TFLOP/s (no sparsity); unknown: no time estimate")
    bandwidth_gbps: float | None = Field(None, gt=0, description="memory bandwidth, GB/s")
    device: Literal["cuda", "cpu"] = Field("cuda", description="cpu: planning a run in this machine's memory")
    published: list[PublishedRun] = Field(default_factory=list, description="training runs others measured on this card")

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
    """The shipped profiles and the user's own (`user_profiles_dir()`), which replace shipped ones of the same file name."""
    found = []
    for path in profile_files(kind):
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
    """A GPU profile by name or alias ("RTX 3060", "3060", "NVIDIA GeForce RTX 3060"); "cpu" is this machine's memory."""
    if name_key(name) == "cpu":
        return cpu_profile()
    profiles = gpu_profiles()
    found = _match(name, profiles, GPU_WORDS)
    if found is None:
        close = _close_matches(name, profiles, GPU_WORDS)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ApplianceError(
            f"No GPU profile matches {name!r}.",
            f"{hint}use --gpu with one of: {', '.join(p.name for p in profiles)}; for another card give its memory "
            f"(--gpu-memory 24) or add its profile to {user_profiles_dir() / 'gpus'}/NAME.yaml",
        )
    return found


def gpu_with_memory(gib: float) -> GpuProfile:
    """An unlisted card known only by the memory on its box: memory is planned, time is not (its TFLOP/s are unknown)."""
    if not gib > DRIVER_KEEPS_GIB:
        raise ApplianceError(f"--gpu-memory {gib:g} is too small for a GPU.", "give the memory on the card's box in GiB, e.g. --gpu-memory 16")
    # bf16 or fp16 compute changes time, not memory: both are 2 bytes.
    return GpuProfile(name=f"a {gib:g} GiB GPU", vram_gib=gib, usable_gib=round(gib - DRIVER_KEEPS_GIB, 2), bf16=True)


def cpu_profile() -> GpuProfile:
    """This machine's memory, for a run on its CPU: what is free now is what a run can have."""
    import psutil

    memory = psutil.virtual_memory()
    total = memory.total / GIB
    return GpuProfile(
        name="CPU (this machine's memory)",
        vram_gib=round(total, 2),
        bf16=True,
        device="cpu",
        held_gib=round(max(0.0, (memory.total - memory.available) / GIB), 2),
    )


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


def _config_path(name: str) -> Path | None:
    """A Hugging Face folder, or its config.json, given as a path."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path / "config.json"
    if path.suffix == ".json":
        return path
    if path.suffix.lower() == ".gguf" and path.is_file():
        raise ApplianceError(
            f"{path} is a GGUF file: the planner reads a Hugging Face config.json.",
            f"import it first (`appliance models import {path} --name NAME`), then plan NAME",
        )
    return None


def find_model(name: str, registry: Registry | None = None) -> ModelShape:
    """The shapes of a model: a Hugging Face folder or config.json given as a path, a store
    model's own config.json, else a profile."""
    config_path = _config_path(name)
    if config_path is not None:
        if not config_path.is_file():
            raise ApplianceError(f"{config_path} does not exist.", "give a Hugging Face model folder (with config.json) or the path of its config.json")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApplianceError(f"Cannot read {config_path}: {err}.", "give the config.json of a Hugging Face model") from None
        if not isinstance(config, dict):
            raise ApplianceError(f"{config_path} is not a model's config.json (not a JSON object).", "give the config.json of a Hugging Face model")
        label = config_path.parent.name if config_path.name == "config.json" else config_path.stem
        return shape_from_config(label, config.get("text_config", config))
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


