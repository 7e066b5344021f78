"""Score a model on a recipe's task.

Classification templates: ``likelihood`` ranks the label strings by the model's log-likelihood after the prompt;
``generate`` decodes greedily and maps the text to a label as FinGPT's benchmarks do. Metrics come from
scikit-learn: accuracy, macro and weighted F1, per-class precision/recall, confusion matrix.
Generation templates: ROUGE-L (rouge-score) and SQuAD-style token F1 against the references, and generated length.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finsft.data import Formatter, encode_continuation, encode_prompt
from finsft.errors import FinsftError
from finsft.recipe import Recipe
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
    pairs = list(zip(predictions, references, strict=True))
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs]
    f1 = [token_f1(pred, ref) for pred, ref in pairs]
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


def _by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``seqs`` from longest to shortest: batches of similar length waste little on padding."""
    return sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))


def score_likelihood(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
                     progress: Progress | None = None, path: str = "auto") -> list[dict[str, float]]:
    """Log-likelihood of each label's tokens after each row's prompt.

    When every label is one distinct token (``path="next_token"``), one forward pass per batch of prompts reads
    the next-token distribution at each prompt's end. Otherwise (``path="sequence"``) each (prompt, label) pair
    is scored in full. Both give the same numbers when both apply; ``path`` forces one (tests compare them).
    """
    import torch

    tok = formatter.tokenizer
    labels = formatter.template.labels
    assert labels is not None
    label_ids = encode_continuation(tok, label_texts(formatter))
    if any(not ids for ids in label_ids):
        raise FinsftError(f"a label of template '{formatter.template.name}' encodes to no tokens")
    single = all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(label_ids)
    if path == "auto":
        path = "next_token" if single else "sequence"
    elif path == "next_token" and not single:
        raise FinsftError("the next-token path needs labels that are distinct single tokens")
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = _device(model)
    out: list[dict[str, float] | None] = [None] * len(prompts)
    order = _by_length(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            first = torch.tensor([ids[0] for ids in label_ids], device=device)
            # The sequence path scores every (prompt, label) pair: about batch_size pairs per forward pass.
            step = batch_size if path == "next_token" else max(1, batch_size // len(label_ids))
            for start in range(0, len(order), step):
                idx = order[start:start + step]
                chunk = [prompts[i] for i in idx]
                if path == "next_token":
                    ids, mask, last = _right_pad(chunk, pad, device)
                    # Only the logits at each prompt's last position are needed: skip the head elsewhere.
                    keep, where = torch.unique(last, return_inverse=True)
                    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                    logp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), where].float(), -1)
                    scores = logp[:, first].tolist()
                else:
                    scores = _sequence_scores(model, chunk, label_ids, pad, device)
                for i, row in zip(idx, scores, strict=True):
                    out[i] = dict(zip(labels, row, strict=True))
                if progress:
                    progress(min(start + step, len(order)), len(order))
    finally:
        model.train(was_training)
    return [s for s in out if s is not None]


def _sequence_scores(model: Any, prompts: list[list[int]], label_ids: list[list[int]], pad: int,
                     device: Any) -> list[list[float]]:
    """For each prompt, the summed log-probabilities of each label's tokens after it (one forward pass)."""
    import torch

    seqs = [p + c for p in prompts for c in label_ids]
    ids, mask, _ = _right_pad(seqs, pad, device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for n, p in enumerate(prompts):
        row = []
        for k, c in enumerate(label_ids):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
            row.append(float(logp[n * len(label_ids) + k, positions, torch.tensor(c, device=device)].sum()))
        out.append(row)
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
    """Greedy completions of each row's prompt (left-padded batches of similar length), special tokens removed."""
    import torch

    tok = formatter.tokenizer
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = _device(model)
    texts: list[str] = [""] * len(prompts)
    order = _by_length(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                chunk = [prompts[i] for i in idx]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, p in enumerate(chunk):
                    ids[j, width - len(p):] = torch.tensor(p)
                    mask[j, width - len(p):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=_stop_ids(tok))
                for i, row in zip(idx, out[:, width:], strict=True):
                    texts[i] = tok.decode(row, skip_special_tokens=True).strip()
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))
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
            raw = [max(s, key=s.__getitem__) for s in scores]
            pred = [gold_label(p, template) for p in raw]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": a, "scores": s}
                     for r, g, p, a, s in zip(rows, gold, pred, raw, scores, strict=True)]
        else:
            texts = generate(model, formatter, rows, batch_size, max_new_tokens or 8, progress)
            pred = [map_answer(t, template) for t in texts]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": t}
                     for r, g, p, t in zip(rows, gold, pred, texts, strict=True)]
        return EvalResult(scorer, classification_metrics(gold, pred, label_space), preds)
    refs = [str(r[template.label_field]) for r in rows]
    texts = generate(model, formatter, rows, batch_size, max_new_tokens or 256, progress)
    preds = [{"input": r.get("input"), "reference": ref, "answer": t}
             for r, ref, t in zip(rows, refs, texts, strict=True)]
    return EvalResult(scorer, qa_metrics(texts, refs), preds)


