"""Exact-duplicate removal, seeded train/validation/test split, and the leakage check."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")


def dedupe(items: Sequence[T], key) -> tuple[list[T], list[T]]:
    """Keep the first of each exact duplicate; return (kept, removed)."""
    seen: set[str] = set()
    kept, removed = [], []
    for item in items:
        k = key(item)
        if k in seen:
            removed.append(item)
        else:
            seen.add(k)
            kept.append(item)
    return kept, removed


def split_count(n: int, size: float) -> int:
    """A split size as given: a fraction when < 1, else a count."""
    if size <= 0:
        return 0
    count = round(n * size) if size < 1 else int(size)
    return min(count, n)


def split(items: Sequence[T], val: float, test: float, seed: int) -> tuple[list[T], list[T], list[T]]:
    """Seeded shuffle, then test, validation and train slices; the same seed gives the same split."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = split_count(len(items), test)
    n_val = split_count(len(items), val)
    if len(items) > 1 and n_test + n_val >= len(items):
        n_val = max(0, len(items) - n_test - 1)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    pick = lambda idx: [items[i] for i in sorted(idx)]  # noqa: E731 - keep file order inside each split
    return pick(train_idx), pick(val_idx), pick(test_idx)


@dataclass(frozen=True)
class Leak:
    prompt: str
    splits: tuple[str, ...]  # e.g. ("train", "val")


def leakage(splits: dict[str, Sequence], prompt_key) -> list[Leak]:
    """Prompts that appear in more than one split: validation on them measures memory, not learning."""
    where: dict[str, list[str]] = {}
    for name, items in splits.items():
        for key in {prompt_key(x) for x in items}:
            where.setdefault(key, []).append(name)
    return [Leak(k, tuple(v)) for k, v in where.items() if len(v) > 1]
