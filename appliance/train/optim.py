"""How the adapter's weights move: the optimizer, the learning-rate schedule, and gradual
unfreezing (ULMFiT): layer groups from the top, each with its own rate."""

from __future__ import annotations

import math
import re
from typing import Any

from appliance.config import TrainSpec, UnfreezeSpec
from appliance.errors import ApplianceError


def schedule_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up, then the decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def layer_groups(adapter_params: dict[str, Any], spec: UnfreezeSpec | None) -> dict[str, int]:
    """Adapter parameter → layer group, 0 being the top group (unfrozen first).

    Without `train.unfreeze` everything is group 0. Parameters outside the decoder layers (a
    classifier's head) belong to the top group.
    """
    if spec is None:
        return {name: 0 for name in adapter_params}
    layer_of = {name: int(m.group(1)) for name in adapter_params if (m := re.search(r"\.layers\.(\d+)\.", name))}
    layers = sorted(set(layer_of.values()), reverse=True)  # top first
    if len(layers) < spec.groups:
        raise ApplianceError(
            f"train.unfreeze.groups={spec.groups} but adapters sit on only {len(layers)} layer(s).",
            f"use at most {len(layers)} groups",
        )
    size = -(-len(layers) // spec.groups)
    group_of_layer = {layer: i // size for i, layer in enumerate(layers)}
    return {name: group_of_layer.get(layer_of.get(name, -1), 0) for name in adapter_params}


def unfrozen_groups(step: int, spec: UnfreezeSpec | None, steps_per_epoch: int) -> int:
    """How many groups (from the top) train at optimizer step `step` (0-based)."""
    if spec is None:
        return 1
    every = spec.every if isinstance(spec.every, int) else max(1, steps_per_epoch)
    return min(spec.groups, 1 + step // every)


def build_optimizer(adapter_params: dict[str, Any], groups: dict[str, int], spec: TrainSpec, device: str) -> tuple[Any, str]:
    """(optimizer, its resolved name): one parameter group per layer group, so lower groups may
    learn more slowly (ULMFiT's discriminative rates); `auto` is paged 8-bit AdamW on CUDA."""
    import torch

    decay = spec.unfreeze.lr_decay if spec.unfreeze is not None else 1.0
    params = [
        {"params": [p for n, p in adapter_params.items() if groups[n] == g], "initial_lr": spec.lr * decay**g}
        for g in sorted(set(groups.values()))
    ]
    name = spec.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device == "cuda" else "adamw"
    if name in ("paged_adamw_8bit", "adamw_8bit"):
        if device != "cuda":
            raise ApplianceError(f"optimizer {name} needs a CUDA GPU.", "use --set train.optimizer=adamw on CPU")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=spec.lr, weight_decay=spec.weight_decay), name
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay), name
