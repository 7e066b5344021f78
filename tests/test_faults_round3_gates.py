"""Nothing lost, round 3: one gate for every file finsft reads or writes (finsft/files.py), one owner per run
folder, the lost-data cases of issue 24, a full disk, and the grep that keeps every other module off user paths.

Table-driven through the real CLI (``python -m finsft`` in a subprocess, or ``cli.main(argv)`` in-process where
the command loads the heavy libraries before it refuses): the exit code, the words of the message, no
"Traceback", the user's folder hashed byte-identical before and after.

A full disk is a real one where the machine allows it: a 300 KiB tmpfs mounted in a private mount namespace
(``unshare -rm``, no root needed, gone when the command exits). Where that is not allowed, the same commands run
in-process with ENOSPC injected where the bytes are written (``os.fsync`` of the writing gate, ``torch.save`` and
safetensors' ``save_file``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from _runs import subprocess_env
from test_faults import World, _has, run_cli, tree_digest, world  # noqa: F401 (world: the fixture)

from finsft.cli import main as cli
from finsft.errors import FinsftError
from finsft.files import (
    RunLock,
    UnreadableFile,
    WriteError,
    check_readable,
    io_problem,
    lock_path,
    read_text,
    write_file,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def _flat(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Case:
    id: str
    args: list[str]  # World.fill'ed: {user}, {runs}, {home}
    code: int
    words: Sequence[str | tuple[str, ...]]
    absent: Sequence[str] = ()  # words the output must not hold
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[World], None] | None = None
    check: Callable[[World], None] | None = None
    in_process: bool = False  # cli.main(argv): commands that load the heavy libraries before they refuse
    script: Path | None = None  # run this script instead of `python -m finsft`


def _fifo(name: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        os.mkfifo(w.home / name)  # outside the hashed user folder: hashing reads files, and a FIFO blocks

    return setup


def _odd_name(w: World) -> None:
    shutil.copy(w.user / "r.json", w.user / "-my recipe é.json")


def _nothing_written(w: World) -> None:
    assert not (w.runs / "out").exists() and not (w.runs / "out.partial").exists()


def _no_temp_files(w: World) -> None:
    left = [p for p in (w.user, w.home) for p in p.rglob("*finsft-tmp*")]
    assert not left, left


CASES = [
    # the reading gate: a FIFO is refused by stat before anything opens it (an open would block: the timeout fails)
    Case("data-file-is-a-fifo", ["train", "{user}/r.json", "data.path={home}/fifo.jsonl"], 1,
         ["fifo.jsonl", "named pipe (FIFO)", "not a regular file"], setup=_fifo("fifo.jsonl")),
    Case("accelerate-config-is-a-fifo", ["plan", "{user}/r.json", "--accelerate-config", "{home}/fifo.yaml"], 1,
         ["--accelerate-config", "fifo.yaml", "named pipe (FIFO)"], setup=_fifo("fifo.yaml")),
    Case("predict-file-is-a-fifo", ["predict", "{user}/r.json", "--file", "{home}/fifo.jsonl"], 1,
         ["--file", "fifo.jsonl", "named pipe (FIFO)"], setup=_fifo("fifo.jsonl"), in_process=True),
    Case("suite-data-is-a-file", ["eval", "{user}/r.json", "--suite", "fingpt-sentiment", "--suite-data",
                                  "{user}/notes.txt", "--out", "{runs}/suite"], 1,
         ["--suite-data", "notes.txt", "is a file, not a folder"]),
    Case("recipe-named-with-a-dash-a-space-and-unicode", ["validate", "--", "-my recipe é.json"], 0,
         ["-my recipe é.json", "1/1 recipes valid"], setup=_odd_name),
    # one problem, counted once (the leak guard and the data checks read the same file)
    *[Case(f"one-problem-once-{key}", ["train", "{user}/r.json", f"{key}={{user}}/headline.jsonl",
                                       *extra], 1,
           ["headline.jsonl", "missing column 'input'"], absent=["2 problems"])
      for key, extra in (("data.validation_path", []), ("evaluation.path", []),
                         ("evaluation.sets.extra.path", ["evaluation.path={user}/ok.jsonl"]))],
    # SIGTERM while train imports torch, transformers and TRL
    Case("sigterm-during-the-imports", ["train", "{user}/r.json"], 143,
         ["SIGTERM while loading the training libraries", "nothing was written", "Start again with",
          "finsft train"], env={"FINSFT_TEST_SIGNAL_AT_PHASE": "imports"}, check=_nothing_written),
    # gpu_check's --out and --deadline (case 2 of the issue)
    Case("gpu-check-out-is-the-users-notes", ["--out", "{user}/notes.txt", "--tiny"], 2,
         ["notes.txt", "not a record of this check", "never replaced"], script=GPU_CHECK, check=_no_temp_files),
    Case("gpu-check-out-is-a-folder", ["--out", "{user}/predictions", "--tiny"], 2,
         ["predictions", "is a folder", "gpu_check.json"], script=GPU_CHECK, check=_no_temp_files),
    Case("gpu-check-out-under-a-file", ["--out", "{user}/notes.txt/check.json", "--tiny"], 2,
         ["notes.txt", "is a file"], script=GPU_CHECK, check=_no_temp_files),
    Case("gpu-check-out-is-a-device", ["--out", "/dev/null", "--tiny"], 2, ["/dev/null", "not a regular file"],
         script=GPU_CHECK),
    *[Case(f"gpu-check-deadline-{value}", ["--deadline", value, "--tiny", "--out", "{home}/check.json"], 2,
           ["--deadline", "positive number of seconds"], script=GPU_CHECK,
           check=lambda w: None if not (w.home / "check.json").exists() else pytest.fail("a record was written"))
      for value in ("nan", "inf", "-1", "0")],
]


def _run_case(w: World, case: Case, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              cwd: Path | None = None) -> tuple[int, str]:
    args = [w.fill(a) for a in case.args]
    if case.in_process:
        monkeypatch.chdir(cwd or w.user)
        for k, v in case.env.items():
            monkeypatch.setenv(k, v)
        code = cli(args)
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    if case.script is not None:
        env = {**subprocess_env(), "PYTHONPATH": str(REPO), **case.env}
        r = subprocess.run([sys.executable, str(case.script), *args], cwd=cwd or w.user, capture_output=True,
                           text=True, env=env, timeout=120)
    else:
        r = run_cli(args, cwd=cwd or w.user, env=case.env, timeout=180)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_gate(world: World, case: Case, monkeypatch: pytest.MonkeyPatch,  # noqa: F811 (the fixture)
              capsys: pytest.CaptureFixture[str]) -> None:
    if case.setup:
        case.setup(world)
    before = tree_digest(world.user)
    t0 = time.monotonic()
    code, output = _run_case(world, case, monkeypatch, capsys)
    shown = f"$ {' '.join(case.args)}\nexit {code} after {time.monotonic() - t0:.1f} s\n{output[-4000:]}"
    flat = _flat(output)
    assert "Traceback" not in output, shown
    assert code == case.code, shown
    missing = [w for w in case.words if not _has(flat, w if isinstance(w, tuple) else _flat(world.fill(w)))]
    assert not missing, f"message lacks {missing}:\n{shown}"
    assert not [w for w in case.absent if w in flat], shown
    assert tree_digest(world.user) == before, f"the user's files changed:\n{shown}"
    if case.check:
        case.check(world)


# ------------------------------------------------------------------------------------- the gates, directly


def test_the_reading_gate(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "latin1.txt").write_bytes(b"ok\nCaf\xe9\n")
    (tmp_path / "big.json").write_bytes(b"x" * 2049)
    (tmp_path / "-a name é.json").write_text('{"ok": 1}', encoding="utf-8")
    cases = {tmp_path / "fifo": "named pipe (FIFO)", Path("/dev/zero"): "character device",
             tmp_path: "a folder, not a regular file", tmp_path / "none": "does not exist",
             tmp_path / "big.json": "2,049 bytes, more than the 2,048 bytes"}
    for path, words in cases.items():
        with pytest.raises(UnreadableFile, match=re.escape(words)):
            check_readable(path, "data file", limit=2048)
    with pytest.raises(UnreadableFile, match=re.escape("not UTF-8 text: byte 0xe9 at line 2 (byte offset 6)")):
        read_text(tmp_path / "latin1.txt", "data file")
    assert read_text(tmp_path / "-a name é.json") == '{"ok": 1}'
    assert check_readable(tmp_path, "suite folder", folder=True) == tmp_path
    with pytest.raises(UnreadableFile, match="is a file, not a folder"):
        check_readable(tmp_path / "big.json", "suite folder", folder=True)


def test_the_writing_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "notes.md"
    mine.write_text("my notes\n", encoding="utf-8")
    (tmp_path / "link.json").symlink_to(mine)
    for path, words in ((mine, "did not make it"), (tmp_path / "link.json", "symbolic link"),
                        (tmp_path, "is a folder")):
        with pytest.raises(WriteError, match=words):
            write_file(path, "x")
    assert mine.read_text() == "my notes\n"
    write_json(tmp_path / "new.json", {"a": 1}, replace=False)
    with pytest.raises(WriteError, match="already exists"):
        write_json(tmp_path / "new.json", {"a": 2}, replace=False)
    write_json(tmp_path / "new.json", {"a": 3}, replace=lambda p: json.loads(p.read_text()).keys() == {"a"})
    assert json.loads((tmp_path / "new.json").read_text()) == {"a": 3}

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("finsft.files.os.fsync", full)
    with pytest.raises(WriteError) as exc:
        write_json(tmp_path / "new.json", {"a": 4}, kept="the earlier record is kept")
    assert "No space left on device" in str(exc.value) and "The earlier record is kept" in str(exc.value)
    assert "free some space" in str(exc.value)
    assert json.loads((tmp_path / "new.json").read_text()) == {"a": 3}  # whole or not at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "new.json", "notes.md"]  # no temp file


def test_library_write_errors_are_recognised() -> None:
    """What torch.save and safetensors raise on a full disk (seen on a 300 KiB tmpfs: torch names no errno)."""
    torch_short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert "the disk is full" in (io_problem(torch_short_write) or "")
    assert io_problem(RuntimeError("shape mismatch")) is None
    assert io_problem(FinsftError("no")) is None


# ------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """(recipe, run): a 1-step run of the tiny model with an evaluation set of its own ('extra'), trained once
    in-process; tests copy it."""
    root = tmp_path_factory.mktemp("trained")
    user = root / "user"
    user.mkdir()
    rows = [{"input": f"Shares of Firm {i} {'rose' if i % 3 == 0 else 'fell' if i % 3 == 1 else 'held'}",
             "output": ("positive", "negative", "neutral")[i % 3]} for i in range(24)]
    (user / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = {"name": "gates", "model": {"name_or_path": str(tiny_model)},
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
              "data": {"path": str(user / "ok.jsonl"), "validation_size": 4},
              "template": {"name": "fingpt_sentiment"},
              "evaluation": {"max_samples": 4, "sets": {"extra": {"path": str(user / "ok.jsonl"), "max_samples": 3}}},
              "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1},
              "output": {"dir": str(root / "runs" / "run")}}
    (user / "r.json").write_text(json.dumps(recipe, indent=2), encoding="utf-8")
    assert cli(["train", str(user / "r.json")]) == 0
    assert (root / "runs" / "run" / "eval" / "extra" / "eval.json").is_file()
    return user / "r.json", root / "runs" / "run"


@pytest.fixture
def run_copy(trained: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    recipe, run = trained
    copy = tmp_path / "runs" / "run"
    shutil.copytree(run, copy, symlinks=True)
    return recipe, copy


def _eval_out(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_case1_a_run_without_recipe_json_keeps_its_own_set_reports(run_copy: tuple[Path, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Lost-data case 1: RUN/recipe.json deleted; eval --adapter RUN must not rewrite RUN/eval/extra/."""
    recipe, run = run_copy
    (run / "recipe.json").unlink()
    own = tree_digest(run / "eval" / "extra")
    rest = {k: v for k, v in tree_digest(run).items() if not k.startswith("eval")}
    code = cli(["eval", str(recipe), "--adapter", str(run), "--limit", "2"])
    output = _eval_out(capsys)
    assert code == 0 and "Traceback" not in output, output[-3000:]
    after = tree_digest(run / "eval" / "extra")
    assert {k: v for k, v in after.items() if not k.startswith("rescored")} == own
    assert json.loads((run / "eval" / "extra" / "rescored" / "eval.json").read_text())["rows"] == 2
    assert "holds the training run's own report" in _flat(output)
    assert {k: v for k, v in tree_digest(run).items() if not k.startswith("eval")} == rest


