"""Hugging Face folders, one layer below every step: which files a model folder holds, its
tokenizer, quieting the libraries, and loading a base (4-bit NF4 or 16-bit) for training or for
inference, with an adapter when asked.

transformers loads, bitsandbytes owns the 4-bit layers, peft owns LoRA; this module only chooses
their settings. We do not call `prepare_model_for_kbit_training`: it casts every non-quantized
weight (embeddings, norms, head) to fp32, which costs memory and buys nothing when those weights
are frozen.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from appliance.config import ModelSpec
from appliance.errors import ApplianceError
from appliance.hardware import Hardware

# The files that make a model folder's tokenizer and chat template (copied with every model).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# Any one of these is a tokenizer's vocabulary: a folder without one has no tokenizer.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")


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
    if not any((model_dir / name).is_file() for name in (*VOCABULARY_FILES, "tokenizer_config.json")):
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
        "device_map": {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"},  # a rank's own GPU
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
    return model


def load_for_inference(
    model_dir, adapter_dir=None, *, load_in_4bit: bool = True, device: str = "auto", dtype: str = "auto", task: str = "sft", labels=None
):
    """The base (4-bit as trained, or 16-bit) with an optional adapter, ready for evaluation, where
    training runs (`device` 'auto': the GPU when there is one) and in what training computes
    (`dtype` 'auto': the device's native type; on the CPU, the CPU's own)."""
    from appliance.hardware import detect

    quiet_libraries()
    hw = detect()
    device = resolve_device(device, hw)
    spec = ModelSpec(load_in_4bit=load_in_4bit, gradient_checkpointing=False, compute_dtype=dtype)
    model = load_base(model_dir, spec, device, compute_dtype(spec, device, hw), task=task, labels=labels)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    # The model as it trained: bitsandbytes' packed CPU layout computes in bf16 whatever the compute
    # dtype (KL 7e-4 from the plain 4-bit model on SmolLM2, more than a merge's rounding), and DoRA
    # reads the base weights themselves at every forward.
    keep_4bit_layout(model)
    model.eval()
    return model


def keep_4bit_layout(model) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights for AVX512-BF16 CPUs on the first forward in eval
    mode and never unpacks them; whatever reads the weights themselves afterwards (a backward pass,
    DoRA's weight norm through peft's dequantize) then reads the packed bytes as if plain. Keep the
    plain layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def roundtrip_4bit(weight, quant_type: str = "nf4", double_quant: bool = True):
    """A weight as the 4-bit model computes with it: quantized as bitsandbytes does on load
    (blocks of 64; double quantization compresses the block scales) and dequantized, in fp32."""
    import bitsandbytes as bnb
    import torch

    packed, state = bnb.functional.quantize_4bit(weight.to(torch.float32), blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    return bnb.functional.dequantize_4bit(packed, state)


def quantized_on_load(name: str, tensor) -> bool:
    """Whether bitsandbytes quantizes this tensor when the base loads in 4 bits: the linear
    layers of the blocks (embeddings, norms and the head stay in 16 bits)."""
    return ".layers." in name and name.endswith(".weight") and tensor.ndim == 2
