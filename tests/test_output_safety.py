"""Nothing lost, even when misused: what ``--overwrite`` may replace, one run per output folder, and the messages
for output folders that cannot be used. In process for the rules (fast), real subprocesses for the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _runs import start_finsft, subprocess_env, wait_for

from finsft.errors import OutputDirError
from finsft.recipe import load_recipe
from finsft.training.output import MARKER, RunDirs, RunLock, made_by_finsft, prepare, publish


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _prepare(make_recipe: Any, *overrides: str) -> tuple[Any, RunDirs]:
    recipe = load_recipe(str(make_recipe()), list(overrides))
    dirs = RunDirs.for_recipe(recipe)
    return recipe, dirs


def test_overwrite_never_replaces_the_model_folder(make_recipe: Any, tiny_model: Path) -> None:
    before = tree_digest(tiny_model)
    recipe, dirs = _prepare(make_recipe, f"output.dir={tiny_model}")
    with pytest.raises(OutputDirError, match="the model folder"):
        prepare(recipe, dirs, overwrite=True, resume=False, force=False)
    assert tree_digest(tiny_model) == before and not dirs.work.exists()


def test_overwrite_never_replaces_the_current_folder_or_a_parent(make_recipe: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "project"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    path = make_recipe()
    before = tree_digest(tmp_path)
    monkeypatch.chdir(work / "sub")
    for target in (".", "..", str(tmp_path), "/"):
        recipe = load_recipe(str(path), [f"output.dir={target}"])
        with pytest.raises(OutputDirError, match="current folder"):
            prepare(recipe, RunDirs.for_recipe(recipe), overwrite=True, resume=False, force=False)
    assert tree_digest(tmp_path) == before


def test_overwrite_never_replaces_data_or_a_folder_finsft_did_not_make(make_recipe: Any, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    recipe, dirs = _prepare(make_recipe, f"output.dir={mine}")
    with pytest.raises(OutputDirError, match="not made by finsft"):
        prepare(recipe, dirs, overwrite=True, resume=False, force=False)
    assert (mine / "thesis.tex").read_text() == "years of work"

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = data_dir / "train.jsonl"
    rows.write_text(json.dumps({"instruction": "i", "input": "x", "output": "positive"}) + "\n")
    recipe, dirs = _prepare(make_recipe, f"data.path={rows}", f"output.dir={data_dir}")
    with pytest.raises(OutputDirError, match="the training data"):
        prepare(recipe, dirs, overwrite=True, resume=False, force=False)
    assert rows.read_text().startswith('{"instruction"')


def test_output_dir_that_is_a_file_or_under_one_is_refused(make_recipe: Any, tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"\x00weights")
    recipe, dirs = _prepare(make_recipe, f"output.dir={target}")
    with pytest.raises(OutputDirError, match="is a file"):
        prepare(recipe, dirs, overwrite=True, resume=False, force=False)
    assert target.read_bytes() == b"\x00weights" and not list(tmp_path.glob("model.bin.*"))
    recipe, dirs = _prepare(make_recipe, f"output.dir={target / 'run'}")
    with pytest.raises(OutputDirError, match="is a file"):
        prepare(recipe, dirs, overwrite=True, resume=False, force=False)


def test_overwrite_replaces_a_finsft_run_only_at_publish(make_recipe: Any) -> None:
    recipe, dirs = _prepare(make_recipe)
    assert prepare(recipe, dirs, overwrite=False, resume=False, force=False) is None
    assert made_by_finsft(dirs.work) and (dirs.work / MARKER).is_file()
    (dirs.work / "adapter_model.safetensors").write_bytes(b"first")
    publish(dirs)
    with pytest.raises(OutputDirError, match="--overwrite"):
        prepare(recipe, dirs, overwrite=False, resume=False, force=False)
    prepare(recipe, dirs, overwrite=True, resume=False, force=False)
    assert (dirs.final / "adapter_model.safetensors").read_bytes() == b"first"  # kept until the new run is done
    (dirs.work / "adapter_model.safetensors").write_bytes(b"second")
    publish(dirs)
    assert (dirs.final / "adapter_model.safetensors").read_bytes() == b"second"
    assert not list(dirs.final.parent.glob(f".{dirs.final.name}.old-*"))


def test_publish_refuses_a_folder_that_changed_hands_during_the_run(make_recipe: Any) -> None:
    recipe, dirs = _prepare(make_recipe)
    prepare(recipe, dirs, overwrite=False, resume=False, force=False)
    dirs.final.mkdir()
    (dirs.final / "notes.txt").write_text("created meanwhile")
    with pytest.raises(OutputDirError, match="kept in"):
        publish(dirs)
    assert (dirs.final / "notes.txt").read_text() == "created meanwhile" and dirs.work.is_dir()


def test_damaged_recipe_json_of_an_interrupted_run_is_explained(make_recipe: Any) -> None:
    recipe, dirs = _prepare(make_recipe)
    prepare(recipe, dirs, overwrite=False, resume=False, force=False)
    (dirs.work / "recipe.json").write_bytes(b'{"name": "tiny", "mod\xff')
    with pytest.raises(OutputDirError, match=r"damaged.*--force"):
        prepare(recipe, dirs, overwrite=False, resume=True, force=False)
    assert prepare(recipe, dirs, overwrite=False, resume=True, force=True) is None
    assert json.loads((dirs.work / "recipe.json").read_text()) == recipe.config


def test_an_unwritable_output_parent_is_explained(make_recipe: Any) -> None:
    recipe, dirs = _prepare(make_recipe, "output.dir=/proc/finsft-run")  # not writable, even for root
    with pytest.raises(OutputDirError, match="finsft-run"):
        RunLock(dirs.lock_file).acquire(dirs.final)
        prepare(recipe, dirs, overwrite=False, resume=False, force=False)


def test_one_run_per_folder_and_a_dead_holder_does_not_block(tmp_path: Path) -> None:
    final = tmp_path / "run"
    first = RunLock(tmp_path / ".run.finsft-lock")
    first.acquire(final)
    second = RunLock(tmp_path / ".run.finsft-lock")
    with pytest.raises(OutputDirError, match=rf"another finsft run is using .*pid {os.getpid()} on "):
        second.acquire(final)
    first.release()
    second.acquire(final)
    second.release()

    # A holder killed with SIGKILL cannot clean up; the operating system releases its lock.
    code = ("import sys, time; from pathlib import Path; from finsft.training.output import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(Path(sys.argv[2])); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".run.finsft-lock"), str(final)],
                            stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    with pytest.raises(OutputDirError, match=f"pid {proc.pid}"):
        RunLock(tmp_path / ".run.finsft-lock").acquire(final)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    third = RunLock(tmp_path / ".run.finsft-lock")
    third.acquire(final)
    third.release()


# ------------------------------------------------------------------------------------------ the real command


def _finsft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finsft", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_overwrite_into_the_model_folder_or_cwd_is_refused(make_recipe: Any, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    recipe = make_recipe()
    before_model, before_cwd = tree_digest(tiny_model), tree_digest(tmp_path)
    for target, words in ((str(tiny_model), "the model folder"), (".", "current folder")):
        proc = _finsft("train", str(recipe), f"output.dir={target}", "--overwrite", cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert words in proc.stderr and "choose a new folder" in proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
    assert tree_digest(tiny_model) == before_model
    assert tree_digest(tmp_path) == before_cwd


@pytest.mark.slow
def test_cli_a_second_run_on_a_busy_folder_is_refused(make_recipe: Any, tmp_path: Path) -> None:
    """While a run trains, a second train --overwrite / --resume / plain train on its folder is refused with who
    holds it, and the first run goes on undisturbed (one writer: no step logged twice)."""
    path = make_recipe(training={"max_steps": 1_000_000, "save_steps": 1_000_000})
    out = tmp_path / "recipe-out"
    work = Path(str(out) + ".partial")
    proc = start_finsft([str(path)], tmp_path / "first.log")
    try:
        assert wait_for(lambda: (work / "metrics.jsonl").exists(), proc)
        for extra in (["--overwrite"], ["--resume"], []):
            second = _finsft(str(path), *extra, cwd=tmp_path)
            assert second.returncode == 1, second.stdout + second.stderr
            assert f"another finsft run is using {out}" in second.stderr and f"pid {proc.pid}" in second.stderr
            assert "Traceback" not in second.stdout + second.stderr
        assert proc.poll() is None, "the first run must still be training"
        proc.send_signal(signal.SIGTERM)  # checkpoint and stop
        assert proc.wait(300) == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice
    assert (work / "recipe.json").is_file() and not out.exists()


@pytest.mark.slow
def test_cli_disk_full_during_a_checkpoint_is_a_message_and_the_run_resumes(make_recipe: Any, tmp_path: Path) -> None:
    """A file-size limit (as a full disk would) cuts the first checkpoint short: a message with the resume command,
    no traceback; the broken checkpoint is skipped and --resume (with room again) finishes the run."""
    path = make_recipe(lora=None, training={"max_steps": 4, "save_steps": 2})  # full model: ~0.6 MB of weights
    cmd = f"ulimit -f 400; exec {sys.executable} -m finsft train {path}"  # 400 KiB per file
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "File too large" in proc.stderr and f"continue with: finsft train {path} --resume" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    work = tmp_path / "recipe-out.partial"
    assert work.is_dir() and not (tmp_path / "recipe-out").exists()
    resumed = _finsft("train", str(path), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "recipe-out" / "manifest.json").read_text())["train"]["global_step"] == 4
