"""Build the FiQA QA recipe's real-data subset (recipes/fiqa_smollm2_qlora.json; CC BY-SA 4.0).

    python recipes/data/make_fiqa_subset.py --source-dir ../shared/data

reads fiqa_qa.jsonl (1,467 real FiQA 2018 task-2 question/answer pairs in FinGPT's {instruction, input, output}
format; provenance and licence in recipes/data/README.md) and writes, next to this script:

- fiqa_qa_heldout.jsonl: one answer for each of --heldout-questions questions;
- fiqa_qa_train.jsonl: one answer for each of --train-questions other questions.

The split is by question: a question with several answers has all of them on one side, so no held-out question is
ever trained on (its other answers are left out of both files). Questions are chosen by a seeded hash (sha256 of
"SEED:question"), the answer of a question by the same hash of "SEED:question:answer", not by Python's `random`,
so the choice does not depend on the Python version. Each selected line is written byte for byte as it is in the
source, in hash order. The source file is checked against its sha256 first: another copy would give other rows.
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = "fiqa_qa.jsonl"
SOURCE_SHA256 = "49db6a2532e000e7b11e082320feb6c968c39f5cb1cea57445537d2e4b11ecac"
TRAIN_OUT = "fiqa_qa_train.jsonl"
HELDOUT_OUT = "fiqa_qa_heldout.jsonl"
SEED = 18
TRAIN_QUESTIONS = 400
HELDOUT_QUESTIONS = 100


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonl_lines(path: Path) -> list[str]:
    """The lines of a JSONL file, split on "\n" only (answers may hold characters str.splitlines() splits on)."""
    text = path.read_text(encoding="utf-8")
    return text.removesuffix("\n").split("\n") if text else []


def read_lines(path: Path, expected_sha256: str) -> list[tuple[str, dict[str, str]]]:
    """(line, parsed row) for every line of the source file, whose sha256 must be the expected one."""
    if not path.is_file():
        raise SystemExit(f"{path}: not found (pass the folder that holds {path.name} with --source-dir)")
    digest = sha256(path)
    if digest != expected_sha256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {expected_sha256}: not the documented copy of FiQA QA")
    out = []
    for n, line in enumerate(jsonl_lines(path), 1):
        row = json.loads(line)
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("instruction", "input", "output")):
            raise SystemExit(f"{path}:{n}: expected an {{instruction, input, output}} row of non-empty strings")
        out.append((line, row))
    return out


def rank(seed: int, *parts: str) -> str:
    return hashlib.sha256(":".join([str(seed), *parts]).encode()).hexdigest()


def split_by_question(rows: list[tuple[str, dict[str, str]]], train_questions: int, heldout_questions: int,
                      seed: int) -> tuple[list[str], list[str]]:
    """(train lines, held-out lines): one answer for each of the first questions in seeded-hash order; the first
    ``heldout_questions`` questions are held out, the next ``train_questions`` are trained on."""
    answers: dict[str, list[tuple[str, str]]] = {}
    for line, row in rows:
        answers.setdefault(row["input"], []).append((rank(seed, row["input"], row["output"]), line))
    questions = sorted(answers, key=lambda q: rank(seed, q))
    if len(questions) < heldout_questions + train_questions:
        raise SystemExit(f"only {len(questions)} distinct questions; asked for {heldout_questions} held-out and "
                         f"{train_questions} training questions")
    chosen = [min(answers[q])[1] for q in questions[: heldout_questions + train_questions]]
    return chosen[heldout_questions:], chosen[:heldout_questions]


def build(source_dir: Path, out_dir: Path, seed: int, train_questions: int, heldout_questions: int) -> dict[str, Path]:
    rows = read_lines(source_dir / SOURCE, SOURCE_SHA256)
    train, heldout = split_by_question(rows, train_questions, heldout_questions, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in ((TRAIN_OUT, train), (HELDOUT_OUT, heldout)):
        path = out_dir / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[name] = path
    return paths


def describe(path: Path) -> str:
    rows = [json.loads(line) for line in jsonl_lines(path)]
    return (f"| `{path.name}` | {len(rows)} | {len({r['input'] for r in rows})} | "
            f"{sorted(len(r['output']) for r in rows)[len(rows) // 2]:,} | `{sha256(path)}` |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-dir", type=Path, required=True, help="folder holding fiqa_qa.jsonl (e.g. ../shared/data)")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where to write the subset (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="default: %(default)s")
    p.add_argument("--train-questions", type=int, default=TRAIN_QUESTIONS, help="default: %(default)s")
    p.add_argument("--heldout-questions", type=int, default=HELDOUT_QUESTIONS, help="default: %(default)s")
    args = p.parse_args(argv)
    paths = build(args.source_dir, args.out_dir, args.seed, args.train_questions, args.heldout_questions)
    print("| file | rows | questions | median answer characters | sha256 |")
    print("|---|---:|---:|---:|---|")
    for path in paths.values():
        print(describe(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
