"""Metrics: FinGPT's answer-to-label mapping, classification metrics (scikit-learn: accuracy, macro and weighted F1,
per-class precision/recall, confusion matrix) and QA metrics (ROUGE-L from rouge-score, SQuAD-style token F1, answer
length against the reference; the answer perplexity comes from :func:`finsft.evaluation.scorers.answer_loss`)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finsft.errors import FinsftError
from finsft.templates import FINGPT9, Template, to_three_class

# The packages the metrics and plots import only at the end of a run: (import name, pip name, what needs it).
CLASSIFICATION_PACKAGES = (("sklearn", "scikit-learn", "classification metrics (accuracy, F1, confusion matrix)"),)
QA_PACKAGES = (("rouge_score.rouge_scorer", "rouge-score", "ROUGE-L of generated answers"),)
PLOT_PACKAGE = ("matplotlib", "matplotlib", "loss.png and confusion.png")


def missing_package(module: str) -> str | None:
    """None when ``module`` imports, else why not (a package present but broken counts as missing)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        return str(exc)
    return None


def check_metric_packages(classification: bool, what: str) -> None:
    """Before anything heavy runs: the packages the metrics of ``what`` need, so that a finished training never
    fails at its last step on a missing import."""
    needed = CLASSIFICATION_PACKAGES if classification else QA_PACKAGES
    missing = [(pip, use, why) for module, pip, use in needed if (why := missing_package(module))]
    if missing:
        names = " ".join(pip for pip, _, _ in missing)
        raise FinsftError(
            f"{what} needs " + "; ".join(f"{pip} for the {use} ({why})" for pip, use, why in missing)
            + f". Install it with: pip install {names}" + (" (or set evaluation to null to train without a task "
                                                           "evaluation)" if "evaluation" in what else ""))


def plots_note() -> str | None:
    """A note when matplotlib is missing: plots are skipped, nothing fails."""
    module, pip, use = PLOT_PACKAGE
    why = missing_package(module)
    return None if why is None else f"{pip} is not installed ({why}): {use} are skipped (pip install {pip})"


def uses_fingpt_mapping(template: Template) -> bool:
    """FinGPT's answer mapping applies when the label set is the 3- or 9-label FinGPT vocabulary."""
    return template.labels is not None and set(template.labels) <= set(FINGPT9)


def map_answer(text: str, template: Template) -> str:
    """The label a generated answer stands for."""
    if uses_fingpt_mapping(template):
        return to_three_class(text)
    assert template.labels is not None
    lowered = text.lower()
    hits = [(lowered.find(lab.lower()), -len(lab), lab) for lab in template.labels if lab.lower() in lowered]
    return min(hits)[2] if hits else "(none)"


def gold_label(value: str, template: Template) -> str:
    value = str(value).strip()
    return to_three_class(value) if uses_fingpt_mapping(template) else value


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(labels)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(labels)},
        "labels": labels,
        "confusion_matrix": confusion_matrix(gold, pred, labels=labels).tolist(),
    }


def _normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token-overlap F1."""
    p, r = _normalize(prediction), _normalize(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = list(zip(predictions, references, strict=True))
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
    f1 = [token_f1(pred, ref) for pred, ref in pairs]
    n = max(1, len(predictions))
    generated = sum(len(p.split()) for p in predictions) / n
    reference = sum(len(r.split()) for r in references) / n
    return {
        "n": len(predictions),
        "rougeL": sum(rouge) / n,
        "token_f1": sum(f1) / n,
        "mean_generated_words": generated,
        "mean_reference_words": reference,
        "length_ratio": generated / reference if reference else 0.0,
    }


def headline(m: dict[str, Any]) -> str:
    if "accuracy" in m:
        return f"accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, weighted F1 {m['weighted_f1']:.3f}"
    text = f"ROUGE-L {m['rougeL']:.3f}, token F1 {m['token_f1']:.3f}, {m['mean_generated_words']:.0f} words"
    if "answer_perplexity" in m:
        text = f"answer perplexity {m['answer_perplexity']:.2f}, " + text
    return text


