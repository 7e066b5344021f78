"""Nothing lost, round 2: the files finsft writes (predict/eval/merge --out), symbolic links and folders a run does
not own, what is read as a recipe, names that become file names, and signals in every phase of a run.

The CLI cases reuse the table-driven harness of tests/test_faults.py (the real CLI in a subprocess: exit code, key
words of the message, no "Traceback", the user's folder byte-identical). The signal cases interrupt each phase
through the test hook FINSFT_TEST_SIGNAL_AT_PHASE (finsft/training/signals.py): the run sends itself the signal as
the phase begins, through the operating system and the real handler.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _runs import loss_steps, subprocess_env
from test_faults import TRAIN, Case, World, _has, run_cli, tree_digest, world  # noqa: F401

from finsft.cli import main as cli
from finsft.commands.evaluate import results_folder
from finsft.errors import FinsftError, OutputDirError
from finsft.files import MAX_RECIPE_BYTES
from finsft.recipe import load_recipe
from finsft.training.output import MARKER, RunDirs, check_checkpoint, prepare
from finsft.training.signals import TEST_SIGNAL_ENV

# ------------------------------------------------------------------------------------------ the CLI cases


def _data_copy(w: World) -> None:
    shutil.copy(w.user / "ok.jsonl", w.user / "train_copy.jsonl")


def _user_folder(w: World) -> None:
    (w.user / "results").mkdir()
    (w.user / "results" / "eval.json").write_text('{"my": "own notes"}\n', encoding="utf-8")


def _user_partial(w: World) -> None:
    """The user's own folder named like finsft's work folder: a recipe.json, no marker."""
    (w.runs / "out.partial").mkdir()
    (w.runs / "out.partial" / "recipe.json").write_text('{"mine": true}\n', encoding="utf-8")
    (w.runs / "out.partial" / "notes.txt").write_text("my notes\n", encoding="utf-8")


def _linked_checkpoints(w: World) -> None:
    """A finsft work folder whose checkpoints/ is a link to the user's folder of checkpoint-* folders."""
    mine = w.user / "my-checkpoints"
    for step in (1, 2):
        (mine / f"checkpoint-{step}").mkdir(parents=True)
        (mine / f"checkpoint-{step}" / "weights.txt").write_text(f"mine {step}\n", encoding="utf-8")
    work = w.runs / "out.partial"
    work.mkdir()
    (work / MARKER).write_text('{"created_by": "finsft"}\n', encoding="utf-8")
    (work / "checkpoints").symlink_to(mine, target_is_directory=True)


def _fifo(w: World) -> None:
    os.mkfifo(w.home / "fifo.json")  # outside the hashed user folder: hashing reads files, and a FIFO blocks


def _extends(target: str) -> Any:
    def setup(w: World) -> None:
        (w.user / "ext.json").write_text(json.dumps({"extends": target, "name": "x"}), encoding="utf-8")

    return setup


def _huge(w: World) -> None:
    with open(w.user / "huge.json", "wb") as f:
        f.truncate(MAX_RECIPE_BYTES + 1)  # sparse: no disk used


def _no_partial_deleted(w: World) -> None:
    assert (w.runs / "out.partial" / "notes.txt").read_text() == "my notes\n"
    assert not (w.runs / "out").exists()


LONG = "a" * 300

