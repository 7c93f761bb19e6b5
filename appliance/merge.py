"""Merge an adapter into the 16-bit base, save a complete HF folder, verify parity.

Never into the 4-bit weights: the base is reloaded in bf16 on a GPU (fp32 on
CPU, where bf16 may be emulated or inexact), the adapter applied and merged.
Parity: the saved merged model's logits on probe prompts are compared with the
same-precision base + adapter; top-1 agreement below 100 % fails the merge
and nothing is left in the store.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from appliance.errors import ApplianceError
from appliance.registry import AdapterManifest, ModelManifest, Registry
from appliance.store import atomic_dir, ensure_free_space

PROBE_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Explain what a fine-tuned language model is.",
    "List three colours.",
)
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
    "generation_config.json",
)


@dataclass
class Parity:
    max_abs_logit_diff: float
    top1_agreement: float
    positions: int
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def check_adapter_base(registry: Registry, adapter: AdapterManifest) -> ModelManifest:
    """The adapter's base must be in the store with the fingerprint it was trained on."""
    try:
        base = registry.model(adapter.base)
    except ApplianceError:
        raise ApplianceError(
            f"The base model {adapter.base!r} of adapter {adapter.name!r} is not in the store.",
            f"import it again under the same name (appliance models import SOURCE --name {adapter.base})",
        ) from None
    if base.fingerprint != adapter.base_fingerprint:
        raise ApplianceError(
            f"Adapter {adapter.name!r} was trained on a base with fingerprint {adapter.base_fingerprint}, "
            f"but {base.name!r} now has fingerprint {base.fingerprint}.",
            "use the base it was trained on, or train the adapter again on this one",
        )
    return base


def merge_dtype(device: str, bf16: bool):
    import torch

    if device == "cuda":
        return torch.bfloat16 if bf16 else torch.float16
    return torch.float32


def probe_batch(tokenizer: Any, task: str) -> list[list[int]]:
    from appliance.data.template import has_chat_template, render

    if task == "classify":  # a classifier reads plain text ending in eos
        return [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in PROBE_PROMPTS]
    prompts = []
    for text in PROBE_PROMPTS:
        rendered = render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True) if has_chat_template(tokenizer) else text
        prompts.append(tokenizer(rendered, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])
    return prompts


def logits_for(model: Any, prompts: list[list[int]], device: str) -> list[Any]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits
            # Causal LM: one row per position; classifier: one row per text.
            out.append(logits.reshape(-1, logits.shape[-1]).float().cpu())
    return out


def compare(reference: list[Any], merged: list[Any], dtype: str) -> Parity:
    import torch

    diffs, agree, total = [], 0, 0
    for a, b in zip(reference, merged):
        diffs.append(float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return Parity(max(diffs), agree / total, total, dtype)


def merge_adapter(
    registry: Registry,
    adapter_name: str,
    *,
    name: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> ModelManifest:
    from appliance.train.model import load_tokenizer, quiet_libraries

    quiet_libraries()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from appliance.hardware import detect
    from appliance.models import describe_folder

    adapter = registry.adapter(adapter_name)
    base = check_adapter_base(registry, adapter)
    name = name or f"{adapter.base}-{adapter.name}"
    target = registry.model_dir(name)
    if (target / "manifest.json").is_file() and not overwrite:
        raise ApplianceError(f"A model named {name!r} is already in the store.", "choose another --name, or pass --overwrite")

    hw = detect()
    dtype = merge_dtype(hw.device, hw.bf16)
    device = hw.device
    base_dir, adapter_dir = registry.model_dir(base.name), registry.adapter_dir(adapter.name)
    ensure_free_space(target.parent, base.parameters * torch.tensor([], dtype=dtype).element_size(), "the merged model")
    started = time.time()

    progress(f"loading {base.name} in {str(dtype).replace('torch.', '')} (16-bit or wider, never 4-bit)")
    load_kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}, "trust_remote_code": False, "use_safetensors": True}
    model_class = AutoModelForCausalLM
    if adapter.task == "classify":
        # The trained head travels in the adapter (modules_to_save); the result is a standard
        # *ForSequenceClassification folder with the label names in its config.
        model_class = AutoModelForSequenceClassification
        labels = adapter.labels or []
        load_kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = model_class.from_pretrained(base_dir, **load_kwargs)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    tokenizer = load_tokenizer(base_dir)
    prompts = probe_batch(tokenizer, adapter.task)
    reference = logits_for(model, prompts, device)

    progress("merging")
    merged = model.merge_and_unload()
    with atomic_dir(target, overwrite=True) as tmp:
        progress(f"saving {name}")
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged, model
        for filename in TOKENIZER_FILES:
            if (base_dir / filename).is_file():
                shutil.copy2(base_dir / filename, tmp / filename)

        progress("checking parity of the saved weights")
        reloaded = model_class.from_pretrained(tmp, dtype=dtype, device_map={"": device}, use_safetensors=True)
        parity = compare(reference, logits_for(reloaded, prompts, device), str(dtype).replace("torch.", ""))
        del reloaded
        if parity.top1_agreement < 1.0:
            raise ApplianceError(
                f"Merge parity failed: top-1 agreement {parity.top1_agreement:.2%} over {parity.positions} positions "
                f"(max |Δlogit| {parity.max_abs_logit_diff:.3g}); nothing was saved.",
                "report this with the adapter's manifest; serve the adapter on the base meanwhile",
            )
        manifest = describe_folder(
            tmp,
            name=name,
            source=f"merge:{base.name}+{adapter.name}",
            kind="merged",
            adapter=adapter.name,
            base=base.name,
            base_fingerprint=base.fingerprint,
            parity=parity.as_dict(),
        )
        manifest.merge_s = round(time.time() - started, 1)  # type: ignore[attr-defined]
        registry.write_manifest(tmp, manifest)
    return manifest

