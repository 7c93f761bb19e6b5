"""Typed configuration: every spec a run needs, validated once at the CLI edge.

Precedence: recipe YAML < `--config FILE` < `--set a.b=c` < flags. The merged
dict is validated by pydantic once; steps receive `RunConfig`, never dicts.
Every error names the field and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.errors import ApplianceError


def profiles_dir() -> Path:
    """Shipped YAML profiles: inside the installed wheel, else the repository's top level."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "profiles", here.parent / "profiles"):
        if candidate.is_dir():
            return candidate
    raise ApplianceError("The profiles folder is missing from this installation.", "reinstall appliance")


def user_profiles_dir() -> Path:
    """Profiles of the user's own (gpus/, models/, recipes/): $APPLIANCE_PROFILES, else the user's config folder.

    They sit outside the installed package so that an upgrade keeps them; one with the file
    name of a shipped profile replaces it.
    """
    import os

    env = os.environ.get("APPLIANCE_PROFILES")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("appliance")) / "profiles"


def profile_files(kind: str) -> list[Path]:
    """The YAML profiles of one kind (gpus, models, recipes): the user's, then the shipped ones they do not replace."""
    found: dict[str, Path] = {}
    for folder in (user_profiles_dir() / kind, profiles_dir() / kind):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return list(found.values())


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Task = Literal["sft", "cpt", "dpo", "kto", "grpo", "classify"]
GENERATION_TASKS = ("sft", "cpt", "dpo", "kto", "grpo")  # adapters of a causal LM: served by vLLM, exported to GGUF


def sequences_per_example(task: str, group_size: int | None = None) -> int:
    """A DPO example is a chosen and a rejected answer; a KTO example its answer and a mismatched one (the KL
    estimate); a GRPO prompt its group of sampled answers."""
    if task == "grpo":
        return group_size or GrpoSpec.model_fields["group_size"].default
    return 2 if task in ("dpo", "kto") else 1


class ModelSpec(Spec):
    name: str | None = Field(None, description="model name in the store (`appliance models list`)")
    load_in_4bit: bool = Field(True, description="QLoRA: NF4 base weights; false trains LoRA on 16-bit weights")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 suits normally distributed weights")
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 where the device computes it natively, else float32 (fp16 on old GPUs)"
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute activations in backward: less memory, ~30 % more time. auto: on for a GPU; "
        "on CPU only when a batch's activations would take over a quarter of the free RAM",
    )
    offload_activations: bool = Field(
        False,
        description="keep the inputs gradient checkpointing saves in CPU memory, not on the GPU: frees "
        "layers × tokens × hidden of GPU memory for a copy each way per layer (no effect on CPU)",
    )
    mlp_tile_tokens: int | None = Field(
        None,
        ge=64,
        description="compute each MLP over at most this many tokens at a time and recompute it tile by tile "
        "in backward: caps the MLP's memory for long sequences, for one more MLP forward",
    )
    allow_remote_code: bool = Field(False, description="accept a model whose config.json names custom code (auto_map)")

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> "ModelSpec":
        if self.offload_activations and self.gradient_checkpointing is False:
            raise ValueError("offload_activations moves what gradient checkpointing saves: set gradient_checkpointing to auto or true")
        return self


class LoraSpec(Spec):
    rank: int = Field(16, ge=1, le=512, description="adapter rank r; higher learns more and costs memory")
    alpha: float = Field(32, gt=0, description="scaling numerator: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input (regularisation)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' or module names such as [q_proj, v_proj]"
    )
    shared_inputs: bool = Field(
        True,
        description="keep each adapted layer's input for backward as the base layer reads it (shared by q, k and v), "
        "not as an fp32 copy per layer: same gradients, less memory (plain LoRA without dropout; false: peft's own forward)",
    )
    layers: str | None = Field(
        None,
        description="adapters only on these layers: 'top:8', 'bottom:4', '0-11', '3,5,7', or 're:PATTERN' over module names",
    )
    use_dora: bool = Field(False, description="DoRA: a learned magnitude per output row beside LoRA's direction (merged before serving: vLLM has no DoRA)")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank, so high ranks keep learning")
    init: Literal["default", "gaussian", "loftq", "pissa", "olora"] = Field(
        "default",
        description="how LoRA starts: default (B = 0: the base itself), gaussian, loftq (4-bit: what quantization lost, base unchanged), "
        "pissa or olora (16-bit bases: the base's principal directions; saved converted to a plain LoRA of twice the rank)",
    )


