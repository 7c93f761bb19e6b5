"""Loading the base for training (4-bit NF4 or 16-bit) and attaching LoRA.

transformers loads, bitsandbytes owns the 4-bit layers, peft owns LoRA; this
module only chooses their settings. We do not call
`prepare_model_for_kbit_training`: it casts every non-quantized weight
(embeddings, norms, head) to fp32, which costs memory and buys nothing when
those weights are frozen.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from appliance.config import LoraSpec, ModelSpec
from appliance.errors import ApplianceError
from appliance.hardware import Hardware


def quiet_libraries() -> None:
    """Library chatter that reads like an error to a user but is not one.

    Logger levels are set before the libraries are imported: bitsandbytes warns at
    import time that an optional CPU kernel package (`kernels`, fetched from a hub) is absent.
    """
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("bitsandbytes", "peft", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(requested: str, hw: Hardware) -> str:
    """Where to compute: the GPU when there is one PyTorch can use. A GPU it cannot use (a CPU-only
    build, a driver too old for its CUDA) is an error, not a silent hours-long run on the CPU."""
    if requested == "cpu":
        return "cpu"
    if hw.gpu_problem:
        raise ApplianceError(
            f"This machine has an NVIDIA GPU, but PyTorch cannot use it: {hw.gpu_problem}.",
            "update the NVIDIA driver, or reinstall on this machine (make install checks the driver); "
            "to run on the CPU anyway, pass --set train.device=cpu",
        )
    if requested == "cuda" and hw.device != "cuda":
        raise ApplianceError("--device cuda was asked for, but no CUDA GPU is visible.", "drop --device or check `nvidia-smi`")
    return hw.device if requested == "auto" else requested


def compute_dtype(spec: ModelSpec, device: str, hw: Hardware):
    """The dtype asked for, else the device's native one (appliance.hardware.compute_dtype_name).

    On the CPU the CPU's own bf16 support decides, even on a machine whose GPU has bf16."""
    import torch

    from appliance.hardware import compute_dtype_name, cpu_has_bf16

    if spec.compute_dtype != "auto":
        return getattr(torch, spec.compute_dtype)
    cpu_bf16 = hw.bf16 if hw.device == "cpu" else cpu_has_bf16()
    return getattr(torch, compute_dtype_name(device, hw.capability, cpu_bf16))


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def classification_pad_id(tokenizer) -> int:
    """The pad id of a classifier: never the eos that ends every classification input.

    transformers' *ForSequenceClassification reads the rightmost token that is not
    config.pad_token_id. ClassificationEncoder ends each text with eos, so with any other pad id
    that read lands on the eos of every row, padded in a batch or alone. With pad = eos (SmolLM2,
    and Llama-3.x, whose tokenizer then pads with <|eot_id|>) it would land on the last text token.
    Any id but eos will do: padding sits after the read position and is masked from attention.
    """
    candidates = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, 0, 1)
    return next(int(c) for c in candidates if c is not None and c != tokenizer.eos_token_id)


def _pad_id(model_dir: Path, config: Any, task: str) -> int:
    """The id this model's batches are padded with: the tokenizer's (a classifier's own, above)."""
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        # A benchmark's random-weight shape has no tokenizer; its random-token batches pad with 0.
        return config.pad_token_id if config.pad_token_id is not None else 0
    tokenizer = load_tokenizer(model_dir)
    return classification_pad_id(tokenizer) if task == "classify" else tokenizer.pad_token_id


def load_base(model_dir: Path, spec: ModelSpec, device: str, dtype, *, task: str = "sft", labels: list[str] | None = None) -> Any:
    """The frozen base, 4-bit NF4 (double quant) or 16-bit, on `device`.

    config.pad_token_id is set from the folder's tokenizer: the id batches are padded with
    (a classifier's own pad id, see classification_pad_id).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": {"": 0} if device == "cuda" else {"": "cpu"},
        "attn_implementation": "sdpa",
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if spec.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
            # A classifier's head is new and trained: it must stay a normal layer.
            llm_int8_skip_modules=["score"] if task == "classify" else None,
        )
    if task == "classify":
        labels = labels or []
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **kwargs,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    model.config.pad_token_id = _pad_id(model_dir, model.config, task)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes (0.50) repacks 4-bit weights for AVX512-BF16 CPUs on the first forward in
        # eval mode and never unpacks them for training; the packed kernel has no backward, so
        # gradients after a validation pass would be silently wrong. Keep the trainable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
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
    problem = ApplianceError(
        f"--layers {text!r} does not fit a model with {n_layers} layers (0..{n_layers - 1}).",
        f"use top:N or bottom:N with N ≤ {n_layers}, a range like 0-{n_layers - 1}, or a list like 0,2,4",
    )
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
        raise problem from None
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
