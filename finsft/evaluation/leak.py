"""The leak guard: the inputs of every set a recipe is scored on, gathered before any model is loaded, so that
training rows with the same input are dropped (``data.drop_eval_overlap``, the default) or counted and warned
about. Checked: ``evaluation.path`` (the rows scored), ``data.validation_path``, every ``evaluation.sets`` entry
(the rows scored) and, with ``evaluation.suite``, the suite's test splits (from ``evaluation.suite_data`` or the
hub). The validation split that finsft draws from the training data is split by input already. Needs
``datasets`` only: no torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finsft.data import EvalInputs, column, load_split, normalise_text
from finsft.errors import DataError, FinsftError
from finsft.evaluation.report import eval_set
from finsft.evaluation.sets import load_set, set_template
from finsft.recipe import Recipe
from finsft.templates import Template


def suite_data_dir(recipe: Recipe, given: str | None = None) -> str | None:
    """The folder the suite is read from: ``given`` (``--suite-data``), else evaluation.suite_data; None: the hub.
    FinsftError when it is not a folder."""
    import os

    folder = given or recipe.evaluation_settings.get("suite_data")
    if folder is None:
        return None
    path = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(path):
        where = "--suite-data" if given else "evaluation.suite_data"
        raise FinsftError(f"{where} '{folder}' is not a folder (it should hold the suite's local files, e.g. "
                          "fpb.jsonl, fiqa_sa.jsonl, tfns_valid.jsonl, nwgi_test.jsonl)")
    return path


def evaluation_inputs(recipe: Recipe, template: Template, log: Callable[[str], None] | None = None) -> EvalInputs:
    """Every evaluation set's normalised inputs. A set the recipe names that cannot be read is an error (training
    would fail on it later); a suite set that cannot be loaded is left unchecked and said (``finsft eval --suite``
    reports it missing in the same way)."""
    field = recipe.data["group_by"]
    ev = recipe.evaluation_settings
    guard = EvalInputs(field=field, drop=recipe.data["drop_eval_overlap"], sets={})

    def add(name: str, rows: Any) -> None:
        values = column(rows, field) if hasattr(rows, "column_names") else [r.get(field) for r in rows]
        if values and all(v is not None for v in values):
            guard.sets[name] = {normalise_text(v) for v in values}
            guard.checked[name] = len(values)

    if recipe.data["validation_path"]:
        rows, _ = load_split(recipe.data["validation_path"], recipe.data["split"], template, recipe.data["columns"])
        add("validation", rows)
    if recipe.evaluation is None:
        return guard
    if ev["path"]:
        main = eval_set(recipe, template, None)
        add(main.name, main.rows)
    for name, spec in (ev.get("sets") or {}).items():
        add(name, load_set(recipe, name, spec, set_template(spec, template)).rows)
    if ev.get("suite"):
        from finsft.evaluation.suite import SETS, SUITES, load_suite_set

        if ev["suite"] not in SUITES:
            raise FinsftError(f"unknown suite '{ev['suite']}'; available: {', '.join(SUITES)}")
        folder = suite_data_dir(recipe)
        unreachable = None  # the hub failed for one set: the others are not tried (each costs ~25 s of retries)
        for s in SETS:
            name = f"{ev['suite']}/{s.name}"
            try:
                if unreachable:
                    raise DataError(f"not tried: {unreachable}")
                rows, _ = load_suite_set(s, folder)
            except (DataError, KeyError, ValueError) as exc:
                if folder is None and "cannot be reached" in str(exc):
                    unreachable = f"the hub could not be reached for {s.title}"
                guard.unchecked[name] = str(exc)
                if log:
                    log(f"[yellow]leak guard:[/] {s.title} of suite {ev['suite']} could not be loaded, so training "
                        f"rows are not checked against it ({exc}); set evaluation.suite_data to a folder with the "
                        "suite's files")
                continue
            if field != "input":  # the suite's rows are instruction/input/output
                guard.unchecked[name] = f"data.group_by is '{field}'; the suite's rows are compared by 'input'"
                continue
            add(name, rows)
    return guard
