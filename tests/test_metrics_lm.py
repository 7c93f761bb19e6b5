"""The chunked linear cross-entropy equals the plain one, in value and gradient, over several chunks.

The logits budget is lowered so that a 50-token vocabulary gets a known chunk size; the rows of
each chunk are recorded as the loss computes them, so the test shows that several chunks ran
(the last one partial), not only that the sums agree.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import appliance.metrics.lm as losses
from appliance.metrics.lm import linear_cross_entropy_sum

VOCAB, WIDTH = 50, 16
# (budget in bytes, rows per chunk it gives, rows): above the 64-row floor, and at it.
CHUNKINGS = [(4 * VOCAB * 100, 100, 237), (1, 64, 150)]


class ChunkRows(TorchFunctionMode):
    """Records the rows of each logsumexp the fused loss takes: one per chunk."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.logsumexp:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def expected_chunks(rows, per_chunk):
    return [min(per_chunk, rows - start) for start in range(0, rows, per_chunk)]


def plain_loss(hidden, head, targets):
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


@pytest.mark.parametrize("budget, per_chunk, rows", CHUNKINGS, ids=["100-row-chunks", "64-row-floor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_matches_plain_over_several_chunks(dtype, budget, per_chunk, rows, monkeypatch):
    monkeypatch.setattr(losses, "LOGITS_BUDGET_BYTES", budget)
    assert losses.chunk_rows(VOCAB) == per_chunk
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False).to(dtype)
    head.weight.requires_grad_(False)  # frozen: the fused path
    hidden = torch.randn(rows, WIDTH, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,))

    with ChunkRows() as chunks:
        fused = linear_cross_entropy_sum(hidden, head, targets)
    assert chunks.rows == expected_chunks(rows, per_chunk) and len(chunks.rows) >= 3
    (fused * 0.5).backward()
    grad_fused = hidden.grad.clone()
    hidden.grad = None
    plain = plain_loss(hidden, head, targets)
    (plain * 0.5).backward()

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fused, plain, rtol=tol, atol=tol)
    assert torch.allclose(grad_fused.float(), hidden.grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("budget, per_chunk, rows", CHUNKINGS[:1], ids=["100-row-chunks"])
def test_trainable_head_loss_matches_plain_over_several_chunks(budget, per_chunk, rows, monkeypatch):
    """A head that trains (LoRA on lm_head) takes the recomputing path: same chunks, same value and gradients."""
    monkeypatch.setattr(losses, "LOGITS_BUDGET_BYTES", budget)
    torch.manual_seed(0)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
    hidden = torch.randn(rows, WIDTH, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,))
    seen = []
    hook = head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))

    chunked = linear_cross_entropy_sum(hidden, head, targets)
    assert seen == expected_chunks(rows, per_chunk) and len(seen) >= 3
    chunked.backward()
    hook.remove()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    plain = plain_loss(hidden, head, targets)
    plain.backward()

    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grads[1], head.weight.grad, rtol=1e-5, atol=1e-5)
