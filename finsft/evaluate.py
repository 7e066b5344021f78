"""Score a model on a recipe's task.

Classification templates: ``likelihood`` ranks the label strings by the model's log-likelihood after the prompt;
``generate`` decodes greedily and maps the text to a label as FinGPT's benchmarks do. Metrics come from
scikit-learn: accuracy, macro and weighted F1, per-class precision/recall, confusion matrix.
Generation templates: ROUGE-L (rouge-score) and SQuAD-style token F1 against the references, and generated length.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from finsft.data import Formatter, encode_prompt
from finsft.errors import FinsftError
from finsft.templates import FINGPT9, Template, to_three_class

Progress = Callable[[int, int], None]


@dataclass
class EvalResult:
    scorer: str
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


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
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    f1 = [token_f1(pred, ref) for pred, ref in zip(predictions, references)]
    n = max(1, len(predictions))
    return {
        "n": len(predictions),
        "rougeL": sum(rouge) / n,
        "token_f1": sum(f1) / n,
        "mean_generated_words": sum(len(p.split()) for p in predictions) / n,
        "mean_reference_words": sum(len(r.split()) for r in references) / n,
    }


# ------------------------------------------------------------------------------------------------ model calls


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def label_texts(formatter: Formatter) -> list[str]:
    """The text that follows the prompt for each label (without the end-of-sequence token)."""
    t = formatter.template
    assert t.labels is not None
    if formatter.chat:
        return [lab for lab in t.labels]
    return [t.render_label(lab) for lab in t.labels]


def score_likelihood(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
                     progress: Progress | None = None) -> list[dict[str, float]]:
    """Log-likelihood of each label's tokens after each row's prompt."""
    import torch

    tok = formatter.tokenizer
    labels = formatter.template.labels
    assert labels is not None
    label_ids = [tok(text, add_special_tokens=False)["input_ids"] for text in label_texts(formatter)]
    single = all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(label_ids)
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = _device(model)
    out: list[dict[str, float]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if single:
                # One forward per prompt: the labels are distinct single tokens, read the next-token distribution.
                first = torch.tensor([ids[0] for ids in label_ids], device=device)
                for start in range(0, len(prompts), batch_size):
                    chunk = prompts[start:start + batch_size]
                    ids, mask, last = _right_pad(chunk, pad, device)
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    logp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), -1)
                    for row in logp[:, first].tolist():
                        out.append(dict(zip(labels, row)))
                    if progress:
                        progress(min(start + batch_size, len(prompts)), len(prompts))
            else:
                pairs = [(p, lab_ids) for p in prompts for lab_ids in label_ids]
                scores: list[float] = []
                step = max(1, batch_size)
                for start in range(0, len(pairs), step):
                    chunk = pairs[start:start + step]
                    seqs = [p + c for p, c in chunk]
                    ids, mask, _ = _right_pad(seqs, pad, device)
                    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                    for i, (p, c) in enumerate(chunk):
                        positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
                        targets = torch.tensor(c, device=device)
                        scores.append(float(logp[i, positions, targets].sum()))
                    if progress:
                        progress(min(start + step, len(pairs)) // len(label_ids), len(prompts))
                k = len(label_ids)
                out = [dict(zip(labels, scores[i * k:(i + 1) * k])) for i in range(len(prompts))]
    finally:
        model.train(was_training)
    return out


def _right_pad(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(device), mask.to(device), last.to(device)


def generate(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
             max_new_tokens: int, progress: Progress | None = None) -> list[str]:
    """Greedy completions of each row's prompt (left-padded batches), special tokens removed."""
    import torch

    tok = formatter.tokenizer
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = _device(model)
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, width - len(p):] = torch.tensor(p)
                    mask[i, width - len(p):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=_stop_ids(tok))
                for row in out[:, width:]:
                    texts.append(tok.decode(row, skip_special_tokens=True).strip())
                if progress:
                    progress(min(start + batch_size, len(prompts)), len(prompts))
    finally:
        model.train(was_training)
    return texts


def _stop_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id}
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def resolve_scorer(scorer: str, template: Template) -> str:
    if scorer == "auto":
        return "likelihood" if template.is_classification else "generate"
    if scorer == "likelihood" and not template.is_classification:
        raise FinsftError(f"the likelihood scorer ranks labels; template '{template.name}' has none")
    return scorer


def evaluate_model(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], *, scorer: str,
                   batch_size: int, max_new_tokens: int | None, progress: Progress | None = None) -> EvalResult:
    """Score ``model`` on template rows (dicts of template fields)."""
    template = formatter.template
    scorer = resolve_scorer(scorer, template)
    if not rows:
        raise FinsftError("no rows to evaluate")
    if template.is_classification:
        assert template.labels is not None
        gold = [gold_label(r[template.label_field], template) for r in rows]
        label_space = ["negative", "neutral", "positive"] if uses_fingpt_mapping(template) else list(template.labels)
        if scorer == "likelihood":
            scores = score_likelihood(model, formatter, rows, batch_size, progress)
            raw = [max(s, key=lambda k, s=s: s[k]) for s in scores]
            pred = [gold_label(p, template) for p in raw]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": a, "scores": s}
                     for r, g, p, a, s in zip(rows, gold, pred, raw, scores)]
        else:
            texts = generate(model, formatter, rows, batch_size, max_new_tokens or 8, progress)
            pred = [map_answer(t, template) for t in texts]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": t}
                     for r, g, p, t in zip(rows, gold, pred, texts)]
        return EvalResult(scorer, classification_metrics(gold, pred, label_space), preds)
    refs = [str(r[template.label_field]) for r in rows]
    texts = generate(model, formatter, rows, batch_size, max_new_tokens or 256, progress)
    preds = [{"input": r.get("input"), "reference": ref, "answer": t} for r, ref, t in zip(rows, refs, texts)]
    return EvalResult(scorer, qa_metrics(texts, refs), preds)
