"""The order of examples and how they become tensors.

The order is a pure function of (seed, micro-batch number), so resuming at
step k replays exactly the micro-batches an uninterrupted run would have seen.

Packing puts a micro-batch's examples end to end in one row, with position
ids restarting at 0 for each example. transformers turns such position ids
into a block-diagonal causal mask, so no example attends to another and no
compute is spent on padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from appliance.data.template import IGNORE_INDEX


class MicroBatchPlan:
    """Micro-batch k → example indices: a seeded permutation per epoch, no example twice per epoch."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = max(1, -(-n_examples // batch_size))
        self._cache: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cache = (epoch, order)
        return self._cache[1]

    def epoch_of(self, k: int) -> float:
        return k / self.per_epoch

    def __call__(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        order = self._order(epoch)
        return order[i * self.batch_size : (i + 1) * self.batch_size]


@dataclass
class Batch:
    tensors: dict[str, Any]  # what the objective needs: input_ids, labels, position_ids, attention_mask...
    useful_tokens: int  # real tokens, padding excluded
    trained_tokens: int  # tokens that carry loss


def pack_rows(lengths: Sequence[int]) -> list[list[int]]:
    """First-fit decreasing into rows as wide as the longest item: few rows, little padding,
    and attention cost bounded by rows × width² rather than (sum of lengths)²."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def collate_lm(items: Sequence[Any], pad_id: int, packing: bool) -> Batch:
    """Causal-LM items (input_ids + labels) packed into few rows, or one padded row each.

    Packed rows carry position ids that restart at 0 for each item (and for the
    padding at a row's end), so each item attends only to itself.
    """
    import torch

    useful = sum(len(x.input_ids) for x in items)
    # The loss averages over the labels written below, which never include an item's first.
    trained = sum(sum(1 for t in x.labels[1:] if t != IGNORE_INDEX) for x in items)
    rows = pack_rows([len(x.input_ids) for x in items]) if packing else [[i] for i in range(len(items))]
    width = max(len(x.input_ids) for x in items)
    ids, labels, positions, segments = [], [], [], []
    for row in rows:
        row_ids, row_labels, row_pos, row_seg = [], [], [], []
        for i in row:
            x = items[i]
            row_ids += x.input_ids
            # An item's first token is predicted from nothing of its own: no loss there.
            row_labels += [IGNORE_INDEX] + list(x.labels[1:])
            row_pos += list(range(len(x.input_ids)))
            row_seg += [i] * len(x.input_ids)
        pad = width - len(row_ids)
        ids.append(row_ids + [pad_id] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
        positions.append(row_pos + list(range(pad)))
        segments.append(row_seg + [-1] * pad)
    # segments: which item each position belongs to (-1: padding), for per-sequence sums (DPO).
    tensors = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "segments": torch.tensor(segments)}
    if packing:
        tensors["position_ids"] = torch.tensor(positions)
    else:
        lengths = [len(items[row[0]].input_ids) for row in rows]
        tensors["attention_mask"] = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return Batch(tensors, useful, trained)


def collate_pairs(items: Sequence[Any], pad_id: int, packing: bool) -> Batch:
    """Preference pairs: each pair's chosen then rejected sequence (chosen at even segments,
    rejected at odd); the batch's unit is the pair."""
    batch = collate_lm([x for pair in items for x in (pair.chosen, pair.rejected)], pad_id, packing)
    batch.trained_tokens = len(items)
    return batch


def collate_unpaired(items: Sequence[Any], pad_id: int, packing: bool) -> Batch:
    """KTO's answers (segments 0..n-1), then each prompt with the next item's answer (segments
    n..2n-1): the mismatched pairs whose reward estimates the policy's KL from the reference.
    `desirable` marks each answer; the batch's unit is the answer."""
    import torch

    from appliance.data.template import TokenizedExample

    n = len(items)
    mismatched = []
    for i, item in enumerate(items):
        other = items[(i + 1) % n]
        start, other_start = item.answer_start, other.answer_start
        mismatched.append(TokenizedExample(
            item.conversation.input_ids[:start] + other.conversation.input_ids[other_start:],
            item.conversation.labels[:start] + other.conversation.labels[other_start:],
        ))
    batch = collate_lm([x.conversation for x in items] + mismatched, pad_id, packing)
    batch.tensors["desirable"] = torch.tensor([x.desirable for x in items])
    batch.trained_tokens = n
    return batch


def collate_classification(items: Sequence[Any], pad_id: int) -> Batch:
    """Labelled texts, right-padded (the classifier reads the last real token)."""
    import torch

    width = max(len(x.input_ids) for x in items)
    ids = [list(x.input_ids) + [pad_id] * (width - len(x.input_ids)) for x in items]
    mask = [[1] * len(x.input_ids) + [0] * (width - len(x.input_ids)) for x in items]
    tensors = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor([x.label for x in items])}
    return Batch(tensors, sum(len(x.input_ids) for x in items), len(items))