class DataSource(Spec):
    path: Path
    weight: float | None = Field(
        None, ge=0, description="sampling weight for mix strategies proportional and temperature (concat and equal refuse it); unset: 1"
    )


class MixSpec(Spec):
    strategy: Literal["concat", "equal", "proportional", "temperature"] = Field(
        "concat",
        description="concat: every example once per epoch; equal: each file alike; proportional: by size × weight; "
        "temperature: probability ∝ size^(1/T)",
    )
    temperature: float = Field(2.0, gt=0, description="T for the temperature strategy (1 = proportional, ∞ = equal)")


class ReplaySpec(Spec):
    path: Path = Field(description="general data mixed back in against forgetting")
    fraction: float = Field(gt=0, lt=1, description="share of each micro-batch drawn from the replay file")


class DataSpec(Spec):
    files: list[DataSource] = Field(default_factory=list, description="training data files (JSONL, or .txt for cpt)")
    mix: MixSpec = Field(default_factory=MixSpec, description="how several files are sampled")
    replay: ReplaySpec | None = Field(None, description="general data replayed against forgetting")
    val: float = Field(0.1, ge=0, description="validation split: a fraction (< 1) or a count of examples")
    test: float = Field(0.0, ge=0, description="test split held out from training and early stopping; fraction or count")
    val_file: Path | None = Field(None, description="a separate validation file (replaces the split)")
    seq_len: int = Field(1024, ge=16, le=1_048_576, description="longest example in tokens")
    overlong: Literal["drop", "truncate"] = Field("drop", description="examples over seq_len: drop them or cut them")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="a format's key → the column or key your files use for it, e.g. {prompt: question, completion: answer}",
    )
    train_on_prompt: bool = Field(
        False,
        description="chat data: loss on every token of the conversation (system prompt, user turns, template), "
        "not only on the assistant's answers (Axolotl's train_on_inputs)",
    )
    dedupe: bool = Field(True, description="remove exact duplicate examples before splitting")
    seed: int = Field(0, description="seed of the split")

    @model_validator(mode="after")
    def _split_sizes(self) -> "DataSpec":
        for name in ("val", "test"):
            size = getattr(self, name)
            if size >= 1 and size != int(size):
                raise ValueError(f"{name} is {size:g}: a fraction below 1, or a whole number of examples")
        if 0 < self.val < 1 and 0 < self.test < 1 and self.val + self.test >= 0.9:
            raise ValueError(f"val {self.val:g} and test {self.test:g} hold out {self.val + self.test:.0%} of the data, leaving almost nothing to train on")
        return self


class TrainSpec(Spec):
    steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training split when steps is unset")
    lr: float = Field(2e-4, gt=0, lt=1, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup: float = Field(0.05, ge=0, description="warm-up: a fraction of the steps (< 1) or a step count")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay on the adapter weights")
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise of scale alpha / sqrt(tokens × width) on the input embeddings while training (5 in the paper)"
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 turns it off")
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit"] = Field(
        "auto", description="auto: paged 8-bit AdamW on CUDA, AdamW on CPU"
    )
    packing: bool = Field(True, description="pack examples into one row without attention across them (no padding)")
    seed: int = Field(0, description="seed of weights init, dropout and data order")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    eval_every: int = Field(0, ge=0, description="validation loss every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept (plus the best one)")
    early_stopping_patience: int = Field(0, ge=0, description="stop after N evaluations without improvement (0: off)")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="where to train")
    fsdp: bool = Field(
        False, description="under torchrun, shard the frozen base across the ranks (FSDP2): each holds 1/N of it, "
        "the adapter stays whole on every rank (--fsdp)"
    )
    unfreeze: "UnfreezeSpec | None" = Field(None, description="gradual unfreezing (ULMFiT): top layers first")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers that also get every metric and the config (appliance/track.py)"
    )

    @model_validator(mode="before")
    @classmethod
    def _trackers_as_text(cls, data: Any) -> Any:
        """`--set train.report_to=mlflow` (or `=mlflow,wandb`) names trackers without YAML's list brackets."""
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):
            data = {**data, "report_to": [name.strip() for name in data["report_to"].split(",") if name.strip()]}
        return data

    @model_validator(mode="after")
    def _length(self) -> "TrainSpec":
        if self.steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class UnfreezeSpec(Spec):
    groups: int = Field(4, ge=2, description="layer groups, unfrozen one at a time from the top")
    every: int | Literal["epoch"] = Field("epoch", description="unfreeze the next group every N steps, or each epoch")
    lr_decay: float = Field(1.0, gt=0, le=1, description="learning-rate factor per group below the top (ULMFiT: 1/2.6)")

    @model_validator(mode="after")
    def _every(self) -> "UnfreezeSpec":
        if isinstance(self.every, int) and self.every < 1:
            raise ValueError("every must be a positive step count or 'epoch'")
        return self


