"""``finsft predict``: generate with the recipe's template, from --input texts or a data file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finsft.data import load_table, make_formatter, to_template_rows
from finsft.errors import FinsftError
from finsft.evaluation import ScoringProgress, default_max_new_tokens, generate, map_answer, prompt_template
from finsft.files import check_readable, write_errors, write_jsonl
from finsft.models import check_adapter, load_for_inference
from finsft.preflight import local_or_hub
from finsft.progress import console
from finsft.recipe import Recipe
from finsft.templates import Template, template_from_recipe


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def output_file(out: str) -> Path:
    """The JSONL file --out names, checked before anything heavy is loaded."""
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise FinsftError(f"--out '{out}' is a folder; name a file, e.g. {Path(out) / 'predictions.jsonl'}")
    if path.exists() or path.is_symlink():
        # A JSONL file of predictions looks like the data it was made from (a QA file has "answer" too), so no
        # shape tells finsft's file from the user's: predict writes new files only.
        raise FinsftError(f"--out '{out}' already exists; finsft predict writes only a new file and never replaces "
                          "one (it could be your data): name a new file, or delete the old predictions first")
    if path.parent.exists() and not path.parent.is_dir():
        raise FinsftError(f"--out '{out}': '{path.parent}' is a file, not a folder")
    return path


def predict_rows(template: Template, recipe: Recipe, inputs: Sequence[str] | None,
                 file: str | None) -> list[dict[str, Any]]:
    """Rows for predict: each --input fills the template's ``input`` field, or the rows of a data file."""
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
    path = local_or_hub(file)
    assert path is not None
    if not os.path.isabs(path):
        raise FinsftError(f"--file '{file}' does not exist")
    check_readable(path, "--file")  # a FIFO or a device is refused before anything reads it
    ds, _ = load_table(path, "train")
    ds = to_template_rows(ds, need, recipe.data["columns"], file)
    return [dict(r) for r in ds]


def predict_command(recipe: Recipe, *, adapter: str | None = None, inputs: Sequence[str] | None = None,
                    file: str | None = None, out: str | None = None,
                    max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """``finsft predict``: generate with the recipe's template; prints a table, or writes JSONL to ``out``."""
    con = console()
    if bool(inputs) == bool(file):
        raise FinsftError("give the texts with --input TEXT (repeatable) or a data file with --file, not both")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise FinsftError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if inputs is not None and not all(text.strip() for text in inputs):
        raise FinsftError("--input is empty: give the text to complete, e.g. --input \"Shares of X jumped 5%\"")
    target = output_file(out) if out else None
    check_adapter(adapter)
    template = template_from_recipe(recipe.template)
    rows = predict_rows(template, recipe, inputs, file)
    loaded = load_for_inference(recipe, adapter, log=con.print)
    formatter = make_formatter(recipe, prompt_template(template), loaded.tokenizer)
    max_new = max_new_tokens or default_max_new_tokens(template, recipe)
    batch_size = recipe.evaluation_settings["batch_size"]
    with ScoringProgress(con, "generating", len(rows)) as progress:
        texts = generate(loaded.model, formatter, rows, batch_size, max_new, progress)
    records = []
    for row, text in zip(rows, texts, strict=True):
        record = {**row, "answer": text}
        if template.is_classification:
            record["label"] = map_answer(text, template)
        records.append(record)
    if target is not None:
        kept = f"the {len(records)} predictions were not written and nothing else was changed"
        with write_errors(target, kept, "predict again"):
            target.parent.mkdir(parents=True, exist_ok=True)
        # replace=False: a new file only, and one made meanwhile is not replaced either
        write_jsonl(target, records, replace=False, kept=kept, then="predict again")
        con.print(f"wrote {len(records)} predictions to {target}")
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


