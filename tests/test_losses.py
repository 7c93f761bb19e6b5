"""The fused linear cross-entropy equals the plain one, in value and gradient."""

import pytest
import torch

from appliance.train.losses import linear_cross_entropy_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_matches_plain(dtype, monkeypatch):
    import appliance.train.losses as losses

    monkeypatch.setattr(losses, "LOGITS_BUDGET_BYTES", 4 * 50 * 7)  # force several chunks of 7 rows
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    head.weight.requires_grad_(False)
    hidden = torch.randn(30, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (30,))

    fused = linear_cross_entropy_sum(hidden, head, targets)
    (fused * 0.5).backward()
    grad_fused = hidden.grad.clone()
    hidden.grad = None
    plain = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (plain * 0.5).backward()

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fused, plain, rtol=tol, atol=tol)
    assert torch.allclose(grad_fused.float(), hidden.grad.float(), rtol=tol, atol=tol)
