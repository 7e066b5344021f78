"""Evaluation: FinGPT's answer mapping, scikit-learn metrics, both likelihood paths, QA metrics, `finsft eval` on
the base model and on a trained adapter, evaluation during training, and clear errors for bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TEST, INVENTED_TRAIN

from finsft.cli import main
from finsft.evaluation import (
    classification_metrics,
    evaluate_model,
    map_answer,
    qa_metrics,
    score_likelihood,
    token_f1,
)
from finsft.templates import get_template, template_from_recipe


def fingpt_change_target(x: str) -> str:
    """FinGPT's tfns.py / fpb.py mapping, verbatim."""
    if "positive" in x or "Positive" in x:
        return "positive"
    elif "negative" in x or "Negative" in x:
        return "negative"
    else:
        return "neutral"


# (generated answer, label FinGPT's benchmarks give it)
HAND_MADE = [
    ("positive", "positive"),
    ("Positive", "positive"),
    ("negative", "negative"),
    ("Negative", "negative"),
    ("neutral", "neutral"),
    ("moderately positive", "positive"),
    ("mildly positive", "positive"),
    ("strong positive", "positive"),
    ("Strong Negative", "negative"),
    ("moderately negative", "negative"),
    ("mildly negative", "negative"),
    ("strong negative", "negative"),
    ("positive and negative", "positive"),
    ("negative, not positive", "positive"),
    ("The sentiment of this news is negative.", "negative"),
    ("POSITIVE", "neutral"),  # FinGPT checks only 'positive' and 'Positive'
    ("NEGATIVE", "neutral"),
    ("I cannot tell", "neutral"),
    ("", "neutral"),
    ("bullish", "neutral"),
]


@pytest.mark.parametrize("labels", ["fingpt3", "fingpt9"])
def test_generate_mapping_is_fingpts(labels: str) -> None:
    template = template_from_recipe({"name": "fingpt_sentiment", "labels": labels})
    for answer, expected in HAND_MADE:
        assert fingpt_change_target(answer) == expected, answer
        assert map_answer(answer, template) == expected, answer


def test_short_template_uses_the_same_mapping() -> None:
    template = get_template("short_sentiment")
    assert [map_answer(a, template) for a, _ in HAND_MADE] == [e for _, e in HAND_MADE]


def test_metrics_equal_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    gold = ["negative", "neutral", "positive", "positive", "neutral", "negative", "neutral", "positive", "neutral",
            "negative", "neutral", "positive", "neutral", "negative", "neutral", "positive", "neutral", "neutral",
            "neutral", "neutral"]
    answers = [a for a, _ in HAND_MADE]
    template = get_template("fingpt_sentiment")
    pred = [map_answer(a, template) for a in answers]
    labels = ["negative", "neutral", "positive"]
    m = classification_metrics(gold, pred, labels)
    assert m["n"] == 20
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(gold, pred, average="weighted"))
    precision = precision_score(gold, pred, labels=labels, average=None, zero_division=0)
    recall = recall_score(gold, pred, labels=labels, average=None, zero_division=0)
    for i, lab in enumerate(labels):
        assert m["per_class"][lab]["precision"] == pytest.approx(precision[i])
        assert m["per_class"][lab]["recall"] == pytest.approx(recall[i])
        assert m["per_class"][lab]["support"] == gold.count(lab)
    assert m["confusion_matrix"] == confusion_matrix(gold, pred, labels=labels).tolist()
    # Hand check: 7 of the 20 hand-made answers land on their gold label (rows 5, 8, 10, 17-20).
    assert m["accuracy"] == pytest.approx(7 / 20)


def test_nine_label_gold_maps_to_three_classes() -> None:
    from finsft.evaluation.metrics import gold_label

    template = template_from_recipe({"name": "fingpt_sentiment", "labels": "fingpt9"})
    assert gold_label("strong negative", template) == "negative"
    assert gold_label("mildly positive", template) == "positive"
    assert gold_label("neutral", template) == "neutral"


