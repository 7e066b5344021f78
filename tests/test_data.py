"""Data: loading (local files in every format, hub ids offline), column mapping, checks with clear errors,
shuffling, the grouped validation split, capping, balancing, and tokenization with completion masks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import INVENTED_TRAIN

from finsft.data import Formatter, build_splits, make_formatter, prepared_cache, tokenize_rows
from finsft.errors import DataError, ModelLoadError
from finsft.models import load_model, load_tokenizer, resolve_model
from finsft.recipe import Recipe, load_recipe
from finsft.templates import BUILTIN, template_from_recipe
from finsft.testing import write_jsonl

LABELS = ("negative", "neutral", "positive")


def rows(n: int, *, labels: tuple[str, ...] = LABELS, repeat: int = 1) -> list[dict[str, str]]:
    """n distinct news rows (each repeated ``repeat`` times in a row), labels cycling."""
    out = []
    for i in range(n):
        row = {"input": f"Company {i} reported results for quarter {i % 4 + 1}", "output": labels[i % len(labels)]}
        out.extend(dict(row) for _ in range(repeat))
    return out


@pytest.fixture
def recipe(make_recipe: Any):  # type: ignore[no-untyped-def]
    def build(data: dict[str, Any], **sections: Any) -> Recipe:
        data = {"max_samples": None, **data}
        return load_recipe(str(make_recipe(data=data, **sections)))

    return build


def splits_of(r: Recipe) -> Any:
    return build_splits(r, template_from_recipe(r["template"]))


# ------------------------------------------------------------------------------------------------ loading


def test_hub_dataset_offline_is_a_clear_error(recipe: Any) -> None:
    r = recipe({"path": "FinGPT/fingpt-sentiment-train"})
    with pytest.raises(DataError) as exc:
        splits_of(r)
    msg = str(exc.value)
    assert "FinGPT/fingpt-sentiment-train" in msg
    assert "local" in msg and ".jsonl" in msg  # how to use a local file instead
    assert "HF_DATASETS_OFFLINE=1" in msg


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_in_every_format(recipe: Any, tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    data = rows(12)
    path = tmp_path / f"train{suffix}"
    frame = pd.DataFrame(data)
    if suffix == ".json":
        path.write_text(json.dumps(data))  # a JSON array of objects
    elif suffix == ".jsonl":
        write_jsonl(path, data)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    s = splits_of(recipe({"path": str(path), "shuffle": False}))
    assert s.validation is None
    assert s.train["input"] == [r["input"] for r in data]
    assert s.train["output"] == [r["output"] for r in data]
    # the template's default instruction fills the missing column
    assert set(s.train["instruction"]) == {BUILTIN["fingpt_sentiment"].defaults["instruction"]}
    assert len(s.fingerprint) == 16


def test_fingerprint_follows_the_content(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(9))
    a = splits_of(recipe({"path": str(path)})).fingerprint
    assert splits_of(recipe({"path": str(path)})).fingerprint == a
    write_jsonl(path, rows(10))
    assert splits_of(recipe({"path": str(path)})).fingerprint != a


def test_column_mapping(recipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    path.write_text("headline,sentiment,source\nShares rose,positive,wire\nProfit fell,negative,wire\n"
                    "Board meets,neutral,blog\n")
    s = splits_of(recipe({"path": str(path), "shuffle": False, "columns": {"input": "headline",
                                                                           "output": "sentiment"}}))
    assert sorted(s.train.column_names) == ["input", "instruction", "output"]  # unused columns dropped
    assert s.train["input"] == ["Shares rose", "Profit fell", "Board meets"]
    assert s.train["output"] == ["positive", "negative", "neutral"]


def test_max_samples(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(30))
    s = splits_of(recipe({"path": str(path), "max_samples": 7, "shuffle": False}))
    assert s.train["input"] == [r["input"] for r in rows(7)]
    assert len(splits_of(recipe({"path": str(path), "max_samples": 1000})).train) == 30


def test_shuffle_is_deterministic_per_seed(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(40))
    original = [r["input"] for r in rows(40)]
    a = splits_of(recipe({"path": str(path)}, training={"seed": 1})).train["input"]
    b = splits_of(recipe({"path": str(path)}, training={"seed": 1})).train["input"]
    c = splits_of(recipe({"path": str(path)}, training={"seed": 2})).train["input"]
    assert a == b
    assert a != c
    assert a != original and sorted(a) == sorted(original)
    assert splits_of(recipe({"path": str(path), "shuffle": False})).train["input"] == original


@pytest.mark.parametrize("size", [0.25, 10])
def test_validation_split_groups_repeated_inputs(recipe: Any, tmp_path: Path, size: float) -> None:
    # 20 unique inputs, each repeated 1-4 times (like FinGPT's sentiment set, which repeats rows)
    data = []
    for i, row in enumerate(rows(20)):
        data.extend(dict(row) for _ in range(i % 4 + 1))
    path = write_jsonl(tmp_path / "d.jsonl", data)
    s = splits_of(recipe({"path": str(path), "validation_size": size}))
    assert s.validation is not None
    train_inputs, val_inputs = set(s.train["input"]), set(s.validation["input"])
    assert not train_inputs & val_inputs
    assert len(s.train) + len(s.validation) == len(data)
    want = round(size * len(data)) if size < 1 else size
    assert want <= len(s.validation) < want + 4  # whole groups: at most one group's size over
    # every copy of a validation input went to validation
    assert Counter(s.validation["input"]) == {k: v for k, v in Counter(r["input"] for r in data).items()
                                              if k in val_inputs}


def test_validation_split_is_deterministic(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(30, repeat=2))
    a = splits_of(recipe({"path": str(path), "validation_size": 0.2}))
    b = splits_of(recipe({"path": str(path), "validation_size": 0.2}))
    assert a.validation["input"] == b.validation["input"]
    assert a.train["input"] == b.train["input"]


def test_validation_split_by_another_field(recipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"question": f"q{i % 5}", "answer": f"a{i}"} for i in range(20)])
    r = recipe({"path": str(path), "validation_size": 0.2, "group_by": "question"},
               template={"name": "custom", "prompt": "Q: {question}\nA:", "completion": " {answer}"})
    s = splits_of(r)
    assert not set(s.train["question"]) & set(s.validation["question"])
    assert len(s.validation) == 4  # one whole question group of 4 rows


def test_separate_validation_file(recipe: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", rows(10))
    valid = write_jsonl(tmp_path / "v.jsonl", rows(4))
    s = splits_of(recipe({"path": str(train), "validation_path": str(valid)}))
    assert len(s.train) == 10 and len(s.validation) == 4


# ------------------------------------------------------------------------------------------------- errors


def test_missing_column(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Shares rose", "output": "positive"}])
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    msg = str(exc.value)
    assert str(path) in msg
    assert "'input'" in msg and "text" in msg  # what is missing and what the data has
    assert "data.columns" in msg


def test_mapped_column_missing(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Shares rose", "output": "positive"}])
    with pytest.raises(DataError, match="'headline' \\(for template field 'input'\\)"):
        splits_of(recipe({"path": str(path), "columns": {"input": "headline"}}))


@pytest.mark.parametrize("content", ["", "\n"])
def test_empty_file(recipe: Any, tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    assert str(path) in str(exc.value) and "empty" in str(exc.value)


def test_empty_csv_with_header_only(recipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("input,output\n")
    with pytest.raises(DataError, match="empty"):
        splits_of(recipe({"path": str(path)}))


def test_labels_outside_the_label_set_suggest_fingpt9(recipe: Any, tmp_path: Path) -> None:
    data = [*rows(6), {"input": "Shares soared", "output": "strong positive"},
            {"input": "Shares slipped", "output": "mildly negative"}]
    path = write_jsonl(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    msg = str(exc.value)
    assert "'strong positive' (1 rows)" in msg and "'mildly negative' (1 rows)" in msg
    assert "negative/neutral/positive" in msg
    assert 'template.labels to "fingpt9"' in msg
    # with the 9-label set the same data is accepted
    assert len(splits_of(recipe({"path": str(path)}, template={"labels": "fingpt9"})).train) == 8


def test_unknown_labels_without_a_hint(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(3), {"input": "x", "output": "bullish"}])
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    assert "'bullish'" in str(exc.value) and "fingpt9" not in str(exc.value)


def test_labels_in_the_validation_file_are_checked(recipe: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", rows(6))
    valid = write_jsonl(tmp_path / "v.jsonl", [{"input": "x", "output": "bullish"}])
    with pytest.raises(DataError, match=r"v\.jsonl.*'bullish'"):
        splits_of(recipe({"path": str(train), "validation_path": str(valid)}))


def test_generation_templates_accept_any_output(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"input": "What is EPS?", "output": "Earnings per share."}])
    s = splits_of(recipe({"path": str(path)}, template={"name": "fiqa_qa"}))
    assert s.train["output"] == ["Earnings per share."]


# ---------------------------------------------------------------------------------------------- balancing


def test_balance_downsample_and_upsample(recipe: Any, tmp_path: Path) -> None:
    data = ([{"input": f"n{i}", "output": "negative"} for i in range(3)]
            + [{"input": f"u{i}", "output": "neutral"} for i in range(12)]
            + [{"input": f"p{i}", "output": "positive"} for i in range(6)])
    path = write_jsonl(tmp_path / "d.jsonl", data)
    down = splits_of(recipe({"path": str(path), "balance": "downsample"})).train
    assert Counter(down["output"]) == {"negative": 3, "neutral": 3, "positive": 3}
    assert len(set(down["input"])) == 9  # no row twice
    up = splits_of(recipe({"path": str(path), "balance": "upsample"})).train
    assert Counter(up["output"]) == {"negative": 12, "neutral": 12, "positive": 12}
    assert {f"n{i}" for i in range(3)} <= set(up["input"])  # every minority row kept
    assert len(set(up["input"])) == 21
    none = splits_of(recipe({"path": str(path)})).train
    assert Counter(none["output"]) == {"negative": 3, "neutral": 12, "positive": 6}


# ------------------------------------------------------------------------------------------------- models


def test_model_hub_id_offline_is_a_clear_error(recipe: Any, tmp_path: Path) -> None:
    r = recipe({"path": str(INVENTED_TRAIN)}, model={"name_or_path": "finsft-test/no-such-model"})
    source = resolve_model(r)
    assert not source.is_local
    with pytest.raises(ModelLoadError) as exc:
        load_tokenizer(source, r)
    msg = str(exc.value)
    assert "finsft-test/no-such-model" in msg
    assert "local model folder" in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(ModelLoadError, match="finsft-test/no-such-model"):
        load_model(source, {})


def test_broken_local_model_folder(recipe: Any, tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    r = recipe({"path": str(INVENTED_TRAIN)}, model={"name_or_path": str(folder)})
    with pytest.raises(ModelLoadError) as exc:
        load_tokenizer(resolve_model(r), r)
    assert "not-a-model" in str(exc.value) and "config.json" in str(exc.value)
    with pytest.raises(ModelLoadError, match="not-a-model"):
        load_model(resolve_model(r), {})


def test_a_tokenizer_without_vocabulary_is_an_error(recipe: Any, tmp_path: Path) -> None:
    """transformers builds a 5-token Gemma tokenizer (all special) from a folder holding only config.json: finsft
    refuses it instead of training on unknown tokens."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    config = json.loads((Path(__file__).parent.parent / "finsft/model_configs/google--gemma-2b.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    r = recipe({"path": str(INVENTED_TRAIN)}, model={"name_or_path": str(folder)})
    with pytest.raises(ModelLoadError) as exc:
        load_tokenizer(resolve_model(r), r)
    msg = str(exc.value)
    assert "config-only" in msg and "5 tokens" in msg and "save_pretrained" in msg