# ------------------------------------------------------------------------------------------ eval and predict


@dataclass
class Loaded:
    """A model ready for inference, with what it was loaded from."""

    model: Any
    tokenizer: Any
    description: str  # the base model
    adapter: str | None


def check_adapter(adapter: str | None) -> Path | None:
    """The adapter (or fully fine-tuned model) folder, checked before anything heavy is loaded."""
    if adapter is None:
        return None
    path = Path(adapter).expanduser().absolute()
    if not path.is_dir():
        hint = ""
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            hint = f" ({partial} holds an unfinished run: finish it with finsft train --resume)"
        raise FinsftError(f"adapter folder '{adapter}' does not exist{hint}")
    if not (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        raise FinsftError(f"'{adapter}' holds neither a LoRA adapter (adapter_config.json) nor a model (config.json); "
                          "pass the output folder of a finished finsft train run")
    return path


def load_for_inference(recipe: Recipe, adapter: str | None, log: Callable[[str], None] = print) -> Loaded:
    """The recipe's base model on this machine's hardware, with the adapter applied when one is given.

    A folder with ``adapter_config.json`` is a LoRA adapter for the recipe's model; a folder with only
    ``config.json`` is a fully fine-tuned model (a run with ``lora: null``) and replaces the base.
    """
    from finsft.models import ModelSource, load_model, load_tokenizer, model_shape, resolve_model
    from finsft.plan import detect_hardware, get_model_kwargs, plan_run

    path = check_adapter(adapter)
    source = resolve_model(recipe, log=log)
    plan = plan_run(recipe, detect_hardware(), model_shape(source, recipe["model"]["trust_remote_code"]))
    kwargs = get_model_kwargs(recipe, plan)
    full = path is not None and not (path / "adapter_config.json").exists()
    weights = ModelSource(str(path), True, str(path)) if full and path is not None else source
    has_tokenizer = path is not None and (path / "tokenizer_config.json").exists()
    tok_source = ModelSource(str(path), True, str(path)) if has_tokenizer else source
    tokenizer = load_tokenizer(tok_source, recipe)
    model = load_model(weights, kwargs)
    if path is not None and not full:
        from peft import PeftModel

        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base_name and os.path.realpath(str(base_name)) != os.path.realpath(source.path):
            log(f"note: the adapter was trained on '{base_name}'; the recipe's model is '{source.path}'")
        try:
            model = PeftModel.from_pretrained(model, str(path))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FinsftError(f"the adapter in '{adapter}' does not fit the recipe's model {source.description}: "
                              f"{exc}") from exc
    model.eval()
    return Loaded(model, tokenizer, source.description, str(path) if path else None)


def default_max_new_tokens(template: Template, recipe: Recipe) -> int:
    configured = (recipe["evaluation"] or {}).get("max_new_tokens")
    return int(configured or (8 if template.is_classification else 256))


class ScoringProgress:
    """A rich progress bar on terminals; a line every ``every_s`` seconds in logs."""

    def __init__(self, out: Any, title: str, total: int, every_s: float = 30.0):
        self.out, self.title, self.total, self.every_s = out, title, total, every_s
        self.bar: Any = None
        self.start = self.last = time.perf_counter()

    def __enter__(self) -> ScoringProgress:
        if self.out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=self.out, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=self.total)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s and done < total:
            self.last = now
            rate = done / (now - self.start)
            self.out.print(f"{self.title}: {done}/{total} rows, {rate:.1f} rows/s, "
                           f"about {(total - done) / rate:.0f} s left")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def score_rows(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], out: Any, title: str, *,
               scorer: str, batch_size: int, max_new_tokens: int | None) -> EvalResult:
    """evaluate_model with a progress display."""
    with ScoringProgress(out, title, len(rows)) as progress:
        return evaluate_model(model, formatter, rows, scorer=scorer, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, progress=progress)


