"""The trainable model: the frozen base made ready for training (checkpointing, tiling) and LoRA
attached to the layers asked for; under FSDP, sharded between the ranks. Loading itself is
appliance.hf's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from appliance.config import LoraSpec, ModelSpec, RunConfig, sequences_per_example
from appliance.errors import ApplianceError
from appliance.hf import keep_4bit_layout, load_base
from appliance.train import distributed


def build_model(
    cfg: RunConfig,
    model_dir: Path,
    device: str,
    dtype: Any,
    *,
    labels: list[str] | None,
    ranks: distributed.Ranks,
    initial_adapter: Path,
    note: Callable[[str], None],
) -> tuple[Any, bool]:
    """The run's trainable model on `device`, and whether it recomputes activations (gradient
    checkpointing, resolved here). `note` is told what was decided, for the run's log."""
    rows = cfg.train.batch_size * sequences_per_example(cfg.task, cfg.grpo and cfg.grpo.group_size)
    checkpointing, why = checkpointing_for(cfg.model, cfg.lora, device, dtype, model_dir, rows * cfg.data.seq_len)
    note(f"gradient checkpointing {'on' if checkpointing else 'off'} ({why})")
    if cfg.model.offload_activations:
        on_gpu = device == "cuda" and checkpointing
        note("checkpointed layer inputs kept in CPU memory" if on_gpu else "offload_activations does nothing on CPU: the inputs are in RAM already")
    if cfg.model.mlp_tile_tokens:
        note(f"MLPs computed {cfg.model.mlp_tile_tokens} tokens at a time")
    spec = cfg.model.model_copy(update={"gradient_checkpointing": checkpointing})

    def adapted_base(load_on: str) -> Any:
        base = load_base(model_dir, spec, load_on, dtype, task=cfg.task, labels=labels)
        model = attach_lora(prepare_for_training(base, spec, device), cfg.lora, task=cfg.task)
        if cfg.lora.init != "default":
            note(initialise_adapter(model, cfg.lora, model_dir, initial_adapter, write=ranks.main))
        if cfg.train.neftune_noise_alpha:
            add_neftune(model, cfg.train.neftune_noise_alpha)
        return model

    if not cfg.train.fsdp:
        return adapted_base(device), checkpointing
    # FSDP: no GPU ever holds the whole base, so one too large for a card trains. Each rank loads
    # and quantizes it in host memory and shards it onto its GPU, one rank of a machine at a time.
    model, held, whole = distributed.load_sharded(ranks, lambda: adapted_base("cpu"), device)
    note(f"the base is sharded between {ranks.world} ranks (FSDP, loaded in host memory one rank at a time): "
         f"this rank holds {held:.4g} of its layers' {whole:.4g} MiB")
    return model, checkpointing


def prepare_for_training(model: Any, spec: ModelSpec, device: str) -> Any:
    """The loaded base, ready for a training loop: bitsandbytes' inference layout off, gradient
    checkpointing (resolved, optionally offloaded) and MLP tiling as the spec says."""
    keep_4bit_layout(model)  # the packed kernel has no backward: gradients after a validation pass would be wrong
    if spec.gradient_checkpointing == "auto":
        raise ValueError("resolve gradient_checkpointing 'auto' first (checkpointing_for)")
    if spec.gradient_checkpointing:
        # Offloading needs pinned host memory, which exists only beside an accelerator; on CPU
        # the saved inputs are in RAM already.
        offload = spec.offload_activations and device == "cuda"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    if spec.mlp_tile_tokens:
        from appliance.train.tiling import tile_mlps

        tile_mlps(model, spec.mlp_tile_tokens)
    return model


# On CPU, time runs out before memory: recomputing activations only pays when keeping them
# would take a large share of the RAM.
CPU_ACTIVATION_SHARE = 0.25


