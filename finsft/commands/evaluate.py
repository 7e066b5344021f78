"""``finsft eval``: score the base model or a trained one on the recipe's evaluation data."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from finsft.data import make_formatter
from finsft.errors import FinsftError
from finsft.evaluation import (
    EvalReport,
    eval_settings,
    metrics_tables,
    predictions_table,
    resolve_scorer,
    rows_fingerprint,
    score,
    write_report,
)
from finsft.evaluation.metrics import check_metric_packages
from finsft.evaluation.report import is_results_folder
from finsft.evaluation.sets import load_set, set_template, summary_line
from finsft.files import UnreadableFile, check_writable, read_json, run_lock
from finsft.models import check_adapter, load_for_inference
from finsft.preflight import Checked, preflight
from finsft.progress import console
from finsft.recipe import Recipe
from finsft.templates import template_from_recipe
from finsft.training.output import made_by_finsft


def training_sets(run: Path | None) -> set[str]:
    """The evaluation sets a training run scored itself: its eval/<name>/ folders are part of the run, never
    replaced by ``finsft eval``. Named by the run's recipe.json (evaluation.sets); when that file is missing or
    unreadable, nothing tells the run's own reports from later ones, so every eval/<name>/ that holds an eval.json
    counts as the run's own (a new evaluation of it goes to eval/<name>/rescored/)."""
    if run is None:
        return set()
    try:
        config = read_json(run / "recipe.json", "the run's recipe")
        return set((config.get("evaluation") or {}).get("sets") or {})
    except (UnreadableFile, AttributeError):
        folder = run / "eval"
        if not folder.is_dir() or folder.is_symlink():
            return set()
        return {p.name for p in folder.iterdir() if p.is_dir() and (p / "eval.json").is_file()}


RESULTS_FIX = ("the scores would be lost after scoring. Pass --out DIR to write the results to a folder you can "
               "write to")


def results_folder(out: str | None, adapter_dir: Path | None, set_name: str) -> Path:
    """Where eval.json goes, checked before anything heavy is loaded. ``--out`` names a new or empty folder, a
    folder of earlier finsft results (written again), or a finsft training run (then, as with ``--adapter``, the
    results go to ``RUN/eval/<data name>/``). Nothing else is replaced: not a file, not a folder finsft did not
    write, not the training run's own eval.json or the eval/<set>/ of its evaluation.sets."""
    if out:
        folder = Path(out).expanduser().absolute()
        if folder.is_symlink():
            raise FinsftError(f"--out '{out}' is a symbolic link (to {os.path.realpath(folder)}); finsft does not "
                              "write through links: name the folder itself, or a new one")
        if folder.exists() and not folder.is_dir():
            raise FinsftError(f"--out '{out}' is a file, not a folder; finsft does not replace it: name a new "
                              "folder, e.g. --out results/NAME")
        if folder.is_dir() and made_by_finsft(folder):
            run = folder  # a training run: its own eval.json, predictions and card stay as training wrote them
        elif folder.is_dir() and any(folder.iterdir()) and not is_results_folder(folder):
            raise FinsftError(f"--out '{out}' is a folder that holds files finsft did not write; finsft never "
                              "replaces them: name a new or empty folder, e.g. --out results/NAME")
        else:
            return folder
    elif adapter_dir is None:
        raise FinsftError("where should the results go? Pass --out DIR (without --adapter there is no run folder "
                          "to write eval.json into)")
    else:
        run = adapter_dir
    target = run / "eval" / set_name
    if set_name in training_sets(run) and target.exists():
        raise FinsftError(f"{target} holds the training run's own evaluation of its set '{set_name}' (its model "
                          "card reports it); finsft does not replace it: pass --out DIR to write this evaluation "
                          "to a new folder")
    return writable_results(target)


def writable_results(folder: Path) -> Path:
    """``folder`` when finsft may write results there: absent, empty, or earlier finsft results; never a link or
    anything else."""
    if folder.is_symlink() or (folder.exists() and not (folder.is_dir() and (not any(folder.iterdir())
                                                                               or is_results_folder(folder)))):
        raise FinsftError(f"{folder} holds files finsft did not write; finsft never replaces them: pass --out DIR "
                          "to write the results to a new folder")
    return folder


def evaluate_command(recipe: Recipe, *, adapter: str | None = None, data: str | None = None,
                     split: str | None = None, limit: int | None = None, scorer: str | None = None,
                     out: str | None = None, checked: Checked | None = None) -> dict[str, Any]:
    """Scores every set the recipe names, as training does: the main set (evaluation.path or the validation
    split, drawn after the leak guard as training drew it; ``data`` instead, and then that alone) and each
    evaluation.sets entry. Each set's eval.json, predictions.jsonl (and confusion.png for classification) go to
    ``RUN/eval/<set name>/``; with ``--out DIR`` the main set's go to DIR and the others' to
    ``DIR/eval/<set name>/``, as in a training run. Returns the main set's eval.json content. ``checked``: the
    preflight's result (the main set's rows) when the caller ran it."""
    if limit is not None and limit < 1:
        raise FinsftError(f"--limit must be at least 1, not {limit}")
    adapter_dir = check_adapter(adapter)
    with owner_lock(out, adapter_dir):
        return _evaluate(recipe, adapter, adapter_dir, data=data, split=split, limit=limit, scorer=scorer, out=out,
                         checked=checked)


