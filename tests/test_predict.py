"""`finsft predict`: --input texts and --file rows through the recipe's template, printed or written as JSONL."""

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
from finsft.templates import to_three_class


def _recipe(tiny_model: Path, out: Path) -> dict[str, Any]:
    return {
        "name": "tiny-predict",
        "model": {"name_or_path": str(tiny_model)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 16},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 128},
        "evaluation": {"path": str(INVENTED_TEST), "max_new_tokens": 5},
        "output": {"dir": str(out / "run"), "plot": False},
    }


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from finsft.recipe import load_recipe
    from finsft.training import train

    folder = tmp_path_factory.mktemp("predict-run")
    path = folder / "recipe.json"
    path.write_text(json.dumps(_recipe(tiny_model, folder)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINSFT_CACHE", str(folder / "cache"))
        run = train(load_recipe(str(path)))
    return {"recipe": path, "run": run}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "finsft", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_predict_inputs_prints_a_table(trained: dict[str, Path]) -> None:
    r = _cli("predict", str(trained["recipe"]), "--adapter", str(trained["run"]),
             "--input", "Profit fell and the bank cut its dividend", "--input", "Shares rose 5% after earnings")
    assert r.returncode == 0, r.stderr
    assert "Profit fell and the bank cut its dividend" in r.stdout
    assert "Shares rose 5% after earnings" in r.stdout
    assert "label" in r.stdout


@pytest.mark.slow
def test_predict_file_writes_jsonl(trained: dict[str, Path], tmp_path: Path) -> None:
    from finsft.commands.predict import predict_command
    from finsft.recipe import load_recipe

    rows = [json.loads(line) for line in INVENTED_TEST.read_text().splitlines()[:5]]
    data = tmp_path / "news.jsonl"
    # Rows to predict need only the prompt's fields: no "output", and "instruction" takes the template default.
    data.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for r in rows))
    out = tmp_path / "preds" / "out.jsonl"
    recipe = load_recipe(str(trained["recipe"]))
    records = predict_command(recipe, adapter=str(trained["run"]), file=str(data), out=str(out))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == records
    assert [w["input"] for w in written] == [r["input"] for r in rows]
    for w in written:
        assert w["instruction"].startswith("What is the sentiment")
        assert w["label"] == to_three_class(w["answer"])

    # Greedy decoding in length-sorted batches gives each row the answer it gets alone.
    alone = predict_command(recipe, adapter=str(trained["run"]), inputs=[rows[2]["input"]])
    assert alone[0]["answer"] == written[2]["answer"]
    # The base model (no adapter).
    base = predict_command(recipe, inputs=[rows[0]["input"]], max_new_tokens=3)
    assert len(base) == 1 and set(base[0]) == {"input", "answer", "label"}


def test_predict_bad_input(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe(tiny_model, tmp_path)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["predict", str(recipe), "--file", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"sentence": "Shares rose"}) + "\n")
    assert main(["predict", str(recipe), "--file", str(wrong)]) == 1
    assert "missing column 'input'" in capsys.readouterr().err
    assert main(["predict", str(recipe), "--file", str(tmp_path / "absent.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(recipe), "--input", "x", "--max-new-tokens", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err


def test_predict_input_needs_an_input_field(tiny_model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "custom.json"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model)},
        "data": {"path": str(INVENTED_TRAIN), "columns": {"headline": "input"}},
        "template": {"name": "custom", "prompt": "Headline: {headline}\nSentiment:", "completion": " {output}"},
        "output": {"dir": str(tmp_path / "r")},
    }))
    assert main(["predict", str(recipe), "--input", "Shares rose"]) == 1
    assert "has no 'input' field" in capsys.readouterr().err
