"""What each recipe optimizes. The loop is shared; an objective supplies the
collation, the summed loss with its unit count, and the validation metrics."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from appliance.data.batches import Batch, collate_lm
from appliance.train.losses import causal_lm_loss_sum


class Objective:
    """Base: causal language modelling on labelled tokens (sft: assistant tokens; cpt: all tokens)."""

    metric = "val_loss"  # early stopping watches this
    higher_is_better = False
    unit = "tokens"

    def __init__(self, pad_id: int, packing: bool):
        self.pad_id = pad_id
        self.packing = packing

    def collate(self, items: Sequence[Any]) -> Batch:
        return collate_lm(items, self.pad_id, self.packing)

    def units(self, batch: Batch) -> int:
        """How many things the loss of this batch averages over (for accumulation weights)."""
        return batch.trained_tokens

    def loss_sum(self, model: Any, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _ = causal_lm_loss_sum(model, tensors)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model: Any, batches: Sequence[Batch], device: str) -> dict[str, float]:
        total, count = 0.0, 0
        for batch in batches:
            tensors = {k: v.to(device) for k, v in batch.tensors.items()}
            loss, n = causal_lm_loss_sum(model, tensors)
            total += float(loss)
            count += n
        mean = total / max(count, 1)
        return {"val_loss": mean, "val_ppl": float(torch.exp(torch.tensor(min(mean, 50.0))))}


OBJECTIVES: dict[str, type[Objective]] = {"sft": Objective, "cpt": Objective}


def objective_for(task: str, pad_id: int, packing: bool, **kwargs: Any) -> Objective:
    return OBJECTIVES[task](pad_id, packing, **kwargs)
