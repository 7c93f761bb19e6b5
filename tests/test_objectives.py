"""The preference losses (recipes dpo, simpo, orpo) against a direct computation on the tiny LLaMA in
real 4-bit: each pair's chosen and rejected answers scored alone by a plain forward pass, the
paper's formula applied by hand, and the sum compared with what the training loop's objective
computes from the packed batch."""

import math

import pytest
import torch

from appliance.config import load_run_config
from appliance.train import TrainingRun
from conftest import REPO

PREFS = REPO / "tests" / "data" / "prefs.jsonl"


def _answer_logprob(model, item) -> tuple[float, int]:
    """Sum of log p over the answer's labelled tokens, and how many there are: one sequence alone."""
    ids = torch.tensor([item.input_ids], device=model.device)
    labels = torch.tensor(item.labels[1:], device=model.device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    keep = labels != -100
    logp = torch.log_softmax(logits[keep], -1).gather(-1, labels[keep][:, None]).sum()
    return float(logp), int(keep.sum())


def _by_hand(loss: str, beta: float, gamma: float, policy, reference) -> float:
    total = 0.0
    for (pc, nc, pr, nr), (rc, _, rr, _) in zip(policy, reference):
        if loss == "dpo":
            total += -math.log(1 / (1 + math.exp(-beta * ((pc - rc) - (pr - rr)))))
        elif loss == "simpo":
            total += -math.log(1 / (1 + math.exp(-(beta * pc / nc - beta * pr / nr - gamma))))
        else:  # orpo
            def log_odds(mean):
                return mean - math.log(1 - math.exp(mean))

            ratio = log_odds(pc / nc) - log_odds(pr / nr)
            total += -pc / nc - beta * math.log(1 / (1 + math.exp(-ratio)))
    return total


@pytest.mark.parametrize("recipe", ["dpo", "simpo", "orpo"])
def test_each_preference_loss_is_its_formula(recipe, tiny):
    cfg = load_run_config(recipe, flags={
        "model": {"name": "tiny"}, "data": {"files": [{"path": str(PREFS)}], "val": 2},
        "train": {"steps": 1, "batch_size": 3, "device": "cpu"},
    })
    run = TrainingRun(cfg, tiny, f"loss-{recipe}")
    run.setup()
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: move it, so the policy differs from the reference
        for name, param in run.adapter_params.items():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    run.model.eval()  # no dropout: the same function both ways
    pairs = [run.data.train[i].item for i in range(3)]
    batch = run.objective.collate(pairs)
    with torch.no_grad():
        loss, figures = run.objective.loss_sum(run.model, {k: v.to(run.device) for k, v in batch.tensors.items()})

        def scores():
            return [(*_answer_logprob(run.model, p.chosen), *_answer_logprob(run.model, p.rejected)) for p in pairs]

        policy = scores()
        with run.model.disable_adapter():
            reference = scores()
    spec = cfg.dpo
    expected = _by_hand(spec.loss, spec.beta, spec.gamma, policy, reference)
    print(f"\n{recipe}: objective {float(loss):.5f}, by hand {expected:.5f}; {figures}")
    assert float(loss) == pytest.approx(expected, rel=2e-3, abs=2e-3)
    assert {"reward_margin", "reward_accuracy"} <= set(figures)


def test_gamma_belongs_to_simpo(tiny):
    with pytest.raises(Exception, match="SimPO's target margin"):
        load_run_config("dpo", sets=["dpo.gamma=0.5"], flags={"model": {"name": "tiny"}, "data": {"files": [{"path": str(PREFS)}]}})