CASES = [
    # 1. files finsft writes
    Case("predict-out-is-the-training-data", ["predict", "{user}/r.json", "--input", "Shares rose", "--out",
                                              "{user}/train_copy.jsonl"], 1,
         ["train_copy.jsonl", "already exists", "never replaces", "name a new file"], setup=_data_copy),
    Case("eval-out-is-a-user-folder", ["eval", "{user}/r.json", "data.validation_size=4", "--out", "{user}/results"],
         1, ["results", "files finsft did not write", "new or empty folder"], setup=_user_folder),
    Case("eval-out-is-a-file", ["eval", "{user}/r.json", "data.validation_size=4", "--out", "{user}/notes.txt"], 1,
         ["notes.txt", "is a file", "does not replace"]),
    Case("merge-out-is-a-file", ["merge", "{user}/r.json", "--adapter", "{runs}/none", "--out", "{user}/notes.txt"],
         1, ["notes.txt", "is a file", "does not replace", "new folder"]),
    # 3. symbolic links out of the run folder
    Case("checkpoints-link-out-of-the-run", [*TRAIN, "training.save_total_limit=1", "training.save_steps=1",
                                             "--resume", "--force"], 1,
         ["checkpoints", "symbolic link", "my-checkpoints", "remove the link"], setup=_linked_checkpoints,
         also_keep=["out.partial"]),
    # 4. a <dir>.partial without the marker is the user's
    *[Case(f"user-partial-{mode or 'plain'}", [*TRAIN, *([mode] if mode else [])], 1,
           ["out.partial", MARKER, "not a finsft run", "choose another output.dir"], setup=_user_partial,
           check=_no_partial_deleted, also_keep=["out.partial"])
      for mode in ("", "--overwrite", "--resume")],
    # 5. what is read as a recipe
    Case("recipe-is-a-fifo", ["validate", "{home}/fifo.json"], 1, ["fifo.json", "named pipe (FIFO)", "not a JSON file"],
         setup=_fifo),
    Case("train-recipe-is-a-fifo", ["train", "{home}/fifo.json"], 1, ["fifo.json", "named pipe (FIFO)"], setup=_fifo),
    Case("extends-dev-zero", ["validate", "{user}/ext.json"], 1, ["/dev/zero", "character device", "not a JSON file"],
         setup=_extends("/dev/zero")),
    Case("extends-a-folder", ["validate", "{user}/ext.json"], 1, ["model", "a folder", "not a JSON file"],
         setup=_extends("model")),
    Case("recipe-is-huge", ["validate", "{user}/huge.json"], 1, ["huge.json", "10,485,761 bytes", "10 MiB"],
         setup=_huge),
    # 6. names that become file or folder names
    Case("eval-set-name-300-chars", ["validate", "{user}/r.json", "--set", "data.validation_size=4", "--set",
                                     f"evaluation.sets.{LONG}.path={{user}}/ok.jsonl"], 1,
         ["$.evaluation.sets", "300 characters", "at most 100", "shorter"]),
    Case("run-name-300-chars", ["validate", "{user}/r.json", "--set", f"training.run_name={LONG}"], 1,
         ["$.training.run_name", "300 characters", "at most 100"]),
    Case("run-name-with-a-slash", ["validate", "{user}/r.json", "--set", "training.run_name=../../x"], 1,
         ["$.training.run_name", "slash"]),
    Case("recipe-name-300-chars", ["validate", "{user}/r.json", "--set", f"name={LONG}"], 1,
         ["$.name", "300 characters"]),
]


# Cases that load the heavy libraries before they refuse run in-process (cli.main, the same entry point without
# the interpreter start-up, ~25 s each on a loaded 2-core machine); one case of each kind runs as a subprocess.
IN_PROCESS = {"eval-out-is-a-file", "eval-out-is-a-user-folder", "merge-out-is-a-file", "user-partial---overwrite",
              "user-partial---resume"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=list(c.marks)) for c in CASES])
def test_fault(world: World, case: Case, monkeypatch: pytest.MonkeyPatch,  # noqa: F811 (the fixture imported above)
               capsys: pytest.CaptureFixture[str]) -> None:
    if case.setup:
        case.setup(world)
    before = tree_digest(world.user)
    kept = {p: tree_digest(world.runs / p) for p in case.also_keep}
    args = [world.fill(a) for a in case.args]
    t0 = time.monotonic()
    if case.id in IN_PROCESS:
        monkeypatch.chdir(world.user)
        code = cli(args)
        captured = capsys.readouterr()
        output = captured.out + captured.err
    else:
        result = run_cli(args, cwd=world.user, timeout=120)  # a FIFO read would block: the timeout fails the test
        code, output = result.returncode, result.stdout + result.stderr
    shown = f"$ finsft {' '.join(args)}\nexit {code} after {time.monotonic() - t0:.1f} s\n{output[-4000:]}"
    assert "Traceback" not in output, shown
    assert code == case.code, shown
    words = [tuple(world.fill(x) for x in w) if isinstance(w, tuple) else world.fill(w) for w in case.words]
    missing = [w for w in words if not _has(output, w)]
    assert not missing, f"message lacks {missing}:\n{shown}"
    assert tree_digest(world.user) == before, f"the user's files changed:\n{shown}"
    for p, digest in kept.items():
        assert tree_digest(world.runs / p) == digest, f"runs/{p} changed:\n{shown}"
    if case.check:
        case.check(world)


