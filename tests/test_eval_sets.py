"""Several evaluation sets in one run (evaluation.sets): rules, and a tiny training run that scores each set before
and after training, writes eval/<name>/eval.json in the one EvalReport shape, and logs per-set summaries; the
manifest lists the data sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import INVENTED_TEST, INVENTED_TRAIN

from finsft.recipe import check_recipe, load_recipe
from finsft.testing import write_jsonl
from finsft.training.run import train


def test_set_rules(make_recipe: Any, tmp_path: Path) -> None:
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"input": "q", "output": "a"}])
    sets = {
        "ok": {"path": str(INVENTED_TEST)},
        "missing": {"path": str(tmp_path / "nope.jsonl")},
        "typo": {"path": str(qa), "template": "fiqa_q"},
        "custom": {"path": str(qa), "template": "custom"},
        "qa_labels": {"path": str(qa), "template": "fiqa_qa", "labels": "fingpt3"},
        "cols": {"path": str(qa), "columns": {"inptu": "question"}},
    }
    _, problems = check_recipe(str(make_recipe(evaluation={"path": str(INVENTED_TEST), "sets": sets})))
    found = {p.path: p.message for p in problems}
    assert set(found) == {"$.evaluation.sets.missing.path", "$.evaluation.sets.typo.template",
                          "$.evaluation.sets.custom.template", "$.evaluation.sets.qa_labels.labels",
                          "$.evaluation.sets.cols.columns.inptu"}
    assert "Did you mean 'fiqa_qa'" in found["$.evaluation.sets.typo.template"]
    _, problems = check_recipe(str(make_recipe(evaluation={"path": str(INVENTED_TEST), "scorer": "likelihood",
                                                           "sets": {"qa": {"path": str(qa), "template": "fiqa_qa"}}})))
    assert [p.path for p in problems] == ["$.evaluation.sets.qa.template"]
    _, problems = check_recipe(str(make_recipe(evaluation={"path": str(INVENTED_TEST),
                                                           "sets": {"a b": {"path": str(qa)}}})))
    assert [p.path for p in problems] == ["$.evaluation.sets"]  # a set name is a folder name


def test_run_scores_every_set_before_and_after(make_recipe: Any, tmp_path: Path) -> None:
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"What is {i}?", "answer": f"It is {i}."}
                                             for i in range(5)])
    # The held-out set stores TFNS's integer labels and names them with its label_map: the report uses the names.
    tfns = {"0": "negative", "1": "positive", "2": "neutral"}
    codes = {v: int(k) for k, v in tfns.items()}
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [
        {"input": r["input"], "output": codes[r["output"]]}
        for r in map(json.loads, INVENTED_TEST.read_text().splitlines())])
    recipe = load_recipe(str(make_recipe(
        data={"path": None, "datasets": [{"path": str(INVENTED_TRAIN), "fraction": 0.5}]},
        evaluation={"path": str(INVENTED_TEST), "before_training": True, "max_samples": 6, "max_new_tokens": 4,
                    "sets": {"heldout": {"path": str(heldout), "max_samples": 5, "label_map": tfns},
                             "qa": {"path": str(qa), "template": "fiqa_qa", "max_samples": 3,
                                    "columns": {"input": "question", "output": "answer"}}}})))
    out = train(recipe)
    main = json.loads((out / "eval.json").read_text())
    assert main["rows"] == 6 and main["base_metrics"] is not None
    for name, rows, key in (("heldout", 5, "accuracy"), ("qa", 3, "rougeL")):
        report = json.loads((out / "eval" / name / "eval.json").read_text())
        assert set(report) == set(main)  # the one EvalReport shape
        assert report["rows"] == rows and key in report["metrics"] and key in report["base_metrics"]
        assert report["adapter"] == str(out)
        assert (out / "eval" / name / "predictions.jsonl").exists()
    named = json.loads((out / "eval" / "heldout" / "eval.json").read_text())["metrics"]
    assert list(named["per_class"]) == ["negative", "neutral", "positive"]
    assert sum(c["support"] for c in named["per_class"].values()) == 5
    assert (out / "eval" / "heldout" / "confusion.png").exists()
    qa_report = json.loads((out / "eval" / "qa" / "eval.json").read_text())
    assert qa_report["settings"]["template"] == "fiqa_qa" and qa_report["settings"]["scorer"] == "generate"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summaries = [(r["eval_set"], r["phase"]) for r in lines if "eval_set" in r]
    assert summaries == [("invented_headlines_test", "before_training"), ("heldout", "before_training"),
                         ("qa", "before_training"), ("invented_headlines_test", "after_training"),
                         ("heldout", "after_training"), ("qa", "after_training")]
    heldout = next(r for r in lines if r.get("eval_set") == "heldout" and r["phase"] == "after_training")
    assert heldout["step"] == 2 and set(heldout) == {"eval_set", "phase", "step", "n", "accuracy", "macro_f1",
                                                     "weighted_f1"}
    manifest = json.loads((out / "manifest.json").read_text())
    (source,) = manifest["data"]["sources"]
    assert source["path"] == str(INVENTED_TRAIN) and source["fraction"] == 0.5
    assert source["rows_used"] == round(source["rows"] * 0.5) and len(source["fingerprint"]) == 64
    # `finsft eval RECIPE --adapter RUN` scores every set, as training did: the main set under RUN/eval/<name>/,
    # each evaluation.sets entry beside it; the folders the training run wrote itself are never replaced.
    from finsft.commands.evaluate import evaluate_command

    own = {name: (out / "eval" / name / "eval.json").read_bytes() for name in ("heldout", "qa")}
    main_report = evaluate_command(recipe, adapter=str(out), limit=3)
    assert main_report["rows"] == 3 and main_report["adapter"] == str(out)
    assert json.loads((out / "eval" / "invented_headlines_test" / "eval.json").read_text())["rows"] == 3
    for name, key in (("heldout", "accuracy"), ("qa", "rougeL")):
        assert (out / "eval" / name / "eval.json").read_bytes() == own[name]
        report = json.loads((out / "eval" / name / "rescored" / "eval.json").read_text())
        assert report["rows"] == 3 and key in report["metrics"] and report["base_metrics"] is None
    # --out DIR: the main set in DIR, the others in DIR/eval/<name>/, as a training run lays them out
    evaluate_command(recipe, adapter=str(out), limit=2, out=str(tmp_path / "elsewhere"))
    assert json.loads((tmp_path / "elsewhere" / "eval.json").read_text())["rows"] == 2
    assert {p.parent.name for p in (tmp_path / "elsewhere" / "eval").glob("*/eval.json")} == {"heldout", "qa"}