class DpoSpec(Spec):
    """Preference tuning (recipes dpo, simpo, orpo: the same pairs, the same loop, another loss)."""

    loss: Literal["dpo", "simpo", "orpo"] = Field("dpo", description="dpo (against the adapter-off reference); simpo and orpo need no reference")
    beta: float = Field(0.1, gt=0, description="dpo: pull away from the reference; simpo: reward scale (about 2); orpo: weight of the odds-ratio term")
    gamma: float = Field(0.0, ge=0, description="simpo only: the reward margin the chosen answer must clear (about beta / 2)")

    @model_validator(mode="after")
    def _gamma(self) -> "DpoSpec":
        if self.gamma and self.loss != "simpo":
            raise ValueError(f"dpo.gamma is SimPO's target margin; the {self.loss} loss has none")
        return self


class KtoSpec(Spec):
    """KTO (Ethayarajh et al. 2024): unpaired answers, each desirable or not, against the adapter-off reference."""

    beta: float = Field(0.1, gt=0, description="strength of the pull away from the reference model")
    desirable_weight: float = Field(1.0, gt=0, description="λ_D: weight of desirable answers (raise it when they are the fewer)")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U: weight of undesirable answers")


class GrpoSpec(Spec):
    """GRPO (Shao et al. 2024): answers sampled from the policy in groups, each scored by reward functions,
    its advantage its reward's distance from its group's mean in the group's standard deviations."""

    reward_file: Path | None = Field(None, description="a Python file of reward functions f(prompt, completion[, answer]) -> float (--reward)")
    group_size: int = Field(4, ge=2, description="answers sampled per prompt; the advantage compares them")
    max_new_tokens: int = Field(64, ge=1, description="longest sampled answer")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the answers")
    beta: float = Field(0.0, ge=0, description="KL penalty to the adapter-off reference (0: none, TRL's default; 0.04 in the paper)")
    sampler: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="what samples the answers: vllm (a server of the run's own, the policy loaded as an adapter each step), "
        "transformers' generate, or auto: vllm on a GPU where it is installed"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="the share of the GPU the vLLM sampler takes; training keeps the rest (TRL's colocated default)"
    )

    @model_validator(mode="after")
    def _reward(self) -> "GrpoSpec":
        if self.reward_file is None:
            raise ValueError("GRPO needs reward functions: --reward rewards.py (or grpo.reward_file)")
        return self


class ClassifySpec(Spec):
    metric: Literal["val_loss", "val_accuracy", "val_macro_f1"] = Field("val_loss", description="what early stopping watches")


TrainSpec.model_rebuild()