def test_token_f1_hand_checked() -> None:
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # p = 2/2, r = 2/3
    assert token_f1("Buy low, sell high!", "buy low sell high") == pytest.approx(1.0)
    assert token_f1("an index fund", "a bond") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "something") == 0.0
    assert token_f1("fees fees fees", "fees") == pytest.approx(0.5)  # p = 1/3, r = 1


def test_qa_metrics_rouge_l() -> None:
    from rouge_score import rouge_scorer

    preds = ["the fund charges low fees", "diversify your portfolio", "no idea"]
    refs = ["index funds charge low fees", "you should diversify your portfolio", "keep an emergency fund"]
    m = qa_metrics(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)) / 3
    assert m["rougeL"] == pytest.approx(expected)
    assert m["n"] == 3
    assert m["mean_generated_words"] == pytest.approx((5 + 3 + 2) / 3)
    # Hand check of the second pair: LCS 3 tokens, p = 3/3, r = 3/5 -> F = 0.75.
    assert scorer.score(refs[1], preds[1])["rougeL"].fmeasure == pytest.approx(0.75)
    assert qa_metrics(["same words"], ["same words"])["rougeL"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ with a real model


def _recipe(tiny_model: Path, out: Path, **extra: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "name": "tiny-eval",
        "model": {"name_or_path": str(tiny_model)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 48, "validation_size": 8},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "max_length": 128, "eval_steps": 1},
        "evaluation": {"path": str(INVENTED_TEST), "max_samples": 8, "batch_size": 4},
        "output": {"dir": str(out / "run")},
    }
    recipe.update(extra)
    return recipe


