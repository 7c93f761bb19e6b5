"""The MLP computed a tile of tokens at a time, for long sequences.

At 24k tokens a Llama-3.1-8B MLP's activations in one block's backward are several
GiB (gate, up, their product, LoRA's input copies and their gradients, each
14336 wide per token), more than the rest of the block. The MLP works on each
token alone, so it can run over tiles of tokens: forward keeps only the MLP's
input, and backward recomputes one tile with gradients, backpropagates it and
frees it before the next. The cost is one more MLP forward per step.

Adapter weights receive their gradients from the inner backward of each tile
(the way reentrant checkpointing works), so the trainable weights are passed to
the autograd function only to make its output require a gradient when the MLP's
input does not (frozen embeddings, adapters on the MLP alone).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device):
    """The random draws of a tile's forward again (LoRA dropout), leaving the global state as it was."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type="cuda" if cuda is not None else "cpu"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward_fn, tile_tokens: int, x: torch.Tensor, *trainable: torch.Tensor):
        rows = x.reshape(-1, x.shape[-1])
        ctx.forward_fn, ctx.tile_tokens, ctx.rng = forward_fn, tile_tokens, []
        tiles = []
        for start in range(0, rows.shape[0], tile_tokens):
            ctx.rng.append(_rng_state(x.device))
            tiles.append(forward_fn(rows[start : start + tile_tokens]))
        ctx.save_for_backward(x)
        out = torch.cat(tiles) if len(tiles) > 1 else tiles[0]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        rows, grads = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        wants_input_grad = ctx.needs_input_grad[2]
        grad_rows = torch.empty_like(rows) if wants_input_grad else None
        for i, start in enumerate(range(0, rows.shape[0], ctx.tile_tokens)):
            tile = rows[start : start + ctx.tile_tokens].detach().requires_grad_(wants_input_grad)
            with torch.enable_grad(), _replayed_rng(ctx.rng[i], x.device):
                out = ctx.forward_fn(tile)
            if out.requires_grad:
                torch.autograd.backward(out, grads[start : start + ctx.tile_tokens])
            if grad_rows is not None:
                grad_rows[start : start + ctx.tile_tokens] = tile.grad if tile.grad is not None else 0
        grad_x = grad_rows.view_as(x) if grad_rows is not None else None
        return (None, None, grad_x, *([None] * (len(ctx.needs_input_grad) - 3)))


def _tiled_forward(mlp: torch.nn.Module, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    forward_fn = partial(type(mlp).forward, mlp)
    if x.shape[:-1].numel() <= tile_tokens:
        return forward_fn(x)
    trainable = [p for p in mlp.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    return _TiledMLP.apply(forward_fn, tile_tokens, x, *trainable)


def tile_mlps(model: Any, tile_tokens: int) -> int:
    """Make every decoder layer's MLP run `tile_tokens` tokens at a time; returns how many.

    The MLP module stays where it is (its weights and adapter names are unchanged); only
    its forward is replaced on the instance.
    """
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and hasattr(module, "down_proj"):
            module.forward = partial(_tiled_forward, module, tile_tokens)
            count += 1
    return count
