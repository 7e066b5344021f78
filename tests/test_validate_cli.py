"""`finsft validate` (and the other light commands: show, schema, templates) through real subprocesses: exit codes,
output formats, every problem of every file at once, no heavy imports, speed; and the pre-commit hook."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
INVALID = sorted((FIXTURES / "invalid").glob("*.json"))
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.json")
                 if not any(part.startswith(".") for part in p.relative_to(REPO / "recipes").parts))
HEAVY = {"torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate"}
GITHUB_LINE = re.compile(r"^::error file=(?P<file>[^,:]+)(,line=(?P<line>\d+),col=(?P<col>\d+))?"
                         r",title=finsft validate::(?P<msg>\$\S*: .+)$")


def finsft(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finsft", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def two_bad_files(tmp_path: Path) -> list[Path]:
    a = _write(tmp_path / "a.json", {
        "model": {"name_or_path": "org/m", "dtpe": "auto"},
        "data": {"path": "org/d", "validation_size": 2.5},
        "training": {"optim": "adam"},
        "output": {"dir": "o"},
    })
    b = _write(tmp_path / "b.json", {
        "model": {"name_or_path": "org/m"},
        "quantization": {"load_in_4bit": True},
        "template": {"name": "fiqa_qa", "system": "hi"},
    })
    return [a, b]


# ----------------------------------------------------------------------------------------------- exit codes


def test_shipped_recipes_validate() -> None:
    assert SHIPPED, "no recipes shipped?"
    result = finsft("validate", "recipes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(SHIPPED)}/{len(SHIPPED)} recipes valid" in result.stdout
    for path in SHIPPED:
        assert f"ok      {path.relative_to(REPO)}" in result.stdout


def test_valid_fixtures_exit_0() -> None:
    result = finsft("validate", "tests/fixtures/valid", "tests/fixtures/extends/sub/deeper/leaf.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("args, fragment", [
    ([], "usage: finsft"),
    (["validate"], "the following arguments are required: paths"),
    (["validate", "--bogus", "recipes"], "unrecognized arguments: --bogus"),
    (["validate", "recipes", "--format", "xml"], "invalid choice: 'xml'"),
    (["validate", "no/such/dir/*.json"], "no recipe files match: no/such/dir/*.json"),
    (["validate", "recipes", "nothing-here.json"], "no recipe files match: nothing-here.json"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2(args: list[str], fragment: str) -> None:
    result = finsft(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert fragment in result.stdout + result.stderr


def test_invalid_fixtures_exit_1_with_one_problem_each() -> None:
    result = finsft("validate", "tests/fixtures/invalid")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[-1].startswith(f"0/{len(INVALID)} recipes valid, {len(INVALID)} problems (")
    assert sum(line.startswith("invalid ") for line in lines) == len(INVALID)
    assert "  tests/fixtures/invalid/key_typo_model.json:4:5: $.model.dtpe: unknown key 'dtpe'. Did you mean " \
           "'dtype'?" in result.stdout


def test_all_errors_of_all_files_at_once(two_bad_files: list[Path]) -> None:
    a, b = two_bad_files
    result = finsft("validate", str(a), str(b))
    assert result.returncode == 1
    out = result.stdout
    expected = [
        f"{a}:4:5: $.model.dtpe: unknown key 'dtpe'. Did you mean 'dtype'?",
        f"{a}:11:5: $.training.optim: \"adam\" is not allowed.",
        f"{a}:8:5: $.data.validation_size: 2.5 is neither a fraction below 1 nor a whole row count",
        f"{b}: $: missing required key 'data'",
        f"{b}: $: missing required key 'output'",
        f"{b}:5:3: $.quantization: a quantized model cannot be fully fine-tuned",
        f"{b}:10:5: $.template.system: 'system' is only used with chat_template: true",
    ]
    for line in expected:
        assert line in out, out
    assert out.index(f"invalid {a}") < out.index(f"invalid {b}")
    assert out.splitlines()[-1].startswith("0/2 recipes valid, 7 problems (")


def test_mixed_valid_and_invalid(two_bad_files: list[Path]) -> None:
    result = finsft("validate", "recipes", str(two_bad_files[0]))
    assert result.returncode == 1
    assert f"ok      {SHIPPED[0].relative_to(REPO)}" in result.stdout
    assert f"{len(SHIPPED)}/{len(SHIPPED) + 1} recipes valid, 3 problems" in result.stdout


def test_glob_argument(tmp_path: Path, two_bad_files: list[Path]) -> None:
    result = finsft("validate", str(tmp_path / "*.json"), "--format", "json")
    assert [f["file"] for f in json.loads(result.stdout)["files"]] == [str(p) for p in two_bad_files]


# ------------------------------------------------------------------------------------------------- formats


def test_format_json(two_bad_files: list[Path]) -> None:
    result = finsft("validate", "--format", "json", "recipes", *map(str, two_bad_files))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert set(report) == {"valid", "files", "seconds"}
    assert report["valid"] is False and isinstance(report["seconds"], float)
    files = {f["file"]: f for f in report["files"]}
    assert list(files) == [str(p.relative_to(REPO)) for p in SHIPPED] + [str(p) for p in two_bad_files]
    for f in report["files"]:
        assert set(f) == {"file", "valid", "errors", "warnings"}
        assert f["valid"] is (not f["errors"])
        for err in f["errors"]:
            assert set(err) == {"file", "path", "message", "line", "column", "override", "severity"}
            assert err["path"].startswith("$") and err["message"]
            assert err["line"] is None or isinstance(err["line"], int)
    a, b = (files[str(p)] for p in two_bad_files)
    assert len(a["errors"]) == 3 and len(b["errors"]) == 4
    dtpe = next(e for e in a["errors"] if e["path"] == "$.model.dtpe")
    assert dtpe["file"] == str(two_bad_files[0]) and (dtpe["line"], dtpe["column"]) == (4, 5)
    assert "Did you mean 'dtype'?" in dtpe["message"]


def test_format_json_all_valid() -> None:
    result = finsft("validate", "recipes", "--format", "json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["valid"] is True and all(f["valid"] and f["errors"] == [] for f in report["files"])


def test_format_github(two_bad_files: list[Path]) -> None:
    result = finsft("validate", "--format", "github", "tests/fixtures/invalid", *map(str, two_bad_files))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[-1] == f"0/{len(INVALID) + 2} recipes valid"
    errors = [GITHUB_LINE.match(line) for line in lines[:-1]]
    assert all(errors), [line for line, m in zip(lines, errors, strict=False) if not m]
    assert len(errors) == len(INVALID) + 7
    by_file: dict[str, list[re.Match[str]]] = {}
    for m in errors:
        assert m is not None
        by_file.setdefault(m["file"], []).append(m)
    (typo,) = by_file["tests/fixtures/invalid/key_typo_model.json"]
    assert (typo["line"], typo["col"]) == ("4", "5")
    assert typo["msg"].startswith("$.model.dtpe: unknown key 'dtpe'. Did you mean 'dtype'?")
    assert len(by_file[str(two_bad_files[0])]) == 3 and len(by_file[str(two_bad_files[1])]) == 4
    assert any(m["line"] is None for m in by_file[str(two_bad_files[1])])  # missing keys have no line


def test_format_github_escapes_and_names_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path / "x,y.json", {"model": {"name_or_path": "org/m"}, "data": {"path": "org/d"},
                                          "output": {"dir": "o"}})
    result = finsft("validate", "--format", "github", str(path), "--set", "name=100% bad")
    assert result.returncode == 1
    line = result.stdout.splitlines()[0]
    assert line.startswith(f"::error file={tmp_path!s}/x%2Cy.json,title=finsft validate::$.name: ")
    assert "'100%25 bad' does not match" in line and line.endswith("(override name=100%25 bad)")


def test_set_overrides() -> None:
    ok = finsft("validate", "recipes", "--set", "training.learning_rate=1e-4", "--set", "training.seed=7")
    assert ok.returncode == 0, ok.stdout
    bad = finsft("validate", "recipes", "--set", "training.learnig_rate=1e-4")
    assert bad.returncode == 1
    assert bad.stdout.count("(override training.learnig_rate=1e-4): $.training.learnig_rate: unknown key "
                            "'learnig_rate'. Did you mean 'learning_rate'?") == len(SHIPPED)
    syntax = finsft("validate", "recipes", "--set", "training.seed")
    assert syntax.returncode == 1 and "must look like section.key=value" in syntax.stdout


# -------------------------------------------------------------------------------- show, schema, templates


def test_show_prints_the_resolved_recipe() -> None:
    result = finsft("show", "tests/fixtures/extends/sub/deeper/leaf.json", "training.learning_rate=1e-4",
                    "lora.r=32")
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert cfg["name"] == "chain-leaf"
    assert cfg["training"]["learning_rate"] == 1e-4 and cfg["lora"]["r"] == 32
    assert cfg["training"]["max_steps"] == 10 and cfg["training"]["seed"] == 3
    assert cfg["training"]["optim"] == "auto" and cfg["training"]["logging_steps"] == 10  # defaults
    assert cfg["template"] == {"name": "fingpt_sentiment", "labels": None, "prompt": None, "completion": None,
                               "chat_template": False, "system": None, "completion_only_loss": True}
    assert cfg["data"]["path"] == str(FIXTURES / "extends" / "data" / "base_train.jsonl")
    assert "extends" not in cfg
    schema = json.loads((REPO / "finsft" / "schemas" / "recipe.schema.json").read_text())
    assert set(cfg) == set(schema["properties"]) - {"$schema", "extends"}


def test_show_invalid_recipe_exits_1_with_every_problem() -> None:
    result = finsft("show", "recipes/" + SHIPPED[0].name, "training.learnig_rate=1e-4", "lora.r=0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("finsft show: the recipe is invalid:\n")
    assert "Did you mean 'learning_rate'?" in result.stderr
    assert "(override lora.r=0): $.lora.r: 0 is less than the minimum of 1" in result.stderr


def test_show_missing_file() -> None:
    result = finsft("show", "no_such_recipe.json")
    assert result.returncode == 1 and "no_such_recipe.json: $: file not found" in result.stderr


def test_schema_command_prints_the_packaged_schema() -> None:
    result = finsft("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == json.loads((REPO / "finsft" / "schemas" / "recipe.schema.json").read_text())


def test_templates_command() -> None:
    result = finsft("templates")
    assert result.returncode == 0
    for name in ("fingpt_sentiment", "fiqa_qa", "short_sentiment", "custom"):
        assert name in result.stdout


def test_version_and_help_exit_0() -> None:
    assert finsft("--version").returncode == 0
    help_ = finsft("validate", "--help")
    assert help_.returncode == 0 and "--format" in help_.stdout


# ------------------------------------------------------------------------------------------- light and fast


def test_validate_imports_no_heavy_module_and_is_fast() -> None:
    code = (
        "import sys, time, json, contextlib, io\n"
        "t0 = time.perf_counter()\n"
        "from finsft.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['validate', 'recipes'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r})\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy, 'seconds': time.perf_counter() - t0}))\n"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    print(f"finsft validate recipes: {report['seconds']:.3f} s in process (imports included), {wall:.3f} s wall "
          "with interpreter start")
    assert report["rc"] == 0
    assert report["heavy"] == []
    assert wall < 5, f"validate took {wall:.1f} s"


# --------------------------------------------------------------------------------------- pre-commit hook


def _parse_hooks(text: str) -> list[dict[str, Any]]:
    """The hook list of a .pre-commit-hooks.yaml: PyYAML when installed, else a tiny parser for its flat form."""
    try:
        import yaml
    except ImportError:
        hooks: list[dict[str, Any]] = []
        for raw in text.splitlines():
            line = raw.split(" #")[0].rstrip()
            if not line or line.lstrip().startswith("#"):
                continue
            if line.startswith("- "):
                hooks.append({})
                line = line[2:]
            key, _, value = line.strip().partition(":")
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                hooks[-1][key] = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            elif value in ("true", "false"):
                hooks[-1][key] = value == "true"
            else:
                hooks[-1][key] = value.strip("'\"")
        return hooks
    loaded: list[dict[str, Any]] = yaml.safe_load(text)
    return loaded


def test_pre_commit_hook() -> None:
    hooks = _parse_hooks((REPO / ".pre-commit-hooks.yaml").read_text())
    (hook,) = (h for h in hooks if h["id"] == "finsft-validate")
    assert hook["name"] == "finsft validate"
    assert hook["entry"] == "finsft validate"
    assert hook["language"] == "python"
    files = re.compile(hook["files"])
    assert all(files.search(str(p.relative_to(REPO))) for p in SHIPPED)
    assert not files.search("recipes/data/tfns_quickstart_train.jsonl")
    assert not files.search("tests/fixtures/invalid/key_typo_top.json")
    assert not files.search("finsft/schemas/recipe.schema.json")
    # the hook's command line (entry + the matching files) passes on the shipped recipes
    entry = hook["entry"].split()
    assert entry[0] == "finsft"
    result = finsft(*entry[1:], *(str(p.relative_to(REPO)) for p in SHIPPED))
    assert result.returncode == 0, result.stdout
