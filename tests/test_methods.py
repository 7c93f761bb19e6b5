"""Transfer-learning methods on the real SmolLM2, each shown to do what it claims:
continued pre-training lowers held-out domain perplexity, DPO, SimPO and ORPO raise the
chosen-minus-rejected margin on held-out pairs, KTO the desirable-minus-undesirable one, GRPO a
verifiable reward, a classification head beats the majority class."""


import pytest

from appliance.bench.methods import run_method
from appliance.config import load_run_config
from appliance.evaluate import evaluate_adapter
from appliance.merge import merge_adapter
from appliance.train.loop import run_training
from conftest import REPO

pytestmark = pytest.mark.slow
DATA = REPO / "tests" / "data"


def train(registry, recipe, filename, name, data=None, **train):
    cfg = load_run_config(
        recipe,
        flags={
            "model": {"name": "smollm2"},
            "data": {"files": [{"path": str(DATA / filename)}], **(data or {})},
            "train": {"save_every": 100, **train},
        },
    )
    return run_training(cfg, registry, name)


def test_cpt_lowers_perplexity_on_held_out_domain_text(smollm2):
    train(smollm2, "cpt", "domain.txt", "tram", steps=10, batch_size=4, lr=5e-4, data={"seq_len": 128, "val": 4, "test": 8})
    report = evaluate_adapter(smollm2, "tram")
    print(f"\ncpt on {report.examples} held-out blocks: perplexity {report.before['perplexity']:.1f} → {report.after['perplexity']:.1f}; "
          f"forgetting {report.forgetting.change_pct:+.1f} %")
    assert report.split == "test"
    assert report.after["perplexity"] < 0.5 * report.before["perplexity"]
    assert abs(report.forgetting.change_pct) < 25


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo"])
def test_preference_tuning_raises_the_margin_on_held_out_pairs(smollm2, method):
    """The same pairs, three losses: DPO against the adapter-off reference, SimPO and ORPO without one
    (the runs `appliance bench methods` measures)."""
    f = run_method(smollm2, method)
    print(f"\n{method} on {f.held_out} held-out pairs: log-prob margin {f.before['logp_margin']:.1f} → {f.after['logp_margin']:.1f}; "
          f"train reward margin {f.first_steps['reward_margin']:.3f} → {f.last_steps['reward_margin']:.3f}")
    # Measured (2 cores, bench/results/methods-cpu-20261130-032551.json): dpo 19.4 → 67.0, simpo 19.4 → 59.5, orpo 19.4 → 39.0 (its SFT term pulls the chosen answers up too).
    assert f.after["logp_margin"] > f.before["logp_margin"] + 10
    assert f.after["preference_accuracy"] == 1.0
    assert f.last_steps["reward_margin"] > f.first_steps["reward_margin"]


def test_kto_raises_desirable_answers_over_undesirable_ones_on_held_out_feedback(smollm2):
    """Unpaired feedback (each prompt with one answer, marked good or bad): the gap in mean log-probability
    per token between desirable and undesirable held-out answers widens."""
    f = run_method(smollm2, "kto")
    print(f"\nkto on {f.held_out} held-out answers: log-prob gap per token {f.before['logp_margin']:.3f} → {f.after['logp_margin']:.3f}; "
          f"train reward accuracy {f.first_steps['reward_accuracy']:.2f} → {f.last_steps['reward_accuracy']:.2f}")
    # Measured (2 cores, same file): 3.24 → 5.36 nats per token.
    assert f.after["logp_margin"] > f.before["logp_margin"] + 1.0


def test_grpo_raises_a_verifiable_reward(smollm2):
    """Brevity (at most 8 words scores 1): SmolLM2's sampled answers start long; the reward must rise."""
    f = run_method(smollm2, "grpo")
    print(f"\ngrpo brevity: sampled reward {f.first_steps['reward']:.3f} (steps 1-3) → {f.last_steps['reward']:.3f} (last 3); answer tokens "
          f"{f.first_steps['completion_tokens']:.0f} → {f.last_steps['completion_tokens']:.0f}; held-out greedy reward "
          f"{f.before['reward']:.3f} → {f.after['reward']:.3f}")
    # Measured (2 cores, bench/results/methods-cpu-20261130-032551.json): 0.534 → 0.753 sampled, greedy held-out 0.626 → 0.844.
    assert f.last_steps["reward"] > f.first_steps["reward"] + 0.1
    assert f.after["reward"] > f.before["reward"]


def test_classifier_beats_the_majority_class_and_merges_to_a_standard_folder(smollm2):
    train(smollm2, "classify", "reviews.jsonl", "sentiment", steps=15, batch_size=8, lr=5e-4, data={"val": 12, "test": 24})
    report = evaluate_adapter(smollm2, "sentiment")
    print(f"\nclassify on {report.examples} held-out reviews: {report.after} vs {report.against} {report.before}")
    assert report.after["accuracy"] > report.before["accuracy"] + 0.2
    assert {"accuracy", "macro_f1", "roc_auc"} <= set(report.after)

    merged = merge_adapter(smollm2, "sentiment", name="sentiment-model")
    assert merged.architecture == "LlamaForSequenceClassification" and merged.task == "classify"
    assert merged.parity.evaluated.top1_agreement >= merged.parity.gate_min_top1
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import torch

    folder = smollm2.model_dir("sentiment-model")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    texts = ["This kettle broke after two days. Avoid it.", "This lamp is a joy to use. Five stars."]
    with torch.no_grad():
        logits = [model(**tokenizer(t + tokenizer.eos_token, return_tensors="pt")).logits[0] for t in texts]
    # Loaded by transformers alone, it ranks the reviews as the evaluation did (ROC AUC): the
    # positive review scores higher for "positive". (After 15 steps its threshold can still lean
    # to the majority class, which the evaluation's accuracy shows; the ranking is what was learned.)
    margins = [float(l[1] - l[0]) for l in logits]
    assert margins[1] > margins[0], margins
    # The merged classifier batches: padded rows give the logits each row gives alone.
    batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    assert tokenizer.pad_token_id == model.config.pad_token_id != tokenizer.eos_token_id
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**tokenizer(t + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)).logits for t in texts])
    assert torch.allclose(together, alone, atol=1e-4), (together, alone)
