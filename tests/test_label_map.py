"""Labels stored as integers or other strings: data.label_map (and a source's or an evaluation set's own) maps them
to the template's labels, a ClassLabel column's own names are used without it, and the rules and messages say
which targets are allowed and how to map values outside the label set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TEST, INVENTED_TRAIN

from finsft.data import build_splits, column
from finsft.data_sources import build_splits as build_mixture_splits
from finsft.errors import DataError
from finsft.evaluation.report import eval_set
from finsft.evaluation.sets import load_set
from finsft.recipe import Recipe, check_recipe, load_recipe
from finsft.templates import template_from_recipe
from finsft.testing import write_jsonl

TFNS = {"0": "negative", "1": "positive", "2": "neutral"}  # the hub's TFNS labels (Bearish, Bullish, Neutral)


def invented(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_tfns(path: Path, out: Path) -> Path:
    """The invented headlines in TFNS's hub shape: text and an integer label."""
    codes = {v: int(k) for k, v in TFNS.items()}
    return write_jsonl(out, [{"text": r["input"], "label": codes[r["output"]]} for r in invented(path)])


def as_class_label(path: Path, out: Path, names: list[str]) -> Path:
    """The invented headlines as a Parquet file whose label column is a datasets.ClassLabel with ``names``
    (in the order negative, positive, neutral, as TFNS)."""
    import datasets

    codes = {"negative": 0, "positive": 1, "neutral": 2}
    rows = invented(path)
    ds = datasets.Dataset.from_dict(
        {"text": [r["input"] for r in rows], "label": [codes[r["output"]] for r in rows]},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}))
    ds.to_parquet(str(out))
    return out


def splits(recipe: Recipe) -> Any:
    return build_splits(recipe, template_from_recipe(recipe.template))


COLUMNS = {"input": "text", "output": "label"}


def test_integer_labels_need_a_label_map_and_the_error_says_so(make_recipe: Any, tmp_path: Path) -> None:
    data = as_tfns(INVENTED_TRAIN, tmp_path / "tfns.jsonl")
    recipe = load_recipe(str(make_recipe(data={"path": str(data), "columns": COLUMNS})))
    with pytest.raises(DataError) as exc:
        splits(recipe)
    msg = str(exc.value)
    assert "labels outside the template's label set (negative/neutral/positive)" in msg
    assert "data.label_map" in msg and '"2": "?"' in msg and "each ? one of: negative, neutral, positive" in msg

    recipe = load_recipe(str(make_recipe(data={"path": str(data), "columns": COLUMNS, "label_map": TFNS,
                                               "max_samples": None})))
    got = column(splits(recipe).train, "output")
    want = [r["output"] for r in invented(INVENTED_TRAIN)]
    assert sorted(got) == sorted(want)  # every row kept, each integer mapped to its name


def test_class_label_names_are_used_without_a_map(make_recipe: Any, tmp_path: Path) -> None:
    data = as_class_label(INVENTED_TRAIN, tmp_path / "cl.parquet", ["negative", "positive", "neutral"])
    recipe = load_recipe(str(make_recipe(data={"path": str(data), "columns": COLUMNS, "max_samples": None})))
    got = column(splits(recipe).train, "output")
    assert sorted(got) == sorted(r["output"] for r in invented(INVENTED_TRAIN))


def test_class_label_names_mapped_by_name(make_recipe: Any, tmp_path: Path) -> None:
    data = as_class_label(INVENTED_TRAIN, tmp_path / "cl.parquet", ["Bearish", "Bullish", "Neutral"])
    recipe = load_recipe(str(make_recipe(data={"path": str(data), "columns": COLUMNS, "max_samples": None})))
    with pytest.raises(DataError, match=r"'Neutral' \(\d+ rows\).*data\.label_map.*\"Neutral\": \"neutral\""):
        splits(recipe)  # the hint maps a name that differs only in case
    by_name = {"Bearish": "negative", "Bullish": "positive", "Neutral": "neutral"}
    recipe = load_recipe(str(make_recipe(data={"path": str(data), "columns": COLUMNS, "label_map": by_name,
                                               "max_samples": None})))
    assert sorted(column(splits(recipe).train, "output")) == sorted(r["output"] for r in invented(INVENTED_TRAIN))


