"""Transfer-learning methods on the real SmolLM2, each shown to do what it claims:
continued pre-training lowers held-out domain perplexity, DPO, SimPO and ORPO raise the
chosen-minus-rejected margin on held-out pairs, KTO the desirable-minus-undesirable one, a classification head beats the majority class."""

import json

import pytest

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


@pytest.mark.parametrize("recipe", ["dpo", "simpo", "orpo"])
def test_preference_tuning_raises_the_margin_on_held_out_pairs(smollm2, recipe):
    """The same pairs, three losses: DPO against the adapter-off reference, SimPO and ORPO without one."""
    result = train(smollm2, recipe, "prefs.jsonl", f"polite-{recipe}", steps=12, batch_size=4, lr=2e-4, data={"val": 4, "test": 8})
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in records if "loss" in m]
    assert steps and all("reward_margin" in m and "reward_accuracy" in m for m in steps)
    report = evaluate_adapter(smollm2, f"polite-{recipe}")
    print(f"\n{recipe} on {report.examples} held-out pairs: log-prob margin {report.before['logp_margin']:.1f} → "
          f"{report.after['logp_margin']:.1f}, accuracy {report.before['preference_accuracy']:.2f} → {report.after['preference_accuracy']:.2f}; "
          f"train reward margin {steps[0]['reward_margin']:.3f} → {steps[-1]['reward_margin']:.3f}")
    # Measured (2 cores): dpo 19.2 → 66.3, simpo 19.2 → 59.0, orpo 19.2 → 38.8 (its SFT term pulls the chosen answers up too).
    assert report.after["logp_margin"] > report.before["logp_margin"] + 10
    assert report.after["preference_accuracy"] == 1.0
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]


def test_kto_raises_desirable_answers_over_undesirable_ones_on_held_out_feedback(smollm2):
    """Unpaired feedback (each prompt with one answer, marked good or bad): the gap in mean log-probability
    per token between desirable and undesirable held-out answers widens."""
    result = train(smollm2, "kto", "feedback.jsonl", "polite-kto", steps=12, batch_size=8, lr=2e-4, data={"val": 4, "test": 8})
    steps = [m for m in (json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps and all({"kl", "reward_accuracy"} <= set(m) for m in steps)
    report = evaluate_adapter(smollm2, "polite-kto")
    print(f"\nkto on {report.examples} held-out answers: log-prob gap per token {report.before['logp_margin']:.3f} → "
          f"{report.after['logp_margin']:.3f}; train reward accuracy {steps[0]['reward_accuracy']:.2f} → {steps[-1]['reward_accuracy']:.2f}")
    # Measured (2 cores): 3.226 → 5.361 nats per token; reward accuracy 0.50 → 1.00.
    assert report.after["logp_margin"] > report.before["logp_margin"] + 1.0


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