def _local_or_hub(ref: str | None) -> str | None:
    """A path given on the command line is relative to the current folder; anything else is a hub id."""
    if ref and os.path.exists(os.path.expanduser(ref)):
        return os.path.abspath(os.path.expanduser(ref))
    return ref


def rows_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def metrics_tables(metrics: dict[str, Any], title: str) -> list[Any]:
    """Rich tables: the headline numbers, and for classification per-class scores and the confusion matrix."""
    from rich.table import Table

    head = Table(title=title)
    if "accuracy" not in metrics:
        for col in ("rows", "ROUGE-L", "token F1", "generated words", "reference words"):
            head.add_column(col, justify="right")
        head.add_row(str(metrics["n"]), f"{metrics['rougeL']:.4f}", f"{metrics['token_f1']:.4f}",
                     f"{metrics['mean_generated_words']:.1f}", f"{metrics['mean_reference_words']:.1f}")
        return [head]
    for col in ("rows", "accuracy", "macro F1", "weighted F1"):
        head.add_column(col, justify="right")
    head.add_row(str(metrics["n"]), f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
                 f"{metrics['weighted_f1']:.4f}")
    per = Table(title="per class")
    for col in ("label", "precision", "recall", "F1", "support"):
        per.add_column(col, justify="left" if col == "label" else "right")
    for lab, m in metrics["per_class"].items():
        per.add_row(lab, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    conf = Table(title="confusion matrix (rows: gold, columns: predicted)")
    conf.add_column("gold \\ predicted")
    for lab in metrics["labels"]:
        conf.add_column(lab, justify="right")
    for lab, counts in zip(metrics["labels"], metrics["confusion_matrix"], strict=True):
        conf.add_row(lab, *(str(c) for c in counts))
    return [head, per, conf]


def predictions_table(preds: Sequence[dict[str, Any]], limit: int = 5) -> Any:
    """A few generations next to their references."""
    from rich.table import Table

    table = Table(title=f"sample predictions ({min(limit, len(preds))} of {len(preds)})", show_lines=True)
    for col in ("input", "reference", "generated"):
        table.add_column(col, overflow="fold", ratio=1)
    for p in preds[:limit]:
        table.add_row(_clip(str(p.get("input") or "")), _clip(str(p.get("reference", ""))), _clip(p["answer"]))
    return table


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def plot_confusion(metrics: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = metrics["labels"], metrics["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_command(recipe: Recipe, *, adapter: str | None = None, data: str | None = None,
                     split: str | None = None, limit: int | None = None, scorer: str | None = None,
                     out: str | None = None) -> dict[str, Any]:
    """``finsft eval``: score the base model or a trained one; writes eval.json, predictions.jsonl (and
    confusion.png for classification) into ``out`` (default: the adapter folder). Returns eval.json's content."""
    from finsft.data import build_splits, make_formatter
    from finsft.progress import console
    from finsft.templates import template_from_recipe
    from finsft.train import eval_rows, write_jsonl

    con = console()
    if limit is not None and limit < 1:
        raise FinsftError(f"--limit must be at least 1, not {limit}")
    adapter_dir = check_adapter(adapter)
    if out is None and adapter_dir is None:
        raise FinsftError("where should the results go? Pass --out DIR (without --adapter there is no run folder "
                          "to write eval.json into)")
    out_dir = Path(out).expanduser().absolute() if out else adapter_dir
    assert out_dir is not None
    if out_dir.exists() and not out_dir.is_dir():
        raise FinsftError(f"--out '{out}' is a file, not a folder")
    template = template_from_recipe(recipe["template"])
    ev = recipe["evaluation"] or {}
    scorer = resolve_scorer(scorer or ev.get("scorer", "auto"), template)
    data = _local_or_hub(data)
    validation = None
    if not data and not ev.get("path"):
        validation = build_splits(recipe, template).validation
    rows, data_desc = eval_rows(recipe, template, validation, data, split, limit)

    t0 = time.perf_counter()
    loaded = load_for_inference(recipe, adapter, log=con.print)
    formatter = make_formatter(recipe, template, loaded.tokenizer)
    batch_size = int(ev.get("batch_size", 16))
    max_new = default_max_new_tokens(template, recipe) if scorer == "generate" else None
    what = f"adapter {loaded.adapter}" if loaded.adapter else f"base model {loaded.description}"
    con.print(f"evaluating {what} on {len(rows)} rows of {data_desc} ({scorer} scorer)")
    t1 = time.perf_counter()
    result = score_rows(loaded.model, formatter, rows, con, f"scoring ({scorer})", scorer=scorer,
                        batch_size=batch_size, max_new_tokens=max_new)
    seconds = time.perf_counter() - t1

    report = {
        "model": loaded.description,
        "adapter": loaded.adapter,
        "data": data_desc,
        "rows": len(rows),
        "rows_fingerprint": rows_fingerprint(rows),
        "settings": {"scorer": result.scorer, "batch_size": batch_size, "max_new_tokens": max_new,
                     "limit": limit or ev.get("max_samples"), "template": template.name,
                     "chat_template": formatter.chat},
        "metrics": result.metrics,
        "seconds": {"load": round(t1 - t0, 2), "scoring": round(seconds, 2)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    write_jsonl(out_dir / "predictions.jsonl", result.predictions)
    title = f"{recipe.name}: {what}, {result.scorer} scorer"
    for table in metrics_tables(result.metrics, title):
        con.print(table)
    written = ["eval.json", "predictions.jsonl"]
    if template.is_classification:
        plot_confusion(result.metrics, out_dir / "confusion.png", title)
        written.append("confusion.png")
    else:
        con.print(predictions_table(result.predictions))
    con.print(f"{len(rows)} rows in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f} rows/s); wrote "
              f"{', '.join(written)} to {out_dir}")
    return report


def prompt_template(template: Template) -> Template:
    """The template without its completion: what predict needs from a row."""
    return replace(template, completion="")


def predict_rows(template: Template, recipe: Recipe, inputs: Sequence[str] | None,
                 file: str | None) -> list[dict[str, Any]]:
    """Rows for predict: each --input fills the template's ``input`` field, or the rows of a data file."""
    from finsft.data import load_table, to_template_rows

    need = prompt_template(template)
    if inputs:
        if "input" not in need.fields:
            raise FinsftError(f"template '{template.name}' has no 'input' field (its prompt reads "
                              f"{', '.join(need.fields)}); pass the rows with --file")
        missing = [f for f in need.required_fields if f != "input"]
        if missing:
            raise FinsftError(f"template '{template.name}' also needs {', '.join(missing)}, which --input cannot "
                              "give; pass the rows with --file")
        return [{"input": text} for text in inputs]
    assert file is not None
    path = _local_or_hub(file)
    assert path is not None
    if not os.path.isabs(path):
        raise FinsftError(f"--file '{file}' does not exist")
    ds, _ = load_table(path, "train")
    ds = to_template_rows(ds, need, recipe["data"]["columns"], file)
    return [dict(r) for r in ds]


def predict_command(recipe: Recipe, *, adapter: str | None = None, inputs: Sequence[str] | None = None,
                    file: str | None = None, out: str | None = None,
                    max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """``finsft predict``: generate with the recipe's template; prints a table, or writes JSONL to ``out``."""
    from finsft.data import make_formatter
    from finsft.progress import console
    from finsft.templates import template_from_recipe
    from finsft.train import write_jsonl

    con = console()
    if bool(inputs) == bool(file):
        raise FinsftError("give the texts with --input TEXT (repeatable) or a data file with --file, not both")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise FinsftError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    check_adapter(adapter)
    template = template_from_recipe(recipe["template"])
    rows = predict_rows(template, recipe, inputs, file)
    loaded = load_for_inference(recipe, adapter, log=con.print)
    formatter = make_formatter(recipe, prompt_template(template), loaded.tokenizer)
    max_new = max_new_tokens or default_max_new_tokens(template, recipe)
    batch_size = int((recipe["evaluation"] or {}).get("batch_size", 16))
    with ScoringProgress(con, "generating", len(rows)) as progress:
        texts = generate(loaded.model, formatter, rows, batch_size, max_new, progress)
    records = []
    for row, text in zip(rows, texts, strict=True):
        record = {**row, "answer": text}
        if template.is_classification:
            record["label"] = map_answer(text, template)
        records.append(record)
    if out:
        path = Path(out).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)
        con.print(f"wrote {len(records)} predictions to {path}")
        return records
    from rich.table import Table

    table = Table(title=f"{recipe.name}: " + (f"adapter {loaded.adapter}" if loaded.adapter else "base model"),
                  show_lines=True)
    table.add_column("input", overflow="fold", ratio=2)
    table.add_column("answer", overflow="fold", ratio=2)
    if template.is_classification:
        table.add_column("label")
    for r in records:
        cells = [_clip(str(r.get("input", ""))), _clip(r["answer"])]
        table.add_row(*cells, *([r["label"]] if template.is_classification else []))
    con.print(table)
    return records
