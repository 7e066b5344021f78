"""The FinGPT sentiment benchmark suite (``finsft eval RECIPE --suite fingpt-sentiment``): FPB, FiQA-SA, TFNS and
NWGI prepared exactly as FinGPT's ``fingpt/FinGPT_Benchmark/benchmarks/{fpb,fiqa,tfns,nwgi}.py`` prepare them
(AI4Finance-Foundation/FinGPT at commit ec315843): the same datasets, configurations, splits, label mappings and
instructions, with FinGPT's "Instruction: ...\\nInput: ...\\nAnswer:" prompt (the fingpt_sentiment template) and
its answer mapping ('positive' in the text -> positive, else 'negative' -> negative, else neutral).

- FPB: ``financial_phrasebank`` config ``sentences_50agree``, split train (4,846 rows); labels 0/1/2 =
  negative/neutral/positive; ``train_test_split(seed=42)['test']`` (25%: 1,212 rows); the "news" instruction.
- FiQA-SA: ``pauri32/fiqa-2018``, train + validation + test concatenated in that order;
  ``train_test_split(0.226, seed=42)['test']``; label from ``sentiment_score``: < -0.1 negative, < 0.1 neutral,
  else positive; the "tweet" instruction for ``format == "post"``, else "news".
- TFNS: ``zeroshot/twitter-financial-news-sentiment``, split validation (2,388 rows); labels 0/1/2 =
  negative/positive/neutral; the "tweet" instruction.
- NWGI: ``oliverwang15/news_with_gpt_instructions``, split test (4,047 rows, the size FinGPT's notebooks report;
  benchmarks/nwgi.py itself names no split); ``news`` is the input; its 7 labels map to 3 as FinGPT's ``dic``:
  strong/moderately negative -> negative, mildly negative/positive and neutral -> neutral, strong/moderately
  positive -> positive; the "news" instruction.

Offline, ``--suite-data DIR`` reads local copies named in ``LOCAL_FILES`` (.jsonl, .json, .csv or .parquet), in
the hub's columns or already in FinGPT's instruction/input/output format; the splits above are applied to files
that hold a whole dataset (FPB, FiQA-SA) and not to files that hold the evaluated split (TFNS, NWGI).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from finsft.errors import DataError
from finsft.templates import FINGPT3, get_template

SUITES = ("fingpt-sentiment",)
NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}
NWGI_LABELS = {
    "strong negative": "negative", "moderately negative": "negative", "mildly negative": "neutral",
    "strong positive": "positive", "moderately positive": "positive", "mildly positive": "neutral",
    "neutral": "neutral",
}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = dict[str, str]


def fiqa_label(score: float) -> str:
    """FinGPT's make_label for FiQA-SA sentiment scores."""
    if score < -0.1:
        return "negative"
    if score < 0.1:
        return "neutral"
    return "positive"


def _instruction_format(ds: Any) -> bool:
    return {"input", "output"} <= set(ds.column_names)


def _need(ds: Any, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"missing column {', '.join(missing)}; expected the {what} hub dataset's columns "
                        f"({', '.join(columns)}) or FinGPT's instruction/input/output; it has "
                        f"{', '.join(ds.column_names)}")


def _rows(ds: Any, make: Callable[[Mapping[str, Any]], Row]) -> list[Row]:
    return [make(r) for r in ds]


def _allowed(labels: Mapping[Any, str]) -> str:
    return ", ".join(f"{k!r} ({v})" if k != v else repr(k) for k, v in labels.items())


def _label(labels: Mapping[Any, str], value: Any, column: str, as_int: bool = False) -> str:
    """``labels[value]``; a DataError naming the column, the value and the labels allowed otherwise."""
    key = value
    if as_int:
        try:
            key = int(value)
        except (TypeError, ValueError):
            key = value
    if key in labels:
        return labels[key]
    raise DataError(f"column '{column}' holds {value!r}, not a label of this set; allowed: {_allowed(labels)}")


def _unknown_labels(values: list[Any], labels: Mapping[Any, str], column: str, as_int: bool = False) -> None:
    """Every value of a label column known, else one DataError with the unknown values, their counts and the labels
    allowed."""
    from collections import Counter

    bad: Counter[str] = Counter()
    for v in values:
        try:
            _label(labels, v, column, as_int)
        except DataError:
            bad[repr(v)] += 1
    if bad:
        shown = ", ".join(f"{v} ({n} rows)" for v, n in bad.most_common(8))
        raise DataError(f"column '{column}' holds labels this set does not have: {shown}; allowed: "
                        f"{_allowed(labels)}")