@pytest.fixture(scope="module")
def label_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer encodes the labels as single tokens, after FinGPT's "Answer: " (tokenized
    apart: "negative") and as a continuation (" negative"), so the likelihood scorer can take its next-token
    path."""
    from finsft.testing import build_tiny_model

    texts = [json.loads(line)["input"] for line in INVENTED_TRAIN.read_text().splitlines()]
    return build_tiny_model(tmp_path_factory.mktemp("label-model"),
                            texts=[*texts, *["Answer: negative Answer: neutral Answer: positive"] * 50,
                                   *["negative\nneutral\npositive"] * 50])


@pytest.fixture(scope="module")
def trained(label_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-step LoRA run on the tiny model that evaluates during and after training."""
    from finsft.recipe import load_recipe
    from finsft.training import train

    folder = tmp_path_factory.mktemp("eval-run")
    path = folder / "recipe.json"
    path.write_text(json.dumps(_recipe(label_model, folder)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINSFT_CACHE", str(folder / "cache"))
        run = train(load_recipe(str(path)))
    return {"recipe": path, "run": run, "folder": folder}


@pytest.fixture(scope="module")
def loaded(trained: dict[str, Any]) -> Any:
    from finsft.data import make_formatter
    from finsft.models import load_for_inference
    from finsft.recipe import load_recipe

    recipe = load_recipe(str(trained["recipe"]))
    lm = load_for_inference(recipe, str(trained["run"]))
    return lm, make_formatter(recipe, template_from_recipe(recipe["template"]), lm.tokenizer)


@pytest.mark.slow
def test_eval_during_training(trained: dict[str, Any]) -> None:
    run = trained["run"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["eval_loss"] > 0 for r in evals)
    result = json.loads((run / "eval.json").read_text())
    assert result["metrics"]["n"] == 8 and 0 <= result["metrics"]["weighted_f1"] <= 1


def _rows(n: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in INVENTED_TEST.read_text().splitlines()[:n]]


@pytest.mark.slow
def test_likelihood_paths_agree(loaded: Any) -> None:
    lm, formatter = loaded
    assert all(len(lm.tokenizer(f" {lab}", add_special_tokens=False)["input_ids"]) == 1
               for lab in ("negative", "neutral", "positive"))
    rows = _rows(12)
    fast = score_likelihood(lm.model, formatter, rows, batch_size=5, path="next_token")
    full = score_likelihood(lm.model, formatter, rows, batch_size=5, path="sequence")
    assert len(fast) == len(full) == 12
    for a, b in zip(fast, full, strict=True):
        assert list(a) == ["negative", "neutral", "positive"]
        assert all(v <= 0 for v in (*a.values(), *b.values()))  # log-probabilities
        assert max(a, key=a.__getitem__) == max(b, key=b.__getitem__)
        for lab in a:
            assert a[lab] == pytest.approx(b[lab], abs=1e-4)
    # Batching and length sorting do not change a row's scores.
    one_by_one = score_likelihood(lm.model, formatter, rows, batch_size=1)
    for a, b in zip(fast, one_by_one, strict=True):
        for lab in a:
            assert a[lab] == pytest.approx(b[lab], abs=1e-4)


@pytest.mark.slow
def test_likelihood_multi_token_labels(trained: dict[str, Any]) -> None:
    from finsft.data import Formatter
    from finsft.models import load_for_inference
    from finsft.recipe import load_recipe

    recipe = load_recipe(str(trained["recipe"]))
    lm = load_for_inference(recipe, None)
    template = template_from_recipe({"name": "fingpt_sentiment", "labels": ["very bad news", "meh", "great news"]})
    formatter = Formatter(template, lm.tokenizer, chat=False, system=None)
    assert len(lm.tokenizer(" very bad news", add_special_tokens=False)["input_ids"]) > 1
    rows = [{"input": r["input"], "output": lab} for r, lab in zip(_rows(6), ["meh", "great news", "very bad news"] * 2,
                                                                    strict=True)]
    scores = score_likelihood(lm.model, formatter, rows, batch_size=4)
    assert all(set(s) == {"very bad news", "meh", "great news"} and max(s.values()) <= 0 for s in scores)
    result = evaluate_model(lm.model, formatter, rows, scorer="likelihood", batch_size=4, max_new_tokens=None)
    assert result.metrics["labels"] == ["very bad news", "meh", "great news"]
    assert {p["pred"] for p in result.predictions} <= {"very bad news", "meh", "great news"}


@pytest.mark.slow
def test_generate_scorer_maps_like_fingpt(loaded: Any) -> None:
    lm, formatter = loaded
    result = evaluate_model(lm.model, formatter, _rows(6), scorer="generate", batch_size=4, max_new_tokens=4)
    assert result.scorer == "generate"
    for p in result.predictions:
        assert p["pred"] == fingpt_change_target(p["answer"])
    assert result.metrics["n"] == 6


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finsft", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_eval_cli_base_and_adapter(trained: dict[str, Any], tmp_path: Path) -> None:
    recipe = str(trained["recipe"])
    base = _cli("eval", recipe, "--out", str(tmp_path / "base"), "--limit", "6")
    assert base.returncode == 0, base.stderr
    assert "weighted F1" in base.stdout and "confusion matrix" in base.stdout
    report = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert report["adapter"] is None and report["rows"] == 6
    assert report["settings"]["scorer"] == "likelihood" and report["settings"]["limit"] == 6
    assert len((tmp_path / "base" / "predictions.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "base" / "confusion.png").stat().st_size > 0

    run = trained["run"]
    # Relative --data (to the current folder), generate scorer; results go under the run (RUN/eval/<data name>/)
    # by default, never over the training run's own eval.json.
    training_eval = (run / "eval.json").read_bytes()
    data = os.path.relpath(INVENTED_TEST, tmp_path)
    tuned = _cli("eval", recipe, "--adapter", str(run), "--data", data, "--limit", "5", "--scorer", "generate",
                 cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    assert (run / "eval.json").read_bytes() == training_eval
    results = run / "eval" / Path(INVENTED_TEST).stem
    report = json.loads((results / "eval.json").read_text())
    assert report["adapter"] == str(run) and report["settings"]["scorer"] == "generate"
    assert report["settings"]["max_new_tokens"] == 8 and report["rows"] == 5
    assert str(INVENTED_TEST) in report["data"]
    preds = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    assert all(p["pred"] == fingpt_change_target(p["answer"]) for p in preds)


@pytest.mark.slow
def test_eval_qa_template(tiny_model: Path, tmp_path: Path) -> None:
    from finsft.commands.evaluate import evaluate_command
    from finsft.recipe import load_recipe

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"input": f"How do I deposit a cheque {i}?",
                                      "output": "Use the bank's app or visit a branch."}) + "\n" for i in range(3)))
    recipe = tmp_path / "qa.json"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(qa)},
                                  "template": {"name": "fiqa_qa"}, "evaluation": {"path": str(qa),
                                                                                  "max_new_tokens": 6},
                                  "output": {"dir": str(tmp_path / "run")}}))
    report = evaluate_command(load_recipe(str(recipe)), out=str(tmp_path / "qa-eval"))
    assert report["settings"]["scorer"] == "generate" and report["settings"]["max_new_tokens"] == 6
    assert 0 <= report["metrics"]["rougeL"] <= 1 and "token_f1" in report["metrics"]
    assert not (tmp_path / "qa-eval" / "confusion.png").exists()
    preds = [json.loads(line) for line in (tmp_path / "qa-eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == ["Use the bank's app or visit a branch."] * 3


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def recipe_file(tiny_model: Path, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(_recipe(tiny_model, tmp_path)))
    return path


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"),
    ('{"instruction": "x", "input": "Shares rose", "output": "bullish"}\n', "labels outside the template's label set"),
    ('{"text": "Shares rose", "output": "positive"}\n', "missing column 'input'"),
])
def test_eval_bad_data(recipe_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                       message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code = main(["eval", str(recipe_file), "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_eval_needs_an_output_folder(recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(recipe_file)]) == 1
    assert "--out" in capsys.readouterr().err


def test_eval_missing_adapter(recipe_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(recipe_file), "--adapter", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(recipe_file), "--adapter", str(tmp_path / "empty")]) == 1
    assert "neither a LoRA adapter" in capsys.readouterr().err


def test_eval_likelihood_needs_labels(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "qa.json"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(INVENTED_TRAIN)},
                                  "template": {"name": "fiqa_qa"}, "output": {"dir": str(tmp_path / "r")}}))
    code = main(["eval", str(recipe), "--scorer", "likelihood", "--data", str(INVENTED_TEST),
                 "--out", str(tmp_path / "o")])
    assert code == 1
    assert "ranks labels" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_full_fine_tune_folder(label_model: Path, tmp_path: Path) -> None:
    """A run with lora: null saves a whole model; eval loads it in place of the base."""
    from finsft.commands.evaluate import evaluate_command
    from finsft.models import load_for_inference
    from finsft.recipe import load_recipe
    from finsft.training import train

    path = tmp_path / "full.json"
    path.write_text(json.dumps(_recipe(label_model, tmp_path, lora=None,
                                       training={"max_steps": 1, "warmup_steps": 0, "per_device_train_batch_size": 4,
                                                 "learning_rate": 1e-2, "max_length": 128})))
    recipe = load_recipe(str(path))
    run = train(recipe)
    assert not (run / "adapter_config.json").exists()
    report = evaluate_command(recipe, adapter=str(run), limit=4)
    assert report["adapter"] == str(run) and report["rows"] == 4
    assert json.loads((run / "eval" / INVENTED_TEST.stem / "eval.json").read_text()) == report
    tuned = load_for_inference(recipe, str(run)).model
    base = load_for_inference(recipe, None).model
    assert any(not (a == b).all() for a, b in zip(tuned.parameters(), base.parameters(), strict=True))