class RunConfig(Spec):
    recipe: str = Field("sft-qlora", description="recipe name in profiles/recipes")
    task: Task = Field("sft", description="what the loss is: sft (assistant tokens), cpt, dpo (also simpo, orpo), kto, grpo, classify")
    model: ModelSpec = Field(default_factory=ModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    dpo: DpoSpec | None = Field(None, description="settings of the dpo, simpo and orpo recipes")
    kto: KtoSpec | None = Field(None, description="settings of the kto recipe")
    grpo: GrpoSpec | None = Field(None, description="settings of the grpo recipe")
    classify: ClassifySpec | None = Field(None, description="settings of the classify recipe")

    @model_validator(mode="after")
    def _task_sections(self) -> "RunConfig":
        """A section belongs to its recipe: `dpo.beta` in an sft run is a mistake, not a no-op."""
        for section in ("dpo", "kto", "grpo", "classify"):
            if getattr(self, section) is not None and self.task != section:
                raise ValueError(f"'{section}' settings apply only to the {section} task, and this run's task is {self.task!r}")
            if getattr(self, section) is None and self.task == section:
                setattr(self, section, {"dpo": DpoSpec, "kto": KtoSpec, "grpo": GrpoSpec, "classify": ClassifySpec}[section]())
        if self.lora.init in ("pissa", "olora") and self.model.load_in_4bit:
            raise ValueError(f"lora.init={self.lora.init} rewrites the base's weights, which a 4-bit base cannot hold exactly; "
                             "use lora.init=loftq for a 4-bit base, or train on the 16-bit base (model.load_in_4bit=false)")
        if self.lora.init in ("pissa", "olora") and self.task not in ("sft", "cpt"):
            raise ValueError(f"lora.init={self.lora.init} changes the base the adapter is switched off to, which {self.task} "
                             "uses as its reference; use it for sft or cpt")
        if self.lora.init == "loftq" and not self.model.load_in_4bit:
            raise ValueError("lora.init=loftq corrects what 4-bit quantization lost; a 16-bit base lost nothing (drop it, or load in 4-bit)")
        if self.data.replay is not None and self.task == "classify":
            raise ValueError("data.replay mixes general data into generation tasks; it does not apply to classify")
        if self.train.fsdp and self.task == "grpo":
            raise ValueError("train.fsdp gathers the base's layers with every rank at once, and GRPO samples answers of a different "
                             "length on each; train GRPO data-parallel (without --fsdp)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_changes(self, changes: dict[str, Any]) -> "RunConfig":
        """This configuration with dotted-path changes applied, validated again (`--fit`'s advice)."""
        return validate_config(deep_merge(self.model_dump(mode="json"), nest(changes, "change")))


# -- loading and merging --------------------------------------------------


def recipe_path(name: str) -> Path:
    recipes = {p.stem: p for p in profile_files("recipes")}
    if name not in recipes:
        raise ApplianceError(
            f"Unknown recipe {name!r}.", f"use one of: {', '.join(sorted(recipes))} (or add {user_profiles_dir() / 'recipes'}/{name}.yaml)"
        )
    return recipes[name]


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ApplianceError(f"{what} {path} does not exist.", "check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ApplianceError(f"Cannot read {what} {path}: {err}.", "check the file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ApplianceError(f"{what} {path} is not valid YAML: {err}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ApplianceError(f"{what} {path} must be a mapping of sections (model, lora, data, train).",
                             "write it as `train:` on one line, then `  steps: 100` indented below (`appliance train --help` for the fields)")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(changes: dict[str, Any], what: str = "--set") -> dict[str, Any]:
    """{"train.lr": 1e-4, "lora.rank": 8} → {"train": {"lr": 1e-4}, "lora": {"rank": 8}}: the one way a
    dotted path (a --set, a flag, a planner change) becomes the nested shape the config merges."""
    out: dict[str, Any] = {}
    for path, value in changes.items():
        node = out
        parts = path.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ApplianceError(f"{what} {path!r} conflicts with another setting of {part!r}.", None)
        node[parts[-1]] = value
    return out


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set train.lr=1e-4 --set lora.target_modules=[q_proj,v_proj]` → nested dict (values parsed as YAML)."""
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ApplianceError(f"--set {item!r} is not key=value.", "write it like --set train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                pass
        changes[key.strip()] = value
    return nest(changes)


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field{got_text}")
        else:
            lines.append(f"  {field}: {e['msg']}{got_text}")
    return lines


def allowed_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        hints = set()
        for e in err.errors():
            if e["type"] == "extra_forbidden":
                names = allowed_fields(e["loc"])
                if names:
                    hints.add(f"{'.'.join(map(str, e['loc'][:-1])) or 'top level'} accepts: {', '.join(names)}")
        raise ApplianceError(
            f"The configuration has {err.error_count()} problem(s):",
            "; ".join(sorted(hints)) or "correct the fields named above",
            details=_format_errors(err),
        ) from None


def load_run_config(
    recipe: str,
    config_file: Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Recipe < config file < --set < flags, validated once."""
    data = read_yaml(recipe_path(recipe), "recipe")
    data.setdefault("recipe", recipe)
    if config_file is not None:
        data = deep_merge(data, read_yaml(config_file, "config file"))
    data = deep_merge(data, parse_set(sets))
    data = deep_merge(data, flags or {})
    return validate_config(data)