def test_the_map_applies_to_validation_evaluation_sources_and_sets(make_recipe: Any, tmp_path: Path) -> None:
    train = as_tfns(INVENTED_TRAIN, tmp_path / "train.jsonl")
    test = as_tfns(INVENTED_TEST, tmp_path / "test.jsonl")
    want = sorted(r["output"] for r in invented(INVENTED_TEST))
    recipe = load_recipe(str(make_recipe(
        data={"path": str(train), "validation_path": str(test), "columns": COLUMNS, "label_map": TFNS},
        evaluation={"path": str(test), "sets": {"tfns": {"path": str(test), "columns": COLUMNS,
                                                          "label_map": TFNS}}})))
    template = template_from_recipe(recipe.template)
    assert sorted(column(splits(recipe).validation, "output")) == want
    assert sorted(r["output"] for r in eval_set(recipe, template, None).rows) == want
    assert sorted(r["output"] for r in load_set(recipe, "tfns", recipe.evaluation_settings["sets"]["tfns"],
                                                template).rows) == want
    # a set's labels are its own: without its label_map the error names the set's setting
    recipe = load_recipe(str(make_recipe(
        data={"path": str(train), "columns": COLUMNS, "label_map": TFNS},
        evaluation={"path": str(test), "sets": {"tfns": {"path": str(test), "columns": COLUMNS}}})))
    with pytest.raises(DataError, match=r"evaluation\.sets\.tfns\.label_map"):
        load_set(recipe, "tfns", recipe.evaluation_settings["sets"]["tfns"], template)
    # a mixture source: data.label_map and the source's own map, its entries winning
    words = write_jsonl(tmp_path / "words.jsonl", [{"text": r["input"], "label": {"negative": "bear"}.get(
        r["output"], r["output"])} for r in invented(INVENTED_TRAIN)])
    recipe = load_recipe(str(make_recipe(data={
        "path": None, "label_map": TFNS, "max_samples": None,
        "datasets": [{"path": str(train), "columns": COLUMNS},
                     {"path": str(words), "columns": COLUMNS, "label_map": {"bear": "negative"}}]})))
    got = column(build_mixture_splits(recipe, template).train, "output")
    assert sorted(got) == sorted(2 * [r["output"] for r in invented(INVENTED_TRAIN)])


def test_label_map_rules(make_recipe: Any, tmp_path: Path) -> None:
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"input": "q", "output": "a"}])
    _, problems = check_recipe(str(make_recipe(
        data={"label_map": {"0": "negativ", "1": "positive"},
              "path": None, "datasets": [{"path": str(INVENTED_TRAIN), "label_map": {"2": "bullish"}}]},
        evaluation={"path": str(INVENTED_TEST), "sets": {
            "nine": {"path": str(INVENTED_TEST), "labels": "fingpt9", "label_map": {"4": "strong positive"}},
            "three": {"path": str(INVENTED_TEST), "label_map": {"4": "strong positive"}},
            "qa": {"path": str(qa), "template": "fiqa_qa", "label_map": {"0": "a"}}}})))
    found = {p.path: p.message for p in problems}
    assert set(found) == {"$.data.label_map.0", "$.data.datasets[0].label_map.2",
                          "$.evaluation.sets.three.label_map.4", "$.evaluation.sets.qa.label_map"}
    assert "maps to 'negativ'" in found["$.data.label_map.0"]
    assert "Did you mean 'negative'" in found["$.data.label_map.0"]
    assert "Allowed: negative, neutral, positive" in found["$.data.label_map.0"]
    assert "no label set" in found["$.evaluation.sets.qa.label_map"]
    _, problems = check_recipe(str(make_recipe(data={"label_map": {"0": "negative"}}, template={"name": "fiqa_qa"})))
    assert [p.path for p in problems] == ["$.data.label_map"]
