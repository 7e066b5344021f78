"""``finsft eval RECIPE [--adapter RUN] --suite fingpt-sentiment [--suite-data DIR]``: score a model on FinGPT's
sentiment benchmarks (finsft.evaluation.suite), one table per set next to FinGPT's published rows. A set that
cannot be loaded is reported as missing with the reason; the others still run."""

from __future__ import annotations

import random
import time
from typing import Any

from finsft.commands.evaluate import RESULTS_FIX, owner_lock, results_folder
from finsft.data import make_formatter
from finsft.errors import FinsftError
from finsft.evaluation import EvalReport, eval_settings, rows_fingerprint, score, write_report
from finsft.evaluation.scorers import FINGPT_SCORER
from finsft.evaluation.sets import summary
from finsft.evaluation.suite import SETS, SUITES, Row, SuiteSet, published, suite_template
from finsft.files import check_writable, write_json
from finsft.models import check_adapter, load_for_inference
from finsft.preflight import Checked, preflight
from finsft.progress import console
from finsft.recipe import Recipe


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def suite_table(s: SuiteSet, n: int, where: str, metrics: dict[str, Any], model: str) -> Any:
    """This model's accuracy, macro F1 and weighted F1 on one set, above FinGPT's published rows."""
    from rich.table import Table

    table = Table(title=f"{s.title}: {n} rows, {where}",
                  caption="below the first row: FinGPT's published results (FinGPT README.md, commit ec315843)")
    for col in ("model", "accuracy", "macro F1", "weighted F1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(f"[bold]{model}[/]", _fmt(metrics["accuracy"]), _fmt(metrics["macro_f1"]),
                  _fmt(metrics["weighted_f1"]))
    for name, acc, f1 in published(s.name):
        table.add_row(name, _fmt(acc), "-", _fmt(f1))
    return table


# What each suite scorer is, wherever its numbers are printed next to FinGPT's published (generated) ones.
SCORER_LABELS = {
    FINGPT_SCORER: "generation scored with FinGPT's own procedure (its prompt ending 'Answer: ', greedy generation "
                   "to 512 tokens, the text after 'Answer: ', change_target): comparable with the published rows",
    "likelihood": "LIKELIHOOD scorer (the 3 labels ranked by log-likelihood, so every answer is a valid label): NOT "
                  "how FinGPT's published rows were scored (they generate); the default, generation, is comparable",
}
SCORER_SHORT = {FINGPT_SCORER: "generation (FinGPT's procedure)", "likelihood": "likelihood (not comparable)"}


def suite_scorer(requested: str | None) -> str:
    """The suite scores as FinGPT's benchmark code does (generation) unless ``--scorer likelihood`` asks for the
    label ranking; the recipe's evaluation.scorer is for its own evaluation set, not for the suite."""
    if requested in (None, "auto", "generate", FINGPT_SCORER):
        return FINGPT_SCORER
    if requested == "likelihood":
        return "likelihood"
    raise FinsftError(f"the suite scores with 'generate' (FinGPT's procedure, the default) or 'likelihood', not "
                      f"{requested!r}")


def limit_rows(rows: list[Row], limit: int | None, seed: int) -> tuple[list[Row], str]:
    if limit and limit < len(rows):
        picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
        return [rows[i] for i in picked], f", {limit} rows sampled with seed {seed}"
    return rows, ""


def suite_command(recipe: Recipe, suite: str, *, adapter: str | None = None, data_dir: str | None = None,
                  limit: int | None = None, scorer: str | None = None, out: str | None = None,
                  checked: Checked | None = None) -> dict[str, Any]:
    """Score every set of ``suite``; writes <results>/<set>/eval.json (the EvalReport shape), predictions and a
    confusion plot per set, and <results>/suite.json. Returns suite.json's content. ``checked``: the preflight's
    result (the suite's rows) when the caller ran it."""
    if suite not in SUITES:
        raise FinsftError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
    if limit is not None and limit < 1:
        raise FinsftError(f"--limit must be at least 1, not {limit}")
    adapter_dir = check_adapter(adapter)
    with owner_lock(out, adapter_dir, "finsft eval --suite"):
        return _suite(recipe, suite, adapter, adapter_dir, data_dir=data_dir, limit=limit, scorer=scorer, out=out,
                      checked=checked)


def _suite(recipe: Recipe, suite: str, adapter: str | None, adapter_dir: Any, *, data_dir: str | None,
           limit: int | None, scorer: str | None, out: str | None, checked: Checked | None) -> dict[str, Any]:
    con = console()
    folder = results_folder(out, adapter_dir, suite)
    check_writable(folder, "the results folder", RESULTS_FIX)
    if checked is None:
        checked = preflight(recipe, "eval", suite=suite, suite_data=data_dir)
    seed = recipe.training["seed"]
    loaded_sets: list[tuple[SuiteSet, list[Row], str]] = []
    missing = dict(checked.suite_missing)
    titles = {s.name: s.title for s in SETS}
    for name, why in missing.items():
        con.print(f"[yellow]{titles[name]}: missing[/] ({why})")
    for s, rows, where in checked.suite_sets:
        rows, note = limit_rows(rows, limit, seed)
        loaded_sets.append((s, rows, where + note))
    result: dict[str, Any] = {"suite": suite, "sets": {}, "missing": missing}

    template = suite_template()
    scorer = suite_scorer(scorer)
    loaded = load_for_inference(recipe, adapter, log=con.print)
    formatter = make_formatter(recipe, template, loaded.tokenizer)
    settings = eval_settings(recipe, formatter, scorer, limit)
    what = f"adapter {loaded.adapter}" if loaded.adapter else f"base model {loaded.description}"
    result.update(model=loaded.description, adapter=loaded.adapter, settings=settings)
    con.print(f"suite {suite}: {what}, {SCORER_LABELS[scorer]}")
    for s, rows, where in loaded_sets:
        t0 = time.perf_counter()
        res = score(loaded.model, formatter, rows, settings, con, f"{s.title} ({scorer})")
        report = EvalReport(model=loaded.description, adapter=loaded.adapter, data=f"{s.title}: {where}",
                            rows=len(rows), rows_fingerprint=rows_fingerprint(rows), settings=settings,
                            metrics=res.metrics, seconds={"scoring": round(time.perf_counter() - t0, 2)})
        write_report(folder / s.name, report, res.predictions, f"{recipe.name}: {s.title}, {what}")
        who = "this model" if not loaded.adapter else "this adapter"
        con.print(suite_table(s, len(rows), where, res.metrics, f"{who}, {SCORER_SHORT[scorer]}"))
        result["sets"][s.name] = {"data": report.data, "scorer": scorer, **summary(res.metrics)}
    for name, why in missing.items():
        con.print(f"[yellow]{name}: missing[/] ({why})")
    write_json(folder / "suite.json", result)
    con.print(f"wrote {folder}/suite.json and eval.json per set")
    return result
