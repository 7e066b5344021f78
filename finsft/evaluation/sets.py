"""Several evaluation sets in one run: ``evaluation.sets`` names extra sets, each with its own data (path, hub
config name, split, columns) and optionally its own template or label vocabulary. Each is scored like the main
set, before and after training, and reported as ``eval/<name>/eval.json`` (the one EvalReport shape) and as one
summary line per set and phase in metrics.jsonl."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finsft.data import Formatter, check_labels, make_formatter, map_labels, to_template_rows
from finsft.evaluation.metrics import headline
from finsft.evaluation.report import EvalSet, eval_settings
from finsft.evaluation.scorers import resolve_scorer
from finsft.files import append_jsonl
from finsft.recipe import Recipe
from finsft.templates import Template, get_template, resolve_labels

SUMMARY_KEYS = ("n", "accuracy", "macro_f1", "weighted_f1", "answer_perplexity", "rougeL", "token_f1")


@dataclass
class NamedSet:
    """An extra evaluation set, ready to score."""

    name: str
    rows: EvalSet
    template: Template
    formatter: Formatter
    settings: dict[str, Any]


def set_template(spec: Mapping[str, Any], recipe_template: Template) -> Template:
    """The set's template (the recipe's when null) with the set's label vocabulary when it names one."""
    base = get_template(spec["template"]) if spec.get("template") else recipe_template
    labels = resolve_labels(spec.get("labels"), base.labels)
    return replace(base, labels=labels) if labels != base.labels else base


def sample(ds: Any, cap: int | None, seed: int) -> tuple[Any, str]:
    """At most ``cap`` rows, a sample seeded like the main set's (the first rows of a file are often sorted)."""
    if cap and cap < len(ds):
        return ds.shuffle(seed=seed).select(range(cap)), f", {cap} rows sampled with seed {seed}"
    return ds, ""


def load_set(recipe: Recipe, name: str, spec: Mapping[str, Any], template: Template,
             limit: int | None = None) -> EvalSet:
    """The rows of one extra set, mapped to its template's fields, labels checked, capped (``limit``, else the
    set's max_samples, else evaluation.max_samples)."""
    from finsft.data_sources import describe, load_source

    source = {"path": spec["path"], "name": spec.get("name"), "split": spec.get("split", "test")}
    what = f"evaluation set '{name}' ({describe(source)})"
    ds, fp = load_source(source)
    local = spec["path"] if os.path.isabs(spec["path"]) else None
    ds = to_template_rows(ds, template, spec.get("columns") or {}, what, section=f"evaluation.sets.{name}",
                          path=local)
    ds = map_labels(ds, template, spec.get("label_map"), what)
    check_labels(ds, template, what, f"evaluation.sets.{name}.labels", fix=f"evaluation.sets.{name}.label_map")
    cap = limit or spec.get("max_samples") or recipe.evaluation_settings["max_samples"]
    ds, note = sample(ds, cap, recipe.training["seed"])
    return EvalSet([dict(r) for r in ds], f"{describe(source)}{note} ({fp})", name)


def named_sets(recipe: Recipe, loaded: list[tuple[str, Template, EvalSet]], tokenizer: Any) -> list[NamedSet]:
    """Sets whose rows are loaded (name, template, rows), with their formatter and scoring settings."""
    ev = recipe.evaluation_settings
    out = []
    for name, t, rows in loaded:
        spec = ev["sets"][name]
        formatter = make_formatter(recipe, t, tokenizer)
        settings = eval_settings(recipe, formatter, resolve_scorer(ev["scorer"], t), spec.get("max_samples"))
        out.append(NamedSet(name, rows, t, formatter, settings))
    return out


def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a set's metrics (no per-class tables): for metrics.jsonl and summaries."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


def log_summary(metrics_path: Path, name: str, phase: str, metrics: Mapping[str, Any], step: int | None) -> None:
    """One line per set and phase in metrics.jsonl: {"eval_set", "phase", "step", headline numbers}."""
    append_jsonl(metrics_path, {"eval_set": name, "phase": phase, "step": step, **summary(metrics)})


def summary_line(name: str, metrics: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> str:
    text = f"{name}: {headline(dict(metrics))}"
    if base is not None:
        text += f" (before: {headline(dict(base))})"
    return text
