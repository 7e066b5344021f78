"""Prompt templates: the built-ins render FinGPT's formats, declarative templates come from the recipe, and
third-party templates register through the ``finsft.templates`` entry point group (a tiny dist in
tests/fixtures/entrypoint_pkg, found through PYTHONPATH/sys.path without installing anything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finsft.errors import DataError, FinsftError
from finsft.templates import (
    BUILTIN,
    FINGPT9,
    SENTIMENT_INSTRUCTION,
    Template,
    get_template,
    registered_names,
    template_from_recipe,
    to_three_class,
)

ENTRYPOINT_PKG = Path(__file__).parent / "fixtures" / "entrypoint_pkg"
FINSFT = [sys.executable, "-m", "finsft"]


@pytest.fixture
def demo_dist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the demo dist visible to importlib.metadata in this process."""
    monkeypatch.syspath_prepend(str(ENTRYPOINT_PKG))
    monkeypatch.delitem(sys.modules, "finsft_demo_templates", raising=False)


def env_with_demo(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENTRYPOINT_PKG), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"  # rich wraps tables to 80 columns when stdout is not a terminal
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ built-ins


def test_fingpt_sentiment_renders_fingpts_prompt() -> None:
    t = BUILTIN["fingpt_sentiment"]
    row = {"input": "Shares rose 5%", "output": "positive"}
    # FinGPT's utils.py template, trailing space included; the label is tokenized apart (completion_apart), as a
    # word with its leading space
    assert t.render_prompt(row) == f"Instruction: {SENTIMENT_INSTRUCTION}\nInput: Shares rose 5%\nAnswer: "
    assert t.render_completion(row) == " positive" and t.completion_apart and t.completion_lead == " "
    assert t.render_prompt({**row, "instruction": "Classify."}).startswith("Instruction: Classify.\n")
    assert t.fields == ["instruction", "input", "output"]
    assert t.required_fields == ["input", "output"]
    assert t.is_classification and t.labels == ("negative", "neutral", "positive")
    assert t.render_label("neutral") == " neutral"


def test_fiqa_and_short_sentiment() -> None:
    fiqa = BUILTIN["fiqa_qa"]
    assert not fiqa.is_classification
    prompt = fiqa.render_prompt({"input": "What is EPS?", "output": "x"})
    assert prompt.startswith("Instruction: Utilize your financial knowledge") and prompt.endswith(
        "\nInput: What is EPS?\nAnswer:")
    short = BUILTIN["short_sentiment"]
    assert short.render_prompt({"input": "Profit fell"}) == "Profit fell\nSentiment:"
    assert len(short.render_prompt({"input": "x"})) * 3 < len(BUILTIN["fingpt_sentiment"].render_prompt({"input": "x"}))


# TRL's formats (prompt_completion, chat_prompt_completion, text) take the data's own text as it is.
@pytest.mark.parametrize("name", sorted(n for n, t in BUILTIN.items() if not (
    t.messages_field or t.conversational or t.language_modeling or t.prompt == "{prompt}")))
def test_prompts_end_without_a_space_or_tokenize_apart(name: str) -> None:
    """A prompt ending in a space is not a token prefix of prompt + completion as one text: such a template
    tokenizes its completion apart (FinGPT's way); the others end without a space and complete with one."""
    t = BUILTIN[name]
    if t.completion_apart:
        assert t.prompt.endswith(" ")
    else:
        assert not t.prompt.endswith(" ") and t.completion.startswith(" ")


def test_custom_prompt_ending_in_a_space_tokenizes_apart() -> None:
    spaced = template_from_recipe({"name": "custom", "prompt": "{input}\nAnswer: ", "completion": "{output}"})
    plain = template_from_recipe({"name": "custom", "prompt": "{input}\nAnswer:", "completion": " {output}"})
    assert spaced.completion_apart and not plain.completion_apart


def test_missing_field_is_a_data_error() -> None:
    with pytest.raises(DataError, match="template 'short_sentiment' needs field 'input'"):
        BUILTIN["short_sentiment"].render_prompt({"output": "positive"})


