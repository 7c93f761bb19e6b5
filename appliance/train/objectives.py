"""What each recipe optimizes. The loop is shared; an objective supplies the collation,
the summed loss with its unit count, and the validation metrics."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from appliance.data import Batch, collate_classification, collate_lm, collate_pairs, collate_unpaired
from appliance.metrics.scores import classification_metrics
from appliance.metrics.lm import (
    causal_lm_loss_sum,
    class_logits,
    class_probabilities,
    mean_token_loss,
    perplexity,
    sequence_logprobs,
    sequence_token_counts,
)


class Objective:
    """Causal language modelling on labelled tokens (sft: assistant tokens; cpt: all tokens)."""

    metric = "val_loss"  # early stopping watches this
    higher_is_better = False

    def __init__(self, pad_id: int, packing: bool):
        self.pad_id = pad_id
        self.packing = packing

    def collate(self, items: Sequence[Any]) -> Batch:
        return collate_lm(items, self.pad_id, self.packing)

    def units(self, batch: Batch) -> int:
        """What the loss of this batch averages over (tokens here), for accumulation weights."""
        return batch.trained_tokens

    def loss_sum(self, model: Any, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _ = causal_lm_loss_sum(model, tensors)
        return loss, {}

    def evaluate(self, model: Any, batches: Sequence[Batch], device: str) -> dict[str, float]:
        mean = mean_token_loss(model, batches, device)
        return {"val_loss": mean, "val_ppl": perplexity(mean)}

    def close(self) -> None:
        """Release what the objective started (GRPO's vLLM server); the run calls it however it ends."""


def _to(batch: Batch, device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.tensors.items()}


class PreferenceObjective(Objective):
    """Preference pairs, under one of three losses (cfg.dpo.loss); c is the chosen answer, r the rejected:

      dpo    −log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])      Rafailov et al. 2023
      simpo  −log σ(β·log π(c)/|c| − β·log π(r)/|r| − γ)                          Meng et al. 2024
      orpo   −log π(c)/|c| − β·log σ(log odds(c) − log odds(r)),                   Hong et al. 2024
             odds(y) = p/(1 − p) with p = exp(log π(y)/|y|)

    DPO's reference is the same 4-bit base with the adapter switched off: no second copy in memory.
    SimPO and ORPO need no reference at all: one forward per step. Each logs its reward margin (the
    implicit reward each loss compares: β·log-ratio, β·mean log-prob, log odds) and how often the
    chosen answer's reward is the higher.
    """

    def __init__(self, pad_id: int, packing: bool, beta: float, loss: str = "dpo", gamma: float = 0.0):
        super().__init__(pad_id, packing)
        self.beta, self.loss, self.gamma = beta, loss, gamma

    def collate(self, items: Sequence[Any]) -> Batch:
        return collate_pairs(items, self.pad_id, self.packing)  # the unit of every preference loss is the pair

    def _terms(self, model: Any, tensors: dict[str, torch.Tensor]):
        """(summed loss, reward margin per pair, log π(c) − log π(r) per pair, extra figures)."""
        n = int(tensors["segments"].max()) + 1
        policy = sequence_logprobs(model, tensors, n)
        logp_margin = (policy[0::2] - policy[1::2]).detach()
        if self.loss == "dpo":
            with torch.no_grad(), model.disable_adapter():
                reference = sequence_logprobs(model, tensors, n)
            margin = self.beta * ((policy[0::2] - reference[0::2]) - (policy[1::2] - reference[1::2]))
            return -torch.nn.functional.logsigmoid(margin).sum(), margin.detach(), logp_margin, {}
        mean_logp = policy / sequence_token_counts(tensors, n).clamp_min(1)
        if self.loss == "simpo":
            margin = self.beta * (mean_logp[0::2] - mean_logp[1::2])
            return -torch.nn.functional.logsigmoid(margin - self.gamma).sum(), margin.detach(), logp_margin, {}
        # ORPO: log odds = log p − log(1 − p), with log(1 − p) = log1p(−exp(log p)) (log p < 0).
        log_odds = mean_logp - torch.log1p(-torch.exp(mean_logp.clamp_max(-1e-6)))
        margin = log_odds[0::2] - log_odds[1::2]
        nll = -mean_logp[0::2]
        loss = (nll - self.beta * torch.nn.functional.logsigmoid(margin)).sum()
        return loss, margin.detach(), logp_margin, {"nll": float(nll.detach().mean())}

    def loss_sum(self, model, tensors):
        loss, margin, _, extra = self._terms(model, tensors)
        return loss, {"reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean()), **extra}

    @torch.no_grad()
    def evaluate(self, model, batches, device):
        losses, margins, logp_margins = [], [], []
        for batch in batches:
            loss, margin, logp_margin, _ = self._terms(model, _to(batch, device))
            losses.append(float(loss))
            margins.append(margin)
            logp_margins.append(logp_margin)
        margin, logp_margin = torch.cat(margins), torch.cat(logp_margins)
        return {
            "val_loss": sum(losses) / len(margin),
            "val_reward_margin": float(margin.mean()),
            "val_reward_accuracy": float((margin > 0).float().mean()),
            "val_logp_margin": float(logp_margin.mean()),  # log π(chosen) − log π(rejected)
        }


class UnpairedObjective(Objective):
    """KTO (Ethayarajh et al. 2024) on unpaired answers, each desirable or not. With r = log π(y) − log π_ref(y)
    and z = max(0, mean r over mismatched prompt/answer pairs) (detached: the policy's KL from the
    reference, estimated in the same batch), an answer costs λ_D·(1 − σ(β(r − z))) when desirable and
    λ_U·(1 − σ(β(z − r))) when not. The reference is the base with the adapter switched off."""

    def __init__(self, pad_id: int, packing: bool, beta: float, desirable_weight: float, undesirable_weight: float):
        super().__init__(pad_id, packing)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def collate(self, items: Sequence[Any]) -> Batch:
        return collate_unpaired(items, self.pad_id, self.packing)

    def _terms(self, model: Any, tensors: dict[str, torch.Tensor]):
        """(summed loss, reward per answer, KL estimate z, desirable mask)."""
        n = int(tensors["segments"].max()) + 1
        policy = sequence_logprobs(model, tensors, n)
        with torch.no_grad(), model.disable_adapter():
            reference = sequence_logprobs(model, tensors, n)
        half = n // 2
        reward = policy[:half] - reference[:half]
        z = (policy[half:] - reference[half:]).detach().mean().clamp_min(0)
        desirable = tensors["desirable"]
        loss = torch.where(
            desirable,
            self.desirable_weight * (1 - torch.sigmoid(self.beta * (reward - z))),
            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - reward))),
        )
        return loss.sum(), reward.detach(), z, desirable

    @staticmethod
    def _figures(reward: torch.Tensor, z: torch.Tensor, desirable: torch.Tensor) -> dict[str, float]:
        """The KL estimate; how often an answer's reward falls on its label's side of it; the mean reward
        of desirable minus undesirable answers (when the batch has both)."""
        figures = {"kl": float(z.mean()), "reward_accuracy": float(((reward > z) == desirable).float().mean())}
        if desirable.any() and (~desirable).any():
            figures["reward_margin"] = float(reward[desirable].mean() - reward[~desirable].mean())
        return figures

    def loss_sum(self, model, tensors):
        loss, reward, z, desirable = self._terms(model, tensors)
        return loss, self._figures(reward, z, desirable)

    @torch.no_grad()
    def evaluate(self, model, batches, device):
        losses, rewards, zs, desirables = [], [], [], []
        for batch in batches:
            loss, reward, z, desirable = self._terms(model, _to(batch, device))
            losses.append(float(loss))
            rewards.append(reward)
            zs.append(z.expand_as(reward))
            desirables.append(desirable)
        reward, z, desirable = torch.cat(rewards), torch.cat(zs), torch.cat(desirables)
        return {"val_loss": sum(losses) / len(reward), **{f"val_{k}": v for k, v in self._figures(reward, z, desirable).items()}}


