"""Resume: an interrupted run continues from its newest complete checkpoint with the same data order, its metrics
log continues without repeated steps, and a changed recipe is refused with a diff unless forced."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from _runs import adapter, loss_steps, max_abs_diff, metrics, start_finsft, wait_for
from safetensors.torch import save_file

from finsft.cli import main as cli
from finsft.errors import OutputDirError
from finsft.recipe import load_recipe
from finsft.training.launch import resume_command
from finsft.training.output import (
    RunDirs,
    latest_checkpoint,
    mean_train_loss,
    prepare,
    trim_metrics,
)


def _checkpoint(work: Path, step: int, complete: bool = True) -> Path:
    ckpt = work / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.zeros(4, 4)}, str(ckpt / "adapter_model.safetensors"))
    if complete:
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


# ------------------------------------------------------------------------------------------------ unit level


def test_latest_checkpoint_skips_one_cut_short(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # killed while saving: no trainer_state.json yet
    bad = _checkpoint(tmp_path, 14)
    (bad / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-10")  # numeric, not "2" > "10"


def test_latest_checkpoint_skips_a_truncated_weight_or_optimizer_file(tmp_path: Path) -> None:
    """A full disk or a kill can cut a weights/optimizer file short after trainer_state.json of a checkpoint was
    written: such a checkpoint is skipped, so that the resume hint never points at the same broken one."""
    _checkpoint(tmp_path, 2)
    torch.save({"state": torch.zeros(8)}, tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.pt")
    adapter = _checkpoint(tmp_path, 4) / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-10])
    optim = _checkpoint(tmp_path, 6) / "optimizer.pt"
    torch.save({"state": torch.zeros(1000)}, optim)
    optim.write_bytes(optim.read_bytes()[:200])
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "checkpoint-2")


def test_trim_metrics_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4, 5)]
    lines.insert(4, json.dumps({"step": 4, "eval_loss": 0.3}))
    lines.append(json.dumps({"step": 5, "train_loss": 0.4, "train_runtime": 1.0}))  # end-of-run summary
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the kill cut the last line
    kept = trim_metrics(path, 4)
    assert [(r["step"], sorted(r)) for r in kept] == [(1, ["loss", "step"]), (2, ["loss", "step"]),
                                                     (3, ["loss", "step"]), (4, ["loss", "step"]),
                                                     (4, ["eval_loss", "step"])]
    assert [json.loads(x) for x in path.read_text().splitlines()] == kept
    assert trim_metrics(path, 0) == [] and path.read_text() == ""
    assert trim_metrics(tmp_path / "absent.jsonl", 3) == []


def test_mean_train_loss_weights_each_record_by_its_steps() -> None:
    history = [{"step": 1, "loss": 4.0}, {"step": 3, "loss": 1.0}, {"step": 3, "eval_loss": 9.0},
               {"step": 4, "loss": 2.0}]
    assert mean_train_loss(history) == pytest.approx((4.0 + 2 * 1.0 + 2.0) / 4)
    assert mean_train_loss([]) is None


def test_resume_refuses_a_changed_recipe_with_a_diff_unless_forced(make_recipe: Any) -> None:
    path = make_recipe()
    recipe = load_recipe(str(path))
    dirs = RunDirs.for_recipe(recipe)
    with pytest.raises(OutputDirError, match="nothing to resume"):
        prepare(recipe, dirs, overwrite=False, resume=True, force=False)
    assert prepare(recipe, dirs, overwrite=False, resume=False, force=False) is None
    ckpt = _checkpoint(dirs.work, 2)  # the recipe's max_steps: a later step would be refused
    assert prepare(recipe, dirs, overwrite=False, resume=True, force=False) == str(ckpt)

    changed = load_recipe(str(path), ["training.learning_rate=0.5", "lora.r=8"])
    with pytest.raises(OutputDirError) as err:
        prepare(changed, dirs, overwrite=False, resume=True, force=False)
    text = str(err.value)
    assert "--force" in text and "--overwrite" in text
    assert '-    "learning_rate": 0.001,' in text and '+    "learning_rate": 0.5,' in text
    assert '-    "r": 4,' in text and '+    "r": 8,' in text
    # forced: the checkpoint is used and the new recipe becomes the run's recipe
    assert prepare(changed, dirs, overwrite=False, resume=True, force=True) == str(ckpt)
    assert json.loads((dirs.work / "recipe.json").read_text()) == changed.config
    # a plain run refuses to touch the interrupted run
    with pytest.raises(OutputDirError, match="--resume"):
        prepare(recipe, dirs, overwrite=False, resume=False, force=False)


def test_resume_command_repeats_the_command_line(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(str(make_recipe()))
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert (resume_command(recipe, ["finsft", "train", "my recipe.json", "training.max_steps=3", "--overwrite"])
            == "finsft train 'my recipe.json' training.max_steps=3 --resume")
    assert resume_command(recipe, ["finsft", "train", "r.json", "--resume", "--force"]) == "finsft train r.json --resume"
    assert resume_command(recipe) == f"finsft train {recipe.source} --resume"
    # started by a launcher: its command line comes first (here pytest's parent is no launcher: a placeholder)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert (resume_command(recipe, ["finsft", "train", "r.json"])
            == "accelerate launch <the same launch options> -m finsft train r.json --resume")


# ----------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(make_recipe: Any, tmp_path: Path) -> None:
    """kill -9 once checkpoint-2 (or -4) is complete, resume, and compare with the same run done in one go. The
    Trainer restores optimizer, scheduler and RNG state and skips the batches already seen (same seed, same
    sampler), so the adapter matches (measured: max abs difference 0.0)."""
    # group_by_length stays "auto" (on, on CPU): the length-grouped sampler must also replay the same order.
    sections: dict[str, Any] = {"training": {"max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 8,
                                             "logging_steps": 1}}
    path = make_recipe("resumed", **sections)
    out = tmp_path / "resumed-out"
    work = out.with_name(out.name + ".partial")

    def checkpointed() -> bool:
        return latest_checkpoint(work) is not None

    proc = start_finsft([str(path), "--overwrite"], tmp_path / "first.log")
    try:
        reached = wait_for(checkpointed, proc)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(60)
    log = (tmp_path / "first.log").read_text()
    assert reached and proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log}"
    assert not out.exists() and work.is_dir()
    killed_at = Path(latest_checkpoint(work) or "").name
    # normally checkpoint-2 (polled every 10 ms); -4 or -6 only on a very slow machine, still a valid resume
    assert killed_at in ("checkpoint-2", "checkpoint-4", "checkpoint-6")

    assert cli([str(path), "--resume"]) == 0
    assert not work.exists()
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "loss.png").is_file() and (out / "tokenizer.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["global_step"] == 6
    assert manifest["train"]["resumed_from"] == f"checkpoints/{killed_at}"
    assert loss_steps(out) == [1, 2, 3, 4, 5, 6]  # continued, no step twice
    assert sum(1 for r in metrics(out) if "train_loss" in r) == 1

    ref_path = make_recipe("straight", **sections)
    assert cli([str(ref_path)]) == 0
    ref = tmp_path / "straight-out"
    diff = max_abs_diff(adapter(out), adapter(ref))
    print(f"resumed from {killed_at}: max |adapter - uninterrupted adapter| = {diff:.3g}")
    assert diff < 1e-6
    ref_losses = [r["loss"] for r in metrics(ref) if "loss" in r]
    assert [r["loss"] for r in metrics(out) if "loss" in r] == pytest.approx(ref_losses, rel=1e-5)
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    assert manifest["train"]["train_loss"] == pytest.approx(ref_manifest["train"]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_before_any_checkpoint_starts_over_cleanly(make_recipe: Any, tmp_path: Path) -> None:
    """A run killed before its first checkpoint: --resume trains from step 0 and the stale log lines go."""
    path = make_recipe(training={"max_steps": 2, "save_steps": 100})
    recipe = load_recipe(str(path))
    dirs = RunDirs.for_recipe(recipe)
    prepare(recipe, dirs, overwrite=False, resume=False, force=False)
    (dirs.work / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    assert cli([str(path), "--resume"]) == 0
    assert loss_steps(dirs.final) == [1, 2]
    assert all(r["loss"] != 99.0 for r in metrics(dirs.final) if "loss" in r)
    assert json.loads((dirs.final / "manifest.json").read_text())["train"]["resumed_from"] is None
