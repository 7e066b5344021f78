"""TRL's dataset formats without a template name: recognised as TRL recognises them (columns and the first row),
said by `finsft show` and the run's plan, refused with the columns found when none matches, and trained with the
loss where TRL puts it (checked on the batches TRL collates)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finsft.data_formats import detect_format, sniff_local
from finsft.recipe import check_recipe, load_recipe
from finsft.testing import write_jsonl

NEWS = ["Shares rose after earnings", "Profit warning hits the stock", "Board meets on Tuesday",
        "Record orders lift the outlook", "Plant closure cuts jobs", "Dividend unchanged",
        "Guidance raised for the year", "Lawsuit weighs on the shares"]
LABELS = ["positive", "negative", "neutral", "positive", "negative", "neutral", "positive", "negative"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


FORMATS: dict[str, list[dict[str, Any]]] = {
    "prompt_completion": [{"prompt": f"Headline: {n}\nSentiment:", "completion": f" {lab}"}
                          for n, lab in zip(NEWS, LABELS, strict=True)],
    # an assistant turn inside the prompt is context: only the completion is trained
    "chat_prompt_completion": [{"prompt": [user("Rate headlines."), assistant("Ready."), user(n)],
                                "completion": [assistant(lab)]} for n, lab in zip(NEWS, LABELS, strict=True)],
    "chat": [{"messages": [user(n), assistant(lab)]} for n, lab in zip(NEWS, LABELS, strict=True)],
    "text": [{"text": f"Quarterly filing. {n}. The company reported results in line with guidance."}
             for n in NEWS],
}


FORMAT_NAMES = {"prompt_completion": "prompt-completion (TRL, standard)",
                "chat_prompt_completion": "prompt-completion (TRL, conversational)",
                "chat": "conversational (TRL 'messages')", "text": "language modelling (TRL 'text')"}


def recipe_file(tmp_path: Path, make_recipe: Any, data: Path, validation: Path | None = None,
                **sections: Any) -> Path:
    """A recipe for the tiny model without a template section."""
    path = make_recipe(data={"path": str(data), "max_samples": None,
                             "validation_path": str(validation) if validation else None}, **sections)
    recipe = json.loads(path.read_text())
    del recipe["template"]
    path.write_text(json.dumps(recipe))
    return path


def test_detection_follows_trl() -> None:
    pc = detect_format(["prompt", "completion"], {"prompt": "a", "completion": "b"})
    assert pc is not None and pc.template == "prompt_completion" and pc.group_by == "prompt"
    conv = detect_format(["prompt", "completion", "id"], {"prompt": [user("a")], "completion": [assistant("b")]})
    assert conv is not None and conv.template == "chat_prompt_completion"
    msgs = detect_format(["messages"], {"messages": [user("a"), assistant("b")]})
    assert msgs is not None and msgs.template == "chat"
    assert detect_format(["messages"], {"messages": "not a list"}) is None  # TRL: not conversational
    text = detect_format(["text", "date"], {"text": "x", "date": "2024"})
    assert text is not None and text.template == "text" and text.loss == "every token"
    rows = detect_format(["instruction", "input", "output"], {"input": "x", "output": "y"})
    assert rows is not None and rows.template == "fingpt_sentiment"
    assert detect_format(["headline", "score"], {"headline": "x", "score": 1}) is None
    # data.columns (field -> column) is applied first: a text column named as the input is FinGPT rows
    mapped = detect_format(["text", "label"], {"text": "x", "label": 0}, {"input": "text", "output": "label"})
    assert mapped is not None and mapped.template == "fingpt_sentiment"
    asked = detect_format(["question", "answer"], None, {"prompt": "question", "completion": "answer"})
    assert asked is not None and asked.template == "prompt_completion"


def test_sniffing_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}] * 2, indent=2))
    (tmp_path / "b.csv").write_text("text,source\nRevenue grew,10-K\n")
    write_jsonl(tmp_path / "c.jsonl", FORMATS["chat"])
    assert sniff_local(str(tmp_path / "a.json")) == (["prompt", "completion"], {"prompt": "p", "completion": "c"})
    assert sniff_local(str(tmp_path / "b.csv")) == (["text", "source"], {"text": "Revenue grew", "source": "10-K"})
    sniffed = sniff_local(str(tmp_path / "c.jsonl"))
    assert sniffed is not None and sniffed[0] == ["messages"]
    assert sniff_local(str(tmp_path / "missing.jsonl")) is None
    assert sniff_local(str(tmp_path / "d.parquet")) is None


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_validate_resolves_the_template_and_show_says_why(name: str, tmp_path: Path, make_recipe: Any) -> None:
    data = write_jsonl(tmp_path / f"{name}.jsonl", FORMATS[name])
    recipe = load_recipe(str(recipe_file(tmp_path, make_recipe, data)))
    assert recipe.template["name"] == name
    assert recipe.data_format is not None and f"template '{name}'" in recipe.data_format
    assert recipe.data["group_by"] in FORMATS[name][0]  # a column of the data, for the validation split


def test_show_names_the_format(tmp_path: Path, make_recipe: Any) -> None:
    data = write_jsonl(tmp_path / "pc.jsonl", FORMATS["prompt_completion"])
    path = recipe_file(tmp_path, make_recipe, data)
    out = subprocess.run([sys.executable, "-m", "finsft", "show", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["template"]["name"] == "prompt_completion"  # stdout stays JSON
    assert ("data format: prompt-completion (TRL, standard), template 'prompt_completion': columns prompt and "
            "completion") in out.stderr and "the loss covers the completion" in out.stderr


def test_unknown_shape_fails_validation_with_the_columns_and_the_formats(tmp_path: Path, make_recipe: Any) -> None:
    data = write_jsonl(tmp_path / "odd.jsonl", [{"headline": "x", "score": 1}])
    _, problems = check_recipe(str(recipe_file(tmp_path, make_recipe, data)))
    [problem] = problems
    assert problem.path == "$.data.path"
    for part in ("columns (headline, score)", "prompt + completion", "messages", "text", "input + output",
                 "data.columns", "template.name"):
        assert part in problem.message, part
    # a named template keeps the data check of its own (missing columns, with a data.columns suggestion)
    named = make_recipe(data={"path": str(data)})
    _, problems = check_recipe(str(named))
    assert problems == []


# ------------------------------------------------------------------------------------------- training


@pytest.fixture
def trainers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from trl import SFTTrainer

    seen: list[Any] = []
    original = SFTTrainer.train

    def recording_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", recording_train)
    return seen


def trained_parts(trainer: Any, tokenizer: Any) -> list[tuple[str, str]]:
    """(text in the loss, whole text) of each row of the first batch TRL collates."""
    batch = next(iter(trainer.get_train_dataloader()))
    out = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        real = mask.bool()
        out.append((tokenizer.decode(ids[(labels != -100) & real]), tokenizer.decode(ids[real])))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_trains_with_trls_loss(name: str, tmp_path: Path, make_recipe: Any, trainers: list[Any],
                                            tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    from finsft.training import train

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = write_jsonl(tmp_path / f"{name}.jsonl", FORMATS[name])
    # text data with an evaluation section (and no validation set): the run skips the task evaluation, saying
    # why; prompt-completion data is scored by generation against its completion
    scored = name.endswith("prompt_completion")
    evaluation = {"max_new_tokens": 3, "max_samples": 3} if scored else {} if name == "text" else None
    path = recipe_file(tmp_path, make_recipe, data, data if scored else None, evaluation=evaluation,
                       training={"max_steps": 1, "per_device_train_batch_size": 4})
    if scored:  # scored on its own training rows: the leak guard would refuse that, so it only warns here
        config = json.loads(path.read_text())
        config["data"]["drop_eval_overlap"] = False
        path.write_text(json.dumps(config))
    out = train(load_recipe(str(path)))
    assert json.loads((out / "recipe.json").read_text())["template"]["name"] == name
    [trainer] = trainers
    parts = trained_parts(trainer, tokenizer)
    end = tokenizer.eos_token
    for trained, whole in parts:
        if name == "prompt_completion":
            assert trained.strip() in {f"{lab}{end}" for lab in LABELS} and whole.endswith(trained)
            assert "Headline:" in whole and "Headline:" not in trained
        elif name == "text":
            assert trained == whole and "Quarterly filing." in trained and trained.endswith(end)  # every token
        else:  # conversations: the (last) assistant turn and its end-of-turn token only
            assert trained.strip().removesuffix("<|im_end|>") in LABELS, trained
            assert "<|im_start|>user" in whole and "<|im_start|>user" not in trained
            if name == "chat_prompt_completion":
                assert "Ready." in whole and "Ready." not in trained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["global_step"] == 1
    if scored:
        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [p["reference"].strip() for p in predictions] and all(
            p["reference"].strip() in LABELS for p in predictions)  # the completion, not a list of messages
        assert "rougeL" in json.loads((out / "eval.json").read_text())["metrics"]
    printed = " ".join(capsys.readouterr().out.split())
    assert f"data format: {FORMAT_NAMES[name]}, template '{name}'" in printed
    assert ("task evaluation skipped" in printed) == (name == "text")


def test_data_read_only_by_the_run_is_recognised_when_it_loads(tmp_path: Path, make_recipe: Any) -> None:
    """A Parquet file (like a hub dataset) is not read by `finsft validate`: the run reads its first row."""
    import datasets

    from finsft.data_sources import resolve_data_format
    from finsft.errors import DataError

    data = tmp_path / "pc.parquet"
    datasets.Dataset.from_list(FORMATS["chat_prompt_completion"]).to_parquet(str(data))
    recipe = load_recipe(str(recipe_file(tmp_path, make_recipe, data)))
    assert recipe.template_pending and recipe.data_format is None
    template = resolve_data_format(recipe)
    assert template is not None and template.name == "chat_prompt_completion" and template.conversational
    assert recipe.template["name"] == "chat_prompt_completion" and recipe.data["group_by"] == "prompt"
    assert recipe.data_format is not None and "lists of messages" in recipe.data_format
    assert resolve_data_format(recipe) is None  # decided once

    odd = tmp_path / "odd.parquet"
    datasets.Dataset.from_list([{"headline": "x", "score": 1}]).to_parquet(str(odd))
    with pytest.raises(DataError, match=r"columns \(headline, score\) match no data format"):
        resolve_data_format(load_recipe(str(recipe_file(tmp_path, make_recipe, odd))))


def test_plain_text_has_nothing_to_score() -> None:
    from finsft.errors import FinsftError
    from finsft.evaluation.scorers import resolve_scorer
    from finsft.templates import BUILTIN

    with pytest.raises(FinsftError, match="plain text: it has no prompt and answer to score"):
        resolve_scorer("auto", BUILTIN["text"])
    assert resolve_scorer("auto", BUILTIN["prompt_completion"]) == "generate"
