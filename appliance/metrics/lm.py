"""Language-model scores that never hold the full logits: the summed cross-entropy over labelled
tokens (the training loss, and perplexity), sequence log-probabilities (DPO, preference scores),
and a classifier's logits at the token it reads.

The language-model head is the widest matrix in a small model (SmolLM2:
576 × 49,152, a fifth of its forward FLOPs) and its logits are the largest
activation in a big-vocabulary one (Llama 3: 128k floats per token). We
compute logits only at positions that carry loss, a chunk at a time, and —
because the head is frozen — take the gradient with respect to the hidden
states in the same pass (softmax − one-hot, times the head), so nothing is
kept for backward but one hidden-sized gradient.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
# fp32 logits held at once per chunk. 64 MiB, not more: on an H200 (bench/results/gpu-profile-20261129-223100.txt,
# Llama-3.2-1B shape, 1 × 2048 tokens) it cut the step's peak from 2.24 to 1.51 GiB against 256 MiB, at the
# same step time (0.310 s against 0.307, medians of 9 steps): the chunks' products stay wide enough.
LOGITS_BUDGET_BYTES = 64 * 2**20


def chunk_rows(vocab_size: int) -> int:
    return max(64, LOGITS_BUDGET_BYTES // (4 * vocab_size))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weightᵀ, target_i) with the hidden-state gradient computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            t = targets[start : start + rows]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = torch.exp(logits - lse[:, None])
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad[start : start + rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Summed CE of `head(hidden)` against `targets` (rows of hidden, 1-D targets)."""
    weight = getattr(head, "weight", None)
    plain_linear = (
        type(head) is torch.nn.Linear and getattr(head, "bias", None) is None and weight is not None and not weight.requires_grad
    )
    if plain_linear:
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows(weight.shape[0]))
    # A trainable or wrapped head (LoRA on lm_head, a quantized head): chunk with recomputation.
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h, t):
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

    rows = chunk_rows(getattr(head, "out_features", 131072))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        total = total + checkpoint(chunk_loss, hidden[start : start + rows], targets[start : start + rows], use_reentrant=False)
    return total


def causal_lm_hidden(model, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states of a (peft-wrapped) causal LM, without computing its logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    out = decoder(
        input_ids=tensors["input_ids"],
        attention_mask=tensors.get("attention_mask"),
        position_ids=tensors.get("position_ids"),
        use_cache=False,
    )
    return out.last_hidden_state


def output_head(model) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def causal_lm_loss_sum(model, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token CE over labelled positions, number of such positions)."""
    hidden = causal_lm_hidden(model, tensors)
    targets = tensors["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    selected = hidden[:, :-1][keep]
    return linear_cross_entropy_sum(selected, output_head(model), targets[keep]), n


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def sequence_logprobs(model, tensors: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
    """Sum of log p(label token) per item (items identified by `segments`), logits in chunks.

    Each chunk's logits are recomputed in backward (checkpoint) rather than kept: DPO
    needs the log-probabilities themselves, so the fused CE gradient trick does not apply.
    """
    token_logprobs, segment = label_logprobs(model, tensors)
    return torch.zeros(n_items, dtype=torch.float32, device=token_logprobs.device).index_add(0, segment, token_logprobs)


def label_logprobs(model, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label token) at every labelled position, and the item (segment) each belongs to."""
    from torch.utils.checkpoint import checkpoint

    hidden = causal_lm_hidden(model, tensors)
    targets = tensors["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    selected, chosen_targets = hidden[:, :-1][keep], targets[keep]
    segment = tensors["segments"][:, 1:][keep]
    head = output_head(model)
    rows = chunk_rows(getattr(head, "out_features", 131072))
    parts = [
        checkpoint(_chunk_logprobs, head, selected[s : s + rows], chosen_targets[s : s + rows], use_reentrant=False)
        if torch.is_grad_enabled()
        else _chunk_logprobs(head, selected[s : s + rows], chosen_targets[s : s + rows])
        for s in range(0, selected.shape[0], rows)
    ]
    return (torch.cat(parts) if parts else selected.new_zeros(0, dtype=torch.float32)), segment


def sequence_token_counts(tensors: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
    """How many label tokens each item has (what sequence_logprobs sums over): SimPO and ORPO average by it."""
    targets = tensors["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    segment = tensors["segments"][:, 1:][keep]
    return torch.zeros(n_items, dtype=torch.float32, device=segment.device).index_add(0, segment, torch.ones_like(segment, dtype=torch.float32))


def class_logits(model: Any, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits at each row's last real token (the eos the encoder appends).

    transformers reads the rightmost token that is not config.pad_token_id, so the padding is
    written with the model's own pad id (appliance.hf.load_base makes it differ from eos): the read is then
    the same for a row alone and padded in any batch.
    """
    mask = tensors["attention_mask"]
    pad = model.config.pad_token_id
    ids = tensors["input_ids"].masked_fill(mask == 0, pad)
    last = ids.gather(1, (mask.sum(1, keepdim=True) - 1).clamp_min(0))
    if bool((last == pad).any()):
        raise ValueError(f"a classification row ends with the pad id {pad}: the head would read the wrong token")
    return model(input_ids=ids, attention_mask=mask).logits.float()


def perplexity(mean_loss: float) -> float:
    """exp of the mean token loss, capped so that a diverged run prints a number."""
    import math

    return math.exp(min(mean_loss, 50.0))



def _on(batch: Any, device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.tensors.items()}


@torch.no_grad()
def mean_token_loss(model: Any, batches: Any, device: str) -> float:
    """The mean cross-entropy over every labelled token of `batches` (collate_lm batches)."""
    total, count = 0.0, 0
    for batch in batches:
        loss, n = causal_lm_loss_sum(model, _on(batch, device))
        total += float(loss)
        count += n
    return total / max(count, 1)


@torch.no_grad()
def preference_margins(model: Any, batches: Any, device: str) -> torch.Tensor:
    """log π(chosen) − log π(rejected) per pair (collate_pairs batches): the policy's own
    log-probabilities, so any model scores, adapter or not."""
    margins = []
    for batch in batches:
        tensors = _on(batch, device)
        logp = sequence_logprobs(model, tensors, int(tensors["segments"].max()) + 1)
        margins.append((logp[0::2] - logp[1::2]).float().cpu())
    return torch.cat(margins)


@torch.no_grad()
def unpaired_answer_logprobs(model: Any, batches: Any, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean log-probability per answer token, desirable) for each answer of collate_unpaired batches
    (their mismatched half is not scored): the policy's own, so any model scores."""
    means, desirable = [], []
    for batch in batches:
        tensors = _on(batch, device)
        n = int(tensors["segments"].max()) + 1
        mean = sequence_logprobs(model, tensors, n) / sequence_token_counts(tensors, n).clamp_min(1)
        means.append(mean[: n // 2].float().cpu())
        desirable.append(batch.tensors["desirable"])
    return torch.cat(means), torch.cat(desirable)


@torch.no_grad()
def class_probabilities(model: Any, batches: Any, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities, true labels) over collate_classification batches."""
    probs, labels = [], []
    for batch in batches:
        probs.append(torch.softmax(class_logits(model, _on(batch, device)), -1).cpu())
        labels.append(batch.tensors["labels"])
    return torch.cat(probs), torch.cat(labels)
