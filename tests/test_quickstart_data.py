"""The quickstart's shipped data (recipes/data) is the documented real TFNS subset: every file is listed in
recipes/data/README.md with its row count, label counts and sha256, and those match the files; train and
held-out texts do not overlap; and, where the source files are at hand (../shared/data), the documented command
rebuilds the files byte for byte. Standard library only (no torch)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, SHARED_DATA

DATA = REPO / "recipes" / "data"
README = DATA / "README.md"
LABELS = ("negative", "neutral", "positive")
TABLE_ROW = re.compile(r"^\| `([^`]+\.jsonl)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| `([0-9a-f]{64})` \|$")


def jsonl_rows(path: Path) -> list[dict[str, str]]:
    # split on "\n" only: tweets hold U+2028, which str.splitlines() would also split on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").removesuffix("\n").split("\n")]


def documented() -> dict[str, dict[str, object]]:
    """file name -> {rows, counts, sha256} from the table in recipes/data/README.md."""
    table: dict[str, dict[str, object]] = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = TABLE_ROW.match(line.strip())
        if m:
            name, rows, *counts, digest = m.groups()
            table[name] = {"rows": int(rows.replace(",", "")),
                           "counts": dict(zip(LABELS, (int(c.replace(",", "")) for c in counts), strict=True)),
                           "sha256": digest}
    return table


def test_readme_table_lists_exactly_the_shipped_files() -> None:
    table = documented()
    assert set(table) == {p.name for p in DATA.glob("tfns_*.jsonl")}  # the FiQA files: tests/test_fiqa_data.py
    assert {"tfns_quickstart_train.jsonl", "tfns_quickstart_heldout.jsonl"} <= set(table)


@pytest.mark.parametrize("name", sorted(documented()))
def test_file_matches_its_readme_row(name: str) -> None:
    entry = documented()[name]
    path = DATA / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], (
        f"{path} differs from the sha256 in {README}: rebuild it with the command there, or update the table")
    rows = jsonl_rows(path)
    assert len(rows) == entry["rows"]
    assert dict(Counter(r["output"] for r in rows)) == entry["counts"]
    for row in rows:
        assert set(row) == {"instruction", "input", "output"} and row["input"].strip()


def test_train_and_heldout_texts_do_not_overlap() -> None:
    train = [r["input"] for r in jsonl_rows(DATA / "tfns_quickstart_train.jsonl")]
    heldout = [r["input"] for r in jsonl_rows(DATA / "tfns_quickstart_heldout.jsonl")]
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)


def test_quickstart_recipe_uses_the_subset() -> None:
    recipe = json.loads((REPO / "recipes" / "quickstart.json").read_text())
    assert recipe["data"]["path"] == "data/tfns_quickstart_train.jsonl"
    assert recipe["evaluation"]["path"] == "data/tfns_quickstart_heldout.jsonl"


def test_readme_states_source_and_licence() -> None:
    text = README.read_text(encoding="utf-8")
    assert "Twitter Financial News Sentiment" in text
    assert "MIT License" in text and "Permission is hereby granted, free of charge" in text


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tfns_subset", DATA / "make_tfns_subset.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_command() -> list[str]:
    """The arguments of the `python recipes/data/make_tfns_subset.py ...` line in the README."""
    (line,) = (ln.strip() for ln in README.read_text(encoding="utf-8").splitlines()
               if ln.strip().startswith("python recipes/data/make_tfns_subset.py"))
    return shlex.split(line)[2:]


@pytest.mark.skipif(not (SHARED_DATA / "tfns_train.jsonl").exists(), reason="TFNS source files not at ../shared/data")
def test_documented_command_rebuilds_the_files(tmp_path: Path) -> None:
    args = _documented_command()
    assert args[args.index("--source-dir") + 1] == "../shared/data"
    args[args.index("--source-dir") + 1] = str(SHARED_DATA)
    assert _script().main([*args, "--out-dir", str(tmp_path)]) == 0
    for name in ("tfns_quickstart_train.jsonl", "tfns_quickstart_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes()


def test_pick_balances_labels_skips_repeats_and_excluded_texts() -> None:
    rows = [(json.dumps({"input": f"t{i % 7}-{label}", "output": label}), {"input": f"t{i % 7}-{label}", "output": label})
            for i in range(30) for label in LABELS]
    lines = _script().pick(rows, 3, 14, exclude={"t0-neutral", "t1-neutral"})
    picked = [json.loads(line) for line in lines]
    assert Counter(r["output"] for r in picked) == dict.fromkeys(LABELS, 3)
    assert len({r["input"] for r in picked}) == 9 and not {"t0-neutral", "t1-neutral"} & {r["input"] for r in picked}
    assert _script().pick(rows, 3, 14, exclude=set()) == _script().pick(list(reversed(rows)), 3, 14, exclude=set())
    assert _script().pick(rows, 3, 15, exclude=set()) != _script().pick(rows, 3, 14, exclude=set())
    with pytest.raises(SystemExit, match="only 7 distinct 'negative' rows"):
        _script().pick(rows, 8, 14, exclude=set())


def test_script_refuses_a_different_source(tmp_path: Path) -> None:
    for name in ("tfns_train.jsonl", "tfns_valid.jsonl"):
        (tmp_path / name).write_text('{"instruction": "i", "input": "x", "output": "neutral"}\n')
    with pytest.raises(SystemExit, match="not the documented copy"):
        _script().build(tmp_path, tmp_path / "out", 14, 1, 1)
