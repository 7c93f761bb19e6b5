"""Merge an adapter into 16-bit weights, save a complete HF folder, judge it against the model the user evaluated.

The merge runs tensor by tensor on the CPU, one safetensors shard of the base at a time: it needs
no GPU and no more memory than the base's largest shard, so an 8B base merges on a machine whose
card could never hold it in 16 bits. Each adapted weight becomes W + s·B·A (s = alpha / r, or
alpha / √r with rsLoRA), computed in fp32 and stored in the merged dtype. W is one of:
- `dequantized` (the default): the NF4 weights the adapter was trained against, dequantized, so
  the merged model reproduces the 4-bit model the user trained and evaluated;
- `original`: the base's own 16-bit weights, which differ from what the adapter saw by the
  quantization error of every weight.
The default is the one that agrees better with the evaluated model (README, "Merging": measured
on SmolLM2 by `appliance merge --weights ...`).

The merge is judged against the evaluated model: the 4-bit base + adapter (peft's own forward,
computing in the same dtype) on probe prompts and on the adapter's validation answers. Figures:
top-1 agreement at the positions where the reference's top-1 leads its runner-up clearly (a
near-tie flips with any rounding, so it says nothing), the same over every position, mean KL and
max |Δlogit|. Below the gate of the merged dtype the merge fails and nothing is saved. A second
check reads every adapted tensor back from the saved files and compares it with what was computed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from appliance.errors import ApplianceError
from appliance.hf import TOKENIZER_FILES, roundtrip_4bit
from appliance.registry import AdapterManifest, Agreement, MergeParity, ModelManifest, Registry
from appliance.store import atomic_dir, ensure_free_space, read_json

MergeWeights = Literal["dequantized", "original"]
DEFAULT_WEIGHTS: MergeWeights = "dequantized"
MergeDtype = Literal["auto", "bfloat16", "float16", "float32"]

PROBE_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Explain what a fine-tuned language model is.",
    "List three colours.",
)
VALIDATION_EXAMPLES = 16  # of the adapter's validation split, teacher-forced
# A position counts for top-1 agreement when the reference's top-1 leads its runner-up by at least
# this many logits: rounding a weight to bf16 moves a logit by a few hundredths, never by this much.
CLEAR_MARGIN = 1.0


@dataclass(frozen=True)
class Gate:
    """What a merged model must reach against the evaluated model (README, "Merging")."""

    min_top1: float  # top-1 agreement at clear positions
    max_mean_kl: float  # nats per position
    # KL(evaluated || merged) as a share of KL(evaluated || base): what the merge loses of what the
    # adapter changed. Scale-free, so it also holds where every distribution is flat.
    max_relative_kl: float


GATES = {"float32": Gate(0.99, 0.02, 0.05), "bfloat16": Gate(0.98, 0.05, 0.1), "float16": Gate(0.98, 0.05, 0.1)}


class MergeMismatch(ApplianceError):
    """The merged model failed the gate against the evaluated model; carries the figures."""

    def __init__(self, parity: MergeParity, message: str, fix: str):
        super().__init__(message, fix)
        self.parity = parity


def merge_dtype(requested: MergeDtype, hw) -> str:
    """What the merged weights are stored in: the serving GPU's native 16-bit type, fp32 on a machine
    without a GPU (vLLM serves float32 there, and bf16 rounding would be a loss for nothing)."""
    if requested != "auto":
        return requested
    if hw.device == "cuda":
        return "bfloat16" if hw.bf16 else "float16"
    return "float32"


# -- the arithmetic ----------------------------------------------------------------------------


@dataclass
class LoraDelta:
    a: Any  # (r, in)
    b: Any  # (out, r)
    scaling: float
    magnitude: Any = None  # DoRA's learned norm per output row (out,), else None

    def weight(self):
        return self.scaling * (self.b.float() @ self.a.float())

    def apply(self, w):
        """W + s·B·A; with DoRA, each row then rescaled to its learned magnitude (m / ‖W + s·B·A‖, peft's merge)."""
        combined = w + self.weight()
        if self.magnitude is None:
            return combined
        return combined * (self.magnitude.float() / combined.norm(dim=1)).unsqueeze(1)


def read_deltas(adapter_dir: Path) -> tuple[dict[str, LoraDelta], dict[str, Any]]:
    """The adapter as {base weight name: delta} and the whole modules it replaces ({name: tensor})."""
    from safetensors.torch import load_file

    config = read_json(adapter_dir / "adapter_config.json")
    unsupported = [k for k in ("use_qalora", "lora_bias") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported or config.get("alpha_pattern") or config.get("fan_in_fan_out"):
        raise ApplianceError(
            f"The adapter in {adapter_dir} uses LoRA settings this merge does not apply ({', '.join(unsupported) or config.get('peft_type')}).",
            "serve it as an adapter on its base instead (appliance serve BASE --adapter NAME)",
        )
    alpha = float(config["lora_alpha"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    prefix = "base_model.model."
    deltas: dict[str, LoraDelta] = {}
    whole: dict[str, Any] = {}
    for key, value in tensors.items():
        name = key.removeprefix(prefix)
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            r = value.shape[0]
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            deltas[f"{module}.weight"] = LoraDelta(value, b, scaling, tensors.get(f"{prefix}{module}.lora_magnitude_vector"))
        elif ".lora_B." not in name and ".lora_magnitude_vector" not in name:
            whole[name] = value  # modules_to_save (a classifier's head), stored whole
    return deltas, whole


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def merged_tensor(name: str, base, deltas: dict[str, LoraDelta], weights: MergeWeights, dtype: str):
    """One tensor of the merged model: adapted weights get W + s·B·A, the rest is cast."""
    import torch

    delta = deltas.get(name)
    if delta is None:
        return base.to(_torch_dtype(dtype)).contiguous()
    base = base.to(torch.float32)  # exact for a 16-bit base; the NF4 codes do not change, the dequantized values are not rounded
    w = roundtrip_4bit(base) if weights == "dequantized" else base
    return delta.apply(w).to(_torch_dtype(dtype)).contiguous()


def write_merged_weights(base_dir: Path, out: Path, deltas: dict[str, LoraDelta], whole: dict[str, Any], weights: MergeWeights, dtype: str,
                         drop: tuple[str, ...] = (), progress: Callable[[str], None] = lambda _: None) -> None:
    """The merged safetensors, shard by shard of the base, with their index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(base_dir.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    done: set[str] = set()
    total = 0
    for i, shard in enumerate(shards):
        progress(f"merging {shard.name} ({i + 1}/{len(shards)})")
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name in drop:
                    continue
                tensors[name] = whole[name].to(_torch_dtype(dtype)) if name in whole else merged_tensor(name, f.get_tensor(name), deltas, weights, dtype)
                done.add(name)
        if i == len(shards) - 1:  # a head the base does not have (a classifier's) goes with the last shard
            tensors.update({n: t.to(_torch_dtype(dtype)).contiguous() for n, t in whole.items() if n not in done})
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: shard.name for n in tensors})
        del tensors
    missing = sorted(set(deltas) - done)
    if missing:
        raise ApplianceError(
            f"The adapter changes weights the base does not have ({', '.join(missing[:3])}).",
            "the adapter belongs to another model: merge it onto its own base",
        )
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def check_saved(base_dir: Path, out: Path, deltas: dict[str, LoraDelta], weights: MergeWeights, dtype: str) -> float:
    """Read every adapted tensor back from the saved files; the largest difference from W + s·B·A
    recomputed from the base, relative to the tensor's largest value."""
    from safetensors import safe_open

    worst = 0.0
    saved_files = sorted(out.glob("*.safetensors"))
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            names = [n for n in f.keys() if n in deltas]
            base = {n: f.get_tensor(n) for n in names}
        for path in saved_files:
            with safe_open(str(path), framework="pt") as g:
                for name in set(names) & set(g.keys()):
                    expected = merged_tensor(name, base[name], deltas, weights, "float32")
                    got = g.get_tensor(name).float()
                    worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    return worst


# -- judging the merge ---------------------------------------------------------------------------


def probe_sequences(registry: Registry, adapter: AdapterManifest, tokenizer: Any) -> tuple[list[list[int]], int, list[str]]:
    """Token ids to compare on: probe prompts, then up to VALIDATION_EXAMPLES of the adapter's
    validation split as full conversations (teacher-forced answers). Returns (sequences, how many
    validation examples, notes)."""
    from appliance.config import RunConfig
    from appliance.data import prepare
    from appliance.data import has_chat_template, render

    notes: list[str] = []
    if adapter.task == "classify":  # a classifier reads plain text ending in eos
        sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in PROBE_PROMPTS]
    else:
        sequences = []
        for text in PROBE_PROMPTS:
            chat = has_chat_template(tokenizer)
            rendered = render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True) if chat else text
            sequences.append(tokenizer(rendered, add_special_tokens=not chat)["input_ids"])
    cfg = RunConfig.model_validate(adapter.config)
    try:
        prepared = prepare(cfg.data, cfg.task, tokenizer)
    except ApplianceError as err:
        notes.append(f"validation answers not compared: the training data cannot be read again ({err.message})")
        return sequences, 0, notes
    held_out = (prepared.val or prepared.test)[:VALIDATION_EXAMPLES]
    for encoded in held_out:
        item = encoded.item
        ids = item.chosen.input_ids if hasattr(item, "chosen") else item.input_ids
        sequences.append(list(ids))
    if not held_out:
        notes.append("validation answers not compared: the adapter was trained without a validation split")
    return sequences, len(held_out), notes


def logits_of(model: Any, sequences: list[list[int]], device: str) -> list[Any]:
    """fp32 logits per sequence on the CPU: one row per position (one per text for a classifier)."""
    import torch

    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits
            out.append(logits.reshape(-1, logits.shape[-1]).float().cpu())
    return out


def agreement(reference: list[Any], other: list[Any], margin: float = CLEAR_MARGIN) -> Agreement:
    import torch

    positions = clear = agree_clear = agree_all = 0
    kl_sum, max_diff = 0.0, 0.0
    for a, b in zip(reference, other):
        top2 = a.topk(2, dim=-1).values
        is_clear = (top2[:, 0] - top2[:, 1]) >= margin
        same = a.argmax(-1) == b.argmax(-1)
        positions += a.shape[0]
        clear += int(is_clear.sum())
        agree_clear += int((same & is_clear).sum())
        agree_all += int(same.sum())
        log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
    return Agreement(
        positions=positions,
        clear_positions=clear,
        margin=margin,
        top1_agreement=agree_clear / clear if clear else 1.0,
        top1_agreement_all=agree_all / positions,
        mean_kl=kl_sum / positions,
        max_abs_logit_diff=max_diff,
    )


def _parity_device(parameters: int, dtype: str) -> str:
    """The GPU when the merged model fits its free memory with room to spare, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    free, _ = torch.cuda.mem_get_info()
    return "cuda" if parameters * _torch_dtype(dtype).itemsize * 1.3 < free else "cpu"


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# -- the whole merge -----------------------------------------------------------------------------


def merge_adapter(
    registry: Registry,
    adapter_name: str,
    *,
    name: str | None = None,
    overwrite: bool = False,
    weights: MergeWeights = DEFAULT_WEIGHTS,
    dtype: MergeDtype = "auto",
    progress: Callable[[str], None] = lambda _: None,
) -> ModelManifest:
    from appliance.hf import load_for_inference
    from appliance.hardware import detect
    from appliance.models import describe_folder
    from appliance.hf import classification_pad_id, load_tokenizer, quiet_libraries

    quiet_libraries()
    adapter = registry.adapter(adapter_name)
    base = registry.base_of(adapter)
    name = name or f"{adapter.base}-{adapter.name}"
    target = registry.model_dir(name)
    if (target / "manifest.json").is_file() and not overwrite:
        raise ApplianceError(f"A model named {name!r} is already in the store.", "choose another --name, or pass --overwrite")
    stored = merge_dtype(dtype, detect())
    base_dir, adapter_dir = registry.model_dir(base.name), registry.adapter_dir(adapter.name)
    ensure_free_space(target.parent, base.parameters * _torch_dtype(stored).itemsize, "the merged model")
    deltas, whole = read_deltas(adapter_dir)
    started = time.time()

    tokenizer = load_tokenizer(base_dir)
    sequences, validation, notes = probe_sequences(registry, adapter, tokenizer)
    device = _parity_device(base.parameters, stored)
    compute = "float32" if device == "cpu" else stored  # CPUs compute bf16 inexactly or slowly: compare in fp32 there
    progress(f"the evaluated model: {base.name} in 4-bit + {adapter.name} ({compute}, {device})")
    evaluated = load_for_inference(base_dir, adapter_dir, device=device, dtype=compute, task=adapter.task, labels=adapter.labels)
    reference = logits_of(evaluated, sequences, device)
    with evaluated.disable_adapter():
        adapter_effect = agreement(reference, logits_of(evaluated, sequences, device)).mean_kl
    del evaluated
    _release(device)

    classifier = adapter.task == "classify"
    with atomic_dir(target, overwrite=True) as tmp:
        # A classifier keeps the trained head (modules_to_save) and drops the language-model head.
        write_merged_weights(base_dir, tmp, deltas, whole, weights, stored, drop=("lm_head.weight",) if classifier else (), progress=progress)
        config = read_json(base_dir / "config.json")
        config.pop("quantization_config", None)
        config["dtype"] = stored
        if classifier:
            labels = adapter.labels or []
            config["architectures"] = [config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
            # The head reads the eos that ends every text: padding must be another token (appliance.hf).
            pad_id = classification_pad_id(tokenizer)
            config.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}, pad_token_id=pad_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for filename in (*TOKENIZER_FILES, "generation_config.json"):
            if (base_dir / filename).is_file():
                shutil.copy2(base_dir / filename, tmp / filename)
        if classifier:  # so that tokenizer(..., padding=True) pads with the id the config names
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
            tokenizer.save_pretrained(tmp)

        progress("reading the saved weights back")
        saved_error = check_saved(base_dir, tmp, deltas, weights, stored)
        progress(f"comparing with the evaluated model ({len(sequences)} sequences)")
        merged_model = _load_merged(tmp, classifier, device, compute)
        gate = GATES[stored]
        parity = MergeParity(
            weights=weights,
            dtype=stored,
            compute_dtype=compute,
            prompts=len(PROBE_PROMPTS),
            validation_examples=validation,
            evaluated=agreement(reference, logits_of(merged_model, sequences, device)),
            adapter_effect_kl=adapter_effect,
            saved_max_rel_diff=saved_error,
            gate_min_top1=gate.min_top1,
            gate_max_mean_kl=gate.max_mean_kl,
            gate_max_relative_kl=gate.max_relative_kl,
            notes=notes,
        )
        del merged_model
        _release(device)
        rounding = 2.0 ** -(24 if stored == "float32" else 11 if stored == "float16" else 8)
        if saved_error > rounding:
            raise ApplianceError(
                f"The saved merged weights differ from what was computed (relative {saved_error:.2g}); nothing was saved.",
                "check the disk, then merge again",
            )
        e = parity.evaluated
        if e.top1_agreement < gate.min_top1 or e.mean_kl > gate.max_mean_kl or parity.relative_kl > gate.max_relative_kl:
            raise MergeMismatch(
                parity,
                f"The merged model does not match the model you evaluated (4-bit {base.name} + {adapter.name}): top-1 agreement "
                f"{e.top1_agreement:.2%} at {e.clear_positions} clear positions (gate {gate.min_top1:.0%}), mean KL {e.mean_kl:.3g} "
                f"(gate {gate.max_mean_kl:g}), {parity.relative_kl:.1%} of the adapter's own effect (gate {gate.max_relative_kl:.0%}); "
                "nothing was saved.",
                "merge into the dequantized weights (--weights dequantized) or in float32 (--dtype float32), "
                "or serve the adapter on its base (appliance serve BASE --adapter NAME)",
            )
        manifest = describe_folder(
            tmp,
            name=name,
            source=f"merge:{base.name}+{adapter.name}",
            kind="merged",
            adapter=adapter.name,
            base=base.name,
            base_fingerprint=base.fingerprint,
            parity=parity,
        )
        manifest.merge_s = round(time.time() - started, 1)  # type: ignore[attr-defined]
        registry.write_manifest(tmp, manifest)
    return manifest


def _load_merged(folder: Path, classifier: bool, device: str, compute: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=_torch_dtype(compute), device_map={"": device}, use_safetensors=True, trust_remote_code=False)
    return model.eval()


def compare_merges(
    registry: Registry,
    adapter_name: str,
    *,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Merge `adapter_name` into each choice of base weights and each dtype, judge each against the
    evaluated model, and keep nothing: what `appliance bench merge` measures to choose the default."""
    import shutil as _shutil

    rows = []
    for weights in ("dequantized", "original"):
        for dtype in dtypes:
            name = f"bench-merge-{adapter_name}-{weights}-{dtype}"
            progress(f"{weights} weights, {dtype}")
            try:
                parity = merge_adapter(registry, adapter_name, name=name, overwrite=True, weights=weights, dtype=dtype, progress=progress).parity
                failed = None
            except MergeMismatch as err:
                parity, failed = err.parity, err.message
            finally:
                _shutil.rmtree(registry.model_dir(name), ignore_errors=True)
            rows.append({"weights": weights, "dtype": dtype, "passed": failed is None, "failure": failed,
                         "parity": parity.model_dump() if parity else None})
    return rows