def test_custom_template_from_the_recipe_section() -> None:
    t = template_from_recipe({"name": "custom", "prompt": "Q: {question}\nA:", "completion": " {answer}"})
    assert t.name == "custom" and t.fields == ["question", "answer"] and not t.is_classification
    assert t.render_prompt({"question": "What is EPS?"}) == "Q: What is EPS?\nA:"
    labelled = template_from_recipe({"name": "custom", "prompt": "{text} ->", "completion": " {label}",
                                     "labels": ["bearish", "bullish"]})
    assert labelled.labels == ("bearish", "bullish")


def test_label_sets_override_the_templates() -> None:
    assert template_from_recipe({"name": "fingpt_sentiment", "labels": "fingpt9"}).labels == FINGPT9
    assert template_from_recipe({"name": "short_sentiment", "labels": ["down", "up"]}).labels == ("down", "up")
    assert template_from_recipe({"name": "fingpt_sentiment"}) is BUILTIN["fingpt_sentiment"]


def test_unknown_template_suggests_the_closest() -> None:
    with pytest.raises(FinsftError, match=r"unknown template 'fingpt_sentimnt'\. Did you mean 'fingpt_sentiment'"):
        get_template("fingpt_sentimnt")


@pytest.mark.parametrize(("text", "label"), [
    ("positive", "positive"), ("Positive outlook", "positive"), ("moderately positive", "positive"),
    ("strong negative", "negative"), ("Negative", "negative"), ("neutral", "neutral"), ("unclear", "neutral"),
    ("negative then positive", "positive"),  # FinGPT checks positive first
])
def test_to_three_class_matches_fingpts_benchmark_rule(text: str, label: str) -> None:
    assert to_three_class(text) == label


# -------------------------------------------------------------------------------------------- entry points


def test_entry_point_templates_in_process(demo_dist: None) -> None:
    names = registered_names()
    assert {"demo", "demo_qa", "demo_broken", "demo_alias"} <= set(names) and names[-1] == "custom"
    demo = get_template("demo")
    assert isinstance(demo, Template) and demo.labels == ("negative", "neutral", "positive")
    assert demo.render_prompt({"input": "Shares rose"}) == "Headline: Shares rose\nMood:"
    assert get_template("demo_qa").render_prompt({"input": "Why?"}) == "Q: Why?\nA:"  # from a factory
    with pytest.raises(FinsftError, match="did not give a finsft Template"):
        get_template("demo_broken")
    assert template_from_recipe({"name": "demo", "labels": "fingpt9"}).labels == FINGPT9
    alias = get_template("demo_alias")  # registered under another name than the Template's own
    assert alias.name == "demo_alias" and alias.prompt == demo.prompt


def test_entry_point_templates_absent_without_the_dist() -> None:
    assert "demo" not in registered_names()


