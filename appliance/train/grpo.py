"""GRPO (Shao et al. 2024, DeepSeekMath): reinforcement learning from reward functions, on the shared loop.

A micro-batch is a set of prompts. For each, `group_size` answers are sampled from the policy as it
is now (transformers' generate, no gradient; or vLLM, appliance.serve.sampler, when the run was given
it); the user's reward functions score each answer, and an answer's advantage is its reward minus
its group's mean, over the group's standard deviation. The loss is the policy gradient of that advantage, each answer's tokens averaged (the paper's
normalisation), with an optional KL penalty to the adapter-off reference (the k3 estimator, per
token). One update per batch of samples, so the policy ratio is 1 and its clip never binds: the
gradient is the advantage times ∇ log π, what TRL computes with its defaults.

Validation samples one greedy answer per held-out prompt: `val_reward` (higher is better) is what
early stopping watches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from appliance.config import GrpoSpec
from appliance.data import IGNORE_INDEX, Batch, collate_lm
from appliance.data.template import TokenizedExample
from appliance.metrics.lm import label_logprobs, sequence_token_counts
from appliance.rewards import load_rewards, mean_reward, sample, score
from appliance.train.objectives import Objective


class GroupRelativeObjective(Objective):
    metric = "val_reward"
    higher_is_better = True

    def __init__(self, pad_id: int, packing: bool, spec: GrpoSpec, tokenizer: Any):
        super().__init__(pad_id, packing)
        self.spec, self.tokenizer = spec, tokenizer
        self.rewards = load_rewards(spec.reward_file)
        self.sampler = None  # a VllmSampler when vLLM draws the answers (appliance.serve.sampler)
        # Prompts by key: a batch carries keys (tensors only travel to the device), the texts stay here.
        self._prompts: dict[int, Any] = {}
        self._next_key = 0

    def collate(self, items: Sequence[Any]) -> Batch:
        keys = list(range(self._next_key, self._next_key + len(items)))
        self._next_key += len(items)
        self._prompts.update(zip(keys, items))
        # The unit of the loss is the sampled answer.
        return Batch({"prompt_keys": torch.tensor(keys)}, sum(len(x.input_ids) for x in items), len(items) * self.spec.group_size)

    def _prompts_of(self, tensors: dict[str, torch.Tensor]) -> list[Any]:
        return [self._prompts[k] for k in tensors["prompt_keys"].tolist()]

    def _rewards(self, prompts: list[Any], sampled) -> torch.Tensor:
        return torch.tensor([score(self.rewards, prompts[s.prompt_index].prompt, s.text, prompts[s.prompt_index].answer) for s in sampled])

    def loss_sum(self, model: Any, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        prompts, group = self._prompts_of(tensors), self.spec.group_size
        for key in tensors["prompt_keys"].tolist():
            del self._prompts[key]  # a training batch is used once
        how = {"per_prompt": group, "max_new_tokens": self.spec.max_new_tokens, "temperature": self.spec.temperature}
        if self.sampler is not None:
            sampled, sampler_logprobs = self.sampler.sample(model, self.tokenizer, [p.input_ids for p in prompts], **how)
        else:
            sampled, sampler_logprobs = sample(model, self.tokenizer, [p.input_ids for p in prompts], **how), None
        rewards = self._rewards(prompts, sampled).view(len(prompts), group)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        sequences = [TokenizedExample(prompts[s.prompt_index].input_ids + s.ids, [IGNORE_INDEX] * len(prompts[s.prompt_index].input_ids) + s.ids)
                     for s in sampled]
        batch = {k: v.to(model.device) for k, v in collate_lm(sequences, self.pad_id, self.packing).tensors.items()}
        logp, segment = label_logprobs(model, batch)
        advantage = advantages.to(logp.device)[segment]
        # exp(logp − logp.detach()) is 1 with gradient ∇logp: the ratio of one update on fresh samples.
        per_token = -torch.exp(logp - logp.detach()) * advantage
        figures = {}
        if self.spec.beta:
            with torch.no_grad(), model.disable_adapter():
                reference, _ = label_logprobs(model, batch)
            gap = reference - logp
            kl = torch.exp(gap) - gap - 1
            per_token = per_token + self.spec.beta * kl
            figures["kl"] = float(kl.detach().mean())
        n = len(sampled)
        counts = sequence_token_counts(batch, n)
        if sampler_logprobs is not None:
            # Per answer token, how far the sampler's log-probability is from the policy's own.
            policy = torch.zeros(n, device=logp.device).index_add(0, segment, logp.detach().float())
            served = torch.tensor([sum(x) for x in sampler_logprobs], device=logp.device)
            figures["sampler_logprob_gap"] = float(((policy - served).abs() / counts.clamp_min(1)).mean())
        loss = (torch.zeros(n, device=logp.device).index_add(0, segment, per_token) / counts.clamp_min(1)).sum()
        figures.update({
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std(1).mean()),
            "completion_tokens": float(sum(len(s.ids) for s in sampled) / n),
        })
        return loss, figures

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()

    @torch.no_grad()
    def evaluate(self, model: Any, batches: Sequence[Batch], device: str) -> dict[str, float]:
        prompts = [p for batch in batches for p in self._prompts_of(batch.tensors)]
        return {"val_reward": mean_reward(model, self.tokenizer, prompts, self.rewards, self.spec.max_new_tokens)}

