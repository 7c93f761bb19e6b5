"""Method mechanics on the tiny LLaMA: layer freezing, gradual unfreezing, mixing, early stopping,
train/val/test separation, what a classifier reads."""

import json
import shutil
from collections import Counter

import pytest
import torch

from appliance.config import DataSource, DataSpec, MixSpec, ReplaySpec, load_run_config
from appliance.data.dataset import examples_per_epoch, prepare
from appliance.data.mix import MixturePlan, mixture_probabilities
from appliance.errors import ApplianceError
from appliance.train.events import PhaseChanged
from appliance.train.loop import TrainingRun, run_training
from appliance.train.optim import unfrozen_groups
from conftest import DEMO, REPO, chat, write_jsonl


def config(path=DEMO / "facts.jsonl", **sections):
    flags = {"model": {"name": "tiny"}, "data": {"files": [{"path": str(path)}], "val": 4}, "train": {"steps": 4, "batch_size": 4, "lr": 1e-3}}
    for key, value in sections.items():
        flags.setdefault(key, {}).update(value)
    return load_run_config("sft-qlora", flags=flags)


def test_layers_top_n_puts_adapters_only_on_the_top_layers(tiny):
    run = TrainingRun(config(lora={"layers": "top:1"}), tiny, "x")
    run.setup()
    assert run.adapter_params and all(".layers.1." in n for n in run.adapter_params)
    run = TrainingRun(config(lora={"layers": "0"}), tiny, "y")
    run.setup()
    assert all(".layers.0." in n for n in run.adapter_params)


def test_a_layer_range_outside_the_model_is_refused(tiny):
    with pytest.raises(ApplianceError, match="does not fit a model with 2 layers"):
        TrainingRun(config(lora={"layers": "0-5"}), tiny, "x").setup()
    with pytest.raises(ApplianceError, match="'foo' is not a selection of layers"):
        TrainingRun(config(lora={"layers": "foo"}), tiny, "x").setup()


def test_gradual_unfreezing_follows_its_schedule(tiny):
    phases = []
    cfg = config(train={"steps": 6, "unfreeze": {"groups": 2, "every": 2, "lr_decay": 0.5}, "save_every": 1})
    run = TrainingRun(cfg, tiny, "g", events=lambda e: phases.append(e) if isinstance(e, PhaseChanged) else None)
    run.setup()
    lower = {n: p for n, p in run.adapter_params.items() if ".layers.0." in n}
    upper = {n: p for n, p in run.adapter_params.items() if ".layers.1." in n}
    assert [unfrozen_groups(s, run.cfg.train.unfreeze, run.plan.per_epoch) for s in range(6)] == [1, 1, 2, 2, 2, 2]
    # Discriminative learning rates: the lower group learns at half the rate.
    assert sorted(g["initial_lr"] for g in run.optimizer.param_groups) == [5e-4, 1e-3]

    snapshots = {}
    original_step = run.train_step

    def step_and_snapshot():
        out = original_step()
        snapshots[run.state.step] = {n: p.detach().clone() for n, p in lower.items()}
        return out

    run.train_step = step_and_snapshot
    run.run()
    print("\nphases:", [(p.step, p.description, p.trainable_params) for p in phases])
    assert [(p.step, p.description) for p in phases] == [(0, "top 1 of 2 layer groups"), (2, "top 2 of 2 layer groups")]
    assert phases[0].trainable_params == sum(p.numel() for p in upper.values())
    assert phases[1].trainable_params == sum(p.numel() for p in upper.values()) + sum(p.numel() for p in lower.values())
    # Frozen in steps 1-2, learning from step 3 on.
    assert all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in lower)
    assert any(not torch.equal(snapshots[2][n], snapshots[3][n]) for n in lower)


def test_mixture_probabilities_follow_the_formulas():
    sizes = [10, 40, 90]
    assert mixture_probabilities(sizes, [None] * 3, "equal") == pytest.approx([1 / 3] * 3)
    assert mixture_probabilities(sizes, [None] * 3, "proportional") == pytest.approx([10 / 140, 40 / 140, 90 / 140])
    assert mixture_probabilities(sizes, [1, 2, 1], "proportional") == pytest.approx([10 / 180, 80 / 180, 90 / 180])
    t = [n ** 0.5 for n in sizes]
    assert mixture_probabilities(sizes, [None] * 3, "temperature", 2.0) == pytest.approx([x / sum(t) for x in t])
    assert mixture_probabilities(sizes, [None] * 3, "equal", replay_fraction=0.25) == pytest.approx([0.25] * 4)
    with pytest.raises(ApplianceError, match="sum to zero"):
        mixture_probabilities(sizes, [0, 0, 0], "proportional")