def test_a_real_small_tokenizer_loads(recipe: Any, tiny_model: Path) -> None:
    r = recipe({"path": str(INVENTED_TRAIN)}, model={"name_or_path": str(tiny_model)})
    assert len(load_tokenizer(resolve_model(r), r)) >= 100


# ------------------------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def tokenized(recipe_: Recipe, tokenizer: Any, data: list[dict[str, str]], max_length: int | None = 128) -> Any:
    import datasets

    template = template_from_recipe(recipe_["template"])
    formatter = make_formatter(recipe_, template, tokenizer)
    return tokenize_rows(datasets.Dataset.from_list(data), formatter, max_length)


def test_completion_mask_covers_the_answer_and_eos(recipe: Any, tokenizer: Any) -> None:
    r = recipe({"path": str(INVENTED_TRAIN)})
    data = [{"instruction": "Classify.", "input": "Shares rose 5% after earnings", "output": "positive"}]
    ds = tokenized(r, tokenizer, data)
    ids, mask = ds[0]["input_ids"], ds[0]["completion_mask"]
    assert len(ids) == len(mask)
    prompt = "Instruction: Classify.\nInput: Shares rose 5% after earnings\nAnswer: "
    prompt_ids = tokenizer(prompt)["input_ids"]  # with BOS, as at inference; "Answer: " ends in its space token
    assert ids[0] == tokenizer.bos_token_id
    assert ids[:len(prompt_ids)] == prompt_ids and mask[:len(prompt_ids)] == [0] * len(prompt_ids)
    completion = [t for t, m in zip(ids, mask, strict=True) if m]
    assert completion[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion) == " positive" + tokenizer.eos_token  # a word, after the prompt's space
    assert mask == [0] * len(prompt_ids) + [1] * len(completion)


