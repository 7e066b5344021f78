"""finsft against FinGPT's own code (vendored in benchmarks/fingpt_benchmark, MIT): the tokens the fingpt_sentiment
template trains are the tokens FinGPT's utils.py trains and its benchmark prompt gives the model, and the suite's
default scorer reads answers, labels and metrics exactly as FinGPT's benchmark code does, row for row."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from finsft.data import make_formatter, tokenize_rows
from finsft.evaluation.scorers import FINGPT_SCORER, evaluate_model, fingpt_answer
from finsft.evaluation.suite import NEWS, TWEET
from finsft.recipe import load_recipe
from finsft.templates import get_template, template_from_recipe, to_three_class

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "fingpt_benchmark"))
import fingpt_code
from conftest import INVENTED_TEST


def _rows(n: int) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in INVENTED_TEST.read_text().splitlines()[:n]]
    return [{"instruction": NEWS if i % 2 else TWEET, "input": r["input"], "output": r["output"]}
            for i, r in enumerate(rows)]


def _tiny_tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _sentencepiece_tokenizer() -> Any:
    from test_data import _sentencepiece_style_tokenizer

    return _sentencepiece_style_tokenizer()


@pytest.mark.parametrize("which", ["byte-level BPE (SmolLM2/Llama-3 style)", "SentencePiece style (Llama-2/Mistral)"])
def test_training_tokens_are_fingpts(which: str, tiny_model: Path, make_recipe: Any) -> None:
    """input_ids equal FinGPT utils.tokenize's; the loss covers exactly what FinGPT appends after the prompt."""
    import datasets

    tok = _tiny_tokenizer(tiny_model) if which.startswith("byte") else _sentencepiece_tokenizer()
    recipe = load_recipe(str(make_recipe()))
    formatter = make_formatter(recipe, template_from_recipe(recipe["template"]), tok)
    rows = _rows(12)
    ours = tokenize_rows(datasets.Dataset.from_list(rows), formatter, 512)  # FinGPT's max_length: no row is cut
    for row, ids, mask in zip(rows, ours["input_ids"], ours["completion_mask"], strict=True):
        theirs = fingpt_code.tokenize(tok, row, max_length=512)
        assert not theirs["exceed_max_length"]
        prompt_len = len(tok(fingpt_code.get_prompt("default", row["instruction"], row["input"]))["input_ids"])
        assert ids == theirs["input_ids"]
        assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)
        # FinGPT's benchmark prompt (format_example) is the same text as finsft's prompt, so the same tokens
        context = fingpt_code.format_example(row)["context"]
        assert formatter.prompt(row) == context
        assert tok(context)["input_ids"] == ids[:prompt_len]


ANSWERS = [
    "positive", "Positive", "1positive", " positive", "negative", "strongly Negative", "neutral", "", "1",
    "positive and negative", "neutral\nAnswer: positive", "mildly positive", "The sentiment is negative.", "n/a",
]


@pytest.mark.parametrize("generated", ANSWERS)
def test_answer_split_and_mapping_are_fingpts(generated: str) -> None:
    decoded = f"Instruction: {NEWS}\nInput: Shares rose.\nAnswer: {generated}"
    theirs = decoded.split("Answer: ")[1]
    assert fingpt_answer(decoded) == theirs
    assert to_three_class(fingpt_answer(decoded)) == fingpt_code.change_target(theirs)
    assert fingpt_answer("no answer cue") == ""  # FinGPT's code would stop here with an IndexError


def test_suite_scorer_equals_fingpts_benchmark_code_row_for_row(tiny_model: Path, make_recipe: Any) -> None:
    """The same model and rows through finsft's suite scorer and through FinGPT's test loop (its tokenizer set-up
    included): identical answers, labels and metrics. The tiny random model generates up to FinGPT's 512 tokens,
    so the answers are long and varied: the mapping sees texts with both words, neither, and cue repeats."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(str(make_recipe()))
    rows = _rows(10)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    formatter = make_formatter(recipe, get_template("fingpt_sentiment"), tok)
    ours = evaluate_model(model, formatter, rows, scorer=FINGPT_SCORER, batch_size=4, max_new_tokens=None)

    model2 = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok2 = AutoTokenizer.from_pretrained(tiny_model)
    model2, tok2 = fingpt_code.setup_tokenizer(model2, tok2)
    frame, metrics = fingpt_code.test_rows(model2.eval(), tok2, pd.DataFrame(rows), batch_size=4)

    assert [p["answer"] for p in ours.predictions] == frame["out_text"].tolist()
    assert [p["pred"] for p in ours.predictions] == frame["new_out"].tolist()
    assert [p["gold"] for p in ours.predictions] == frame["new_target"].tolist()
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert ours.metrics[key] == pytest.approx(metrics[key], abs=1e-12), key
    assert ours.scorer == FINGPT_SCORER
