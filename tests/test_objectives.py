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

METHODS = REPO / "appliance" / "demo" / "methods"
PREFS = METHODS / "prefs.jsonl"


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


def test_kto_is_its_formula_with_the_kl_from_mismatched_pairs(tiny):
    cfg = load_run_config("kto", flags={
        "model": {"name": "tiny"}, "data": {"files": [{"path": str(METHODS / "feedback.jsonl")}], "val": 2},
        "train": {"steps": 1, "batch_size": 4, "device": "cpu"},
    })
    run = TrainingRun(cfg, tiny, "loss-kto")
    run.setup()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in run.adapter_params.items():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    run.model.eval()
    answers = [run.data.train[i].item for i in range(4)]
    assert {a.desirable for a in answers} == {True, False}
    batch = run.objective.collate(answers)
    tensors = {k: v.to(run.device) for k, v in batch.tensors.items()}
    with torch.no_grad():
        # A policy whose KL estimate is above zero, so the clamp does not hide it.
        for seed in range(1, 20):
            if run.objective.loss_sum(run.model, tensors)[1]["kl"] > 0.01:
                break
            torch.manual_seed(seed)
            for name, param in run.adapter_params.items():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        loss, figures = run.objective.loss_sum(run.model, tensors)

        def reward(item):
            policy = _answer_logprob(run.model, item)[0]
            with run.model.disable_adapter():
                return policy - _answer_logprob(run.model, item)[0]

        from appliance.data.template import TokenizedExample

        rewards = [reward(a.conversation) for a in answers]
        # Each prompt with the next answer: the prompt's tokens up to its answer, then the other's answer.
        mismatched = [
            TokenizedExample(a.conversation.input_ids[: a.answer_start] + b.conversation.input_ids[b.answer_start :],
                             a.conversation.labels[: a.answer_start] + b.conversation.labels[b.answer_start :])
            for a, b in zip(answers, answers[1:] + answers[:1])
        ]
        z = max(0.0, sum(reward(m) for m in mismatched) / len(mismatched))
    beta, wd, wu = cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight
    expected = sum(
        wd * (1 - 1 / (1 + math.exp(-beta * (r - z)))) if a.desirable else wu * (1 - 1 / (1 + math.exp(-beta * (z - r))))
        for a, r in zip(answers, rewards)
    )
    print(f"\nkto: objective {float(loss):.5f}, by hand {expected:.5f}; z {z:.4f}; {figures}")
    assert float(loss) == pytest.approx(expected, rel=2e-3, abs=2e-4)
    assert z > 0.01 and figures["kl"] == pytest.approx(z, rel=2e-3)
    assert {"reward_margin", "reward_accuracy"} <= set(figures)
