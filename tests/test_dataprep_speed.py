"""Data preparation at scale: the batched tokenizer path gives exactly the per-row result, and the prepared-data cache
is hit by the same inputs (also from another process) and missed when the data, the data settings, the template,
the tokenizer or max_length change. Timings are reported by benchmarks/speed.py, not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finsft.bench import synthetic_rows, write_synthetic
from finsft.data import (
    PROMPT_TAIL,
    Formatter,
    build_splits,
    encode_completions,
    make_formatter,
    prepared_cache,
    tokenize_rows,
)
from finsft.recipe import load_recipe
from finsft.templates import get_template, template_from_recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "sentiment.jsonl", "sentiment", 400, seed=1)


def prepare(recipe_path: Path, tokenizer: Any) -> tuple[Any, list[str]]:
    recipe = load_recipe(str(recipe_path))
    template = template_from_recipe(recipe["template"])
    splits = build_splits(recipe, template)
    logs: list[str] = []
    ds = prepared_cache(splits.train, make_formatter(recipe, template, tokenizer), recipe["training"]["max_length"],
                        splits.fingerprint, "train", log=logs.append)
    return ds, logs


def hit(logs: list[str]) -> bool:
    assert len(logs) == 1, logs
    return "from cache" in logs[0]


def recipe_with(make_recipe: Any, data_path: Path, name: str = "r", **sections: Any) -> Path:
    base: dict[str, Any] = {"data": {"path": str(data_path), "validation_size": 0.05, "max_samples": None},
                            "template": {"name": "fingpt_sentiment", "labels": "fingpt9"}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return make_recipe(name, **base)


def reference(tok: Any, f: Formatter, row: dict[str, str], max_length: int | None) -> tuple[list[int], list[int]]:
    """The row-by-row definition tokenize_rows must reproduce."""
    p = tok(f.prompt(row), add_special_tokens=not f.chat)["input_ids"]
    c = encode_completions(f, [f.completion(row)])[0]
    if max_length is not None and len(p) + len(c) > max_length:
        c = c[: max(max_length - len(p), max_length // 2)]
        keep = max_length - len(c)
        tail = min(PROMPT_TAIL, keep)
        p = p[: keep - tail] + p[len(p) - tail:] if keep > 0 else []
    return p + c, [0] * len(p) + [1] * len(c)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("max_length", [None, 512, 60, 24])
def test_batched_tokenization_equals_the_per_row_definition(tokenizer: Any, chat: bool,
                                                            max_length: int | None) -> None:
    import datasets

    rows = list(synthetic_rows("sentiment", 120, seed=2)) + list(synthetic_rows("qa", 40, seed=3))
    rows += rows[:30]  # repeated rows are tokenized once and shared
    f = Formatter(get_template("fiqa_qa"), tokenizer, chat, "Be brief." if chat else None)
    ds = tokenize_rows(datasets.Dataset.from_list(rows), f, max_length)
    assert len(ds) == len(rows)
    for row, ids, mask in zip(rows, ds["input_ids"][:], ds["completion_mask"][:], strict=True):
        want_ids, want_mask = reference(tokenizer, f, row, max_length)
        assert list(ids) == want_ids
        assert list(mask) == want_mask
        if max_length is not None:
            assert len(ids) <= max_length


def test_tokenizes_shuffled_and_split_rows_in_their_order(make_recipe: Any, data: Path, tokenizer: Any) -> None:
    recipe = load_recipe(str(recipe_with(make_recipe, data)))
    template = template_from_recipe(recipe["template"])
    splits = build_splits(recipe, template)  # shuffled and split: an index mapping over the file's rows
    formatter = make_formatter(recipe, template, tokenizer)
    ds = tokenize_rows(splits.train, formatter, 128)
    for i in (0, 7, len(ds) - 1):
        assert list(ds[i]["input_ids"]) == reference(tokenizer, formatter, dict(splits.train[i]), 128)[0]


def test_same_inputs_hit_the_cache(make_recipe: Any, data: Path, tokenizer: Any) -> None:
    path = recipe_with(make_recipe, data)
    first, logs1 = prepare(path, tokenizer)
    second, logs2 = prepare(path, tokenizer)
    assert not hit(logs1) and hit(logs2)
    assert first["input_ids"][:] == second["input_ids"][:]
    assert first["completion_mask"][:] == second["completion_mask"][:]
    # the output folder and training settings other than max_length do not matter
    other = recipe_with(make_recipe, data, "other", training={"learning_rate": 0.01, "max_steps": 3},
                        output={"dir": str(data.parent / "elsewhere")})
    assert hit(prepare(other, tokenizer)[1])


@pytest.mark.slow
def test_another_process_hits_the_cache(make_recipe: Any, data: Path, tiny_model: Path, tokenizer: Any) -> None:
    path = recipe_with(make_recipe, data)
    assert not hit(prepare(path, tokenizer)[1])
    script = (
        "import sys; from transformers import AutoTokenizer\n"
        "from finsft.recipe import load_recipe; from finsft.templates import template_from_recipe\n"
        "from finsft.data import build_splits, make_formatter, prepared_cache\n"
        "r = load_recipe(sys.argv[1]); t = template_from_recipe(r['template']); s = build_splits(r, t)\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "prepared_cache(s.train, make_formatter(r, t, tok), r['training']['max_length'], s.fingerprint, 'train')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(tiny_model)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "from cache" in proc.stdout and "tokenizing" not in proc.stdout


@pytest.mark.parametrize("change", ["max_length", "template", "system", "chat", "max_samples", "seed",
                                    "validation_size"])
def test_changed_settings_miss_the_cache(make_recipe: Any, data: Path, tokenizer: Any, change: str) -> None:
    path = recipe_with(make_recipe, data)
    prepare(path, tokenizer)
    assert hit(prepare(path, tokenizer)[1])
    sections: dict[str, dict[str, Any]] = {
        "max_length": {"training": {"max_length": 64}},
        "template": {"template": {"name": "short_sentiment", "labels": "fingpt9"}},
        "system": {"template": {"chat_template": True, "system": "Answer with one label."}},
        "chat": {"template": {"chat_template": True}},
        "max_samples": {"data": {"max_samples": 100}},
        "seed": {"training": {"seed": 7}},
        "validation_size": {"data": {"validation_size": 0.1}},
    }[change]
    assert not hit(prepare(recipe_with(make_recipe, data, "changed", **sections), tokenizer)[1])


def test_changed_data_misses_the_cache(make_recipe: Any, data: Path, tokenizer: Any) -> None:
    path = recipe_with(make_recipe, data)
    prepare(path, tokenizer)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[5]["input"] = "Shares of the bank fell sharply after the results."
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, logs = prepare(path, tokenizer)
    assert not hit(logs)
    assert "Shares of the bank fell sharply" in "".join(tokenizer.batch_decode(ds["input_ids"][:]))


def test_another_tokenizer_misses_the_cache(make_recipe: Any, data: Path, tokenizer: Any, tmp_path: Path) -> None:
    import copy

    from finsft.testing import build_tiny_model

    path = recipe_with(make_recipe, data)
    prepare(path, tokenizer)
    other_vocab = build_tiny_model(tmp_path / "other", vocab_size=500)
    from transformers import AutoTokenizer

    assert not hit(prepare(path, AutoTokenizer.from_pretrained(other_vocab))[1])
    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<|im_end|>"
    assert not hit(prepare(path, other_eos)[1])
    assert hit(prepare(path, tokenizer)[1])  # the original is still cached
