"""Nothing lost, round 3 (issue 24), the surface half: model cards that text from recipes and data cannot break,
the tracking preflight, ``plan --accelerate-config`` validation and the data-format checks of the preflight.

The CLI cases run through ``finsft.cli.main`` in one fresh process per environment (the driver of
test_faults_preflight.py): exit code, words of the message naming the problem and the fix, no "Traceback", no
heavy module imported before the refusal, the user's files byte-identical, no run folder made.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

from finsft.publish.card import card_text, code_span, fence, portable, quote

# ------------------------------------------------------------------------------------------------- model cards

HOSTILE = [
    "---",
    "# A heading from the description",
    "```",
    "~~~",
    "````python",
    "</details>",
    "</summary>",
    "<script>alert(1)</script>",
    "<details><summary>x",
    "Title\n===",
    "Title\n---\nmore",
    "> quoted\n>> twice",
    "| a | b |\n|---|---|",
    "1. list\n- item\n* star\n+ plus",
    "    indented code",
    "<!-- open comment",
    "text with /abs/path/file.jsonl and a `tick` and ``` three",
]


class _Structure(HTMLParser):
    """Opened/closed details and summary in order, every heading, every script, every code block."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.headings: list[str] = []
        self.scripts = 0
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("details", "summary"):
            self.stack.append(tag)
        if tag == "script":
            self.scripts += 1
        if re.fullmatch(r"h[1-6]", tag):
            self._in_heading = True
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("details", "summary"):
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            else:
                self.stack.pop()
        if re.fullmatch(r"h[1-6]", tag):
            self._in_heading = False

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings[-1] += data


def _structure(markdown: str) -> _Structure:
    parser = _Structure()
    parser.feed(MarkdownIt("commonmark").enable("table").render(markdown))
    parser.close()
    return parser


def _card_files(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _recipe(description: str, row_text: str) -> dict[str, Any]:
    return {
        "name": "hostile", "description": description,
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "/data/my_rows.jsonl", "split": "train"},
        "template": {"name": "fingpt_sentiment", "chat_template": False},
        "training": {"learning_rate": 1e-3, "seed": 1},
        "evaluation": {"path": "/data/heldout.jsonl"},
        "output": {"dir": "runs/x"},
    }


def _manifest(row_text: str) -> dict[str, Any]:
    return {"recipe": "hostile", "data": {"fingerprint": "ab", "train_rows": 10},
            "train": {"global_step": 3, "effective_batch": 2},
            "example": {"row": {"instruction": "Classify.", "input": row_text},
                        "prompt": f"Instruction: Classify.\nInput: {row_text}\nAnswer:", "chat_template": False,
                        "system": None},
            "plan": [{"setting": "training.precision", "value": "fp32", "reason": f"why: {row_text}",
                      "automatic": True}],
            "libraries": {"peft": "0.21.2"}}


REPORT = {"data": "/data/heldout.jsonl </details> <script>", "rows": 4, "rows_fingerprint": "f0`0d",
          "settings": {"scorer": "likelihood"},
          "metrics": {"n": 4, "accuracy": 0.5, "macro_f1": 0.4, "weighted_f1": 0.45,
                      "per_class": {"</summary># x": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}}},
          "base_metrics": None}


def _clean_headings(tmp_path: Path) -> list[str]:
    return _structure(card_text(_card_files(tmp_path), _manifest("plain"), _recipe("plain", "plain"), REPORT)
                      ).headings


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_recipe_and_row_text_cannot_change_the_card(tmp_path: Path, text: str) -> None:
    folder = _card_files(tmp_path)
    markdown = card_text(folder, _manifest(text), _recipe(text, text), REPORT)
    card = ModelCard(markdown)  # the metadata still parses, as the hub reads it
    assert card.data.library_name == "peft" and "finsft" in card.data.tags
    (folder / "README.md").write_text(markdown, encoding="utf-8")
    assert ModelCard.load(folder / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    parsed = _structure(card.text)
    assert parsed.errors == [] and parsed.stack == [], parsed.errors or parsed.stack
    assert parsed.scripts == 0
    assert parsed.headings == _clean_headings(tmp_path)  # no heading added, none swallowed by an open fence
    assert "</details>" in markdown and "</summary>" in markdown


def test_path_scrubber_keeps_closing_tags_and_entities() -> None:
    text = "<details><summary>x</summary>\n\n</details> &lt;/script&gt; </script>"
    assert portable(text) == text
    assert portable("see /home/me/data/tfns.jsonl, (/x/y.json) `~/m/smol`") == "see tfns.jsonl, (y.json) `smol`"


def test_fences_and_code_spans_outlast_the_text() -> None:
    assert fence("a ``` b ````` c", "json") == ["``````json", "a ``` b ````` c", "``````"]
    assert fence("plain") == ["```", "plain", "```"]
    assert code_span("a`b") == "`` a`b ``" and code_span("x") == "`x`"
    assert quote("# h\n---\n<b>") == ["> \\# h", "> \\---", "> &lt;b&gt;"]
