"""The leak guard (data.drop_eval_overlap): training rows whose input also appears in an evaluation set
(evaluation.path, data.validation_path, evaluation.sets, the suite named by evaluation.suite) are dropped and
counted per source and per set, or, with the guard off, counted and warned about. Real files, in process; one
tiny training run for the manifest and the console line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from finsft.data_sources import build_splits
from finsft.errors import DataError
from finsft.evaluation.leak import evaluation_inputs
from finsft.recipe import load_recipe
from finsft.templates import template_from_recipe
from finsft.testing import write_jsonl


def rows(prefix: str, n: int, label: str = "neutral") -> list[dict[str, str]]:
    return [{"input": f"{prefix} headline number {i} about quarterly results", "output": label} for i in range(n)]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Two training sources and three evaluation files; overlaps written with other case and spacing."""
    heldout = rows("Heldout", 6, "positive")
    extra = rows("Extra", 5, "negative")
    a = rows("Alpha", 20) + [{"input": r["input"].upper(), "output": "positive"} for r in heldout[:3]]
    b = rows("Beta", 20) + [{"input": "  " + r["input"].replace(" ", "   ") + " ", "output": "negative"}
                            for r in extra[:2]] + [heldout[0]]
    return {"a": write_jsonl(tmp_path / "a.jsonl", a), "b": write_jsonl(tmp_path / "b.jsonl", b),
            "heldout": write_jsonl(tmp_path / "heldout.jsonl", heldout),
            "extra": write_jsonl(tmp_path / "extra.jsonl", extra)}