def owner_lock(out: str | None, adapter_dir: Path | None, command: str = "finsft eval") -> Any:
    """The run lock of the training run this evaluation reads or writes (``--adapter RUN``, or ``--out RUN``):
    a training of that folder (``--overwrite`` would replace the adapter being scored) or another eval, merge or
    push of it is refused while this one runs."""
    from contextlib import ExitStack

    stack = ExitStack()
    runs = [] if adapter_dir is None or not made_by_finsft(adapter_dir) else [adapter_dir]
    if out:
        folder = Path(out).expanduser().absolute()
        if folder.is_dir() and not folder.is_symlink() and made_by_finsft(folder) and folder not in runs:
            runs.append(folder)
    for run in runs:
        stack.enter_context(run_lock(run, f"{command} --adapter" if run == adapter_dir else f"{command} --out"))
    return stack


def _evaluate(recipe: Recipe, adapter: str | None, adapter_dir: Path | None, *, data: str | None,
              split: str | None, limit: int | None, scorer: str | None, out: str | None,
              checked: Checked | None) -> dict[str, Any]:
    con = console()
    if out is None and adapter_dir is None:
        results_folder(out, adapter_dir, "")  # the error, before anything heavy
    if checked is None:
        checked = preflight(recipe, "eval", data=data, split=split, limit=limit)
    template = checked.template or template_from_recipe(recipe.template)
    ev = recipe.evaluation_settings
    wanted_scorer = scorer
    scorer = resolve_scorer(scorer or ev["scorer"], template)
    check_metric_packages(template.is_classification, "finsft eval")
    rows = checked.main_set
    assert rows is not None
    out_dir = results_folder(out, adapter_dir, rows.name)
    owned = training_sets(adapter_dir)
    # Every set's rows before the model loads: a set that cannot be read fails now, not after the first is scored.
    extra = []
    for name, spec in ([] if data else (ev.get("sets") or {}).items()):
        t = set_template(spec, template)
        set_scorer = resolve_scorer(ev["scorer"], t)
        if wanted_scorer and wanted_scorer != "auto":
            if wanted_scorer == "likelihood" and not t.is_classification:
                con.print(f"set '{name}': --scorer likelihood does not apply to template '{t.name}' (it has no "
                          f"labels); scored with {set_scorer}")
            else:
                set_scorer = wanted_scorer
        if out:
            folder = out_dir / "eval" / name
        elif adapter_dir is not None and name in owned:  # the training run's own report stays as it is
            folder = writable_results(adapter_dir / "eval" / name / "rescored")
            con.print(f"set '{name}': {folder.parent} holds the training run's own report; this evaluation goes to "
                      f"{folder}")
        else:
            folder = results_folder(None, adapter_dir, name)
        if folder == out_dir:
            raise FinsftError(f"evaluation.sets has a set named '{name}', the name of the main evaluation set's "
                              f"results folder ({out_dir}); rename the set")
        extra.append((load_set(recipe, name, spec, t, limit), t, set_scorer, spec.get("max_samples"), folder))
    for folder in [out_dir, *(e[-1] for e in extra)]:
        check_writable(folder, "the results folder", RESULTS_FIX)

    t0 = time.perf_counter()
    loaded = load_for_inference(recipe, adapter, log=con.print)
    load_s = round(time.perf_counter() - t0, 2)
    formatter = make_formatter(recipe, template, loaded.tokenizer)
    what = f"adapter {loaded.adapter}" if loaded.adapter else f"base model {loaded.description}"
    sets = [(rows, formatter, eval_settings(recipe, formatter, scorer, limit), out_dir)]
    for set_rows, t, set_scorer, cap, folder in extra:
        set_formatter = make_formatter(recipe, t, loaded.tokenizer)
        sets.append((set_rows, set_formatter, eval_settings(recipe, set_formatter, set_scorer, limit or cap), folder))
    reports: list[EvalReport] = []
    for i, (set_rows, set_formatter, settings, folder) in enumerate(sets):
        set_scorer = settings["scorer"]
        label = "" if i == 0 else f"set '{set_rows.name}': "
        con.print(f"{label}evaluating {what} on {len(set_rows.rows)} rows of {set_rows.description} ({set_scorer} "
                  "scorer)")
        t1 = time.perf_counter()
        result = score(loaded.model, set_formatter, set_rows.rows, settings, con, f"scoring {set_rows.name} "
                       f"({set_scorer})")
        seconds = time.perf_counter() - t1
        report = EvalReport(model=loaded.description, adapter=loaded.adapter, data=set_rows.description,
                            rows=len(set_rows.rows), rows_fingerprint=rows_fingerprint(set_rows.rows),
                            settings=settings, metrics=result.metrics,
                            seconds={"load": load_s, "scoring": round(seconds, 2)} if i == 0
                            else {"scoring": round(seconds, 2)})
        title = f"{recipe.name}: {what}, {result.scorer} scorer" + (f", set '{set_rows.name}'" if i else "")
        for table in metrics_tables(result.metrics, title):  # on screen first: a failed write loses no number
            con.print(table)
        if not set_formatter.template.is_classification:
            con.print(predictions_table(result.predictions))
        done = [f"{r.data} in {f}" for r, f in zip(reports, (s[-1] for s in sets), strict=False)]
        kept = ("the scores are printed above" + (f"; the sets scored before are written ({'; '.join(done)})"
                                                   if done else ""))
        written = write_report(folder, report, result.predictions, title, kept=kept,
                               then="score again with --out DIR on a disk with space")
        n = len(set_rows.rows)
        con.print(f"{n} rows in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} rows/s); wrote "
                  f"{', '.join(written)} to {folder}")
        reports.append(report)
    if len(reports) > 1:
        con.print("; ".join(summary_line(s[0].name, r.metrics) for r, s in zip(reports, sets, strict=True)))
    return reports[0].as_dict()