def test_a_fifo_recipe_is_refused_in_under_a_second(tmp_path: Path) -> None:
    """In-process (no interpreter start-up in the figure): stat, not open, tells a FIFO or device from a file."""
    os.mkfifo(tmp_path / "fifo.json")
    for path in (tmp_path / "fifo.json", Path("/dev/zero")):
        t0 = time.monotonic()
        assert cli(["validate", str(path)]) == 1
        assert time.monotonic() - t0 < 1.0


@pytest.mark.slow
def test_eval_out_at_a_training_run_writes_under_its_eval_folder(world: World) -> None:  # noqa: F811
    """`finsft eval --adapter RUN --out RUN` (and --out RUN alone) writes RUN/eval/<name>/; the training's own
    eval.json, predictions, plot, card and every other file stay byte-identical."""
    recipe = world.user / "r.json"
    config = json.loads(recipe.read_text())
    config["data"]["validation_size"] = 4
    config["evaluation"] = {"max_samples": 4}
    recipe.write_text(json.dumps(config))
    run = world.runs / "done"
    assert cli(["train", str(recipe), f"output.dir={run}"]) == 0  # in-process: the training is not the subject
    assert (run / "eval.json").is_file()
    before = tree_digest(run)
    result = run_cli(["eval", str(recipe), "--adapter", str(run), "--out", str(run), "--data",
                      str(world.user / "ok.jsonl"), "--limit", "3"], cwd=world.user)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    after = tree_digest(run)
    assert {k: v for k, v in after.items() if k != "eval" and not k.startswith("eval/")} == before
    assert json.loads((run / "eval" / "ok" / "eval.json").read_text())["rows"] == 3
    assert f"to {run / 'eval' / 'ok'}" in " ".join(output.split())


def test_results_folder_rules(tmp_path: Path) -> None:
    """eval --out: new, empty or finsft's own results are written; a training run gets eval/<name>/, never over
    the sets it scored itself; anything else is refused."""
    assert results_folder(str(tmp_path / "new"), None, "x") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert results_folder(str(tmp_path / "empty"), None, "x") == tmp_path / "empty"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "eval.json").write_text(json.dumps({k: 1 for k in ("model", "data", "rows", "rows_fingerprint",
                                                                  "settings", "metrics")}))
    (earlier / "predictions.jsonl").write_text("")
    assert results_folder(str(earlier), None, "x") == earlier
    (earlier / "mine.txt").write_text("mine")
    with pytest.raises(FinsftError, match="did not write"):
        results_folder(str(earlier), None, "x")
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")
    (run / "recipe.json").write_text(json.dumps({"evaluation": {"sets": {"fpb": {"path": "fpb.jsonl"}}}}))
    assert results_folder(str(run), None, "tfns") == run / "eval" / "tfns"
    (run / "eval" / "fpb").mkdir(parents=True)
    for out, adapter in ((str(run), None), (None, run)):
        with pytest.raises(FinsftError, match="training run's own evaluation of its set 'fpb'"):
            results_folder(out, adapter, "fpb")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FinsftError, match="symbolic link"):
        results_folder(str(tmp_path / "link"), None, "x")


# ------------------------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(work: Path, name: str, state: dict[str, Any]) -> Path:
    ckpt = work / "checkpoints" / name
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_a_checkpoint_that_disagrees_with_its_name_or_the_recipe_is_refused(make_recipe: Any) -> None:
    recipe = load_recipe(str(make_recipe(training={"max_steps": 4})))
    dirs = RunDirs.for_recipe(recipe)
    prepare(recipe, dirs, overwrite=False, resume=False, force=False)
    ckpt = _fake_checkpoint(dirs.work, "checkpoint-2", {"global_step": 99, "max_steps": 4})
    with pytest.raises(OutputDirError, match=r"global_step 99, but the folder is named for step 2.*Delete that"):
        prepare(recipe, dirs, overwrite=False, resume=True, force=False)
    shutil.rmtree(ckpt)
    _fake_checkpoint(dirs.work, "checkpoint-9", {"global_step": 9, "max_steps": 9})
    with pytest.raises(OutputDirError, match=r"step 9, beyond the recipe's training.max_steps=4"):
        prepare(recipe, dirs, overwrite=False, resume=True, force=False)
    check_checkpoint(ckpt.with_name("checkpoint-9"), -1)  # epochs (no max_steps): the name check alone


