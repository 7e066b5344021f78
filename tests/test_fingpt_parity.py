"""finsft against FinGPT's own code (vendored in benchmarks/fingpt_benchmark, MIT): the prompt tokens the
fingpt_sentiment template trains are the ones FinGPT's utils.py trains and its benchmark prompt gives the model (the
label follows as a word; a custom "{output}" completion trains utils.py's tokens exactly), and the suite's
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


def _tokenizer(which: str, tiny_model: Path) -> Any:
    return _tiny_tokenizer(tiny_model) if which.startswith("byte") else _sentencepiece_tokenizer()


TOKENIZERS = ["byte-level BPE (SmolLM2/Llama-3 style)", "SentencePiece style (Llama-2/Mistral)"]


@pytest.mark.parametrize("which", TOKENIZERS)
def test_training_prompt_is_fingpts_and_the_label_a_word(which: str, tiny_model: Path, make_recipe: Any) -> None:
    """fingpt_sentiment: the prompt's ids equal FinGPT utils.tokenize's and its benchmark prompt's (trailing space
    a token of its own); the loss covers the label as a word (leading-space marker) and EOS. On a dummy-prefix
    (SentencePiece) tokenizer that is FinGPT's sequence id for id; on byte-level BPE the label's first token carries
    its space. Either way FinGPT's answer split and change_target read the trained answer as the gold label."""
    import datasets

    tok = _tokenizer(which, tiny_model)
    recipe = load_recipe(str(make_recipe()))
    formatter = make_formatter(recipe, template_from_recipe(recipe["template"]), tok)
    rows = _rows(12)
    ours = tokenize_rows(datasets.Dataset.from_list(rows), formatter, 512)  # FinGPT's max_length: no row is cut
    for row, ids, mask in zip(rows, ours["input_ids"], ours["completion_mask"], strict=True):
        theirs = fingpt_code.tokenize(tok, row, max_length=512)
        assert not theirs["exceed_max_length"]
        prompt_len = len(tok(fingpt_code.get_prompt("default", row["instruction"], row["input"]))["input_ids"])
        assert ids[:prompt_len] == theirs["input_ids"][:prompt_len]
        assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)
        # FinGPT's benchmark prompt (format_example) is the same text as finsft's prompt, so the same tokens
        context = fingpt_code.format_example(row)["context"]
        assert formatter.prompt(row) == context
        assert tok(context)["input_ids"] == ids[:prompt_len]
        label = ids[prompt_len:]
        assert label[-1] == tok.eos_token_id
        word = tok.convert_ids_to_tokens(label[0])
        assert word.startswith(("Ġ", "▁")), word  # a word start, not utils.py's bare "positive" after a lone space
        if which.startswith("Sentence"):
            assert ids == theirs["input_ids"]  # the dummy prefix: FinGPT's own target ids
            continue  # (this tiny vocabulary cannot spell the whole prompt back)
        assert label == tok(" " + row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # an adapter that reproduces what it was trained on is read as the gold label by FinGPT's code
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.split("Answer: ")[1] == " " + row["output"]
        assert fingpt_code.change_target(decoded.split("Answer: ")[1]) == fingpt_code.change_target(row["output"])


@pytest.mark.parametrize("which", TOKENIZERS)
def test_custom_bare_completion_trains_fingpts_utils_tokens(which: str, tiny_model: Path, make_recipe: Any) -> None:
    """A custom template with FinGPT's prompt and the completion "{output}" trains utils.tokenize's ids exactly."""
    import datasets

    tok = _tokenizer(which, tiny_model)
    recipe = load_recipe(str(make_recipe(template={
        "name": "custom", "prompt": "Instruction: {instruction}\nInput: {input}\nAnswer: ", "completion": "{output}",
        "labels": "fingpt3"})))
    formatter = make_formatter(recipe, template_from_recipe(recipe["template"]), tok)
    rows = [{**r, "output": f" {r['output']} "} for r in _rows(6)]  # utils.py strips the target: so does finsft
    ours = tokenize_rows(datasets.Dataset.from_list(rows), formatter, 512)
    for row, ids, mask in zip(rows, ours["input_ids"], ours["completion_mask"], strict=True):
        theirs = fingpt_code.tokenize(tok, row, max_length=512)
        assert ids == theirs["input_ids"]
        prompt_len = sum(1 for m in mask if not m)
        assert theirs["labels"][prompt_len:] == ids[prompt_len:] and all(mask[prompt_len:])


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
