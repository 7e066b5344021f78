"""``finsft eval``: score the base model or a trained one on the recipe's evaluation data."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from finsft.data import make_formatter
from finsft.data_sources import build_splits
from finsft.errors import FinsftError
from finsft.evaluation import (
    EvalReport,
    eval_set,
    eval_settings,
    metrics_tables,
    predictions_table,
    resolve_scorer,
    rows_fingerprint,
    score,
    write_report,
)
from finsft.evaluation.metrics import check_metric_packages
from finsft.models import check_adapter, load_for_inference
from finsft.progress import console
from finsft.recipe import Recipe
from finsft.templates import template_from_recipe


def local_or_hub(ref: str | None) -> str | None:
    """A path given on the command line is relative to the current folder; anything else is a hub id."""
    if ref and os.path.exists(os.path.expanduser(ref)):
        return os.path.abspath(os.path.expanduser(ref))
    return ref


def results_folder(out: str | None, adapter_dir: Path | None, set_name: str) -> Path:
    """Where eval.json goes: ``--out``, else ``RUN/eval/<data name>/`` under the evaluated run (never over the
    training run's own eval.json)."""
    if out:
        folder = Path(out).expanduser().absolute()
        if folder.exists() and not folder.is_dir():
            raise FinsftError(f"--out '{out}' is a file, not a folder")
        return folder
    if adapter_dir is None:
        raise FinsftError("where should the results go? Pass --out DIR (without --adapter there is no run folder "
                          "to write eval.json into)")
    return adapter_dir / "eval" / set_name


def evaluate_command(recipe: Recipe, *, adapter: str | None = None, data: str | None = None,
                     split: str | None = None, limit: int | None = None, scorer: str | None = None,
                     out: str | None = None) -> dict[str, Any]:
    """Writes eval.json, predictions.jsonl (and confusion.png for classification) into the results folder.
    Returns eval.json's content."""
    con = console()
    if limit is not None and limit < 1:
        raise FinsftError(f"--limit must be at least 1, not {limit}")
    adapter_dir = check_adapter(adapter)
    if out is None and adapter_dir is None:
        results_folder(out, adapter_dir, "")  # the error, before anything heavy
    template = template_from_recipe(recipe.template)
    ev = recipe.evaluation_settings
    scorer = resolve_scorer(scorer or ev["scorer"], template)
    check_metric_packages(template.is_classification, "finsft eval")
    data = local_or_hub(data)
    validation = None
    if not data and not ev["path"]:
        validation = build_splits(recipe, template).validation
    rows = eval_set(recipe, template, validation, data, split, limit)
    out_dir = results_folder(out, adapter_dir, rows.name)

    t0 = time.perf_counter()
    loaded = load_for_inference(recipe, adapter, log=con.print)
    formatter = make_formatter(recipe, template, loaded.tokenizer)
    settings = eval_settings(recipe, formatter, scorer, limit)
    what = f"adapter {loaded.adapter}" if loaded.adapter else f"base model {loaded.description}"
    con.print(f"evaluating {what} on {len(rows.rows)} rows of {rows.description} ({scorer} scorer)")
    t1 = time.perf_counter()
    result = score(loaded.model, formatter, rows.rows, settings, con, f"scoring ({scorer})")
    seconds = time.perf_counter() - t1

    report = EvalReport(model=loaded.description, adapter=loaded.adapter, data=rows.description,
                        rows=len(rows.rows), rows_fingerprint=rows_fingerprint(rows.rows), settings=settings,
                        metrics=result.metrics, seconds={"load": round(t1 - t0, 2), "scoring": round(seconds, 2)})
    title = f"{recipe.name}: {what}, {result.scorer} scorer"
    written = write_report(out_dir, report, result.predictions, title)
    for table in metrics_tables(result.metrics, title):
        con.print(table)
    if not template.is_classification:
        con.print(predictions_table(result.predictions))
    n = len(rows.rows)
    con.print(f"{n} rows in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} rows/s); wrote "
              f"{', '.join(written)} to {out_dir}")
    return report.as_dict()