def test_sampled_proportions_match_the_formula(tmp_path):
    files = []
    for name, n in (("a", 10), ("b", 40), ("c", 90)):
        files.append(write_jsonl(tmp_path / f"{name}.jsonl", [chat(f"{name} question {i}", f"answer {i}") for i in range(n)]))
    replay = write_jsonl(tmp_path / "general.jsonl", [chat(f"general {i}", f"g {i}") for i in range(20)])
    spec = DataSpec(
        files=[DataSource(path=f) for f in files],
        val=0,
        mix=MixSpec(strategy="temperature", temperature=2.0),
        replay=ReplaySpec(path=replay, fraction=0.2),
    )
    prepared = prepare(spec, "sft", None)
    expected = mixture_probabilities([10, 40, 90], [None] * 3, "temperature", 2.0, 0.2)
    assert prepared.mixture.probs == pytest.approx(expected)
    plan = MixturePlan(prepared.mixture, 8, seed=1, examples_per_epoch=examples_per_epoch(prepared, 0.2))
    draws = Counter(prepared.train[i].source for k in range(2500) for i in plan(k))
    total = sum(draws.values())
    observed = [draws[s] / total for s in range(4)]
    print(f"\nexpected {[round(p, 3) for p in expected]}, observed {[round(p, 3) for p in observed]} over {total} draws")
    assert observed == pytest.approx(expected, abs=0.01)
    assert plan(17) == MixturePlan(prepared.mixture, 8, seed=1, examples_per_epoch=175)(17)  # a pure function of k


def test_replay_and_mixing_run_through_the_loop(tiny, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [chat(f"general {i}", f"g {i}") for i in range(10)])
    cfg = config(data={"replay": {"path": str(general), "fraction": 0.5}, "mix": {"strategy": "equal"}})
    result = run_training(cfg, tiny, "mixed")
    roles = {d.role for d in tiny.adapter("mixed").data}
    assert roles == {"train", "replay"} and result.steps == 4