class ClassificationObjective(Objective):
    """Cross-entropy over classes from a sequence-classification head (LoRA + trained head)."""

    def __init__(self, pad_id: int, packing: bool, metric: str = "val_loss"):
        super().__init__(pad_id, packing=False)
        self.metric = metric
        self.higher_is_better = metric != "val_loss"

    def collate(self, items: Sequence[Any]) -> Batch:
        # The padding id is replaced by the model's own in class_logits.
        return collate_classification(items, self.pad_id)

    def loss_sum(self, model, tensors):
        logits = class_logits(model, tensors)
        loss = torch.nn.functional.cross_entropy(logits, tensors["labels"], reduction="sum")
        return loss, {"accuracy": float((logits.argmax(-1) == tensors["labels"]).float().mean())}

    def evaluate(self, model, batches, device):
        probs, labels = class_probabilities(model, batches, device)
        loss = float(torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), labels))
        return {"val_loss": loss, **{f"val_{k}": v for k, v in classification_metrics(probs, labels).items()}}


def objective_for(task: str, pad_id: int, packing: bool, cfg: Any, model_dir: Any = None) -> Objective:
    if task == "grpo":
        from appliance.hf import load_tokenizer
        from appliance.train.grpo import GroupRelativeObjective

        return GroupRelativeObjective(pad_id, packing, cfg.grpo, load_tokenizer(model_dir))
    if task == "dpo":
        return PreferenceObjective(pad_id, packing, cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.gamma)
    if task == "kto":
        return UnpairedObjective(pad_id, packing, cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    if task == "classify":
        return ClassificationObjective(pad_id, packing, cfg.classify.metric)
    return Objective(pad_id, packing)