def test_adapter_without_its_weights_is_named(run_copy: tuple[Path, Path]) -> None:
    recipe, run = run_copy
    (run / "adapter_model.safetensors").unlink()
    before = tree_digest(run)
    r = run_cli(["eval", str(recipe), "--adapter", str(run)], cwd=run.parent, timeout=180)
    output = _flat(r.stdout + r.stderr)
    assert r.returncode == 1 and "Traceback" not in output, output[-3000:]
    for words in ("adapter_model.safetensors", "a finsft run folder holds", "adapter_config.json"):
        assert words in output, output[-3000:]
    assert "Repo id" not in output
    assert tree_digest(run) == before


def test_case3_train_overwrite_is_refused_while_eval_scores_the_run(run_copy: tuple[Path, Path],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Lost-data case 3, with two real commands: `finsft eval --adapter RUN` (a subprocess, stopped with SIGSTOP
    once it holds the run's lock) and `finsft train RECIPE --overwrite` of the same folder: the training is
    refused with the holder's command and pid; the evaluation then finishes and scores the adapter it started
    with; the run is untouched but for its new eval/ report."""
    recipe, run = run_copy
    config = json.loads(recipe.read_text())
    config["output"]["dir"] = str(run)
    mine = run.parent / "r.json"
    mine.write_text(json.dumps(config), encoding="utf-8")
    before = {k: v for k, v in tree_digest(run).items() if not k.startswith("eval/")}
    info = lock_path(run).with_name(lock_path(run).name + ".json")
    proc = subprocess.Popen([sys.executable, "-m", "finsft", "eval", str(mine), "--adapter", str(run), "--data",
                             str(recipe.parent / "ok.jsonl"), "--limit", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    try:
        end = time.monotonic() + 240
        while not (info.is_file() and "finsft eval" in info.read_text()) and proc.poll() is None:
            assert time.monotonic() < end, "eval never took the run's lock"
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[0]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            code = cli(["train", str(mine), "--overwrite"])
            output = _flat(_eval_out(capsys))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert code == 1 and "Traceback" not in output, output[-3000:]
        for words in (f"another finsft run is using {run}", "finsft eval --adapter", f"pid {proc.pid}"):
            assert words in output, output[-3000:]
        eval_output = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, eval_output[-3000:]
    assert {k: v for k, v in tree_digest(run).items() if not k.startswith("eval/")} == before
    assert json.loads((run / "eval" / "ok" / "eval.json").read_text())["adapter"] == str(run)
    assert not info.exists()  # released


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_a_run_being_trained_is_not_scored_or_merged(run_copy: tuple[Path, Path], tmp_path: Path, command: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe, run = run_copy
    before = tree_digest(run)
    holder = RunLock(lock_path(run), "finsft train")
    holder.acquire(run)
    try:
        args = (["eval", str(recipe), "--adapter", str(run)] if command == "eval"
                else ["merge", str(recipe), "--adapter", str(run), "--out", str(tmp_path / "merged")])
        code = cli(args)
    finally:
        holder.release()
    output = _flat(_eval_out(capsys))
    assert code == 1 and "Traceback" not in output, output[-3000:]
    for words in (f"another finsft run is using {run}", f"finsft train, pid {os.getpid()}"):
        assert words in output, output[-3000:]
    assert tree_digest(run) == before and not (tmp_path / "merged").exists()


# ------------------------------------------------------------------ a read-only run, a full disk (real ones)


@cache
def private_mounts() -> bool:
    """Whether this machine lets a process mount a tmpfs in its own mount namespace (``unshare -rm``)."""
    if shutil.which("unshare") is None:
        return False
    probe = Path(f"/tmp/finsft-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        probe.rmdir()


def run_in_namespace(setup: str, args: Sequence[str], cwd: Path, listing: Path | None = None
                     ) -> tuple[int, str, str]:
    """``python -m finsft ARGS`` in a private mount namespace after the shell commands ``setup`` (mounts);
    returns (exit code, output, the files left under ``listing`` afterwards, one per line)."""
    script = f'{setup} || exit 97; "$@"; rc=$?; echo "@@LEFT@@"; ' + (f'find "{listing}" -mindepth 1; ' if listing
                                                                          else "") + "exit $rc"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "finsft", *args],
                       cwd=cwd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    out, _, left = r.stdout.partition("@@LEFT@@")
    assert r.returncode != 97, r.stderr
    return r.returncode, out + r.stderr, left


NEEDS_MOUNTS = pytest.mark.skipif("not private_mounts()", reason="no private mount namespace here (unshare -rm)")


@NEEDS_MOUNTS
def test_case4_eval_of_a_read_only_run_is_refused_before_scoring(run_copy: tuple[Path, Path]) -> None:
    """Lost-data case 4: the run folder on a read-only mount (a bind mount remounted ro: EROFS, real for root
    too). The preflight refuses before the model loads, names --out, and the run is byte-identical."""
    recipe, run = run_copy
    before = tree_digest(run)
    code, output, _ = run_in_namespace(f'mount --bind "{run}" "{run}" && mount -o remount,ro,bind "{run}"',
                                       ["eval", str(recipe), "--adapter", str(run), "--limit", "2"], run.parent)
    flat = _flat(output)
    assert code == 1 and "Traceback" not in output, output[-3000:]
    for words in ("cannot be written", "--out DIR", str(run)):
        assert words in flat, output[-3000:]
    assert "evaluating" not in flat  # refused before any scoring
    assert tree_digest(run) == before


@NEEDS_MOUNTS
@pytest.mark.parametrize("command", ["train", "eval-out", "merge-out"])
def test_a_full_disk_ends_in_a_message(run_copy: tuple[Path, Path], tmp_path: Path, command: str) -> None:
    """A small tmpfs as the output (300 KiB; 8 KiB for eval's reports): the command ends with "No space left on device" (or torch's short write,
    named as a full disk), what was kept and what to do; no traceback, no temporary file left, the user's
    files and the run byte-identical."""
    recipe, run = run_copy
    disk = tmp_path / "disk"
    disk.mkdir()
    user_before, run_before = tree_digest(recipe.parent), tree_digest(run)
    if command == "train":
        args = ["train", str(recipe), f"output.dir={disk / 'out'}"]
        words = [("the disk is full", "No space left on device"), "The run is kept in", "free some space",
                 "--resume"]
    elif command == "eval-out":
        big = tmp_path / "many.jsonl"  # predictions.jsonl larger than the (8 KiB) disk
        rows = [{"input": f"Shares of Firm {i} rose after the bank raised its outlook for the quarter " * 3,
                 "output": "positive"} for i in range(60)]
        big.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        args = ["eval", str(recipe), "--adapter", str(run), "--data", str(big), "--out", str(disk / "res")]
        words = ["No space left on device", "The scores are printed above", "free some space"]
    else:
        args = ["merge", str(recipe), "--adapter", str(run), "--out", str(disk / "merged")]
        words = ["No space left on device", "Nothing was written", "free some space", "merge again"]
    size = "8k" if command == "eval-out" else "300k"
    code, output, left = run_in_namespace(f'mount -t tmpfs -o size={size} tmpfs "{disk}"', args, tmp_path,
                                          listing=disk)
    flat = _flat(output)
    assert code == 1 and "Traceback" not in output, output[-4000:]
    missing = [w for w in words if not _has(flat, w)]
    assert not missing, f"{missing}\n{output[-4000:]}"
    assert "finsft-tmp" not in left, left
    if command == "merge-out":
        assert not any(Path(p).name == "merged" for p in left.split()), left
    assert tree_digest(recipe.parent) == user_before and tree_digest(run) == run_before


# ------------------------------------------------------------------------ the acceptance grep (issue 24)


# Calls that open, write, rename or delete files. Outside finsft/files.py each occurrence must be on this list,
# with the reason it is not a user-named path (or is one the gate cannot serve).
FILE_CALLS = re.compile(r"(?<![\w.])open\(|\.write_text\(|\.write_bytes\(|rmtree\(|os\.replace\(|os\.rename\(|"
                        r"\.unlink\(|\.rename\(|savefig\(")
ALLOWED: dict[str, dict[str, str]] = {
    "finsft/files.py": {"*": "the two gates themselves"},
    "finsft/cli.py": {"os.open(os.devnull": "stdout onto /dev/null after a closed pipe (no file of the user's)"},
    "finsft/training/output.py": {
        "shutil.rmtree(path)": "the run's own work folder, removed only when it carries finsft's .finsft marker "
                               "and holds no link (_remove_finsft_folder checks both)",
        "os.replace(dirs.final, old)": "publishing: the earlier run (made_by_finsft checked) moved aside",
        "os.replace(dirs.work, dirs.final)": "publishing: the finished work folder (finsft's) renamed into place",
        "shutil.rmtree(old, ignore_errors=True)": "the earlier run moved aside by publish, finsft's own",
        'with open(path, "rb") as f:': "reading a checkpoint's safetensors header inside the run's work folder",
    },
    "finsft/evaluation/report.py": {"savefig(buffer": "a plot rendered into memory; the bytes go through the gate"},
    "finsft/training/trainer.py": {"card.unlink()": "PEFT's stub README.md in finsft's own checkpoints"},
    "finsft/data.py": {"os.replace(tmp, target)": "the tokenized-data cache, in finsft's cache folder",
                       "shutil.rmtree(tmp, ignore_errors=True)": "its temporary folder in finsft's cache"},
    "finsft/models.py": {"os.replace(tmp, target)": "the GGUF conversion, in finsft's cache folder",
                         "shutil.rmtree(tmp, ignore_errors=True)": "its temporary folder in finsft's cache",
                         "os.replace(part, tmp)": "random-weight models, in finsft's cache folder",
                         "shutil.rmtree(part, ignore_errors=True)": "its temporary folder in finsft's cache"},
    "finsft/bench.py": {"*": "finsft bench writes only into its own temporary work folder (tempfile.mkdtemp) and "
                             "reads the JSON its worker wrote there"},
    "finsft/library_schema.py": {"*": "developer tool: regenerates this repository's own generated file"},
    "finsft/docs.py": {"*": "developer tool: regenerates the README's generated reference in this repository"},
    "finsft/testing/__init__.py": {"*": "test helper: builds the tiny model into the folder a test gives it"},
    "benchmarks/gpu_check.py": {
        "with open(path, \"rb\") as f:": "is_check_record: reads a regular file the gate checked, to recognise its "
                                         "own record",
        "log_path.write_text(": "a command's log in the check's own --work folder",
        "*work*": "files in the check's own --work folder (logs, tiny models, recipes), never --out",
    },
}


def _allowed(rel: str, line: str) -> bool:
    rules = ALLOWED.get(rel, {})
    if "*" in rules:
        return True
    if "*work*" in rules and not re.search(r"\bout\b|args\.out|a\.out|self\.out", line):
        return True
    return any(key in line for key in rules if key not in ("*", "*work*"))


def _file_calls(root: Path, folders: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = str(path.relative_to(root))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                code = line.split("#", 1)[0]
                if FILE_CALLS.search(code) and not code.strip().startswith(('"', "'")):
                    yield rel, n, line.strip()


def test_no_file_call_outside_the_gates() -> None:
    """The acceptance grep: finsft/ opens, writes, renames and deletes files only through finsft/files.py, except
    the allow-listed writes into finsft's own folders (each with its reason above). benchmarks/gpu_check.py's
    --out goes through the gate too."""
    stray = [f"{rel}:{n}: {line}" for rel, n, line in _file_calls(REPO, ["finsft", "benchmarks"])
             if (rel.startswith("finsft/") or rel == "benchmarks/gpu_check.py") and not _allowed(rel, line)]
    assert not stray, "file calls outside the gates (route them through finsft.files, or justify them):\n" + \
        "\n".join(stray)