def _from_instructions(ds: Any, default_instruction: str, labels: Mapping[Any, str] | None = None) -> list[Row]:
    """Rows already in FinGPT's format; an output that is a source label (e.g. NWGI's 7) is mapped to 3. Every
    output must then be one of FinGPT's three labels."""
    allowed = {**{v: v for v in FINGPT3}, **(labels or {})}
    _unknown_labels([str(v).strip() if isinstance(v, str) else v for v in ds["output"]], allowed, "output")

    def make(r: Mapping[str, Any]) -> Row:
        out = r["output"]
        out = out.strip() if isinstance(out, str) else out
        return {"instruction": r.get("instruction") or default_instruction, "input": str(r["input"]),
                "output": allowed[out]}
    return _rows(ds, make)


def _split(ds: Any, what: str, **kwargs: Any) -> Any:
    """FinGPT's seeded test split; a file too small for it is a DataError, not a scikit-learn message."""
    try:
        return ds.train_test_split(seed=42, **kwargs)["test"]
    except ValueError as exc:
        raise DataError(f"{len(ds)} rows are too few for {what}'s seed-42 test split ({exc}); the file should hold "
                        "the whole dataset") from exc


def prepare_fpb(ds: Any, local: bool) -> list[Row]:
    """FinGPT's fpb.py: the seed-42 test split (25%) of sentences_50agree, labels 0/1/2 = neg/neu/pos."""
    if not _instruction_format(ds):
        _need(ds, ("sentence", "label"), "FPB")
        _unknown_labels(ds["label"], FPB_LABELS, "label", as_int=True)
    ds = _split(ds, "FPB")
    if _instruction_format(ds):
        return _from_instructions(ds, NEWS)
    return _rows(ds, lambda r: {"instruction": NEWS, "input": r["sentence"],
                                "output": _label(FPB_LABELS, r["label"], "label", as_int=True)})