def test_templates_command_lists_entry_points() -> None:
    proc = subprocess.run([*FINSFT, "templates"], capture_output=True, text=True, env=env_with_demo(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    demo = next(line for line in lines if line.startswith("│ demo "))
    assert "classification" in demo and "negative/neutral/positive" in demo and "Demo headline mood" in demo
    assert any(line.startswith("│ demo_qa ") and "generation" in line for line in lines)
    assert any(line.startswith("│ demo_alias ") for line in lines)
    assert any(line.startswith("│ demo_broken ") and "broken" in line for line in lines)
    assert any(line.startswith("│ fingpt_sentiment ") for line in lines)


def write_recipe(path: Path, template: dict[str, Any], model: str = "org/model") -> Path:
    (path.parent / "train.jsonl").write_text('{"input": "Shares rose", "output": "positive"}\n')
    path.write_text(json.dumps({"model": {"name_or_path": model}, "data": {"path": "train.jsonl"},
                                "template": template, "output": {"dir": "runs/x"}}))
    return path


def test_validate_accepts_entry_point_templates(tmp_path: Path) -> None:
    good = write_recipe(tmp_path / "good.json", {"name": "demo"})
    typo = write_recipe(tmp_path / "typo.json", {"name": "demoo"})
    broken = write_recipe(tmp_path / "broken.json", {"name": "demo_broken"})
    proc = subprocess.run([*FINSFT, "validate", "--format", "json", str(good), str(typo), str(broken)],
                          capture_output=True, text=True, env=env_with_demo(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    result = {Path(f["file"]).name: f for f in json.loads(proc.stdout)["files"]}
    assert result["good.json"]["valid"] is True, result["good.json"]
    assert result["typo.json"]["valid"] is False
    assert "Did you mean 'demo'" in result["typo.json"]["errors"][0]["message"]
    assert "did not give a finsft Template" in result["broken.json"]["errors"][0]["message"]
    # without the dist on the path the entry point template is unknown
    alone = subprocess.run([*FINSFT, "validate", str(good)], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert alone.returncode == 1 and "unknown template 'demo'" in alone.stdout


@pytest.mark.slow
def test_training_with_an_entry_point_template(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_recipe(template={"name": "demo"})
    proc = subprocess.run([*FINSFT, "train", str(recipe)], capture_output=True, text=True, timeout=600,
                          env=env_with_demo(OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "recipe-out"
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "recipe.json").read_text())["template"]["name"] == "demo"
    assert "step 2/2" in proc.stdout


# ------------------------------------------------------------------- unsafe format strings (issue 9)

UNSAFE = {
    "{input:{input.__class__.__mro__}}": "placeholder inside its format spec",  # str.format would evaluate it
    "{input:{}}": "placeholder inside its format spec",
    "{input:>100000000}": "width or precision 100000000; at most 1000",
    "{input:.5000}": "width or precision 5000",
    "{input:d}": "does not apply to text",
    "{input.__class__}": "must be a field name",
    "{input[0]}": "must be a field name",
    "a } b": "literal brace",
}


@pytest.mark.parametrize(("fmt", "message"), UNSAFE.items())
def test_unsafe_format_strings_are_refused(fmt: str, message: str) -> None:
    from finsft.templates import TemplateFormatError, format_fields

    with pytest.raises(TemplateFormatError, match=message.replace("(", r"\(").replace("[", r"\[")):
        format_fields(fmt)


@pytest.mark.parametrize("fmt", ["{input:>1000}", "{input:^20}", "{input!r}", "{input:.10}", "{{literal}} {input}"])
def test_plain_format_specs_are_allowed(fmt: str) -> None:
    from finsft.templates import format_fields

    assert format_fields(fmt) == ["input"]


@pytest.mark.parametrize("fmt", list(UNSAFE)[:4])
def test_render_time_guard_for_templates_that_skipped_validation(fmt: str) -> None:
    """A Template built in code (or by a third-party entry point) is checked again when a row is rendered: the
    nested field is never evaluated and no 100-million-character prompt is built."""
    t = Template(name="t", description="", prompt=fmt + "\nAnswer:", completion=" {output}")
    with pytest.raises(FinsftError):
        t.render_prompt({"input": "Shares rose"})
    bad_completion = Template(name="t", description="", prompt="{input}", completion=" {output:>99999}",
                              labels=("a", "b"))
    with pytest.raises(FinsftError):
        bad_completion.render_label("a")


@pytest.mark.parametrize(("key", "fmt", "message"), [
    ("prompt", "{input:{input.__class__.__mro__}}\nAnswer:", "placeholder inside its format spec"),
    ("prompt", "{input:>100000000}\nAnswer:", "at most 1000"),
    ("completion", " {output:{output}}", "placeholder inside its format spec"),
])
def test_validate_refuses_unsafe_custom_templates(tmp_path: Path, key: str, fmt: str, message: str) -> None:
    from finsft.recipe import check_recipe

    section = {"name": "custom", "prompt": "{input}\nAnswer:", "completion": " {output}", key: fmt}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model": {"name_or_path": "org/m"}, "data": {"path": "org/d"},
                                "template": section, "output": {"dir": "runs/x"}}))
    recipe, problems = check_recipe(str(path))
    assert recipe is None
    assert [p.path for p in problems] == [f"$.template.{key}"] and message in problems[0].message
