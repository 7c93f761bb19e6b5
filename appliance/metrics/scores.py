"""Scores of answers and predictions, from well-kept libraries where one exists (rouge-score,
sacrebleu, scikit-learn): SQuAD's exact match and token F1, ROUGE-L, BLEU and chrF, accuracy,
macro F1 and ROC AUC."""

from __future__ import annotations

import re
import string
from collections import Counter


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


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's standard settings (13a tokenizer, exponential smoothing),
    so the figure compares with published ones."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (0-100, character n-grams up to 6, beta 2), sacrebleu's default: kinder than BLEU to
    short answers and word forms."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(predictions, [references]).score)


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