def prepare_fiqa(ds: Any, local: bool) -> list[Row]:
    """FinGPT's fiqa.py: ``train_test_split(0.226, seed=42)['test']`` of train+validation+test; labels from the
    score; the tweet instruction for posts."""
    if not _instruction_format(ds):
        _need(ds, ("sentence", "sentiment_score", "format"), "FiQA-SA")
        bad = [v for v in ds["sentiment_score"] if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            raise DataError(f"column 'sentiment_score' holds {bad[0]!r} ({len(bad)} rows): it must be a number from -1 "
                            "to 1 (below -0.1 negative, below 0.1 neutral, else positive)")
    ds = _split(ds, "FiQA-SA", test_size=0.226)
    if _instruction_format(ds):
        return _from_instructions(ds, NEWS)
    return _rows(ds, lambda r: {"instruction": TWEET if r["format"] == "post" else NEWS, "input": r["sentence"],
                                "output": fiqa_label(float(r["sentiment_score"]))})


def prepare_tfns(ds: Any, local: bool) -> list[Row]:
    """FinGPT's tfns.py: the validation split, labels 0/1/2 = neg/pos/neu, the tweet instruction."""
    if _instruction_format(ds):
        return _from_instructions(ds, TWEET)
    _need(ds, ("text", "label"), "TFNS")
    _unknown_labels(ds["label"], TFNS_LABELS, "label", as_int=True)
    return _rows(ds, lambda r: {"instruction": TWEET, "input": r["text"],
                                "output": _label(TFNS_LABELS, r["label"], "label", as_int=True)})


def prepare_nwgi(ds: Any, local: bool) -> list[Row]:
    """FinGPT's nwgi.py: the 7 labels mapped to 3, ``news`` as the input, the news instruction."""
    if _instruction_format(ds):
        return _from_instructions(ds, NEWS, NWGI_LABELS)
    _need(ds, ("news", "label"), "NWGI")
    _unknown_labels(ds["label"], NWGI_LABELS, "label")
    return _rows(ds, lambda r: {"instruction": NEWS, "input": r["news"], "output": NWGI_LABELS[r["label"]]})


@dataclass(frozen=True)
class SuiteSet:
    name: str  # folder-safe, also the results folder
    title: str
    hub_id: str
    config: str | None
    splits: tuple[str, ...]  # concatenated in this order
    local_file: str  # stem of the --suite-data file
    local_holds: str  # what the local file must hold, for the README and messages
    prepare: Callable[[Any, bool], list[Row]]


SETS = (
    SuiteSet("fpb", "FPB", "financial_phrasebank", "sentences_50agree", ("train",), "fpb",
             "all 4,846 sentences of sentences_50agree in file order (finsft takes the seed-42 test split)",
             prepare_fpb),
    SuiteSet("fiqa_sa", "FiQA-SA", "pauri32/fiqa-2018", None, ("train", "validation", "test"), "fiqa_sa",
             "every row of train, validation and test, in that order (finsft takes the 22.6% seed-42 test split)",
             prepare_fiqa),
    SuiteSet("tfns", "TFNS", "zeroshot/twitter-financial-news-sentiment", None, ("validation",), "tfns_valid",
             "the validation split (2,388 rows)", prepare_tfns),
    SuiteSet("nwgi", "NWGI", "oliverwang15/news_with_gpt_instructions", None, ("test",), "nwgi_test",
             "the test split (4,047 rows)", prepare_nwgi),
)
LOCAL_FILES = {s.name: s.local_file + ".jsonl" for s in SETS}

# FinGPT's published results (README.md of AI4Finance-Foundation/FinGPT at ec315843): (model, accuracy, weighted F1)
# per set; None where the table has no number.
_V3 = ("fpb", "fiqa_sa", "tfns", "nwgi")
_WEIGHTED_F1 = {
    "FinGPT v3.3 (Llama2-13B LoRA)": (0.882, 0.874, 0.903, 0.643),
    "FinGPT v3.2 (Llama2-7B)": (0.850, 0.860, 0.894, 0.636),
    "FinGPT v3.1 (ChatGLM2-6B)": (0.855, 0.850, 0.875, 0.642),
    "FinGPT (8bit)": (0.855, 0.847, 0.879, 0.632),
    "FinGPT (QLoRA)": (0.777, 0.752, 0.828, 0.583),
    "OpenAI fine-tune": (0.878, 0.887, 0.883, None),
    "GPT-4": (0.833, 0.630, 0.808, None),
    "FinBERT": (0.880, 0.596, 0.733, 0.538),
    "Llama2-7B": (0.390, 0.800, 0.296, 0.503),
    "BloombergGPT": (0.511, 0.751, None, None),
}
# "same instruction template for SFT (LoRA)" table: (weighted F1, accuracy) per set.
_LORA_BASES = {
    "Llama2": ((0.863, 0.863), (0.871, 0.855), (0.896, 0.895), (0.649, 0.651)),
    "Falcon": ((0.846, 0.849), (0.840, 0.811), (0.893, 0.893), (0.636, 0.638)),
    "MPT": ((0.872, 0.872), (0.863, 0.844), (0.907, 0.907), (0.640, 0.641)),
    "Bloom": ((0.810, 0.810), (0.771, 0.753), (0.840, 0.840), (0.573, 0.574)),
    "ChatGLM2": ((0.850, 0.849), (0.864, 0.862), (0.859, 0.858), (0.619, 0.629)),
    "Qwen": ((0.854, 0.854), (0.867, 0.851), (0.883, 0.882), (0.638, 0.643)),
    "InternLM": ((0.709, 0.714), (0.679, 0.687), (0.729, 0.731), (0.498, 0.503)),
}


def published(set_name: str) -> list[tuple[str, float | None, float | None]]:
    """FinGPT's published (model, accuracy, weighted F1) rows for one set."""
    i = _V3.index(set_name)
    rows: list[tuple[str, float | None, float | None]] = [
        (model, None, scores[i]) for model, scores in _WEIGHTED_F1.items() if scores[i] is not None]
    rows += [(f"FinGPT LoRA on {model}", acc, f1) for model, sets in _LORA_BASES.items() for f1, acc in [sets[i]]]
    return rows


def local_file(folder: str, s: SuiteSet) -> str | None:
    for suffix in SUFFIXES:
        path = os.path.join(folder, s.local_file + suffix)
        if os.path.isfile(path):
            return path
    return None


def load_suite_set(s: SuiteSet, data_dir: str | None) -> tuple[list[Row], str]:
    """The set's rows as FinGPT prepares them, and where they came from. DataError when it cannot be loaded."""
    import datasets

    from finsft.data import load_table
    from finsft.data_sources import load_source

    if data_dir is not None:
        path = local_file(data_dir, s)
        if path is None:
            raise DataError(f"no {s.local_file}{{{','.join(SUFFIXES)}}} in {data_dir} (it should hold "
                            f"{s.local_holds})")
        ds, fp = load_table(path, "train")
        try:
            return s.prepare(ds, True), f"{path} ({fp[:16]})"
        except DataError as exc:
            raise DataError(f"{s.title} file {path}: {exc}") from None
    parts, fps = [], []
    for split in s.splits:
        ds, fp = load_source({"path": s.hub_id, "name": s.config, "split": split})
        parts.append(ds)
        fps.append(fp)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    where = f"{s.hub_id}{f' ({s.config})' if s.config else ''} [{'+'.join(s.splits)}]"
    try:
        return s.prepare(ds, False), f"{where} ({'+'.join(f[:16] for f in fps)})"
    except DataError as exc:
        raise DataError(f"{s.title} ({where}): {exc}") from None


def suite_template() -> Any:
    """FinGPT's prompt and 3 labels: the fingpt_sentiment template."""
    template = get_template("fingpt_sentiment")
    assert template.labels == FINGPT3
    return template
