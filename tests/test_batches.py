"""Data order and packing: deterministic, and packing changes no loss."""

import torch

from appliance.data.batches import MicroBatchPlan, collate_lm, pack_rows
from appliance.data.template import IGNORE_INDEX, TokenizedExample


def test_plan_is_a_pure_function_of_the_micro_batch_number():
    plan = MicroBatchPlan(10, 3, seed=7)
    first = [plan(k) for k in range(12)]
    again = MicroBatchPlan(10, 3, seed=7)
    assert [again(k) for k in reversed(range(12))] == list(reversed(first))
    epoch0 = sum(first[:4], [])
    assert sorted(epoch0) == list(range(10))  # every example once per epoch
    assert first[:4] != first[4:8]  # reshuffled each epoch


def test_pack_rows_fits_items_into_rows_as_wide_as_the_longest():
    rows = pack_rows([10, 3, 7, 2, 5])
    assert sorted(sum(rows, [])) == [0, 1, 2, 3, 4]
    assert all(sum([10, 3, 7, 2, 5][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3


def _items():
    torch.manual_seed(0)
    lengths = [12, 5, 9, 3]
    return [
        TokenizedExample(ids := torch.randint(3, 1000, (n,)).tolist(), [IGNORE_INDEX] * (n // 2) + ids[n // 2 :])
        for n in lengths
    ]


def test_packed_loss_equals_separate_losses(tiny):
    """Position ids keep packed examples from attending to each other: same loss, to float precision."""
    from appliance.config import ModelSpec
    from appliance.metrics.lm import causal_lm_loss_sum
    from appliance.hf import load_base

    model = load_base(tiny.model_dir("tiny"), ModelSpec(load_in_4bit=False, gradient_checkpointing=False), "cpu", torch.float32)
    items = _items()
    packed = collate_lm(items, pad_id=2, packing=True)
    assert packed.tensors["input_ids"].shape[0] < len(items)  # really packed
    padded = collate_lm(items, pad_id=2, packing=False)
    with torch.no_grad():
        loss_packed, n_packed = causal_lm_loss_sum(model, packed.tensors)
        loss_padded, n_padded = causal_lm_loss_sum(model, padded.tensors)
        separate = [causal_lm_loss_sum(model, collate_lm([x], 2, False).tensors) for x in items]
    assert n_packed == n_padded == sum(n for _, n in separate)
    total = sum(float(loss) for loss, _ in separate)
    assert abs(float(loss_packed) - total) < 1e-3
    assert abs(float(loss_padded) - total) < 1e-3
    assert packed.useful_tokens == padded.useful_tokens == 29


def test_trained_tokens_count_only_the_labels_that_carry_loss():
    """CPT labels every token of a block, but a block's first token is predicted from nothing of its
    own and gets no loss: the count the loss is averaged over must leave it out."""
    blocks = [TokenizedExample(ids, list(ids)) for ids in ([5, 6, 7, 8], [9, 10, 11], [12, 13])]
    sft = _items()  # first label already ignored: the count does not change
    for items, expected in ((blocks, 3 + 2 + 1), (sft, sum(x.trained_tokens for x in sft))):
        for packing in (True, False):
            batch = collate_lm(items, pad_id=2, packing=packing)
            assert batch.trained_tokens == int((batch.tensors["labels"] != IGNORE_INDEX).sum()) == expected
