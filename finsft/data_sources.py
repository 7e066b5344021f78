"""Dataset mixtures: ``data.datasets`` lists sources (TRL's DatasetMixtureConfig names: path, name, data_dir,
data_files, split; plus finsft's column mapping and ``fraction``), read one by one, each mapped to the template's
fields and cut to its fraction (a sample seeded with training.seed), then concatenated; shuffling, the validation
split (grouped by unique input across every source), max_samples and balancing apply to the whole mixture.

``build_splits`` is the entry point for both kinds of data section (one ``path``, or ``datasets``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from typing import Any

from finsft.data import (
    EvalInputs,
    Splits,
    _file_digest,
    check_labels,
    finish_splits,
    load_hub_dataset,
    load_table,
    map_labels,
    to_template_rows,
)
from finsft.data import build_splits as build_single_splits
from finsft.errors import DataError
from finsft.recipe import Recipe
from finsft.templates import Template


def describe(source: Mapping[str, Any]) -> str:
    """A source for people: its path, and its configuration and split when they matter."""
    text = str(source["path"])
    if source.get("name"):
        text += f" ({source['name']})"
    if source.get("data_dir"):
        text += f" data_dir={source['data_dir']}"
    if source.get("data_files"):
        text += f" data_files={source['data_files']}"
    if not os.path.isabs(text) or source.get("data_files"):
        text += f" [{source.get('split', 'train')}]"
    return text


def _files_digest(files: Any) -> str | None:
    """Digest of local data_files, or None when any of them is not a local file."""
    names = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else list(files)
    if not all(isinstance(f, str) and os.path.isfile(f) for f in names):
        return None
    return hashlib.sha256("".join(_file_digest(f) for f in names).encode()).hexdigest()


def load_source(source: Mapping[str, Any]) -> tuple[Any, str]:
    """One source as a ``datasets.Dataset`` and a fingerprint of its content: a local file through
    ``load_table``, anything else (hub ids, builders with data_files) through ``datasets.load_dataset``."""

    path, split = source["path"], source.get("split", "train")
    name, data_dir, files = source.get("name"), source.get("data_dir"), source.get("data_files")
    if os.path.isabs(path) and os.path.isfile(path) and not (name or data_dir or files):
        return load_table(path, split)
    what = describe(source)
    ds = load_hub_dataset(path, split, what=what, fix="point the source at a local file", name=name,
                          data_dir=data_dir, data_files=files)
    digest = _files_digest(files) if files else None
    return ds, digest or str(getattr(ds, "_fingerprint", what))


def take_fraction(ds: Any, fraction: float, seed: int, index: int) -> Any:
    """``round(fraction * rows)`` rows (at least 1) sampled with ``seed`` (and the source's index, so two sources
    of one size do not draw the same rows), in their original order."""
    if fraction >= 1:
        return ds
    n = max(1, round(fraction * len(ds)))
    picked = random.Random(f"{seed}/{index}").sample(range(len(ds)), n)
    return ds.select(sorted(picked))


def load_mixture(recipe: Recipe, template: Template,
                 exclude: EvalInputs | None = None) -> tuple[Any, str, list[dict[str, Any]]]:
    """Every source of data.datasets as template rows, concatenated; a digest of all of them; and what each
    source gave (for the manifest). ``exclude``: the leak guard, applied to each source before its fraction."""
    import datasets

    seed = recipe.training["seed"]
    parts, digests, report = [], [], []
    for i, source in enumerate(recipe.data["datasets"] or []):
        what = describe(source)
        ds, digest = load_source(source)
        local = source["path"] if os.path.isabs(source["path"]) and not source.get("data_files") else None
        rows = to_template_rows(ds, template, source.get("columns") or {}, what, section=f"data.datasets[{i}]",
                                path=local)
        rows = map_labels(rows, template, {**(recipe.data.get("label_map") or {}), **(source.get("label_map") or {})},
                          what)
        check_labels(rows, template, what, fix=f"data.datasets[{i}].label_map")
        read = len(rows)
        if exclude is not None:
            rows = exclude.apply(rows, what)
        fraction = float(source.get("fraction", 1))
        used = take_fraction(rows, fraction, seed, i)
        parts.append(used)
        digests.append(digest)
        report.append({"path": source["path"], "name": source.get("name"), "split": source.get("split", "train"),
                       "rows": read, "rows_used": len(used), "fraction": fraction, "fingerprint": digest})
        if read != len(rows):
            report[-1]["rows_dropped_eval_overlap"] = read - len(rows)
    first = parts[0]
    aligned = [first]
    for part, info in zip(parts[1:], report[1:], strict=True):
        if part.features != first.features:
            try:
                part = part.cast(first.features)
            except (ValueError, TypeError) as exc:
                raise DataError(f"{info['path']}: its columns have other types than those of "
                                f"{report[0]['path']} ({dict(part.features)} vs {dict(first.features)}): {exc}") from exc
        aligned.append(part)
    return datasets.concatenate_datasets(aligned), "+".join(digests), report


def build_splits(recipe: Recipe, template: Template, exclude: EvalInputs | None = None) -> Splits:
    """The training and validation rows of the recipe's data section: one source (data.path) or a mixture
    (data.datasets). ``Splits.sources`` lists each source with its rows and fingerprint. ``exclude``: the leak
    guard's evaluation inputs (finsft.evaluation.leak), dropped or counted per source."""
    if not recipe.data.get("datasets"):
        return build_single_splits(recipe, template, exclude)
    rows, digest, report = load_mixture(recipe, template, exclude)
    splits = finish_splits(rows, digest, recipe, template, f"the mixture of {len(report)} sources", exclude)
    splits.sources = report
    return splits


def resolve_data_format(recipe: Recipe) -> Template | None:
    """For a recipe that names no template and whose data could not be read before the run (a hub id, a Parquet
    file): TRL's format of the first source's first row (finsft.data_formats) decides the template. The recipe's
    config (template.name, and data.group_by unless the recipe sets it) and ``data_format`` record the choice.
    None when there is nothing to decide."""
    from finsft.data_formats import detect_format, unknown_format_message
    from finsft.templates import template_from_recipe

    if not recipe.template_pending:
        return None
    data = recipe.data
    if data.get("path"):
        source: dict[str, Any] = {"path": data["path"], "split": data["split"]}
        columns: Mapping[str, str] = data["columns"]
    else:
        source = dict(next(iter(data.get("datasets") or []), {"path": ""}))
        columns = source.get("columns") or {}
    ds, _ = load_source(source)
    first = ds[0] if len(ds) else None
    fmt = detect_format(list(ds.column_names), first, columns)
    if fmt is None:
        raise DataError(unknown_format_message(describe(source), list(ds.column_names), first))
    recipe.config["template"]["name"] = fmt.template
    raw_data = recipe.raw.get("data")
    if not (isinstance(raw_data, dict) and "group_by" in raw_data):
        recipe.config["data"]["group_by"] = fmt.group_by
    recipe.data_format = fmt.describe()
    return template_from_recipe(recipe.template)