def checkpointing_for(spec: ModelSpec, lora: LoraSpec, device: str, dtype, model_dir: Path, tokens: int) -> tuple[bool, str]:
    """Resolve model.gradient_checkpointing ('auto' or a bool) for a micro-batch of `tokens` tokens."""
    if spec.gradient_checkpointing != "auto":
        return spec.gradient_checkpointing, "set in the config"
    if device == "cuda":
        return True, "auto: on a GPU, memory is what runs out"
    import json

    import psutil

    from appliance.plan import TrainSettings, layer_activation_bytes, shape_from_config

    try:
        shape = shape_from_config(model_dir.name, json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    except (ApplianceError, OSError, ValueError):
        return True, "auto: the model's shapes are unknown, so memory is saved"
    settings = TrainSettings(rank=lora.rank, target_modules=lora.target_modules, gradient_checkpointing=False)
    scale = dtype.itemsize / 2  # the planner counts a 16-bit stream
    need = tokens * shape.num_hidden_layers * layer_activation_bytes(shape, settings, "appliance") * scale
    free = psutil.virtual_memory().available
    on = need > CPU_ACTIVATION_SHARE * free
    return on, f"auto: a micro-batch's activations ≈ {need / 2**30:.1f} GiB against {free / 2**30:.0f} GiB of free RAM"


def num_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """'top:8', 'bottom:4', '0-11', '3,5,7' → sorted layer indices (None: all layers).
    ('re:PATTERN', a regex over module names, is handled by attach_lora.)"""
    if text is None or text.strip() in ("", "all"):
        return None
    text = text.strip()
    forms = f"use top:N or bottom:N with N ≤ {n_layers}, a range like 0-{n_layers - 1}, or a list like 0,2,4"
    problem = ApplianceError(f"--layers {text!r} does not fit a model with {n_layers} layers (0..{n_layers - 1}).", forms)
    try:
        if text.startswith(("top:", "bottom:")):
            side, count = text.split(":", 1)
            n = int(count)
            if not 1 <= n <= n_layers:
                raise problem
            return list(range(n_layers - n, n_layers)) if side == "top" else list(range(n))
        layers: set[int] = set()
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise problem
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise ApplianceError(f"--layers {text!r} is not a selection of layers.", forms) from None
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise problem
    return sorted(layers)


def attach_lora(model: Any, lora: LoraSpec, *, task: str = "sft") -> Any:
    """Wrap the frozen base with LoRA adapters (all linear layers by default)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = lora.target_modules
    if lora.layers and lora.layers.startswith("re:"):
        # A module pattern: peft matches the regex against full module names.
        targets, layers = lora.layers[3:], None
    else:
        layers = parse_layers(lora.layers, num_layers(model))
    if layers is not None and targets == "all-linear":
        # peft takes a layer list only with explicit module names.
        targets = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if ".layers." in name and isinstance(module, torch.nn.Linear)}
        )
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        # LoftQ is computed below (peft's replace_lora_weights_loftq runs on CUDA only).
        init_lora_weights={"default": True, "loftq": True}.get(lora.init, lora.init),
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise ApplianceError(f"LoRA could not be attached: {err}", "check lora.target_modules against the model's module names") from None
    if lora.shared_inputs:
        from appliance.train.lora import keep_lora_inputs_shared

        keep_lora_inputs_shared(model)
    return model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters; a 4-bit weight counts as the matrix it stands for, not as its
    packed bytes (two values a byte), which bitsandbytes keeps the shape of on its module."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total, seen = 0, set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied embeddings
                continue
            seen.add(id(param))
            state = getattr(module, "quant_state", None) if name == "weight" else None
            total += state.shape.numel() if state is not None else param.numel()
    return trainable, total


def add_neftune(model: Any, alpha: float) -> None:
    """NEFTune (Jain et al. 2023): while training, add uniform noise of scale alpha / sqrt(L·d) to the
    input embeddings (L the micro-batch's row width, d the embedding width, as transformers does);
    validation and the saved adapter see none."""
    import torch

    def noisy(module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / (output.shape[1] * output.shape[2]) ** 0.5
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    model.get_input_embeddings().register_forward_hook(noisy)


def init_loftq(model: Any, model_dir: Path) -> int:
    """LoftQ (Li et al. 2023), one step: each adapted 4-bit layer's LoRA starts as the best rank-r
    approximation of what quantization lost (W − dequant(Q(W)), W read from the base's safetensors),
    split evenly between B and A and divided by LoRA's scaling so that scaling·B·A is that
    approximation. The 4-bit base is unchanged, so the adapter serves and merges like any other.
    Returns how many layers it set."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    shard_of = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            shard_of.update(dict.fromkeys(f.keys(), shard))
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = module.get_base_layer().weight if isinstance(module, LoraLayer) else None
            if weight is None or getattr(weight, "quant_state", None) is None:
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            with safe_open(str(shard_of[key]), framework="pt") as f:
                original = f.get_tensor(key).to(weight.device, torch.float32)
            lost = original - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            u, s, vh = torch.linalg.svd(lost, full_matrices=False)
            adapter = module.active_adapters[0]
            rank, scaling = module.r[adapter], module.scaling[adapter]
            root = (s[:rank] / scaling).sqrt()
            module.lora_B[adapter].weight.copy_(u[:, :rank] * root)
            module.lora_A[adapter].weight.copy_(root[:, None] * vh[:rank])
            count += 1
    return count


def save_initial_adapter(model: Any, folder: Path) -> None:
    """PiSSA / OLoRA: the adapter as initialised, marked as a plain init (peft's recipe), for the conversion at save."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def initialise_adapter(model: Any, lora: LoraSpec, model_dir: Path, initial_adapter: Path, write: bool) -> str:
    """The start lora.init asks for beyond peft's own: LoftQ computed; PiSSA / OLoRA's start kept
    (`write`: this process keeps it) for the conversion at save. Returns what was done, for the log."""
    if lora.init == "loftq":
        return f"LoftQ: {init_loftq(model, model_dir)} adapters start as what 4-bit quantization lost"
    if lora.init in ("pissa", "olora") and write and not (initial_adapter / "adapter_config.json").is_file():
        save_initial_adapter(model, initial_adapter)
    return f"LoRA initialised by {lora.init}"
