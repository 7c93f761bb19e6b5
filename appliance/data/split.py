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


def split(items: Sequence[T], val: float, test: float, seed: int, group=None) -> tuple[list[T], list[T], list[T]]:
    """Seeded shuffle, then test, validation and train slices; the same seed gives the same split.
    `group(item)`: items of the same group (an example and its paraphrases) land in one split."""
    if group is not None and any(group(x) is not None for x in items):
        return _split_groups(items, val, test, seed, group)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = split_count(len(items), test)
    n_val = split_count(len(items), val)
    if len(items) > 1 and n_test + n_val >= len(items):
        n_val = max(0, len(items) - n_test - 1)
    test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    pick = lambda idx: [items[i] for i in sorted(idx)]  # noqa: E731 - keep file order inside each split
    return pick(train_idx), pick(val_idx), pick(test_idx)


def _split_groups(items: Sequence[T], val: float, test: float, seed: int, group) -> tuple[list[T], list[T], list[T]]:
    """Whole groups to test, then validation, until each holds its share of the items; the rest train."""
    members: dict[str, list[int]] = {}
    for i, x in enumerate(items):
        members.setdefault(group(x) or f"\x00{i}", []).append(i)
    keys = list(members)
    random.Random(seed).shuffle(keys)
    n_test, n_val = split_count(len(items), test), split_count(len(items), val)
    parts: list[list[int]] = [[], [], []]  # test, val, train
    for key in keys:
        target = 0 if len(parts[0]) < n_test else 1 if len(parts[1]) < n_val else 2
        if target < 2 and not parts[2] and key == keys[-1]:
            target = 2  # keep something to train on
        parts[target] += members[key]
    test_idx, val_idx, train_idx = parts
    pick = lambda idx: [items[i] for i in sorted(idx)]  # noqa: E731 - keep file order inside each split
    return pick(train_idx), pick(val_idx), pick(test_idx)


@dataclass(frozen=True)
class Leak:
    prompt: str  # the key examples are compared by: a chat's turns as role\x1fcontent, joined by \x1e
    splits: tuple[str, ...]  # e.g. ("train", "val")

    @property
    def shown(self) -> str:
        """The prompt as a person reads it: "user: ... / assistant: ..."."""
        return self.prompt.replace("\x1f", ": ").replace("\x1e", " / ")


def leakage(splits: dict[str, Sequence], prompt_key) -> list[Leak]:
    """Prompts that appear in more than one split: validation on them measures memory, not learning."""
    where: dict[str, list[str]] = {}
    for name, items in splits.items():
        for key in {prompt_key(x) for x in items} - {None, ""}:
            where.setdefault(key, []).append(name)
    return [Leak(k, tuple(v)) for k, v in where.items() if len(v) > 1]
