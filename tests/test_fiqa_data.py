"""The FiQA QA recipe's shipped data (recipes/data/fiqa_qa_*.jsonl) is the documented real subset: the table in
recipes/data/README.md matches the files (sha256, rows, questions, median answer length); no question is in both
files; the README carries the CC BY-SA 4.0 notice; and, where the source file is at hand (../shared/data), the
documented command rebuilds the files byte for byte. Standard library only (no torch)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, SHARED_DATA

DATA = REPO / "recipes" / "data"
README = DATA / "README.md"
FILES = ("fiqa_qa_train.jsonl", "fiqa_qa_heldout.jsonl")
TABLE_ROW = re.compile(r"^\| `(fiqa_qa_[a-z]+\.jsonl)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| `([0-9a-f]{64})` \|$")


def jsonl_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").removesuffix("\n").split("\n")]


def documented() -> dict[str, tuple[int, int, int, str]]:
    """file name -> (rows, questions, median answer characters, sha256) from recipes/data/README.md."""
    table = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = TABLE_ROW.match(line.strip())
        if m:
            name, rows, questions, median, digest = m.groups()
            table[name] = (*(int(v.replace(",", "")) for v in (rows, questions, median)), digest)
    return table  # type: ignore[return-value]


def test_readme_table_lists_exactly_the_fiqa_files() -> None:
    assert set(documented()) == {p.name for p in DATA.glob("fiqa_*.jsonl")} == set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_file_matches_its_readme_row(name: str) -> None:
    rows_n, questions, median, digest = documented()[name]
    path = DATA / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, (
        f"{path} differs from the sha256 in {README}: rebuild it with the command there, or update the table")
    rows = jsonl_rows(path)
    assert len(rows) == rows_n and len({r["input"] for r in rows}) == questions
    assert sorted(len(r["output"]) for r in rows)[len(rows) // 2] == median
    for row in rows:
        assert set(row) == {"instruction", "input", "output"} and row["input"].strip() and row["output"].strip()


def test_no_question_is_in_both_files() -> None:
    train, heldout = ({r["input"] for r in jsonl_rows(DATA / name)} for name in FILES)
    assert train and heldout and not train & heldout


def test_recipe_uses_the_subset() -> None:
    recipe = json.loads((REPO / "recipes" / "fiqa_smollm2_qlora.json").read_text())
    assert recipe["data"]["path"] == "data/fiqa_qa_train.jsonl"
    assert recipe["evaluation"]["path"] == "data/fiqa_qa_heldout.jsonl"


def test_readme_carries_the_cc_by_sa_notice() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("# FiQA QA"):]
    for needed in ("CC BY-SA 4.0", "https://creativecommons.org/licenses/by-sa/4.0/", "Changes made",
                   "Attribution", "money.stackexchange.com", "Maia et al.", "explodinggradients/fiqa"):
        assert needed in section, needed


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_fiqa_subset", DATA / "make_fiqa_subset.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (SHARED_DATA / "fiqa_qa.jsonl").exists(), reason="fiqa_qa.jsonl not at ../shared/data")
def test_documented_command_rebuilds_the_files(tmp_path: Path) -> None:
    (line,) = (ln.strip() for ln in README.read_text(encoding="utf-8").splitlines()
               if ln.strip().startswith("python recipes/data/make_fiqa_subset.py"))
    args = shlex.split(line)[2:]
    assert args[args.index("--source-dir") + 1] == "../shared/data"
    args[args.index("--source-dir") + 1] = str(SHARED_DATA)
    assert _script().main([*args, "--out-dir", str(tmp_path)]) == 0
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes()


def test_split_keeps_each_question_on_one_side() -> None:
    rows = [(json.dumps({"input": f"q{i % 9}", "output": f"a{i}"}), {"input": f"q{i % 9}", "output": f"a{i}"})
            for i in range(40)]
    train, heldout = _script().split_by_question(rows, 5, 3, 18)
    t, h = ([json.loads(x)["input"] for x in lines] for lines in (train, heldout))
    assert len(t) == len(set(t)) == 5 and len(h) == len(set(h)) == 3 and not set(t) & set(h)
    assert _script().split_by_question(list(reversed(rows)), 5, 3, 18) == (train, heldout)  # order-independent
    assert _script().split_by_question(rows, 5, 3, 19) != (train, heldout)
    with pytest.raises(SystemExit, match="only 9 distinct questions"):
        _script().split_by_question(rows, 7, 3, 18)


def test_script_refuses_a_different_source(tmp_path: Path) -> None:
    (tmp_path / "fiqa_qa.jsonl").write_text('{"instruction": "i", "input": "q", "output": "a"}\n')
    with pytest.raises(SystemExit, match="not the documented copy"):
        _script().build(tmp_path, tmp_path / "out", 18, 1, 1)
