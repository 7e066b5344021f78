"""TRL's dataset formats, recognised the way TRL recognises them, so a recipe without a template name trains on
them as TRL's SFTTrainer would.

TRL looks at a dataset's columns and its first example (``trl.data_utils.is_conversational``: a ``prompt``,
``completion`` or ``messages`` value that is a list of ``{"role", ...}`` objects is conversational):

- ``prompt`` + ``completion`` -> prompt-completion (standard: text; conversational: lists of messages), loss on
  the completion;
- ``messages`` (conversational) -> loss on the assistant turns (finsft's chat template);
- ``text`` -> language modelling (``dataset_text_field``), loss on every token.

finsft's own FinGPT rows (``input`` + ``output``, ``instruction`` optional) keep the default template. Light on
purpose (the standard library only): ``finsft validate`` sniffs the first rows of a local JSON/JSONL/CSV file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finsft.files import UnreadableFile, open_readable

# How many characters of a .json file are read to find its first object (a JSON array of rows).
SNIFF_CHARS = 1 << 20
DEFAULT_TEMPLATE = "fingpt_sentiment"


@dataclass(frozen=True)
class DataFormat:
    """A recognised data format: the template that trains on it, and why."""

    name: str  # TRL's name of the format, for people
    template: str  # the registered template that formats it
    loss: str  # what the loss covers
    group_by: str  # the field whose unique values keep repeated rows on one side of a validation split
    reason: str  # the columns that decided it


FORMATS = {
    "prompt_completion": ("prompt-completion (TRL, standard)", "the completion (and end of sequence)", "prompt"),
    "chat_prompt_completion": ("prompt-completion (TRL, conversational)", "the completion's assistant turns",
                               "prompt"),
    "chat": ("conversational (TRL 'messages')", "the assistant turns", "messages"),
    "text": ("language modelling (TRL 'text')", "every token", "text"),
    DEFAULT_TEMPLATE: ("FinGPT instruction/input/output rows", "the output (the label)", "input"),
}

ACCEPTED = ("prompt + completion (TRL prompt-completion: text, or lists of messages in both), messages (TRL "
            "conversational: a list of {role, content}), text (TRL language modelling), or input + output with an "
            "optional instruction (FinGPT rows)")


def _is_messages(value: Any) -> bool:
    """TRL's test for a conversational value: a list whose first item is an object with a 'role'."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], Mapping) and "role" in value[0]


def detect_format(columns: Sequence[str], first: Mapping[str, Any] | None,
                  mapping: Mapping[str, str] | None = None) -> DataFormat | None:
    """The format of a table with ``columns`` whose first row is ``first`` (None when unknown); ``mapping`` is
    data.columns (field -> column), applied first. None when no format matches."""
    inverse = {col: field for field, col in (mapping or {}).items()}
    cols = [inverse.get(c, c) for c in columns]
    for field in (mapping or {}):  # a mapped field counts even when the file could not be read
        if field not in cols:
            cols.append(field)
    row = {inverse.get(k, k): v for k, v in (first or {}).items()}
    conversational = any(_is_messages(row.get(k)) for k in ("prompt", "completion", "messages"))
    shown = ", ".join(columns) if columns else ", ".join(cols)

    def found(template: str, why: str) -> DataFormat:
        name, loss, group_by = FORMATS[template]
        return DataFormat(name, template, loss, group_by, why)

    if "prompt" in cols and "completion" in cols:
        if conversational:
            return found("chat_prompt_completion", f"columns prompt and completion hold lists of messages "
                                                   f"(columns: {shown})")
        return found("prompt_completion", f"columns prompt and completion (columns: {shown})")
    if "messages" in cols and (conversational or first is None):
        return found("chat", f"column messages holds a list of messages (columns: {shown})")
    if "text" in cols:
        return found("text", f"column text (columns: {shown})")
    if "input" in cols and "output" in cols:
        return found(DEFAULT_TEMPLATE, f"columns input and output (columns: {shown})")
    return None


def unknown_format_message(source: str, columns: Sequence[str]) -> str:
    return (f"{source}: its columns ({', '.join(columns) or 'none'}) match no data format finsft recognises "
            f"without a template name. Accepted: {ACCEPTED}. Rename the columns, map them with data.columns (e.g. "
            "{\"prompt\": \"question\", \"completion\": \"answer\"}), or name a template in template.name "
            "(`finsft templates` lists them)")


def sniff_local(path: str) -> tuple[list[str], dict[str, Any] | None] | None:
    """(columns, first row) of a local .jsonl/.json/.csv file, read with the standard library; None when the
    file is of another kind, missing, unreadable or without columns (the run decides once the data is loaded)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".jsonl", ".json", ".csv") or not os.path.isfile(path):
        return None
    try:
        with io.TextIOWrapper(open_readable(path, "data file"), encoding="utf-8",
                              newline="" if suffix == ".csv" else None) as f:
            if suffix == ".csv":
                reader = csv.DictReader(f)
                first_csv = next(reader, None)
                if not reader.fieldnames:
                    return None
                return list(reader.fieldnames), dict(first_csv) if first_csv else None
            text = f.read(SNIFF_CHARS)
    except (OSError, UnicodeDecodeError, csv.Error, UnreadableFile):
        return None
    row = _first_json_row(text)
    return (list(row), row) if row else None  # no row, or an empty one: the run reports it


def _first_json_row(text: str) -> dict[str, Any] | None:
    """The first object of JSON lines, or of a JSON array of objects."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        start = len(text) - len(text[start + 1:].lstrip())
    try:
        value, _ = decoder.raw_decode(text, start)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
