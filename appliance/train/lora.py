"""LoRA's forward without the fp32 copy of its input kept for backward.

peft computes an adapter in its weights' dtype (fp32): it casts the layer input
to fp32 and autograd keeps that copy for lora_A's weight gradient, one copy per
adapted layer. q, k and v read the same input, so a Llama block keeps three
fp32 copies of it, and gate and up two more of theirs: half of what a block
keeps at long sequence lengths. Here the input is kept as it arrives (the
tensor the base layer reads, shared by the layers that read it) and cast again
in backward: the same arithmetic, so the values and gradients are peft's.

Only plain LoRA takes this path: one active adapter, no dropout (the mask would
have to be kept instead), no DoRA or other variant, no autocast, not merged.
Anything else runs peft's own forward.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch


class _LoraDelta(torch.autograd.Function):
    """scaling · (x Aᵀ) Bᵀ in A's dtype, returned in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        down = x.to(lora_a.dtype) @ lora_a.t()
        ctx.save_for_backward(x, lora_a, lora_b, down)
        ctx.scaling = scaling
        return ((down @ lora_b.t()) * scaling).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, lora_a, lora_b, down = ctx.saved_tensors
        grad = grad_out.to(lora_b.dtype) * ctx.scaling
        rows = grad.reshape(-1, grad.shape[-1])
        grad_b = rows.t() @ down.reshape(-1, down.shape[-1]) if ctx.needs_input_grad[2] else None
        grad_down = grad @ lora_b
        down_rows = grad_down.reshape(-1, grad_down.shape[-1])
        grad_a = down_rows.t() @ x.reshape(-1, x.shape[-1]).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
        grad_x = (grad_down @ lora_a).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None


def _plain_lora(layer: Any) -> str | None:
    """The adapter name when `layer` runs one plain LoRA adapter, else None."""
    if layer.disable_adapters or layer.merged or torch.is_autocast_enabled() or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _shared_input_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain_lora(layer)
    if name is None or args or kwargs:  # mixed-adapter batches and variants take arguments: peft's forward
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    delta = _LoraDelta.apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
    return result + delta.to(result.dtype)


def keep_lora_inputs_shared(model: Any) -> int:
    """Route every peft LoRA linear layer through `_shared_input_forward`; returns how many."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            module.forward = partial(_shared_input_forward, module)
            count += 1
    return count