def test_early_stopping_restores_the_best_checkpoint(tiny, tmp_path):
    """Validation answers that contradict the training answers: the loss on them falls while the
    model learns the answers' shape, then rises as it learns the training facts, so it has a best step."""
    rows = [json.loads(line) for line in (DEMO / "facts.jsonl").read_text().splitlines()]
    answers = [r["messages"][-1]["content"] for r in rows]
    contradicting = [{"messages": [r["messages"][0], {"role": "assistant", "content": answers[(i + len(rows) // 2) % len(rows)]}]}
                     for i, r in enumerate(rows) if answers[(i + len(rows) // 2) % len(rows)] != r["messages"][-1]["content"]]
    val = write_jsonl(tmp_path / "contradicting.jsonl", contradicting[:8])
    cfg = config(data={"val_file": str(val)},
                 train={"steps": 30, "lr": 1e-2, "schedule": "constant", "warmup": 0, "eval_every": 2, "early_stopping_patience": 2})
    result = run_training(cfg, tiny, "es")
    evals = [m for m in result.history if "val_loss" in m]
    best = min(evals, key=lambda m: m["val_loss"])
    print(f"\nstopped early: {result.stopped_early} after {result.steps} steps; best step {best['step']} val_loss {best['val_loss']:.3f}")
    assert result.stopped_early and result.steps < 30
    assert result.metrics["best_step"] == best["step"]
    assert result.metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-4)


def test_the_test_split_is_held_out_from_training_and_validation(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(50)])
    prepared = prepare(DataSpec(files=[DataSource(path=path)], val=0.2, test=0.2), "sft", None)
    lines = {name: {e.line for e in prepared.split(name)} for name in ("train", "val", "test")}
    assert len(lines["test"]) == 10 and len(lines["val"]) == 10 and len(lines["train"]) == 30
    assert not (lines["test"] & lines["train"]) and not (lines["test"] & lines["val"])


def test_schedules(tiny):
    from appliance.train.optim import schedule_factor

    for kind in ("constant", "linear", "cosine"):
        factors = [schedule_factor(s, 20, 4, kind) for s in range(20)]
        assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and factors[4] == 1.0
        assert (factors[-1] == 1.0) == (kind == "constant")


def test_weight_decay_and_dropout_reach_the_optimizer_and_lora(tiny):
    run = TrainingRun(config(train={"weight_decay": 0.1}, lora={"dropout": 0.2}), tiny, "wd")
    run.setup()
    assert all(g["weight_decay"] == 0.1 for g in run.optimizer.param_groups)
    dropouts = [m for n, m in run.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.p == 0.2 for m in dropouts)


# -- what a classifier reads -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_style_folder(tiny_model_folder, tmp_path_factory):
    """The tiny model set up like Llama-3.x-Instruct: config.eos_token_id is a list and neither the
    config nor the tokenizer names a pad token, so the tokenizer pads with its eos (id 2, not 0)."""
    folder = tmp_path_factory.mktemp("llama3-style")
    for item in tiny_model_folder.iterdir():
        shutil.copy2(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config.pop("pad_token_id", None)
    config["eos_token_id"] = [0, 2]
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def _reviews(tokenizer, n=5):
    """Encoded classification items of different lengths (each text ends with eos)."""
    spec = DataSpec(files=[DataSource(path=REPO / "tests" / "data" / "reviews.jsonl")], val=0)
    items = [e.item for e in prepare(spec, "classify", tokenizer).train]
    by_length = {len(x.input_ids): x for x in items}
    picked = [by_length[n] for n in sorted(by_length)[:: max(1, len(by_length) // n)]][:n]
    assert len({len(x.input_ids) for x in picked}) == len(picked) > 2
    return picked


def _alone_and_together(objective, model, items):
    from appliance.metrics.lm import class_probabilities

    alone = torch.cat([class_probabilities(model, [objective.collate([x])], "cpu")[0] for x in items])
    together, _ = class_probabilities(model, [objective.collate(items)], "cpu")
    return alone, together


@pytest.mark.parametrize("variant", ["llama3-style", "pad-is-eos"])
def test_a_classifier_reads_each_texts_eos_alone_or_padded_in_a_batch(variant, llama3_style_folder, tiny_model_folder):
    """The head reads the eos the encoder ends every text with, whatever pads the shorter rows.
    (transformers reads the rightmost token that is not config.pad_token_id.)"""
    from appliance.config import ModelSpec
    from appliance.hf import load_base, load_tokenizer
    from appliance.train.objectives import objective_for

    folder = llama3_style_folder if variant == "llama3-style" else tiny_model_folder
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    # Loaded as evaluation loads it (real 4-bit), with fp32 compute so the comparison is exact on any CPU.
    spec = ModelSpec(load_in_4bit=True, compute_dtype="float32", gradient_checkpointing=False)
    torch.manual_seed(0)
    model = load_base(folder, spec, "cpu", torch.float32, task="classify", labels=["negative", "positive"])
    model.eval()
    objective = objective_for("classify", tokenizer.pad_token_id, True, load_run_config("classify"))
    items = _reviews(tokenizer)
    alone, together = _alone_and_together(objective, model, items)
    print(f"\n{variant}: largest difference alone vs batched {float((alone - together).abs().max()):.2e}")
    assert torch.allclose(alone, together, atol=1e-5)
    with torch.no_grad():
        for x, probs in zip(items, alone):
            hidden = model.model(input_ids=torch.tensor([x.input_ids])).last_hidden_state[0, -1]
            assert x.input_ids[-1] == tokenizer.eos_token_id
            assert torch.allclose(torch.softmax(model.score(hidden).float(), -1), probs, atol=1e-5)


def test_classifier_training_loss_does_not_depend_on_the_batch(tiny, llama3_style_folder):
    """The training path (TrainingRun loads the base itself): logits and the summed loss of a padded
    batch equal those of its rows one at a time."""
    from appliance.models import import_model
    from appliance.train.loop import TrainingRun
    from appliance.hf import load_tokenizer

    import_model(str(llama3_style_folder), tiny, name="llama3-style")
    cfg = load_run_config(
        "classify",
        flags={
            "model": {"name": "llama3-style", "compute_dtype": "float32"},
            "data": {"files": [{"path": str(REPO / "tests" / "data" / "reviews.jsonl")}], "val": 8},
            "train": {"steps": 1, "batch_size": 8},
        },
    )
    run = TrainingRun(cfg, tiny, "sentiment")
    run.setup()
    run.model.eval()
    items = _reviews(load_tokenizer(tiny.model_dir("llama3-style")))
    alone, together = _alone_and_together(run.objective, run.model, items)
    assert torch.allclose(alone, together, atol=1e-5)
    with torch.no_grad():
        batched_loss, _ = run.objective.loss_sum(run.model, run.objective.collate(items).tensors)
        row_losses = [run.objective.loss_sum(run.model, run.objective.collate([x]).tensors)[0] for x in items]
    assert float(batched_loss) == pytest.approx(float(sum(row_losses)), abs=1e-4)
