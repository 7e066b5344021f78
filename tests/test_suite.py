"""The FinGPT sentiment suite: each set prepared as FinGPT's benchmarks/{fpb,fiqa,tfns,nwgi}.py prepare it (small
fixtures in the hub datasets' columns, and the real FPB/TFNS files in shared/data), missing sets reported, and
`finsft eval --suite` end to end on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TEST, SHARED_DATA

from finsft.data import load_table
from finsft.evaluation.suite import (
    LOCAL_FILES,
    NEWS,
    SETS,
    TWEET,
    fiqa_label,
    load_suite_set,
    prepare_fiqa,
    prepare_fpb,
    prepare_nwgi,
    prepare_tfns,
    published,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "suite"


def table(name: str) -> Any:
    return load_table(str(FIXTURES / name), "train")[0]


def test_local_file_names() -> None:
    assert LOCAL_FILES == {"fpb": "fpb.jsonl", "fiqa_sa": "fiqa_sa.jsonl", "tfns": "tfns_valid.jsonl",
                           "nwgi": "nwgi_test.jsonl"}
    assert [s.hub_id for s in SETS] == ["financial_phrasebank", "pauri32/fiqa-2018",
                                        "zeroshot/twitter-financial-news-sentiment",
                                        "oliverwang15/news_with_gpt_instructions"]
    assert [(s.config, s.splits) for s in SETS] == [("sentences_50agree", ("train",)),
                                                    (None, ("train", "validation", "test")),
                                                    (None, ("validation",)), (None, ("test",))]


def test_fpb_seed_42_test_split_and_labels() -> None:
    ds = table("fpb.jsonl")
    rows = prepare_fpb(ds, True)
    want = ds.train_test_split(seed=42)["test"]  # FinGPT: instructions.train_test_split(seed = 42)['test']
    assert len(rows) == 5 == len(want)  # 25% of 20
    assert [r["input"] for r in rows] == want["sentence"]
    assert [r["output"] for r in rows] == [{0: "negative", 1: "neutral", 2: "positive"}[x] for x in want["label"]]
    assert {r["instruction"] for r in rows} == {NEWS}


@pytest.mark.skipif(not (SHARED_DATA / "fpb.jsonl").exists(), reason="shared data not present")
def test_fpb_real_file_both_formats_give_fingpts_1212_rows(tmp_path: Path) -> None:
    """shared/data/fpb.jsonl (instruction format, all 4,846 rows) and the same rows in the hub's columns give the
    same 1,212 test rows."""
    ds = load_table(str(SHARED_DATA / "fpb.jsonl"), "train")[0]
    assert len(ds) == 4846
    rows = prepare_fpb(ds, True)
    ints = {"negative": 0, "neutral": 1, "positive": 2}
    hub = tmp_path / "fpb.jsonl"
    hub.write_text("".join(json.dumps({"sentence": r["input"], "label": ints[r["output"]]}) + "\n" for r in ds))
    assert len(rows) == 1212
    assert rows == prepare_fpb(load_table(str(hub), "train")[0], True)


def test_fiqa_thresholds_instructions_and_split() -> None:
    assert [fiqa_label(x) for x in (-0.5, -0.1, -0.11, 0.0, 0.099, 0.1, 0.6)] == [
        "negative", "neutral", "negative", "neutral", "neutral", "positive", "positive"]
    ds = table("fiqa_sa.jsonl")
    rows = prepare_fiqa(ds, True)
    want = ds.train_test_split(0.226, seed=42)["test"]
    assert len(rows) == len(want) == 5  # ceil(0.226 * 22)
    assert [r["input"] for r in rows] == want["sentence"]
    assert [r["output"] for r in rows] == [fiqa_label(s) for s in want["sentiment_score"]]
    assert [r["instruction"] for r in rows] == [TWEET if f == "post" else NEWS for f in want["format"]]


def test_tfns_label_order_is_negative_positive_neutral() -> None:
    ds = table("tfns_valid.jsonl")
    rows = prepare_tfns(ds, True)
    assert len(rows) == 12  # the validation split as is
    assert [r["output"] for r in rows[:3]] == ["negative", "positive", "neutral"]
    assert rows[0]["input"] == ds[0]["text"] and rows[0]["instruction"] == TWEET


@pytest.mark.skipif(not (SHARED_DATA / "tfns_valid.jsonl").exists(), reason="shared data not present")
def test_tfns_real_validation_file() -> None:
    rows, where = load_suite_set(SETS[2], str(SHARED_DATA))
    assert len(rows) == 2388 and "tfns_valid.jsonl" in where
    assert sum(r["output"] == "neutral" for r in rows) == 1566


def test_nwgi_seven_labels_map_to_three_as_fingpts_dic() -> None:
    rows = prepare_nwgi(table("nwgi_test.jsonl"), True)
    assert [r["output"] for r in rows[:7]] == ["negative", "negative", "neutral", "neutral", "neutral", "positive",
                                               "positive"]
    assert rows[0]["input"].startswith("Markets news item 0") and rows[0]["instruction"] == NEWS
    # a copy already in FinGPT's format keeps 3-way outputs and maps 7-way ones the same way
    import datasets

    inst = datasets.Dataset.from_list([{"instruction": NEWS, "input": "x", "output": "mildly positive"},
                                       {"instruction": NEWS, "input": "y", "output": "negative"}])
    assert [r["output"] for r in prepare_nwgi(inst, True)] == ["neutral", "negative"]


def test_missing_sets_are_named_with_the_reason(tmp_path: Path) -> None:
    from finsft.errors import DataError

    with pytest.raises(DataError, match=r"no nwgi_test\{.jsonl"):
        load_suite_set(SETS[3], str(tmp_path))
    (tmp_path / "fpb.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n" * 1 +
                                        json.dumps({"text": "y", "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"FPB file .*fpb.jsonl: missing column sentence"):
        load_suite_set(SETS[0], str(tmp_path))


def test_published_rows() -> None:
    rows = {name: (acc, f1) for name, acc, f1 in published("tfns")}
    assert rows["FinGPT v3.3 (Llama2-13B LoRA)"] == (None, 0.903)
    assert rows["GPT-4"] == (None, 0.808) and rows["FinBERT"] == (None, 0.733)
    assert rows["FinGPT LoRA on MPT"] == (0.907, 0.907)
    assert "OpenAI fine-tune" not in {name for name, _, _ in published("nwgi")}  # no number in FinGPT's table


def test_suite_command_scores_the_sets_it_can_load(make_recipe: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from finsft.cli import main

    data = tmp_path / "suite-data"
    data.mkdir()
    for name in ("fpb.jsonl", "tfns_valid.jsonl", "fiqa_sa.jsonl"):
        shutil.copy(FIXTURES / name, data / name)
    out = tmp_path / "results"
    assert main(["eval", str(make_recipe("plain")), "--suite", "--out", str(out)]) == 1
    assert "this recipe names none" in capsys.readouterr().err
    # --suite without a name: the recipe's evaluation.suite, read from its evaluation.suite_data
    recipe = make_recipe(evaluation={"path": str(INVENTED_TEST), "suite": "fingpt-sentiment",
                                     "suite_data": str(data)})
    code = main(["eval", str(recipe), "--suite", "--limit", "4", "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert code == 0, text + captured.err
    assert "NWGI: missing" in text and "nwgi_test" in text
    for title in ("FPB", "FiQA-SA", "TFNS"):
        assert f"{title}: " in text
    assert "FinGPT v3.3 (Llama2-13B LoRA)" in text and "FinGPT's published results" in text
    suite = json.loads((out / "suite.json").read_text())
    assert set(suite["sets"]) == {"fpb", "fiqa_sa", "tfns"} and set(suite["missing"]) == {"nwgi"}
    for name, n in (("fpb", 4), ("fiqa_sa", 4), ("tfns", 4)):
        report = json.loads((out / name / "eval.json").read_text())
        assert set(report) == {"model", "adapter", "data", "rows", "rows_fingerprint", "settings", "metrics",
                               "base_metrics", "seconds", "samples"}
        assert report["rows"] == n and report["metrics"]["labels"] == ["negative", "neutral", "positive"]
        assert suite["sets"][name]["weighted_f1"] == report["metrics"]["weighted_f1"]
    # every set missing: an error naming each reason
    code = main(["eval", str(recipe), "--suite", "fingpt-sentiment", "--suite-data", str(tmp_path / "results"),
                 "--out", str(out)])
    assert code != 0
    assert "no set of suite 'fingpt-sentiment' could be loaded" in capsys.readouterr().err