def recipe_with(tmp_path: Path, files: dict[str, Path], **data: Any) -> Any:
    raw = {"model": {"name_or_path": "unused-model"}, "template": {"name": "fingpt_sentiment"},
           "data": {"datasets": [{"path": str(files["a"])}, {"path": str(files["b"])}], **data},
           "evaluation": {"path": str(files["heldout"]), "sets": {"extra": {"path": str(files["extra"])}}},
           "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return load_recipe(str(path))


def test_guard_drops_and_counts_per_source_and_set(tmp_path: Path, files: dict[str, Path]) -> None:
    recipe = recipe_with(tmp_path, files)
    template = template_from_recipe(recipe.template)
    guard = evaluation_inputs(recipe, template)
    assert guard.drop and guard.checked == {"heldout": 6, "extra": 5}
    splits = build_splits(recipe, template, guard)
    assert len(splits.train) == 40  # 23 + 23 rows read, 3 + 3 dropped
    kept = {r["input"].casefold() for r in splits.train}
    assert not any("heldout" in text or "extra" in text for text in kept)
    a, b = splits.sources
    assert (a["rows"], a["rows_used"], a["rows_dropped_eval_overlap"]) == (23, 20, 3)
    assert (b["rows"], b["rows_used"], b["rows_dropped_eval_overlap"]) == (23, 20, 3)
    report = guard.report()
    assert report["dropped"] == report["overlapping"] == 6
    assert report["by_set"] == {"heldout": 4, "extra": 2}
    assert report["by_source"][str(files["b"])]["by_set"] == {"extra": 2, "heldout": 1}
    line, warning = guard.summary()
    assert not warning and line.startswith("leak guard: dropped 6 training rows whose input appears")
    assert "heldout: 4" in line and "extra: 2" in line and f"{files['a']}: 3 of 23" in line


def test_guard_off_keeps_rows_and_warns(tmp_path: Path, files: dict[str, Path]) -> None:
    recipe = recipe_with(tmp_path, files, drop_eval_overlap=False)
    template = template_from_recipe(recipe.template)
    guard = evaluation_inputs(recipe, template)
    splits = build_splits(recipe, template, guard)
    assert len(splits.train) == 46 and all("rows_dropped_eval_overlap" not in s for s in splits.sources)
    report = guard.report()
    assert (report["drop"], report["overlapping"], report["dropped"]) == (False, 6, 0)
    line, warning = guard.summary()
    assert warning and "6 training rows have their input in the evaluation data" in line
    assert "are trained on, as data.drop_eval_overlap is false" in line


def test_training_file_as_evaluation_set_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    raw = {"model": {"name_or_path": "unused-model"}, "template": {"name": "fingpt_sentiment"},
           "data": {"path": str(files["heldout"])}, "evaluation": {"path": str(files["heldout"])},
           "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "same.json").write_text(json.dumps(raw))
    recipe = load_recipe(str(tmp_path / "same.json"))
    template = template_from_recipe(recipe.template)
    with pytest.raises(DataError, match=r"every one of its 6 rows has its input in the evaluation data "
                                        r"\(heldout: 6\).*data.drop_eval_overlap to false"):
        build_splits(recipe, template, evaluation_inputs(recipe, template))


def test_suite_test_splits_are_excluded(tmp_path: Path) -> None:
    """evaluation.suite: the suite's test split (FPB: FinGPT's seed-42 split of the whole file) is left out of
    training, the rest of the same file is kept; a suite set without a local file is named, not checked."""
    suite = tmp_path / "suite"
    suite.mkdir()
    fpb = rows("Phrasebank", 40, "positive")
    write_jsonl(suite / "fpb.jsonl", [{"instruction": "x", **r} for r in fpb])
    raw = {"model": {"name_or_path": "unused-model"}, "template": {"name": "fingpt_sentiment"},
           "data": {"path": str(suite / "fpb.jsonl"), "validation_size": 5},
           "evaluation": {"suite": "fingpt-sentiment", "suite_data": str(suite)},
           "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.json").write_text(json.dumps(raw))
    recipe = load_recipe(str(tmp_path / "r.json"))
    template = template_from_recipe(recipe.template)
    said: list[str] = []
    guard = evaluation_inputs(recipe, template, log=said.append)
    assert guard.checked == {"fingpt-sentiment/fpb": 10}  # train_test_split(seed=42): 25% of 40
    assert set(guard.unchecked) == {"fingpt-sentiment/fiqa_sa", "fingpt-sentiment/tfns", "fingpt-sentiment/nwgi"}
    assert len(said) == 3 and all("could not be loaded" in s for s in said)
    splits = build_splits(recipe, template, guard)
    assert len(splits.train) == 25 and len(splits.validation) == 5
    assert splits.sources[0]["rows_dropped_eval_overlap"] == 10


def test_guard_imports_no_torch(tmp_path: Path, files: dict[str, Path]) -> None:
    """The overlap is known before the model loads: computing it needs no torch."""
    recipe_with(tmp_path, files)
    code = ("import sys; from finsft.recipe import load_recipe; from finsft.templates import template_from_recipe\n"
            "from finsft.evaluation.leak import evaluation_inputs; from finsft.data_sources import build_splits\n"
            "r = load_recipe(sys.argv[1]); t = template_from_recipe(r.template); g = evaluation_inputs(r, t)\n"
            "build_splits(r, t, g); print(g.report()['dropped'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "recipe.json")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["6", "False"]


@pytest.mark.slow
def test_run_manifest_and_console(make_recipe: Any, tmp_path: Path, files: dict[str, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from finsft.training.run import TrainingRun, train

    sources = [{"path": str(files["a"])}, {"path": str(files["b"])}]
    evaluation = {"path": str(files["heldout"]), "max_new_tokens": 2, "sets": {"extra": {"path": str(files["extra"])}}}
    out = train(load_recipe(str(make_recipe(data={"path": None, "max_samples": None, "datasets": sources},
                                            evaluation=evaluation))))
    said = capsys.readouterr().out
    assert "leak guard: dropped 6 training rows whose input appears in the evaluation data" in said
    overlap = json.loads((out / "manifest.json").read_text())["data"]["eval_overlap"]
    assert (overlap["drop"], overlap["dropped"], overlap["by_set"]) == (True, 6, {"heldout": 4, "extra": 2})
    assert overlap["by_source"][str(files["a"])]["dropped"] == 3
    card = (out / "README.md").read_text()
    assert "6 training rows whose input appears in the evaluation data were left out of training" in card

    # The off switch: the same data is kept, and the console says how many rows overlap (setup only: no model).
    recipe = load_recipe(str(make_recipe("off", data={"path": None, "max_samples": None, "datasets": sources,
                                                      "drop_eval_overlap": False}, evaluation=evaluation)))
    with TrainingRun(recipe) as run:
        run.setup()
        assert len(run.splits.train) == 46
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: 6 training rows have their input in the evaluation data" in said


def test_suite_from_an_unreachable_hub_is_named_not_checked(tmp_path: Path, files: dict[str, Path]) -> None:
    """Offline, the first suite set that the hub cannot give is named; the others are not tried (retries cost
    ~25 s each); training goes on with the sets the recipe names."""
    raw = {"model": {"name_or_path": "unused-model"}, "template": {"name": "fingpt_sentiment"},
           "data": {"path": str(files["a"])},
           "evaluation": {"path": str(files["heldout"]), "suite": "fingpt-sentiment"},
           "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.json").write_text(json.dumps(raw))
    recipe = load_recipe(str(tmp_path / "r.json"))
    said: list[str] = []
    guard = evaluation_inputs(recipe, template_from_recipe(recipe.template), log=said.append)
    assert guard.checked == {"heldout": 6} and len(said) == 4
    assert "cannot be reached" in guard.unchecked["fingpt-sentiment/fpb"]
    assert all(guard.unchecked[f"fingpt-sentiment/{s}"].startswith("not tried: the hub could not be reached for FPB")
               for s in ("fiqa_sa", "tfns", "nwgi"))
