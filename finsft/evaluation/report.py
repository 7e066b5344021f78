"""Evaluation reports: ONE eval.json shape, written by training (before/after) and by ``finsft eval``, with its
progress display, rich tables and confusion plot."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finsft.data import Formatter
from finsft.errors import FinsftError
from finsft.evaluation.scorers import (
    FINGPT_MAX_LENGTH,
    FINGPT_PROCEDURE,
    FINGPT_SCORER,
    EvalResult,
    default_max_new_tokens,
    evaluate_model,
)
from finsft.files import UnreadableFile, read_json, write_errors, write_file, write_json, write_jsonl
from finsft.recipe import Recipe
from finsft.templates import Template


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
               scorer: str, batch_size: int, max_new_tokens: int | None, max_length: int | None = None,
               generate_samples: int | None = None) -> EvalResult:
    """evaluate_model with a progress display (of the generations, for generation templates)."""
    total = min(len(rows), generate_samples or len(rows))
    with ScoringProgress(out, title, total) as progress:
        return evaluate_model(model, formatter, rows, scorer=scorer, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, progress=progress, max_length=max_length,
                              generate_samples=generate_samples)


def rows_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def metrics_tables(metrics: dict[str, Any], title: str) -> list[Any]:
    """Rich tables: the headline numbers, and for classification per-class scores and the confusion matrix."""
    from rich.table import Table

    head = Table(title=title)
    if "accuracy" not in metrics:
        cells = {"generated rows": str(metrics["n"]), "ROUGE-L": f"{metrics['rougeL']:.4f}",
                 "token F1": f"{metrics['token_f1']:.4f}", "generated words": f"{metrics['mean_generated_words']:.1f}",
                 "reference words": f"{metrics['mean_reference_words']:.1f}"}
        if "answer_perplexity" in metrics:
            cells = {"answer perplexity": f"{metrics['answer_perplexity']:.3f}",
                     "answer tokens": str(metrics["answer_tokens"]), **cells}
        for col in cells:
            head.add_column(col, justify="right")
        head.add_row(*cells.values())
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


def plot_confusion(metrics: dict[str, Any], path: Path, title: str, kept: str = "nothing else was changed",
                   then: str = "") -> bool:
    """confusion.png; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

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
    save_figure(fig, path, kept, then)
    return True


def save_figure(fig: Any, path: Path, kept: str = "nothing else was changed", then: str = "") -> None:
    """A matplotlib figure as PNG through the writing gate (whole or not at all; into a folder finsft made)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_file(path, buffer.getvalue(), replace=True, kept=kept, then=then)


@dataclass
class EvalSet:
    """The rows a model is scored on, with where they came from."""

    rows: list[dict[str, Any]]
    description: str  # source, sampling and fingerprint, for people and eval.json
    name: str  # a short folder-safe name of the source (``finsft eval`` writes RUN/eval/<name>/)


def _slug(text: str) -> str:
    stem = Path(text).stem if ("/" in text or "." in text) and Path(text).suffix else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "data"


def eval_set(recipe: Recipe, template: Template, validation: Any, data: str | None = None,
             split: str | None = None, limit: int | None = None) -> EvalSet:
    """The rows the recipe evaluates on (``data`` or evaluation.path, else the validation split), capped by
    ``limit`` or evaluation.max_samples with a seeded sample."""
    from finsft.data import load_split

    ev = recipe.evaluation_settings
    path = data or ev["path"]
    if path:
        ds, fp = load_split(path, split or ev["split"] or "test", template, recipe.data["columns"],
                            recipe.data.get("label_map"))
        source, name = path, _slug(path.rstrip("/"))
    elif validation is not None:
        ds, fp, source, name = validation, str(getattr(validation, "_fingerprint", "")), "validation split", "validation"
    else:
        raise FinsftError("nothing to evaluate on: set evaluation.path, data.validation_path or data.validation_size"
                          " (or pass --data)")
    cap = limit or ev["max_samples"]
    seed = recipe.training["seed"]
    if cap and cap < len(ds):
        # A seeded random sample: the first rows of a file are often sorted (FPB's first 200 are 87% positive).
        ds = ds.shuffle(seed=seed).select(range(cap))
        source += f", {cap} rows sampled with seed {seed}"
    return EvalSet([dict(r) for r in ds], f"{source} ({fp})", name)


def eval_settings(recipe: Recipe, formatter: Formatter, scorer: str, limit: int | None = None) -> dict[str, Any]:
    """How the rows are scored: part of every eval.json."""
    ev = recipe.evaluation_settings
    template = formatter.template
    settings = {"scorer": scorer, "batch_size": ev["batch_size"],
                "max_new_tokens": default_max_new_tokens(template, recipe) if scorer == "generate" else None,
                "limit": limit or ev["max_samples"], "template": template.name, "chat_template": formatter.chat}
    if scorer == FINGPT_SCORER:  # FinGPT's benchmark procedure: its own generation length, answer split, mapping
        settings.update(max_length=FINGPT_MAX_LENGTH, procedure=FINGPT_PROCEDURE)
    if not template.is_classification:  # the answer perplexity: rows cut as for training; generation: a prefix
        settings.update(max_length=recipe.training["max_length"], generate_samples=ev["generate_samples"])
    return settings


def score(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], settings: dict[str, Any], out: Any,
          title: str) -> EvalResult:
    """Score ``model`` on ``rows`` as ``settings`` say, with a progress display."""
    return score_rows(model, formatter, rows, out, title, scorer=settings["scorer"],
                      batch_size=settings["batch_size"], max_new_tokens=settings["max_new_tokens"],
                      max_length=settings.get("max_length"), generate_samples=settings.get("generate_samples"))


@dataclass
class EvalReport:
    """eval.json: one shape for training runs and ``finsft eval``. ``metrics`` are the evaluated model's (after
    training, for a run); ``base_metrics`` the base model's on the same rows, when it was scored too."""

    model: str
    adapter: str | None
    data: str
    rows: int
    rows_fingerprint: str
    settings: dict[str, Any]
    metrics: dict[str, Any]
    base_metrics: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # generation templates: the first few rows side by side, {input, reference, before, after}
    samples: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SIDE_BY_SIDE = 5


