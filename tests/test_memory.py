"""The live-memory measurement of our training step (appliance.bench.memory) and the planner against it.

The saved measurements (bench/results/memory-*.json, written by `appliance bench memory --save`)
are re-planned with today's planner: every part of every moment within 15 %. The counter itself
is checked on tensors of known size, and the whole measurement on the tiny LLaMA against the
sizes its own parameters and batch dictate.
"""

from __future__ import annotations

import json

import pytest
import torch

from appliance.plan import TrainSettings, find_model, lora_parameters
from appliance.results import REPO_RESULTS
from appliance.bench.memory import StepCase, compare, measure_step, misses
from appliance.bench.storages import LiveStorages

SAVED = sorted(REPO_RESULTS.glob("memory-*.json"))


def _saved(path):
    return json.loads(path.read_text())["memory"]


def test_saved_measurements_cover_the_issue():
    """Llama-3.2-1B at a short sequence and SmolLM2 at 2048 tokens, each with and without the levers."""
    seen = set()
    for path in SAVED:
        m = _saved(path)
        s = m["settings"]
        assert m["dtype"] == "bfloat16" and s["gradient_checkpointing"] and s["load_in_4bit"], path
        levers = "none" if not s["lora_shared_inputs"] and not s["mlp_tile_tokens"] else ("tiled" if s["mlp_tile_tokens"] else "shared")
        seen.add((m["model"], m["case"]["seq_len"], levers, m["case"]["packed"]))
    for model, seq_len in (("llama-3.2-1b", 512), ("smollm2-135m", 2048)):
        for levers in ("none", "shared", "tiled"):
            assert any(k[:3] == (model, seq_len, levers) for k in seen), (model, seq_len, levers, seen)
    assert any(k[3] for k in seen), "no measurement with the packed-sequence mask"


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.name)
def test_the_planner_is_within_tolerance_of_every_saved_step(path):
    """Every part at the loss, in backward and at the optimizer step (small parts within 2 % of the total)."""
    measured = _saved(path)
    print(f"\n{path.name}: {measured['model']} {measured['case']}")
    for moment, parts in compare(measured).items():
        for name, check in parts.items():
            error = "" if check.error is None else f"{check.error:+6.1%}"
            print(f"  {moment:<9} {name:<17} planned {check.planned_gib:7.3f}  measured {check.measured_gib:7.3f}  {error}")
    assert misses(measured) == []


def test_the_peak_moment_is_the_planners():
    for path in SAVED:
        measured = _saved(path)
        planned = compare(measured)
        moment = max(planned, key=lambda m: planned[m]["total"].planned_gib)
        assert moment == measured["peak_moment"], path.name


# -- the counter ---------------------------------------------------------------------------------


def test_the_counter_counts_storages_once_and_frees_them():
    counter = LiveStorages("cpu")
    counter.moment = "forward"
    with counter:
        x = torch.ones(1000, dtype=torch.float32)  # 4000 bytes
        assert counter.now == 4000
        view = x[10:20].view(2, 5)  # the same storage: nothing new
        y = x * 2  # 4000 more
        assert counter.now == 8000
        del x
        assert counter.now == 8000  # the view keeps the storage alive
        del view
        assert counter.now == 4000
        z = torch.zeros(10, dtype=torch.bfloat16)
        assert counter.now == 4020
        del y, z
    assert counter.now == 0
    assert counter.peaks["forward"][0] == 8000  # x and y together


def test_the_counter_sees_what_autograd_keeps_for_backward():
    w = torch.randn(64, 64, requires_grad=True)
    counter = LiveStorages("cpu")
    counter.moment = "forward"
    with counter:
        h = torch.randn(128, 64)
        out = torch.tanh(h @ w)  # tanh keeps its output for backward; mm keeps h
        kept = counter.now
        del h
        assert counter.now == kept  # h is still saved by the graph
        loss = out.sum()
        del out
        loss.backward()
        del loss
    assert counter.now == 64 * 64 * 4  # the graph is gone; w.grad remains
    assert w.grad is not None


# -- one real step of the tiny model ------------------------------------------------------------


def test_a_measured_step_of_the_tiny_model_is_sane(tiny):
    """Parts that follow from the model and the batch alone, whatever the planner says."""
    case = StepCase(seq_len=64, rows=2, packed=True, rank=4)
    result = measure_step(tiny.model_dir("tiny"), case, name="tiny")
    shape = find_model("tiny", tiny)
    adapters = lora_parameters(shape, TrainSettings(rank=4))
    mib = 2**20 / 2**30

    assert result.case.lengths() == [64, 32, 32]
    assert set(result.moments) == {"forward", "loss", "backward", "optimizer"}
    for moment, figures in result.moments.items():
        parts = figures["parts"]
        assert figures["gib"] == pytest.approx(sum(parts.values())), moment  # everything alive is attributed
        assert parts["lora_weights"] * 2**30 == 4 * adapters  # fp32 adapters, counted before the step
        assert parts["optimizer_states"] * 2**30 >= 8 * adapters  # AdamW: two fp32 states each
        assert parts["kept_weights"] * 2**30 >= 2 * shape.vocab_size * shape.hidden_size  # the bf16 embeddings
        assert 0 < parts["linear_weights"] < parts["kept_weights"]  # 4-bit, and small beside a 49k vocabulary
    loss, backward = result.moments["loss"]["parts"], result.moments["backward"]["parts"]
    assert loss["packed_mask"] * 2**30 == case.rows * case.seq_len**2  # the bool mask, (rows, 1, W, W)
    assert backward["packed_mask"] * 2**30 == 3 * case.rows * case.seq_len**2  # and its bf16 additive copy
    labelled = case.rows * case.seq_len - len(case.lengths())  # each example's first token predicts nothing
    assert loss["logits_and_loss"] * 2**30 >= 3 * 4 * labelled * shape.vocab_size  # fp32 logits, shifted, softmax
    assert loss["lora_gradients"] == 0  # set to None after the warm-up step
    assert result.moments["optimizer"]["parts"]["lora_gradients"] * 2**30 == 4 * adapters
    assert result.peak_moment == "loss" and result.peak_gib > 1 * mib
    assert result.settings["batch_size"] == case.rows and result.settings["packed"] is True
    assert result.settings["optimizer"] == "adamw" and result.settings["gradient_checkpointing"] is True
