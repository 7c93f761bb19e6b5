"""Evaluation: before (the base) versus after (base + adapter) on held-out data.

    sft       perplexity on the answers; exact match, token F1 and ROUGE-L of greedy answers
    cpt       perplexity on held-out domain text
    dpo       log π(chosen) − log π(rejected) margin and preference accuracy
    classify  accuracy, macro F1, ROC AUC (the "before" is the majority class)
and for generation tasks a forgetting check: perplexity on general text shipped
with the package, base versus adapter, as a change in %.

The held-out data is the adapter's own test split (rebuilt from its manifest:
same files, same seed), else its validation split, unless --data names a file.
Metrics come from well-kept libraries: scikit-learn, rouge-score.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from appliance.errors import ApplianceError

GENERAL_TEXT = "general.txt"


# -- metrics -----------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def classification_metrics(probs, labels) -> dict[str, float]:
    """Accuracy, macro F1 and ROC AUC (one-vs-rest for several classes) by scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    y_true = labels.numpy()
    p = probs.numpy()
    y_pred = p.argmax(-1)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(p.shape[1])), zero_division=0)),
    }
    if len(set(y_true.tolist())) == p.shape[1]:  # AUC needs every class among the true labels
        if p.shape[1] == 2:
            out["roc_auc"] = float(roc_auc_score(y_true, p[:, 1]))
        else:
            out["roc_auc"] = float(roc_auc_score(y_true, p, multi_class="ovr", average="macro"))
    return out


# -- models -----------------------------------------------------------------------------------


def load_for_inference(
    model_dir, adapter_dir=None, *, load_in_4bit: bool = True, device: str = "auto", dtype: str = "auto", task: str = "sft", labels=None
):
    """The base (4-bit as trained, or 16-bit) with an optional adapter, ready for evaluation, where
    training runs (`device` 'auto': the GPU when there is one) and in what training computes
    (`dtype` 'auto': the device's native type; on the CPU, the CPU's own)."""
    from appliance.config import ModelSpec
    from appliance.hardware import detect
    from appliance.train.model import compute_dtype, load_base, quiet_libraries, resolve_device

    quiet_libraries()
    hw = detect()
    device = resolve_device(device, hw)
    spec = ModelSpec(load_in_4bit=load_in_4bit, gradient_checkpointing=False, compute_dtype=dtype)
    model = load_base(model_dir, spec, device, compute_dtype(spec, device, hw), task=task, labels=labels)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model


