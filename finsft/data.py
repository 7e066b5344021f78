"""Build the training and validation data: load (hub id or local JSON/JSONL/CSV/Parquet), map columns, check,
shuffle, split by unique input, cap, balance; then format with the template and tokenize.

Tokenized data carries ``input_ids`` and ``completion_mask`` (1 on completion tokens, end-of-sequence included), so
TRL's SFTTrainer trains on it as is, and is cached by a fingerprint of (data, template, tokenizer, max_length).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from finsft.errors import DataError
from finsft.files import UnreadableFile, check_readable, open_readable
from finsft.recipe import Recipe
from finsft.templates import LABEL_SETS, Template

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Tokens kept from the end of an over-long prompt: the answer cue ("...Answer:") must survive truncation.
PROMPT_TAIL = 16
# Part of the prepared-data cache key: bump it when tokenize_rows changes what it produces.
PREP_VERSION = 5
# Texts per tokenizer call: big batches for the fast tokenizers' parallel encoding, bounded memory.
TOKENIZE_CHUNK = 20_000


@dataclass
class Splits:
    train: Any  # datasets.Dataset of template fields
    validation: Any | None
    fingerprint: str  # of the source data
    # Each source read: path, name, split, rows (read), rows_used (after its fraction), fraction, fingerprint.
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    overlap: EvalInputs | None = None  # the leak guard's counts, when it ran


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open_readable(path, "data file") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_text_file(path: str) -> tuple[str, bool]:
    """(sha256 of the file, whether it has any non-blank character), reading it once. A text data file must be
    UTF-8: Arrow's readers do not check, and a bad byte would surface later as a UnicodeDecodeError deep inside a
    library, so the first one is reported here with its line and byte offset."""
    h = hashlib.sha256()
    carry = b""  # the start of a multi-byte character cut by the block boundary
    offset = 0  # of `carry` in the file
    lines = 0  # newlines before `carry`
    content = False
    with open_readable(path, "data file") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            data = carry + block
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as exc:
                if exc.end < len(data) or len(data) - exc.start > 3:
                    _not_utf8(path, data, exc.start, offset, lines)
                good = exc.start  # an incomplete character at the end: decide with the next block
            content = content or bool(data[:good].strip())
            lines += data.count(b"\n", 0, good)
            offset += good
            carry = data[good:]
    if carry:
        _not_utf8(path, carry, 0, offset, lines)
    return h.hexdigest(), content


def _not_utf8(path: str, data: bytes, pos: int, offset: int, lines: int) -> None:
    line = lines + data.count(b"\n", 0, pos) + 1
    raise DataError(
        f"data file '{path}' is not UTF-8 text: byte 0x{data[pos]:02x} at line {line} (byte offset {offset + pos}) "
        "is not valid UTF-8. Save the file with UTF-8 encoding (e.g. in your editor's 'Save with encoding', or "
        "`iconv -f latin1 -t utf-8 in > out`), or with pandas: df.to_json(path, orient='records', lines=True, "
        "force_ascii=False)")


def looks_like_local_file(path: str) -> bool:
    """Whether a data reference is meant as a local file rather than a hub dataset id: it has a data file suffix
    or starts like a path (/, ./, ../, ~)."""
    return path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.splitext(path)[1].lower() in LOADERS


def load_table(path: str, split: str) -> tuple[Any, str]:
    """A ``datasets.Dataset`` from a local file or a hub dataset id, and a fingerprint of its content."""
    import datasets

    if os.path.isabs(path) or looks_like_local_file(path):
        given, path = path, os.path.abspath(os.path.expanduser(path))
        try:  # the reading gate: a regular file (a FIFO, a device or a socket is refused without opening it)
            check_readable(path, "data file")
        except UnreadableFile as exc:
            if not os.path.exists(path):
                raise DataError(f"data file '{given}' not found: {path} does not exist. Check the path (relative "
                                "paths on the command line start from the current folder, in a recipe from the "
                                "recipe's folder)") from None
            if os.path.isdir(path):
                raise DataError(f"data file '{given}' is a folder: name a .jsonl/.json/.csv/.parquet file in "
                                "it") from None
            raise DataError(str(exc)) from None
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in LOADERS:
            raise DataError(f"data file '{path}': unsupported type '{suffix}' (use {', '.join(LOADERS)})")
        if os.path.getsize(path) == 0:
            raise DataError(f"data file '{path}' is empty: it has no rows")
        try:
            if suffix == ".parquet":
                digest = _file_digest(path)
            else:
                digest, content = scan_text_file(path)
                if not content:
                    raise DataError(f"data file '{path}' is empty: it has no rows (only blank lines)")
        except UnreadableFile as exc:
            raise DataError(str(exc)) from None
        except OSError as exc:
            raise DataError(f"cannot read data file '{path}': {exc.strerror or exc}") from exc
        try:
            ds = datasets.load_dataset(LOADERS[suffix], data_files=path, split="train")
        except Exception as exc:  # datasets raises many types for malformed files
            if "corresponds to no data" in str(exc):
                raise DataError(f"data file '{path}' is empty: it has no rows") from exc
            raise DataError(f"cannot read data file '{path}': {exc}") from exc
        return ds, digest
    ds = load_hub_dataset(path, split, what=f"'{path}'", fix="set data.path to a local .jsonl/.csv/.parquet file")
    return ds, str(getattr(ds, "_fingerprint", path))


def load_hub_dataset(path: str, split: str, *, what: str, fix: str, name: str | None = None,
                     data_dir: str | None = None, data_files: Any = None) -> Any:
    """``datasets.load_dataset`` with errors for people: a missing split or configuration, or a dataset that is
    neither cached nor reachable. ``what`` names the source in messages, ``fix`` says what else to do."""
    import datasets

    try:
        return datasets.load_dataset(path, name=name, data_dir=data_dir, data_files=data_files, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"dataset {what} has no split '{split}': {exc}") from exc
        if "config" in str(exc).lower():
            raise DataError(f"dataset {what}: {exc}. Set the source's 'name' to one of its configurations") from exc
        raise DataError(f"cannot load dataset {what}: {exc}") from exc
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, FileNotFoundError...
        raise DataError(
            f"cannot load dataset {what} (split '{split}'): it is not in the local Hugging Face cache and the hub "
            f"cannot be reached (HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE', 'unset')}), or it does "
            f"not exist. Download it where the hub is reachable, or {fix}. ({type(exc).__name__}: {exc})") from exc


def to_template_rows(ds: Any, template: Template, columns: Mapping[str, str], source: str, *,
                     section: str = "data", path: str | None = None) -> Any:
    """Keep and rename the columns the template reads; clear errors for missing columns, an empty table and
    values that are not text; chat data: every conversation checked (finsft.chat), bad ones named by their line
    in ``path``. ``section`` is the recipe key whose ``columns`` map this source (``data``,
    ``data.datasets[1]``, ``evaluation.sets.NAME``): hints name it."""
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty: it has no rows")
    have = list(ds.column_names)
    mapping = {field: columns.get(field, field) for field in template.fields}
    missing = {field: col for field, col in mapping.items() if col not in have and field not in template.defaults}
    if missing:
        raise DataError(missing_columns_message(source, missing, mapping, have, columns, f"{section}.columns",
                                                template.messages_field))
    present = {col: field for field, col in mapping.items() if col in have}
    # A chat template's messages field holds the conversation (a list of turns), as do both fields of
    # conversational prompt-completion data; every other field is text.
    ds = text_columns(ds, {c: f for c, f in present.items()
                           if f != template.messages_field and not template.conversational}, source)
    ds = ds.select_columns(list(present))
    if any(col != field for col, field in present.items()):
        ds = ds.rename_columns({c: f for c, f in present.items() if c != f})
    for field in template.fields:
        if field not in ds.column_names:  # optional field with a default, absent from the data
            ds = ds.add_column(field, [template.defaults[field]] * len(ds))
    if template.messages_field:
        from finsft.chat import check_conversations

        # Decoded values: a column mixing text and other content is stored as JSON text, which ``column`` returns
        # as is (a number would pass as its digits, a list of parts as its JSON).
        check_conversations(ds[template.messages_field][:], source, path)
    return check_targets(ds, template, source, path, section)


def note(text: str) -> None:
    """A word about the data (rows dropped, one class) on stderr (a command's JSON output on stdout stays JSON),
    from the first rank only; light (rich, no transformers): the preflight prints it before any heavy import."""
    from rich.console import Console

    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    Console(highlight=False, soft_wrap=True, quiet=rank not in ("", "0"), stderr=True).print(
        text, markup=False)


def _target_problem(template: Template, field: str, value: Any, csv_file: bool) -> str | None:
    """Why a row's target (completion, answer, text) cannot be trained on: "empty" when it is empty (dropped), a
    sentence when it is wrong (refused), None when it is fine."""
    if value is None:
        return "empty" if csv_file else (f"'{field}' is null: give the answer as text"
                                         + (" (a list of assistant messages)" if template.conversational else "")
                                         + ", or remove the row")
    if not template.conversational:
        return None if str(value).strip() else "empty"
    if not isinstance(value, list):
        return (f"'{field}' holds {type(value).__name__}, not a list of {{\"role\", \"content\"}} messages "
                "(TRL's conversational prompt-completion)")
    if not value:
        return "empty"
    for i, msg in enumerate(value):
        role = msg.get("role") if isinstance(msg, Mapping) else None
        if role != "assistant":
            return (f"{field} turn {i} has role {role!r}: the {field} holds the answer, assistant turns only; move "
                    f"the {role or 'other'} turns into 'prompt'")
    if not any(str(m.get("content") or "").strip() for m in value):
        return "empty"
    return None


def check_targets(ds: Any, template: Template, source: str, path: str | None = None,
                  section: str = "data") -> Any:
    """The rows' targets (the completion, answer or text the loss covers and scores compare with): a null one, or a
    conversational completion that is not assistant turns, is refused with its line; empty ones are dropped with
    a count (they would train only the end-of-sequence token and score nothing), or refused when every row's is
    empty."""
    from finsft.chat import SHOWN, jsonl_lines

    field = template.label_field
    if template.messages_field or field not in ds.column_names or field in template.defaults:
        return ds
    csv_file = bool(path) and str(path).lower().endswith(".csv")
    empty: list[int] = []
    bad: list[tuple[int, str]] = []
    for row, value in enumerate(column(ds, field), start=1):
        why = _target_problem(template, field, value, csv_file)
        if why == "empty":
            empty.append(row)
        elif why:
            bad.append((row, why))
    if bad:
        lines = jsonl_lines(path, [r for r, _ in bad[:SHOWN]]) or {}
        shown = "\n  ".join(f"{source}, {f'line {lines[r]}' if r in lines else f'row {r}'}: {why}"
                            for r, why in bad[:SHOWN])
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DataError(f"{len(bad)} of {len(ds)} rows in {source} cannot be trained:\n  {shown}{more}")
    if empty and len(empty) == len(ds):
        raise DataError(f"{source}: every row's '{field}' is empty ({len(ds)} rows): there is nothing to learn or to "
                        f"score. Fill in the answers, or map '{field}' to the column that holds them with "
                        f"{section}.columns")
    if empty:
        lines = jsonl_lines(path, empty[:3]) or {}
        first = ", ".join(f"line {lines[r]}" if r in lines else f"row {r}" for r in empty[:3])
        note(f"note: {source}: {len(empty)} of {len(ds)} rows have an empty '{field}' (first: {first}) and are left "
             "out: an empty answer trains only the end-of-sequence token and scores nothing")
        drop = set(empty)
        ds = ds.select([i for i in range(len(ds)) if i + 1 not in drop])
    return ds


# Column names under which conversations are commonly stored (ShareGPT, UltraChat, ...).
CONVERSATION_COLUMNS = ("conversations", "conversation", "chat", "dialog", "dialogue", "turns")


def missing_columns_message(source: str, missing: Mapping[str, str], mapping: Mapping[str, str],
                            have: Sequence[str], columns: Mapping[str, str], key: str = "data.columns",
                            messages_field: str | None = None) -> str:
    """Which template fields have no column, and the ``key`` entry (data.columns, data.datasets[i].columns,
    evaluation.sets.NAME.columns) that would fix each (the file's closest unused column when there is one). Chat
    data (``messages_field``) is mapped only to a column that holds conversations."""
    import difflib

    if messages_field and messages_field in missing:
        conv = [c for c in have if c.lower() in CONVERSATION_COLUMNS]
        msg = (f"{source}: no '{missing[messages_field]}' column; the file has columns: {', '.join(have)}. The "
               f"'chat' template reads conversations: a list of {{\"role\", \"content\"}} messages per row "
               f"(roles system/user/assistant).")
        if conv:
            return msg + f" Did you mean {key} = {json.dumps({messages_field: conv[0]})}?"
        return msg + (" Write each row as {\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": "
                      "\"assistant\", \"content\": ...}]}, or, for prompt/answer text columns, use a text template "
                      "(finsft templates lists them; template.name \"custom\" with template.prompt and "
                      "template.completion fits any columns)")

    used = {col for field, col in mapping.items() if field not in missing}
    free = [c for c in have if c not in used]
    parts, fix = [], {}
    for field, col in missing.items():
        named = f", as {key} says" if field in columns else ""
        parts.append(f"'{col}' (for template field '{field}'){named}")
        close = difflib.get_close_matches(col, free, n=1, cutoff=0.6) or difflib.get_close_matches(
            field, free, n=1, cutoff=0.6)
        if close:
            fix[field] = close[0]
            free.remove(close[0])
    unfixed = [f for f in missing if f not in fix]
    if len(unfixed) == 1 and len(free) == 1:  # one field without a column, one column unused: that is the one
        fix[unfixed[0]] = free[0]
    msg = f"{source}: missing column {', '.join(parts)}; the file has columns: {', '.join(have)}."
    if fix:
        example = json.dumps({**{k: v for k, v in columns.items() if k not in missing}, **fix})
        return msg + f" Did you mean {key} = {example}?"
    field = next(iter(missing))
    return msg + (f" Map each field to one of the file's columns with {key}, e.g. "
                  f"{{\"{field}\": \"{(free or list(have))[0]}\"}}.")


def text_columns(ds: Any, present: Mapping[str, str], source: str) -> Any:
    """Template fields are text: a list or object value would be rendered as its Python repr, so it is refused
    (naming the row). A column mixing text and numbers (Arrow reads it as JSON text, quotes included) becomes
    text."""
    import datasets

    for col, field in present.items():
        feature = ds.features[col]
        if isinstance(feature, datasets.Value) or not isinstance(
                feature, (dict, list, datasets.List, datasets.LargeList, datasets.Json)):
            continue  # text, numbers, booleans, class labels
        values = ds[col][:]  # decoded Python values
        bad = next((i for i, v in enumerate(values) if isinstance(v, (list, dict))), None)
        if bad is not None:
            kind = "an object" if isinstance(values[bad], dict) else "a list"
            raise DataError(f"{source}: row {bad + 1}, column '{col}' (template field '{field}') holds {kind}, "
                            f"not text: the template needs a string there. Join or pick the value when preparing "
                            f"the data (e.g. \" \".join(...)), or map the field to another column with data.columns")
        ds = ds.remove_columns(col).add_column(col, [None if v is None else str(v) for v in values])
    return ds


def map_labels(ds: Any, template: Template, label_map: Mapping[str, str] | None, source: str) -> Any:
    """The label column in the template's labels: a ClassLabel column's integers become its own names, then
    ``label_map`` (data.label_map and the like) maps a value, by its text ("2") or its class name ("Bearish"), to a
    template label. Values it does not name stay as they are (check_labels reports those outside the label set)."""
    import datasets

    field = template.label_field
    if not template.labels or field not in ds.column_names:
        return ds
    feature = ds.features[field]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    label_map = dict(label_map or {})
    if names is None and not label_map:
        return ds

    def one(value: Any) -> Any:
        if value is None:
            return None
        text = str(value).strip()
        if text in label_map:
            return label_map[text]
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            return label_map.get(names[value], names[value])
        return text

    mapped = [one(v) for v in column(ds, field)]
    return ds.remove_columns(field).add_column(field, mapped)


def check_labels(ds: Any, template: Template, source: str, key: str = "template.labels",
                 fix: str = "data.label_map") -> None:
    """Every label is one of the template's; otherwise an error naming the values, their counts and the settings
    that fix it: ``key`` picks the label set (template.labels, a set's labels), ``fix`` maps values
    (data.label_map, a source's or a set's own label_map)."""
    if not template.labels:
        return
    counts = Counter(str(v).strip() for v in column(ds, template.label_field))
    unknown = {k: v for k, v in counts.items() if k not in template.labels}
    if unknown:
        ranked = sorted(unknown.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"'{k}' ({v} rows)" for k, v in ranked[:8])
        hint = ""
        for name, labels in LABEL_SETS.items():
            if set(counts) <= set(labels) and tuple(labels) != template.labels:
                hint = f" These are the '{name}' labels: set {key} to \"{name}\"."
        if not hint:
            hint = " " + label_map_hint([k for k, _ in ranked[:8]], template.labels, fix)
        raise DataError(f"{source}: labels outside the template's label set ({'/'.join(template.labels)}): "
                        f"{shown}.{hint}")


def label_map_hint(values: Sequence[str], labels: Sequence[str], fix: str) -> str:
    """How to map label values to the template's labels with ``fix`` (a label_map), e.g. for integer labels."""
    lowered = {label.lower(): label for label in labels}
    example = {v: lowered.get(v.lower(), "?") for v in values}
    unsure = "?" in example.values()
    return (f"Map them to the template's labels with {fix}, e.g. {json.dumps(example)}"
            + (f" (each ? one of: {', '.join(labels)}; the dataset's card says what each value means)"
               if unsure else "") + ".")


def column(ds: Any, name: str) -> list[Any]:
    """One column of a ``datasets.Dataset`` as a list, read through Arrow (iterating ``ds[name]`` item by item is
    ~20x slower on large sets)."""
    return list(ds.with_format("arrow")[name].to_pylist())


def normalise_text(value: Any) -> str:
    """A row's input as the leak guard compares it: Unicode NFKC, case folded, whitespace collapsed (a
    conversation or other non-text value: its JSON)."""
    import unicodedata

    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass
class EvalInputs:
    """The inputs of every evaluation set, normalised (finsft.evaluation.leak builds it): training rows whose
    ``field`` value is among them overlap the evaluation data. ``drop``: leave them out (data.drop_eval_overlap)."""

    field: str
    drop: bool
    sets: dict[str, set[str]]  # set name -> its normalised inputs
    checked: dict[str, int] = dataclasses.field(default_factory=dict)  # set name -> rows compared
    unchecked: dict[str, str] = dataclasses.field(default_factory=dict)  # set name -> why it could not be read
    by_source: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # filled by apply()

    def apply(self, rows: Any, source: str) -> Any:
        """``rows`` without (``drop``) or with the rows that overlap; counts them under ``source``."""
        if not self.sets or self.field not in rows.column_names:
            return rows
        keys = [normalise_text(v) for v in column(rows, self.field)]
        hits = [i for i, k in enumerate(keys) if any(k in inputs for inputs in self.sets.values())]
        per_set = {name: sum(1 for i in hits if keys[i] in inputs) for name, inputs in self.sets.items()}
        self.by_source[source] = {"rows": len(rows), "overlapping": len(hits),
                                  "dropped": len(hits) if self.drop else 0,
                                  "by_set": {k: v for k, v in per_set.items() if v}}
        if not (self.drop and hits):
            return rows
        distinct = len({keys[i] for i in hits})
        if len(hits) == len(rows) and distinct * 2 <= len(hits):  # few values, each on many rows: group_by's doing
            shared = ", ".join(repr(v[:40]) for v in sorted({keys[i] for i in hits})[:3])
            raise DataError(
                f"{source}: the leak guard compares rows by data.group_by ('{self.field}'), and its {len(rows):,} rows "
                f"share {distinct:,} value{'s' if distinct != 1 else ''} of it ({shared}{', ...' if distinct > 3 else ''}) "
                "that the evaluation data has too, so every row looks like an evaluation row. data.group_by should "
                "name the field that identifies a row's text (e.g. 'input', or 'prompt'), not one every row repeats "
                "(an instruction): set data.group_by to it, or set data.drop_eval_overlap to false")
        if len(hits) == len(rows):
            raise DataError(
                f"{source}: every one of its {len(rows):,} rows has its {self.field} in the evaluation data ({', '.join(f'{k}: {v:,}' for k, v in per_set.items() if v)}): the training data is an "
                "evaluation set, or is held in one. Evaluate on rows the model does not train on, or set "
                "data.drop_eval_overlap to false to train on them anyway")
        gone = set(hits)
        return rows.select([i for i in range(len(rows)) if i not in gone])

    def report(self) -> dict[str, Any]:
        """For manifest.json: what was compared and what overlapped, per source and per set."""
        by_set: dict[str, int] = {}
        for info in self.by_source.values():
            for name, n in info["by_set"].items():
                by_set[name] = by_set.get(name, 0) + n
        return {"drop": self.drop, "field": self.field,
                "compared": "Unicode NFKC, case folded, whitespace collapsed",
                "checked": self.checked, "unchecked": self.unchecked,
                "overlapping": sum(i["overlapping"] for i in self.by_source.values()),
                "dropped": sum(i["dropped"] for i in self.by_source.values()),
                "by_set": by_set, "by_source": self.by_source}

    def summary(self) -> tuple[str, bool]:
        """One console line, and whether it is a warning (overlapping rows that are trained on)."""
        r = self.report()
        checked = ", ".join(f"{name} ({n:,})" for name, n in self.checked.items())
        if not r["overlapping"]:
            return f"leak guard: no training input appears in the evaluation data (checked {checked})", False
        sets = ", ".join(f"{name}: {n:,}" for name, n in r["by_set"].items())
        sources = ", ".join(f"{src}: {i['overlapping']:,} of {i['rows']:,}" for src, i in self.by_source.items()
                            if i["overlapping"])
        if self.drop:
            return (f"leak guard: dropped {r['dropped']:,} training rows whose {self.field} appears in the evaluation "
                    f"data (by set: {sets}; by source: {sources}); data.drop_eval_overlap=false keeps them"), False
        return (f"{r['overlapping']:,} training rows have their {self.field} in the evaluation data (by "
                f"set: {sets}; by source: {sources}) and are trained on, as data.drop_eval_overlap is false: the "
                "scores on those sets will be too high"), True


def group_split(ds: Any, size: float, group_by: str, seed: int, source: str = "the training data") -> tuple[Any, Any]:
    """Split off a validation set of about ``size`` rows (or fraction) so no group_by value is in both parts."""
    if size >= 1 and int(size) >= len(ds):
        raise DataError(f"data.validation_size asks for {int(size)} validation rows but {source} has only "
                        f"{len(ds)} row{'s' if len(ds) != 1 else ''}, which would leave none to train on. "
                        f"Set data.validation_size below {len(ds)} (e.g. {max(1, len(ds) // 10)}) or to a fraction "
                        "such as 0.1, or give a separate data.validation_path")
    values = column(ds, group_by)
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(str(v), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    want = round(size * len(ds)) if size < 1 else int(size)
    want = max(1, min(want, len(ds) - 1))
    val_idx: list[int] = []
    for k in keys:
        if len(val_idx) >= want:
            break
        val_idx.extend(groups[k])
    val_set = set(val_idx)
    if len(val_set) >= len(ds):
        raise DataError(f"{source}: the validation split would take every row: its {len(ds)} rows have only "
                        f"{len(keys)} unique '{group_by}' value{'s' if len(keys) != 1 else ''} (rows sharing one "
                        "stay together). Add rows, lower data.validation_size, or give data.validation_path")
    train_idx = [i for i in range(len(ds)) if i not in val_set]
    return ds.select(train_idx), ds.select(sorted(val_idx))


def balance(ds: Any, field: str, mode: str, seed: int) -> Any:
    if mode == "none":
        return ds
    by_label: dict[str, list[int]] = {}
    for i, v in enumerate(column(ds, field)):
        by_label.setdefault(str(v), []).append(i)
    rng = random.Random(seed)
    target = (min if mode == "downsample" else max)(len(v) for v in by_label.values())
    idx: list[int] = []
    for rows in by_label.values():
        if len(rows) >= target:
            idx.extend(rng.sample(rows, target))
        else:
            idx.extend(rows + [rng.choice(rows) for _ in range(target - len(rows))])
    rng.shuffle(idx)
    return ds.select(idx)


def load_split(path: str, split: str, template: Template, columns: Mapping[str, str],
               label_map: Mapping[str, str] | None = None) -> tuple[Any, str]:
    """One data source as template rows, labels mapped (``label_map``, a ClassLabel's names) and checked."""
    ds, digest = load_table(path, split)
    ds = to_template_rows(ds, template, columns, path, path=path)
    ds = map_labels(ds, template, label_map, path)
    check_labels(ds, template, path)
    return ds, digest


def build_splits(recipe: Recipe, template: Template, exclude: EvalInputs | None = None) -> Splits:
    """The training and validation rows of a recipe with one source, ``data.path`` (a mixture of sources in
    ``data.datasets``: :func:`finsft.data_sources.build_splits`). ``exclude``: the leak guard's evaluation
    inputs, applied to the source before the validation split."""
    data = recipe.data
    path = data["path"]
    if not path:
        raise DataError("data.path is not set: name the training data (or a mixture in data.datasets)")
    train, digest = load_split(path, data["split"], template, data["columns"], data.get("label_map"))
    rows = len(train)
    if exclude is not None:
        train = exclude.apply(train, path)
    source = {"path": path, "name": None, "split": data["split"], "rows": rows, "rows_used": len(train),
              "fraction": 1, "fingerprint": digest}
    if rows != len(train):
        source["rows_dropped_eval_overlap"] = rows - len(train)
    splits = finish_splits(train, digest, recipe, template, path, exclude)
    splits.sources = [source]
    return splits


def one_class_warning(train: Any, template: Template, what: str, mapped: bool) -> None:
    """A classification set whose rows all carry one label trains a model that answers that label: said, with the
    setting that usually caused it."""
    if len(train) == 0 or not template.labels or len(template.labels) < 2:
        return
    labels = Counter(str(v).strip() for v in column(train, template.label_field))
    if len(labels) == 1:
        (label, n), = labels.items()
        cause = (" after data.label_map: check that it maps each value to its own label (the dataset's card says "
                 "what each value means)") if mapped else ""
        note(f"warning: {what}: all {n} training rows have the label '{label}'{cause}. The model would learn to "
             f"answer '{label}' to everything; the template's labels are {', '.join(template.labels)}")


def finish_splits(train: Any, digest: str, recipe: Recipe, template: Template, what: str,
                  exclude: EvalInputs | None = None) -> Splits:
    """Shuffle, the validation split (by unique group_by value), max_samples and class balance, on the rows of
    every source together; ``digest`` fingerprints the sources, ``exclude`` the rows the leak guard dropped."""
    data = recipe.data
    seed = recipe.training["seed"]
    if data["shuffle"]:
        train = train.shuffle(seed=seed)  # an index mapping: rewriting the table costs seconds on large sets
    validation = None
    if data["validation_path"]:
        validation, vdigest = load_split(data["validation_path"], data["split"], template, data["columns"],
                                         data.get("label_map"))
        digest = f"{digest}+{vdigest}"
    elif data["validation_size"]:
        train, validation = group_split(train, data["validation_size"], data["group_by"], seed, what)
    if data["max_samples"]:
        train = train.select(range(min(data["max_samples"], len(train))))
    if template.labels:
        train = balance(train, template.label_field, data["balance"], seed)
        one_class_warning(train, template, what, bool(data.get("label_map")))
    if len(train) == 0:
        raise DataError(f"{what}: no training rows left after the validation split")
    # data.datasets is absent (null) for one source: left out, so fingerprints from before mixtures still hold;
    # so is the leak guard's setting and what it dropped when it dropped nothing.
    settings = {k: v for k, v in data.items() if not (k == "datasets" and v is None) and k != "drop_eval_overlap"}
    dropped = exclude.report()["dropped"] if exclude is not None else 0
    key: list[Any] = [digest, settings, seed] + ([sorted((s, i["dropped"]) for s, i in exclude.by_source.items())]
                                                 if exclude is not None and dropped else [])
    fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Splits(train=train, validation=validation, fingerprint=fp, overlap=exclude)


# --------------------------------------------------------------------------------------------- formatting


@dataclass(frozen=True)
class Formatter:
    """Turns template rows into prompt/completion strings, with or without the tokenizer's chat template.

    Without a chat template the completion ends with the tokenizer's EOS token; with one, the rendered assistant
    turn ends with the template's end-of-turn token. Either way the model learns to stop.
    """

    template: Template
    tokenizer: Any
    chat: bool
    system: str | None

    def prompt(self, row: Mapping[str, Any]) -> str:
        if self.template.messages_field:  # chat data: the conversation up to its last assistant turn
            from finsft.chat import check_conversation, conversation_prompt, with_system

            messages = with_system(check_conversation(row[self.template.messages_field]), self.system)
            return conversation_prompt(self.tokenizer, messages)[0]
        if self.template.conversational:  # TRL's conversational prompt: rendered up to the assistant's turn
            from finsft.chat import with_system

            prompt = with_system(list(row["prompt"]), self.system)
            return str(self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        text = self.template.render_prompt(row)
        if not self.chat:
            return text
        return str(self.tokenizer.apply_chat_template(self._messages(text), tokenize=False,
                                                      add_generation_prompt=True))

    def completion(self, row: Mapping[str, Any]) -> str:
        return self.completion_text(self.template.render_completion(row), row)

    def completion_text(self, completion: str, row: Mapping[str, Any]) -> str:
        if not self.chat:
            if self.template.completion_apart:  # FinGPT's utils.py: the target stripped, then EOS; the
                # template's own leading space (fingpt_sentiment's " {output}") stays: the answer is a word
                completion = self.template.completion_lead + completion.strip()
            return completion + (self.tokenizer.eos_token or "")
        prompt_text = self.template.render_prompt(row)
        head = self.tokenizer.apply_chat_template(self._messages(prompt_text), tokenize=False,
                                                  add_generation_prompt=True)
        return self._chat_completion(prompt_text, str(head), completion)

    def pair(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """``(prompt(row), completion(row))``; with a chat template the prompt is rendered once for both."""
        if not self.chat:
            return self.prompt(row), self.completion(row)
        prompt_text = self.template.render_prompt(row)
        head = str(self.tokenizer.apply_chat_template(self._messages(prompt_text), tokenize=False,
                                                      add_generation_prompt=True))
        return head, self._chat_completion(prompt_text, head, self.template.render_completion(row))

    def _chat_completion(self, prompt_text: str, head: str, completion: str) -> str:
        full = self.tokenizer.apply_chat_template(
            [*self._messages(prompt_text), {"role": "assistant", "content": completion.strip()}], tokenize=False)
        if not full.startswith(head):
            raise DataError("the tokenizer's chat template renders the prompt differently with and without the "
                            "answer; set template.chat_template to false")
        return str(full[len(head):])

    def _messages(self, text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return [*msgs, {"role": "user", "content": text}]


def make_formatter(recipe: Recipe, template: Template, tokenizer: Any) -> Formatter:
    t = recipe.template
    conversations = bool(template.messages_field or template.conversational)
    if conversations and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"template '{template.name}' formats conversations with the tokenizer's chat template, and "
                        "this tokenizer has none")
    if t["chat_template"] and not getattr(tokenizer, "chat_template", None):
        raise DataError("template.chat_template is true but the tokenizer has no chat template")
    return Formatter(template, tokenizer, bool(t["chat_template"] or conversations), t["system"])


def encode_prompt(tokenizer: Any, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of prompts exactly as at inference: special tokens (BOS) only when no chat template adds them."""
    return list(tokenizer(texts, add_special_tokens=not chat)["input_ids"])


def _encode_unique(encode: Callable[[list[str]], Sequence[Sequence[int]]], texts: list[str]) -> tuple[Any, Any, Any]:
    """Tokenize each distinct text once (FinGPT's sets repeat rows), in big batches. Returns (flat token ids,
    start of each distinct text in them, its length) and, separately, each text's index among the distinct ones."""
    import numpy as np

    index: dict[str, int] = {}
    which = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
    distinct = list(index)
    flats, lengths = [], []
    for i in range(0, len(distinct), TOKENIZE_CHUNK):
        ids = encode(distinct[i:i + TOKENIZE_CHUNK])
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flats.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum())))
        lengths.append(lens)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return flat, starts[which], lens[which]


def _ragged(values: Any, starts: Any, lengths: Any) -> tuple[Any, Any]:
    """Concatenate ``values[starts[i]:starts[i] + lengths[i]]`` for every i, without a Python loop."""
    import numpy as np

    ends = np.cumsum(lengths)
    idx = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(ends - lengths - starts, lengths)
    return values[idx], ends


# Text that ends on a token boundary in every common tokenizer; see encode_continuation.
CONTINUATION_ANCHOR = "Answer:"


def encode_continuation(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of texts that continue a prompt (no special tokens), as the model sees them in context.

    Byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM2) encode " negative" alone exactly as after a prompt.
    SentencePiece-style tokenizers that prepend a dummy space (Llama-2, Mistral) encode it alone as
    ['▁', '▁negative'] but as ['▁negative'] after the prompt: for those, texts are encoded behind an anchor that
    ends on a token boundary and the anchor's tokens are dropped.
    """

    def plain(batch: list[str]) -> list[list[int]]:
        return list(tok(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"])

    anchor = plain([CONTINUATION_ANCHOR])[0]
    probe = " negative"
    in_context = plain([CONTINUATION_ANCHOR + probe])[0]
    if in_context[: len(anchor)] != anchor or in_context[len(anchor):] == plain([probe])[0]:
        return plain(texts)
    out = []
    for text, ids in zip(texts, plain([CONTINUATION_ANCHOR + t for t in texts]), strict=True):
        out.append(ids[len(anchor):] if ids[: len(anchor)] == anchor else plain([text])[0])
    return out


def encode_completions(formatter: Formatter, texts: list[str]) -> list[list[int]]:
    """Token ids of completions as training appends them to the prompt's ids.

    - ``completion_apart`` with a bare completion (``"{output}"``): tokenized apart, FinGPT's utils.py exactly
      (``tokenizer(target, add_special_tokens=False)``);
    - otherwise, and for an apart completion that starts with a space (fingpt_sentiment's ``" {output}"``): as a
      text's continuation (:func:`encode_continuation`), so the answer is a word with its leading-space marker
      (``Ġpositive``/``▁positive``) whatever the tokenizer, after the prompt's own tokens (its trailing space
      stays the separate token FinGPT's scoring prompt ends with).
    """
    tok = formatter.tokenizer
    if formatter.template.completion_apart and not formatter.chat and not formatter.template.completion_lead:
        return list(tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    return encode_continuation(tok, texts)


def tokenize_rows(rows: Any, formatter: Formatter, max_length: int | None, *, num_proc: int | None = None,
                  desc: str = "tokenizing", log: Callable[[str], None] | None = None) -> Any:
    """``input_ids`` + ``completion_mask`` for every row. Over-long rows lose the middle of the prompt (its head and
    its last PROMPT_TAIL tokens, the answer cue, stay), then the end of the completion.

    Prompt and completion are tokenized separately (the prompt exactly as at inference), each distinct text once, in
    batches of TOKENIZE_CHUNK through the fast tokenizer (which encodes a batch on every core); the rows are then
    assembled with numpy into an Arrow table. ``num_proc`` and ``desc`` are accepted for compatibility; the work
    runs in this process.
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    tok = formatter.tokenizer
    if formatter.template.messages_field:  # chat data: loss on assistant turns (finsft.chat)
        from finsft.chat import tokenize_conversations

        conversations = rows[formatter.template.messages_field][:]  # decoded (see to_template_rows)
        ids, masks = tokenize_conversations(tok, conversations, formatter.system, max_length, log)
        return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    if formatter.template.conversational:  # TRL's conversational prompt-completion: loss on the completion
        ids, masks = tokenize_chat_completions(tok, column(rows, "prompt"), column(rows, "completion"),
                                               formatter.system, max_length)
        return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    if formatter.template.language_modeling:  # TRL's language modelling: every token in the loss
        ids = tokenize_texts(tok, column(rows, formatter.template.label_field), max_length)
        return datasets.Dataset.from_dict({"input_ids": ids, "completion_mask": [[1] * len(i) for i in ids]})
    fields = [f for f in formatter.template.fields if f in rows.column_names]
    table = rows.select_columns(fields).with_format("arrow")[:]
    cols = [table.column(f).to_pylist() for f in fields]
    prompts: list[str] = []
    completions: list[str] = []
    for values in zip(*cols, strict=True):
        p, c = formatter.pair(dict(zip(fields, values, strict=True)))
        prompts.append(p)
        completions.append(c)
    del cols, table

    p_flat, p_start, p_len = _encode_unique(lambda t: encode_prompt(tok, t, formatter.chat), prompts)
    c_flat, c_start, c_len = _encode_unique(lambda t: encode_completions(formatter, t), completions)
    del prompts, completions
    head, tail_len, c_keep = p_len, np.zeros_like(p_len), c_len
    if max_length is not None:
        over = p_len + c_len > max_length
        c_keep = np.where(over, np.minimum(c_len, np.maximum(max_length - p_len, max_length // 2)), c_len)
        keep = max_length - c_keep
        tail = np.minimum(PROMPT_TAIL, np.maximum(keep, 0))
        head = np.where(over, np.maximum(keep - tail, 0), p_len)
        tail_len = np.where(over, tail, 0)
    # Every row is three segments of [prompt ids | completion ids]: prompt head, prompt tail, completion.
    pool = np.concatenate([p_flat, c_flat])
    starts = np.stack([p_start, p_start + p_len - tail_len, len(p_flat) + c_start], axis=1).reshape(-1)
    lengths = np.stack([head, tail_len, c_keep], axis=1).reshape(-1)
    ids, seg_ends = _ragged(pool, starts, lengths)
    mask = np.repeat(np.tile(np.array([0, 0, 1], dtype=np.int8), len(p_len)), lengths)
    row_ends = seg_ends[2::3] if len(seg_ends) else seg_ends
    large = len(ids) >= 2**31
    offsets = pa.array(np.concatenate([[0], row_ends]), pa.int64() if large else pa.int32())
    list_array = pa.LargeListArray if large else pa.ListArray
    out = pa.table({
        "input_ids": list_array.from_arrays(offsets, pa.array(ids, pa.int32())),
        "completion_mask": list_array.from_arrays(offsets, pa.array(mask, pa.int8())),
    })
    return datasets.Dataset(datasets.table.InMemoryTable(out))


def tokenize_texts(tok: Any, texts: list[Any], max_length: int | None) -> list[list[int]]:
    """Token ids of plain texts as TRL's language modelling tokenizes them: the tokenizer's special tokens (BOS),
    the text, and the end-of-sequence token; over-long texts lose their end."""
    eos = tok.eos_token_id
    out = []
    for ids in tok(["" if t is None else str(t) for t in texts])["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids[:max_length] if max_length is not None else ids)
    return out


def tokenize_chat_completions(tok: Any, prompts: Sequence[Any], completions: Sequence[Any], system: str | None,
                              max_length: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """TRL's conversational prompt-completion rows: prompt and completion messages rendered together with the
    chat template; a token is trained when it lies in an assistant turn of the completion (an assistant turn
    inside the prompt is context, as in TRL). Over-long rows lose their end."""
    from finsft.chat import assistant_spans, check_conversation, with_system

    ids_out: list[list[int]] = []
    mask_out: list[list[int]] = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True), start=1):
        where = f"row {row}"
        if not isinstance(prompt, list) or not isinstance(completion, list) or not completion:
            raise DataError(f"{where}: 'prompt' and 'completion' must both be lists of {{\"role\", \"content\"}} "
                            "objects (TRL's conversational prompt-completion format)")
        messages = with_system(check_conversation([*prompt, *completion], where), system)
        head = str(tok.apply_chat_template(messages[:len(messages) - len(completion)], tokenize=False,
                                           add_generation_prompt=True))
        text, spans = assistant_spans(tok, messages)
        spans = [(s, e) for s, e in spans if s >= len(head)]
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(start < e and end > s for s, e in spans)) for start, end in enc["offset_mapping"]]
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        ids_out.append(ids)
        mask_out.append(mask)
    return ids_out, mask_out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([tokenizer.eos_token, tokenizer.bos_token, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def prepared_cache(rows: Any, formatter: Formatter, max_length: int | None, data_fp: str, name: str,
                   log: Callable[[str], None] = print) -> Any:
    """Tokenized rows, from the cache when (data, template, tokenizer, max_length) was prepared before."""
    import datasets

    from finsft.files import cache_dir

    t = formatter.template
    key = json.dumps([data_fp, name, len(rows), rows._fingerprint, t.prompt, t.completion, t.completion_apart, t.defaults,
                      formatter.chat,
                      formatter.system, tokenizer_fingerprint(formatter.tokenizer), max_length, PROMPT_TAIL,
                      PREP_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    target = cache_dir() / "prepared" / digest
    if (target / "dataset_info.json").exists():
        log(f"{name}: {len(rows)} rows tokenized, from cache ({target})")
        return datasets.load_from_disk(str(target))
    log(f"{name}: tokenizing {len(rows)} rows")
    ds = tokenize_rows(rows, formatter, max_length, desc=f"tokenizing {name}", log=log)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=digest + ".tmp-")
    try:
        ds.save_to_disk(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or the disk is read-only
    return datasets.load_from_disk(str(target)) if target.exists() else ds
