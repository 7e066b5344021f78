"""Build the quickstart's real-data subset of Twitter Financial News Sentiment (TFNS, MIT licence).

    python recipes/data/make_tfns_subset.py --source-dir ../shared/data

reads tfns_train.jsonl and tfns_valid.jsonl (FinGPT's {instruction, input, output} rows; their provenance is in
recipes/data/README.md) and writes, next to this script:

- tfns_quickstart_train.jsonl: --train-per-label rows of each label from the TFNS *train* split;
- tfns_quickstart_heldout.jsonl: --heldout-per-label rows of each label from the TFNS *validation* split.

Both are class-balanced: the zero-shot model answers "negative" to nearly everything and TFNS is 65% neutral, so
on balanced held-out rows every constant answer scores accuracy 1/3 and the before/after numbers show what the
fine-tune learned about all three classes. Rows are chosen by a seeded hash of their text (sha256 of
"SEED:input"), not by Python's `random`, so the choice does not depend on the Python version; a text is taken
once, texts that occur in both splits are never taken, and each selected line is written byte for byte as it is
in the source. The source files are checked against their sha256 first: another copy would give other rows.
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ("negative", "neutral", "positive")
SOURCES = {  # file -> sha256, as listed in the provenance notes (recipes/data/README.md)
    "tfns_train.jsonl": "4b1230defc90713863440b97e2f57d88e08519116a9d0a9da40f51bc4906ecb0",
    "tfns_valid.jsonl": "3bd659a3c092ca71cb9f322ff2471c001cee43e23608fc8d9bb5207c53387794",
}
TRAIN_OUT = "tfns_quickstart_train.jsonl"
HELDOUT_OUT = "tfns_quickstart_heldout.jsonl"
SEED = 14
TRAIN_PER_LABEL = 160
HELDOUT_PER_LABEL = 100


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonl_lines(path: Path) -> list[str]:
    """The lines of a JSONL file, split on "\n" only: tweets hold U+2028 and other characters that
    str.splitlines() would also split on."""
    text = path.read_text(encoding="utf-8")
    return text.removesuffix("\n").split("\n") if text else []


def read_lines(path: Path, expected_sha256: str) -> list[tuple[str, dict[str, str]]]:
    """(line, parsed row) for every line of a source file whose sha256 is the expected one."""
    if not path.is_file():
        raise SystemExit(f"{path}: not found (pass the folder that holds {path.name} with --source-dir)")
    digest = sha256(path)
    if digest != expected_sha256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {expected_sha256}: not the documented copy of TFNS")
    out = []
    for n, line in enumerate(jsonl_lines(path), 1):
        row = json.loads(line)
        if row.get("output") not in LABELS or not isinstance(row.get("input"), str):
            raise SystemExit(f"{path}:{n}: expected a {{instruction, input, output}} row with output in {LABELS}")
        out.append((line, row))
    return out


def rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def pick(rows: list[tuple[str, dict[str, str]]], per_label: int, seed: int, exclude: set[str]) -> list[str]:
    """per_label lines of each label, lowest seeded hash first; each input text once; the result in hash order."""
    seen: set[str] = set()
    by_label: dict[str, list[tuple[str, str]]] = {label: [] for label in LABELS}
    for line, row in rows:
        text = row["input"]
        if text in seen or text in exclude:
            continue
        seen.add(text)
        by_label[row["output"]].append((rank(seed, text), line))
    chosen: list[tuple[str, str]] = []
    for label, candidates in by_label.items():
        if len(candidates) < per_label:
            raise SystemExit(f"only {len(candidates)} distinct '{label}' rows; asked for {per_label}")
        chosen += sorted(candidates)[:per_label]
    return [line for _, line in sorted(chosen)]


def build(source_dir: Path, out_dir: Path, seed: int, train_per_label: int, heldout_per_label: int) -> dict[str, Path]:
    train = read_lines(source_dir / "tfns_train.jsonl", SOURCES["tfns_train.jsonl"])
    valid = read_lines(source_dir / "tfns_valid.jsonl", SOURCES["tfns_valid.jsonl"])
    in_both = {r["input"] for _, r in train} & {r["input"] for _, r in valid}
    files = {
        TRAIN_OUT: pick(train, train_per_label, seed, exclude=in_both),
        HELDOUT_OUT: pick(valid, heldout_per_label, seed, exclude=in_both),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in files.items():
        path = out_dir / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[name] = path
    return paths


def describe(path: Path) -> str:
    rows = [json.loads(line) for line in jsonl_lines(path)]
    counts = Counter(r["output"] for r in rows)
    return (f"| `{path.name}` | {len(rows)} | " + " | ".join(str(counts[label]) for label in LABELS)
            + f" | `{sha256(path)}` |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-dir", type=Path, required=True,
                   help="folder holding tfns_train.jsonl and tfns_valid.jsonl (e.g. ../shared/data)")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where to write the subset (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="default: %(default)s")
    p.add_argument("--train-per-label", type=int, default=TRAIN_PER_LABEL, help="default: %(default)s")
    p.add_argument("--heldout-per-label", type=int, default=HELDOUT_PER_LABEL, help="default: %(default)s")
    args = p.parse_args(argv)
    paths = build(args.source_dir, args.out_dir, args.seed, args.train_per_label, args.heldout_per_label)
    print("| file | rows | " + " | ".join(LABELS) + " | sha256 |")
    print("|---|---:|---:|---:|---:|---|")
    for path in paths.values():
        print(describe(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