def generate_answers(model: Any, tokenizer: Any, questions: Sequence[str | Sequence[dict]], *, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to questions (text, or a conversation ending in a user turn)."""
    import torch

    from appliance.data.template import render

    answers = []
    model.eval()
    for question in questions:
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        prompt = render(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def general_text_path() -> Path:
    return Path(str(resources.files("appliance") / "demo" / GENERAL_TEXT))


# -- the evaluation ----------------------------------------------------------------------------


@dataclass
class EvalReport:
    adapter: str
    against: str
    task: str
    split: str
    examples: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    forgetting: dict[str, float] | None = None
    samples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _perplexity(objective, model, batches, device) -> float:
    return objective.evaluate(model, batches, device)["val_ppl"]


def evaluate_adapter(
    registry,
    adapter_name: str,
    *,
    data: Path | None = None,
    against: str | None = None,
    limit: int = 50,
    progress: Callable[[str], None] = lambda _: None,
) -> EvalReport:
    from appliance.config import DataSource, RunConfig
    from appliance.data.dataset import prepare
    from appliance.train.model import load_tokenizer
    from appliance.train.objectives import objective_for

    manifest = registry.adapter(adapter_name)
    base = registry.base_of(manifest)
    cfg = RunConfig.model_validate(manifest.config)
    if cfg.task == "classify" and against not in (None, base.name):
        raise ApplianceError(
            f"--against {against}: the 'before' of classifier {adapter_name!r} is the majority class of the held-out "
            "labels; another model has no head trained on these labels to compare with.",
            "drop --against; to compare two classifier adapters, evaluate each on the same --data",
        )
    # Evaluation reads the held-out splits; weights only steer how the train split is sampled
    # (and an adapter trained before concat refused weights may carry some under concat).
    spec = cfg.data.model_copy(update={"files": [f.model_copy(update={"weight": None}) for f in cfg.data.files]})
    if data is not None:
        spec = spec.model_copy(update={"files": [DataSource(path=data)], "val": 0, "test": 0, "val_file": None, "replay": None})
    model_dir = registry.model_dir(base.name)
    tokenizer = load_tokenizer(model_dir)
    other = None if against in (None, base.name) else _comparable_model(registry, against, tokenizer)
    prepared = prepare(spec, cfg.task, tokenizer, model_name=base.name)
    split = "train" if data is not None else ("test" if prepared.test else "val")
    items = prepared.split(split)[:limit]
    if not items:
        raise ApplianceError(
            f"Adapter {adapter_name!r} has no held-out {split} data to evaluate on.",
            "pass --data FILE with held-out examples",
        )
    report = EvalReport(adapter_name, against or base.name, cfg.task, "data" if data is not None else split, len(items))
    progress(f"loading {base.name} in 4-bit with {adapter_name}")
    model = load_for_inference(model_dir, registry.adapter_dir(adapter_name), task=cfg.task, labels=manifest.labels)
    device = str(model.device)
    objective = objective_for(cfg.task, tokenizer.pad_token_id, True, cfg)
    batches = [objective.collate([e.item for e in items[i : i + 8]]) for i in range(0, len(items), 8)]

    loaded_other: list[Any] = []

    @contextlib.contextmanager
    def before_model():
        """The 'before' model: the base itself (adapter off), or another store model (loaded once)."""
        if other is None:
            with model.disable_adapter():
                yield model
            return
        if not loaded_other:
            progress(f"loading {other.name} in 4-bit for the 'before' column")
            loaded_other.append(load_for_inference(registry.model_dir(other.name), task=cfg.task))
        yield loaded_other[0]

    if cfg.task == "classify":
        probs, labels = objective.predict(model, batches, device)
        report.after = classification_metrics(probs, labels)
        majority = Counter(labels.tolist()).most_common(1)[0][0]
        import torch

        majority_probs = torch.nn.functional.one_hot(torch.full_like(labels, majority), probs.shape[1]).float()
        report.before = {k: v for k, v in classification_metrics(majority_probs, labels).items() if k != "roc_auc"}
        report.against = f"majority class {manifest.labels[majority]!r}" if manifest.labels else "majority class"
        return report

    progress("scoring held-out data")
    if cfg.task == "dpo":
        # The policy's own log-probabilities: no DPO reference is needed, so a plain model scores too.
        report.after = _preference_scores(model, batches, device)
        with before_model() as reference:
            report.before = _preference_scores(reference, batches, device)
    else:
        report.after["perplexity"] = _perplexity(objective, model, batches, device)
        with before_model() as reference:
            report.before["perplexity"] = _perplexity(objective, reference, batches, device)
    if cfg.task == "sft":
        progress("generating answers (greedy)")
        _generation_metrics(report, model, before_model, tokenizer, prepared, items, registry)
    report.forgetting = _forgetting(model, before_model, tokenizer, device)
    return report


def _preference_scores(model, batches, device) -> dict[str, float]:
    """Mean log π(chosen) − log π(rejected), and the share of pairs where it is positive."""
    import torch

    from appliance.train.losses import sequence_logprobs

    margins = []
    with torch.no_grad():
        for batch in batches:
            tensors = {k: v.to(device) for k, v in batch.tensors.items()}
            logp = sequence_logprobs(model, tensors, int(tensors["segments"].max()) + 1)
            margins.append((logp[0::2] - logp[1::2]).float().cpu())
    margin = torch.cat(margins)
    return {"logp_margin": float(margin.mean()), "preference_accuracy": float((margin > 0).float().mean())}


def _comparable_model(registry, name: str, tokenizer):
    """The store model `--against` names, if it reads the same token ids as the adapter's base."""
    from appliance.train.model import load_tokenizer

    other = registry.model(name)
    if other.task != "causal-lm":
        raise ApplianceError(f"--against {name}: {name!r} is a classifier, not a language model.", "compare with a language model")
    if load_tokenizer(registry.model_dir(other.name)).get_vocab() != tokenizer.get_vocab():
        raise ApplianceError(
            f"--against {name}: {name!r} has another tokenizer than the adapter's base, so it would read the "
            "held-out data's token ids as other words.",
            "compare with a model that shares the base's tokenizer (the base, its merges, or another fine-tune of it)",
        )
    return other


def _generation_metrics(report, model, before_model, tokenizer, prepared, items, registry) -> None:
    from appliance.data.load import load_file

    # Rebuild each item's conversation: the prompt is everything before the last assistant turn.
    by_source = {}
    conversations = []
    for e in items:
        source = prepared.report.sources[e.source]
        if source.path not in by_source:
            by_source[source.path] = dict(load_file(Path(source.path)).examples)
        messages = by_source[source.path][e.line].messages
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        conversations.append(([m.as_dict() for m in messages[:last]], messages[last].content))
    prompts = [c[0] for c in conversations]
    references = [c[1] for c in conversations]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    after = generate_answers(model, tokenizer, prompts, max_new_tokens=longest + 16)
    with before_model() as reference_model:
        before = generate_answers(reference_model, tokenizer, prompts, max_new_tokens=longest + 16)
    for name, answers, target in (("before", before, report.before), ("after", after, report.after)):
        target["exact_match"] = sum(map(exact_match, answers, references)) / len(references)
        target["token_f1"] = sum(map(token_f1, answers, references)) / len(references)
        target["rouge_l"] = sum(map(rouge_l, answers, references)) / len(references)
    report.samples = [
        {"prompt": p[-1]["content"], "reference": r, "before": b, "after": a}
        for p, r, b, a in list(zip(prompts, references, before, after))[:5]
    ]


def _forgetting(model, before_model, tokenizer, device) -> dict[str, float]:
    """Perplexity on general text shipped with the package: does the adapter still know language?"""
    from appliance.config import DataSource, DataSpec
    from appliance.data.dataset import prepare
    from appliance.train.objectives import Objective

    general = prepare(DataSpec(files=[DataSource(path=general_text_path())], val=0, seq_len=256, dedupe=False), "cpt", tokenizer)
    objective = Objective(tokenizer.pad_token_id, True)
    batches = [objective.collate([e.item for e in general.train[i : i + 4]]) for i in range(0, len(general.train), 4)]
    after = _perplexity(objective, model, batches, device)
    with before_model() as reference:
        before = _perplexity(objective, reference, batches, device)
    return {"base_ppl": before, "adapter_ppl": after, "change_pct": (after / before - 1.0) * 100.0 if before else math.nan}


def save_evaluation(registry, report: EvalReport) -> None:
    """Into the adapter's manifest (rewritten atomically)."""
    manifest = registry.adapter(report.adapter)
    manifest.evaluation = report.as_dict()
    registry.write_manifest(registry.adapter_dir(report.adapter), manifest)
