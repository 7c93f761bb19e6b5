"""Evaluation: before (the base) versus after (base + adapter) on held-out data.

    sft       perplexity on the answers; exact match, token F1, ROUGE-L, BLEU and chrF of greedy answers
    cpt       perplexity on held-out domain text
    dpo       log π(chosen) − log π(rejected) margin and preference accuracy
    kto       mean log π per token of desirable and of undesirable answers, and their gap
    grpo      the mean reward of a greedy answer to each held-out prompt (the run's reward functions)
    classify  accuracy, macro F1, ROC AUC (the "before" is the majority class)
and for generation tasks a forgetting check: perplexity on general text shipped
with the package, base versus adapter, as a change in %.

The held-out data is the adapter's own test split (rebuilt from its manifest:
same files, same seed), else its validation split, unless --data names a file.
Metrics come from well-kept libraries: scikit-learn, rouge-score, sacrebleu (BLEU and chrF, 0-100).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from appliance.data import collate_classification, collate_lm, collate_pairs, collate_unpaired
from appliance.errors import ApplianceError
from appliance.metrics.scores import bleu, chrf, classification_metrics, exact_match, rouge_l, token_f1
from appliance.registry import Evaluation, Forgetting, Sample

GENERAL_TEXT = "general.txt"


# -- answers --------------------------------------------------------------------------------


def generate_answers(model: Any, tokenizer: Any, questions: Sequence[str | Sequence[dict]], *, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to questions (text, or a conversation ending in a user turn)."""
    import torch

    from appliance.data import render

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


def evaluate_adapter(
    registry,
    adapter_name: str,
    *,
    data: Path | None = None,
    against: str | None = None,
    limit: int = 50,
    progress: Callable[[str], None] = lambda _: None,
) -> Evaluation:
    from appliance.config import DataSource, RunConfig
    from appliance.data import prepare
    from appliance.hf import classification_pad_id, load_for_inference, load_tokenizer
    from appliance.metrics import lm

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
    report = Evaluation(adapter=adapter_name, against=against or base.name, task=cfg.task, split="data" if data is not None else split, examples=len(items))
    progress(f"loading {base.name} in 4-bit with {adapter_name}")
    model = load_for_inference(model_dir, registry.adapter_dir(adapter_name), task=cfg.task, labels=manifest.labels)
    device = str(model.device)
    pad = classification_pad_id(tokenizer) if cfg.task == "classify" else tokenizer.pad_token_id
    collate = {
        "classify": lambda xs: collate_classification(xs, pad),
        "dpo": lambda xs: collate_pairs(xs, pad, True),
        "kto": lambda xs: collate_unpaired(xs, pad, True),
    }.get(cfg.task, lambda xs: collate_lm(xs, pad, True))
    # GRPO's held-out data are prompts: their answers are sampled, not read.
    batches = [collate([e.item for e in items[i : i + 8]]) for i in range(0, len(items), 8)] if cfg.task != "grpo" else []

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
        probs, labels = lm.class_probabilities(model, batches, device)
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
        report.after = _preference_scores(lm.preference_margins(model, batches, device))
        with before_model() as reference:
            report.before = _preference_scores(lm.preference_margins(reference, batches, device))
    elif cfg.task == "grpo":
        from appliance.rewards import load_rewards, mean_reward

        rewards, prompts = load_rewards(cfg.grpo.reward_file), [e.item for e in items]
        report.after["reward"] = mean_reward(model, tokenizer, prompts, rewards, cfg.grpo.max_new_tokens)
        with before_model() as reference:
            report.before["reward"] = mean_reward(reference, tokenizer, prompts, rewards, cfg.grpo.max_new_tokens)
    elif cfg.task == "kto":
        report.after = _unpaired_scores(*lm.unpaired_answer_logprobs(model, batches, device))
        with before_model() as reference:
            report.before = _unpaired_scores(*lm.unpaired_answer_logprobs(reference, batches, device))
    else:
        report.after["perplexity"] = lm.perplexity(lm.mean_token_loss(model, batches, device))
        with before_model() as reference:
            report.before["perplexity"] = lm.perplexity(lm.mean_token_loss(reference, batches, device))
    if cfg.task == "sft":
        progress("generating answers (greedy)")
        _generation_metrics(report, model, before_model, tokenizer, prepared, items, registry)
    report.forgetting = _forgetting(model, before_model, tokenizer, device)
    return report


def _preference_scores(margin) -> dict[str, float]:
    """Mean log π(chosen) − log π(rejected), and the share of pairs where it is positive."""
    return {"logp_margin": float(margin.mean()), "preference_accuracy": float((margin > 0).float().mean())}


def _unpaired_scores(mean_logp, desirable) -> dict[str, float]:
    """Mean log-probability per token of the desirable and of the undesirable answers, and the gap."""
    scores = {f"{side}_logp": float(mean_logp[mask].mean()) for side, mask in (("desirable", desirable), ("undesirable", ~desirable)) if mask.any()}
    if len(scores) == 2:
        scores["logp_margin"] = scores["desirable_logp"] - scores["undesirable_logp"]
    return scores


def _comparable_model(registry, name: str, tokenizer):
    """The store model `--against` names, if it reads the same token ids as the adapter's base."""
    from appliance.hf import load_tokenizer

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
    from appliance.data import load_file

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
        target["bleu"] = bleu(answers, references)
        target["chrf"] = chrf(answers, references)
    report.samples = [
        Sample(prompt=p[-1]["content"], reference=r, before=b, after=a) for p, r, b, a in list(zip(prompts, references, before, after))[:5]
    ]


def _forgetting(model, before_model, tokenizer, device) -> Forgetting:
    """Perplexity on general text shipped with the package: does the adapter still know language?"""
    from appliance.config import DataSource, DataSpec
    from appliance.data import prepare
    from appliance.metrics.lm import mean_token_loss, perplexity

    general = prepare(DataSpec(files=[DataSource(path=general_text_path())], val=0, seq_len=256, dedupe=False), "cpt", tokenizer)
    batches = [collate_lm([e.item for e in general.train[i : i + 4]], tokenizer.pad_token_id, True) for i in range(0, len(general.train), 4)]
    after = perplexity(mean_token_loss(model, batches, device))
    with before_model() as reference:
        before = perplexity(mean_token_loss(reference, batches, device))
    return Forgetting(base_ppl=before, adapter_ppl=after, change_pct=(after / before - 1.0) * 100.0 if before else math.nan)


def save_evaluation(registry, report: Evaluation) -> None:
    """Into the adapter's manifest (rewritten atomically)."""
    manifest = registry.adapter(report.adapter)
    manifest.evaluation = report
    registry.write_manifest(registry.adapter_dir(report.adapter), manifest)
