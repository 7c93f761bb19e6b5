"""Mixing several data sources, and replaying general data against forgetting.

Strategies (the T5 paper's terms), for sources of sizes n_i and weights w_i:
    concat        every example once per epoch, in a seeded shuffle (weights refused)
    equal         p_i = 1 / k   (weights refused)
    proportional  p_i ∝ w_i · n_i   (w_i = 1 when unset)
    temperature   p_i ∝ (w_i · n_i)^(1/T)   (T = 1 is proportional, T → ∞ is equal)
Replay takes a fixed share f of every draw for the general data; the task
sources share the remaining 1 − f by their strategy.

Sampling is a pure function of (seed, micro-batch number), so a resumed run
draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from appliance.errors import ApplianceError


def mixture_probabilities(
    sizes: Sequence[int],
    weights: Sequence[float | None],
    strategy: str,
    temperature: float = 2.0,
    replay_fraction: float = 0.0,
) -> list[float]:
    """Sampling probability of each task source (and, last, the replay source when f > 0)."""
    if strategy == "equal":
        raw = [1.0 for _ in sizes]
    elif strategy == "temperature":
        raw = [(n * (1.0 if w is None else w)) ** (1.0 / temperature) for n, w in zip(sizes, weights)]
    else:  # proportional (and concat, whose expected shares are the sizes)
        raw = [n * (1.0 if w is None else w) for n, w in zip(sizes, weights)]
    total = sum(raw)
    if total <= 0:
        raise ApplianceError(
            "The data weights sum to zero, so nothing would be sampled.",
            "give at least one --data file a positive weight (FILE:WEIGHT)",
        )
    probs = [r / total * (1.0 - replay_fraction) for r in raw]
    return probs + ([replay_fraction] if replay_fraction > 0 else [])


@dataclass(frozen=True)
class Mixture:
    """Global example indices grouped by source, and each source's sampling probability."""

    groups: list[list[int]]
    probs: list[float]
    names: list[str]


class MixturePlan:
    """Micro-batch k → example indices drawn by source probability (with replacement inside a source)."""

    def __init__(self, mixture: Mixture, batch_size: int, seed: int, examples_per_epoch: int):
        self.mixture = mixture
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = max(1, -(-examples_per_epoch // batch_size))
        self._cumulative = []
        acc = 0.0
        for p in mixture.probs:
            acc += p
            self._cumulative.append(acc)

    def epoch_of(self, k: int) -> float:
        return k / self.per_epoch

    def _source(self, u: float) -> int:
        for i, edge in enumerate(self._cumulative):
            if u < edge:
                return i
        return len(self._cumulative) - 1

    def __call__(self, k: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + k)
        out = []
        for _ in range(self.batch_size):
            group = self.mixture.groups[self._source(rng.random())]
            out.append(group[rng.randrange(len(group))])
        return out