def test_chat_template_masks_the_assistant_turn_with_end_of_turn(recipe: Any, tokenizer: Any) -> None:
    r = recipe({"path": str(INVENTED_TRAIN)}, template={"chat_template": True, "system": "Be brief."})
    data = [{"input": "Profit fell", "output": "negative"}]
    ds = tokenized(r, tokenizer, data)
    ids, mask = ds[0]["input_ids"], ds[0]["completion_mask"]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nInstruction: ")
    completion = [t for t, m in zip(ids, mask, strict=True) if m]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in completion
    assert tokenizer.decode(completion).startswith("negative<|im_end|>")
    prompt = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert prompt.endswith("<|im_start|>assistant\n") and "negative" not in prompt.split("Answer:")[-1]
    assert ids[0] != tokenizer.bos_token_id  # the chat template adds no BOS and none is added


def test_chat_template_needs_one(recipe: Any, tokenizer: Any) -> None:
    import copy

    r = recipe({"path": str(INVENTED_TRAIN)}, template={"chat_template": True})
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        make_formatter(r, template_from_recipe(r["template"]), plain)


def test_truncation_keeps_the_answer_cue_and_the_answer(recipe: Any, tokenizer: Any) -> None:
    r = recipe({"path": str(INVENTED_TRAIN)})
    long_input = " ".join(["The company reported higher revenue and raised its guidance."] * 40)
    ds = tokenized(r, tokenizer, [{"input": long_input, "output": "positive"}], max_length=48)
    ids, mask = ds[0]["input_ids"], ds[0]["completion_mask"]
    assert len(ids) == 48
    assert ids[0] == tokenizer.bos_token_id  # head kept
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m]).endswith("Answer: ")
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == " positive" + tokenizer.eos_token