def side_by_side(before: Sequence[dict[str, Any]] | None, after: Sequence[dict[str, Any]],
                 limit: int = SIDE_BY_SIDE) -> list[dict[str, Any]] | None:
    """The first ``limit`` generated answers before and after training next to the question and the reference
    (generation templates, when the base model was scored on the same rows); None otherwise."""
    if not before or not after or "reference" not in after[0]:
        return None
    return [{"input": a.get("input"), "reference": a["reference"], "before": b["answer"], "after": a["answer"]}
            for b, a in zip(before[:limit], after[:limit], strict=True) if b.get("input") == a.get("input")]


def samples_table(samples: Sequence[dict[str, Any]]) -> Any:
    """The side-by-side answers as a rich table."""
    from rich.table import Table

    table = Table(title=f"{len(samples)} held-out questions: answers before and after training", show_lines=True)
    for col in ("question", "reference", "before", "after"):
        table.add_column(col, overflow="fold", ratio=1)
    for s in samples:
        table.add_row(_clip(str(s.get("input") or "")), _clip(s["reference"]), _clip(s["before"]), _clip(s["after"]))
    return table


def write_report(folder: Path, report: EvalReport, predictions: Sequence[dict[str, Any]], title: str, *,
                 kept: str = "nothing else was changed", then: str = "") -> list[str]:
    """eval.json, predictions.jsonl and, for classification, confusion.png into ``folder`` (checked by the caller:
    new, or finsft's results), each through the writing gate; returns the names. A full disk or a read-only
    folder ends in one WriteError saying ``kept`` and what to do (``then``)."""
    with write_errors(folder, kept, then):
        folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "eval.json", report.as_dict(), kept=kept, then=then)
    write_jsonl(folder / "predictions.jsonl", predictions, kept=kept, then=then)
    written = ["eval.json", "predictions.jsonl"]
    if "confusion_matrix" in report.metrics and plot_confusion(report.metrics, folder / "confusion.png", title,
                                                                kept, then):
        written.append("confusion.png")
    return written


RESULT_FILES = frozenset({"eval.json", "predictions.jsonl", "confusion.png", "suite.json"})
_REPORT_KEYS = frozenset({"model", "data", "rows", "rows_fingerprint", "settings", "metrics"})


def is_results_folder(folder: Path) -> bool:
    """A folder of evaluation results finsft wrote (``finsft eval`` or ``--suite``): nothing but eval.json (in the
    EvalReport shape), predictions.jsonl, confusion.png, suite.json and folders of the same kind, no symbolic link.
    Such a folder may be written again; any other non-empty folder is the user's."""
    found = False
    for p in folder.iterdir():
        if p.is_symlink():
            return False
        if p.is_dir():
            if not is_results_folder(p):
                return False
            found = True
        elif p.name not in RESULT_FILES or not p.is_file():
            return False
        elif p.name == "eval.json":
            try:
                report = read_json(p, "eval.json", limit=64 * 2**20)
            except UnreadableFile:
                return False
            if not (isinstance(report, dict) and report.keys() >= _REPORT_KEYS):
                return False
            found = True
    return found
