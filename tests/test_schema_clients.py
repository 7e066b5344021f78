"""The recipe schema through a standard validator, check-jsonschema's own command: a recipe with 'extends' may be
partial (editors and check-jsonschema accept a child recipe), one without must name model, data and output, and
check-jsonschema's verdict agrees with `finsft validate` on every shipped recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "finsft" / "schemas" / "recipe.schema.json"
FIXTURES = REPO / "tests" / "fixtures"


def check_jsonschema(files: list[Path]) -> dict[str, bool]:
    """check-jsonschema's verdict per file (run as its own command line)."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is in the dev extras")
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA), "-o", "json",
                          *map(str, files)], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert not report.get("parse_errors"), report
    failed = {Path(e["filename"]).resolve() for e in report["errors"]}
    return {str(f): f.resolve() not in failed for f in files}


def finsft_validate(files: list[Path]) -> dict[str, bool]:
    out = subprocess.run([sys.executable, "-m", "finsft", "validate", "--format", "json", *map(str, files)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    return {str(Path(f["file"])): f["valid"] for f in json.loads(out.stdout)["files"]}


def test_partial_child_recipes_and_shipped_recipes_agree(tmp_path: Path) -> None:
    base = FIXTURES / "extends" / "base.json"
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"extends": str(base), "training": {"max_steps": 3}}))
    orphan = tmp_path / "orphan.json"  # neither the required sections nor a base to take them from
    orphan.write_text(json.dumps({"training": {"max_steps": 3}}))
    null_base = tmp_path / "null_base.json"  # extends null means no base: the sections are required
    null_base.write_text(json.dumps({"extends": None, "training": {"max_steps": 3}}))
    shipped = sorted((REPO / "recipes").glob("*.json"))
    assert shipped
    chain = [base, FIXTURES / "extends" / "sub" / "mid.json", FIXTURES / "extends" / "sub" / "deeper" / "leaf.json"]
    files = [*shipped, *chain, FIXTURES / "valid" / "full.json", child, orphan, null_base]

    schema_verdict = check_jsonschema(files)
    finsft_verdict = finsft_validate(files)
    expected = {str(f): f not in (orphan, null_base) for f in files}
    assert schema_verdict == expected
    assert finsft_verdict == expected


def test_finsft_still_requires_the_sections_after_merging(tmp_path: Path) -> None:
    """A child of a base that lacks 'output' passes the schema alone (it extends) but not `finsft validate`,
    which checks the merged recipe."""
    base = json.loads((FIXTURES / "extends" / "base.json").read_text())
    del base["output"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "base_train.jsonl").write_text(
        (FIXTURES / "extends" / "data" / "base_train.jsonl").read_text())
    (tmp_path / "base.json").write_text(json.dumps(base))
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"extends": "base.json", "training": {"max_steps": 3}}))
    assert check_jsonschema([child]) == {str(child): True}
    out = subprocess.run([sys.executable, "-m", "finsft", "validate", str(child)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 1
    assert "missing required key 'output'" in out.stdout + out.stderr