def test_a_symlinked_work_folder_is_refused(make_recipe: Any, tmp_path: Path) -> None:
    recipe = load_recipe(str(make_recipe()))
    dirs = RunDirs.for_recipe(recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MARKER).write_text("{}")
    dirs.work.symlink_to(elsewhere, target_is_directory=True)
    for mode in ({"overwrite": True, "resume": False}, {"overwrite": False, "resume": True}):
        with pytest.raises(OutputDirError, match="symbolic link"):
            prepare(recipe, dirs, force=False, **mode)
    assert (elsewhere / MARKER).is_file()


# ----------------------------------------------------------------------------------------------- signals

PHASE_WORDS = {"setup": "during setup", "model": "during model loading",
               "before": "during the evaluation of the base model", "training": "stopped at step 1/",
               "saving": "during saving", "after": "during the evaluation of the trained model",
               "finish": "during finishing"}


def _signal_recipe(make_recipe: Any) -> Path:
    return make_recipe(data={"validation_size": 4}, training={"max_steps": 2, "save_steps": 1},
                       evaluation={"max_samples": 4, "before_training": True}, output={"plot": False})


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASE_WORDS))
def test_a_signal_in_every_phase_says_what_was_kept_and_how_to_continue(
        make_recipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        phase: str) -> None:
    path = _signal_recipe(make_recipe)
    sig = signal.SIGINT if phase == "model" else signal.SIGTERM
    monkeypatch.setenv(TEST_SIGNAL_ENV, f"{phase}:{sig.name}")
    data_before = tree_digest(tmp_path / "recipe.json")
    assert cli([str(path), "training.seed=3"]) == 128 + sig
    err = " ".join(capsys.readouterr().err.split())
    out, work = tmp_path / "recipe-out", tmp_path / "recipe-out.partial"
    assert sig.name in err and PHASE_WORDS[phase] in err, err
    assert "Traceback" not in err and not out.exists()
    assert tree_digest(tmp_path / "recipe.json") == data_before
    if phase == "setup":
        assert f"nothing was written and {out} is unchanged. Start again with: finsft train {path} training.seed=3" \
            in err
        assert not work.exists()
        return
    assert f"Resume with: finsft train {path} training.seed=3 --resume" in err and str(work) in err
    if phase in ("saving", "after", "finish"):
        assert "training had finished at step 2" in err and "it does not train again" in err
        if phase == "after":
            return  # resumed in the subprocess test below
        monkeypatch.delenv(TEST_SIGNAL_ENV)
        assert cli([str(path), "training.seed=3", "--resume"]) == 0
        resumed = capsys.readouterr().out
        assert "not training again" in resumed
        assert loss_steps(out) == [1, 2]  # no step past max_steps
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["train"]["global_step"] == 2 and (out / "eval.json").is_file()
    elif phase in ("model", "before"):
        assert "newest checkpoint: none, no training step was saved" in err


@pytest.mark.slow
def test_sigterm_during_the_evaluation_after_training_then_resume(make_recipe: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The real CLI in a subprocess: exit 143 with the resume line; --resume evaluates and publishes without a
    training step past max_steps; a checkpoint edited to claim more steps than the recipe allows is refused."""
    path = _signal_recipe(make_recipe)
    env = {**subprocess_env(), TEST_SIGNAL_ENV: "after"}
    first = subprocess.run([sys.executable, "-m", "finsft", "train", str(path)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    text = first.stdout + first.stderr
    assert first.returncode == 143, text[-3000:]
    assert f"Resume with:\n  finsft train {path} --resume\n" in text and "Traceback" not in text
    work = tmp_path / "recipe-out.partial"
    state_file = work / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    good = state_file.read_text()
    state_file.write_text(good.replace('"global_step": 2', '"global_step": 7'))
    env.pop(TEST_SIGNAL_ENV)
    monkeypatch.chdir(tmp_path)
    assert cli(["train", str(path), "--resume"]) == 1  # in-process: the refusal comes before any model is loaded
    assert "global_step 7, but the folder is named for step 2" in capsys.readouterr().err
    assert not (tmp_path / "recipe-out").exists()
    state_file.write_text(good)
    resumed = subprocess.run([sys.executable, "-m", "finsft", "train", str(path), "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    out = tmp_path / "recipe-out"
    assert loss_steps(out) == [1, 2]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "eval.json").is_file()
