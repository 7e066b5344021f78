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
    warning: str | None = None  # an ambiguous layout: what the run will do, and how to get something else

    def describe(self) -> str:
        """The format, the template, why, and what the loss covers (and the warning), for people."""
        text = f"{self.name}, template '{self.template}': {self.reason}; the loss covers {self.loss}"
        return text + (f". Warning: {self.warning}" if self.warning else "")


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

    def found(template: str, why: str, warning: str | None = None) -> DataFormat:
        name, loss, group_by = FORMATS[template]
        return DataFormat(name, template, loss, group_by, why, warning)

    if "prompt" in cols and "completion" in cols:
        if conversational:
            return found("chat_prompt_completion", f"columns prompt and completion hold lists of messages "
                                                   f"(columns: {shown})")
        return found("prompt_completion", f"columns prompt and completion (columns: {shown})")
    if "messages" in cols and (conversational or first is None):
        return found("chat", f"column messages holds a list of messages (columns: {shown})")
    if "text" in cols:
        label = next((c for c in LABEL_COLUMNS if c in cols), None)
        warning = None if label is None else (
            f"the column '{label}' is not used: TRL trains on 'text' alone (language modelling, loss on every token). "
            f"For a classifier, name a template and map the columns, e.g. template.name \"fingpt_sentiment\" with "
            f"data.columns = {{\"input\": \"text\", \"output\": \"{label}\"}} (and data.label_map for numeric labels)")
        return found("text", f"column text (columns: {shown})", warning)
    if "input" in cols and "output" in cols:
        return found(DEFAULT_TEMPLATE, f"columns input and output (columns: {shown})")
    return None


# Columns that hold a class next to a ``text`` column (a classification file that TRL would read as plain text).
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "target", "output", "answer")


def format_problem(source: str, columns: Sequence[str], first: Mapping[str, Any] | None) -> str | None:
    """The specific reason a table matches no format, when it is a near miss: conversations stored as JSON text,
    an empty first conversation (the first row decides, as in TRL), column names with spaces around them."""
    row = dict(first or {})
    for key in ("messages", "prompt", "completion"):
        value = row.get(key)
        if key in columns and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            return (f"{source}, first row: '{key}' holds text that looks like JSON ({value[:60]!r}), not a list of "
                    f"{{\"role\", \"content\"}} messages: the conversation was saved as a string. Store the list "
                    f"itself (json.loads each value when preparing the file, then write the rows with json.dumps)")
        if key in columns and isinstance(value, list) and not value:
            return (f"{source}, first row: '{key}' is an empty list. finsft, like TRL, reads the data format from "
                    f"the first row: give it a conversation (a list of {{\"role\", \"content\"}} messages) or "
                    f"remove the empty row")
    padded = {c: c.strip() for c in columns if isinstance(c, str) and c != c.strip()}
    if padded:
        fixed = [padded.get(c, c) for c in columns]
        fmt = detect_format(fixed, {padded.get(k, k): v for k, v in row.items()})
        if fmt is not None:
            names = ", ".join(f"{c!r}" for c in padded)
            mapping = json.dumps({v: k for k, v in padded.items()})
            return (f"{source}: the column name(s) {names} have spaces around them (a CSV header written as "
                    f"'a, b'?), so they match no format; with the spaces removed this is {fmt.name}. Rename them "
                    f"in the header, or map them with data.columns = {mapping}")
    return None


def unknown_format_message(source: str, columns: Sequence[str], first: Mapping[str, Any] | None = None) -> str:
    specific = format_problem(source, columns, first)
    if specific:
        return specific
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