def test_prepared_cache_reuses_tokenized_rows(recipe: Any, tokenizer: Any, tmp_path: Path) -> None:
    import datasets

    r = recipe({"path": str(INVENTED_TRAIN)})
    template = template_from_recipe(r["template"])
    formatter = make_formatter(r, template, tokenizer)
    data = datasets.Dataset.from_list(rows(5))
    logs: list[str] = []
    a = prepared_cache(data, formatter, 64, "fp", "train", log=logs.append)
    b = prepared_cache(data, formatter, 64, "fp", "train", log=logs.append)
    assert a["input_ids"] == b["input_ids"]
    assert "tokenizing 5 rows" in logs[0] and "from cache" in logs[1]
    # another max_length is another cache entry
    prepared_cache(data, formatter, 32, "fp", "train", log=logs.append)
    assert "tokenizing" in logs[2]
    chat = Formatter(template, tokenizer, True, None)
    prepared_cache(data, chat, 64, "fp", "train", log=logs.append)
    assert "tokenizing" in logs[3]


def _sentencepiece_style_tokenizer() -> Any:
    """A Llama-2/Mistral-style tokenizer: the normalizer prepends a dummy '▁' and turns spaces into '▁'."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    words = ["Answer", ":", "negative", "neutral", "positive", "news", "shares", "fell"]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=sorted(set("".join(words)) | {"▁"}))
    tok.train_from_iterator(["▁" + w for w in words] * 50 + list(words) * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_completions_are_encoded_as_in_context_for_dummy_prefix_tokenizers() -> None:
    from finsft.data import encode_continuation

    tok = _sentencepiece_style_tokenizer()
    alone = tok(" negative", add_special_tokens=False)["input_ids"]
    prompt = tok("Answer:", add_special_tokens=False)["input_ids"]
    joint = tok("Answer: negative", add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt)] == prompt
    assert alone != joint[len(prompt):]  # the dummy prefix: standalone encoding differs from in-context
    assert encode_continuation(tok, [" negative"]) == [joint[len(prompt):]]


def test_byte_level_completions_are_encoded_plainly(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from finsft.data import encode_continuation

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [" negative</s>", " The bank cut its dividend."]
    assert encode_continuation(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------- misuse (issue 9: nothing lost)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bytes_that_are_not_utf8_name_the_line_and_offset(recipe: Any, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        path.write_bytes(b"input,output\nShares rose,positive\nCaf\xe9 profit fell,negative\n")
        where = "line 3 (byte offset 37)"
    else:
        path.write_bytes(b'{"input": "Shares rose", "output": "positive"}\n{"input": "Caf\xe9", "output": "negative"}\n')
        where = "line 2 (byte offset 61)"
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    msg = str(exc.value)
    assert str(path) in msg and "not UTF-8" in msg and "0xe9" in msg and where in msg and "Save" in msg


def test_utf8_check_across_read_blocks(tmp_path: Path) -> None:
    """A multi-byte character cut by the 1 MiB read block is fine; a bad byte after it is found at its offset."""
    from finsft.data import scan_text_file

    head = b"x" * ((1 << 20) - 1) + "é".encode()  # é's two bytes straddle the block boundary
    good = tmp_path / "good.jsonl"
    good.write_bytes(head + b"\n")
    assert scan_text_file(str(good))[1] is True
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(head + b"\nab\xff\n")
    with pytest.raises(DataError, match=rf"line 2 \(byte offset {len(head) + 3}\)"):
        scan_text_file(str(bad))
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"ok\n" + "é".encode()[:1])  # the file ends inside a character
    with pytest.raises(DataError, match=r"line 2 \(byte offset 3\)"):
        scan_text_file(str(cut))


def test_only_blank_lines_is_a_file_without_rows(recipe: Any, tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\t\n")
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    assert str(path) in str(exc.value) and "no rows" in str(exc.value)
    assert "corresponds to no data" not in str(exc.value)


def test_missing_column_hint_maps_the_missing_field_to_the_closest_column(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"label": "positive", "headline": "Shares rose"}])
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path), "columns": {"output": "label"}}))
    msg = str(exc.value)
    assert "'input' (for template field 'input')" in msg and 'data.columns = {"output": "label", "input": ' \
        '"headline"}' in msg  # the one unused column for the one unmapped field, the existing mapping kept
    with pytest.raises(DataError, match=r'Did you mean data.columns = \{"output": "label", "input": "headline"\}'):
        splits_of(recipe({"path": str(path), "columns": {"output": "label", "input": "headlines"}}))


@pytest.mark.parametrize(("value", "kind"), [(["Profit", "fell"], "a list"), ({"text": "Profit fell"}, "an object")])
def test_list_or_object_values_are_refused_with_row_and_column(recipe: Any, tmp_path: Path, value: Any,
                                                               kind: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(2), {"input": value, "output": "negative"}])
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path)}))
    msg = str(exc.value)
    assert str(path) in msg and "row 3" in msg and "column 'input'" in msg and kind in msg and "string" in msg


def test_a_column_mixing_text_and_numbers_becomes_text(recipe: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*rows(2), {"input": 42, "output": "neutral"}])
    s = splits_of(recipe({"path": str(path), "shuffle": False}))
    assert s.train["input"] == [r["input"] for r in rows(2)] + ["42"]  # not '"Company 0..."' with JSON quotes


def test_render_refuses_a_list_value() -> None:
    with pytest.raises(DataError, match="field 'input' holds list"):
        BUILTIN["fingpt_sentiment"].render_prompt({"input": ["a", "b"]})


@pytest.mark.parametrize("size", [10, 11, 500])
def test_validation_size_of_all_rows_or_more_is_refused(recipe: Any, tmp_path: Path, size: int) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(10))
    with pytest.raises(DataError) as exc:
        splits_of(recipe({"path": str(path), "validation_size": size}))
    msg = str(exc.value)
    assert f"asks for {size} validation rows" in msg and "only 10 rows" in msg and "below 10" in msg
    s = splits_of(recipe({"path": str(path), "validation_size": 9}))  # below the row count: as asked
    assert (len(s.train), len(s.validation)) == (1, 9)


def test_local_looking_data_that_does_not_exist_is_not_a_hub_id(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from finsft.data import load_table

    monkeypatch.chdir(tmp_path)
    for ref in ("missing.jsonl", "./data/x", "~/finsft-no-such-file.csv"):
        with pytest.raises(DataError) as exc:
            load_table(ref, "train")
        assert f"'{ref}' not found" in str(exc.value) and "hub" not in str(exc.value)
    write_jsonl(tmp_path / "here.jsonl", rows(2))
    ds, _ = load_table("here.jsonl", "train")  # a relative local file on the command line loads
    assert len(ds) == 2
