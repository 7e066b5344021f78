"""Experiment tracking (TensorBoard, offline), early stopping with the best checkpoint, and the Hugging Face-style
files at the top of the run folder: real training runs of the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from _runs import adapter, max_abs_diff

from finsft.errors import FinsftError
from finsft.preflight import check_trackers, missing_trackers
from finsft.recipe import load_recipe
from finsft.training import train

FAST = {"warmup_steps": 0, "lr_scheduler_type": "constant"}
VALIDATION = {"max_samples": 24, "validation_size": 8}


def run(make_recipe: Any, **sections: Any) -> Path:
    sections["training"] = {**FAST, **sections.get("training", {})}
    return train(load_recipe(str(make_recipe(**sections))))


def events(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "runs").rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {run_dir / 'runs'}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_missing_trackers_are_named_with_their_pip_package() -> None:
    assert missing_trackers("none") == [] and missing_trackers(None) == []
    if importlib.util.find_spec("wandb") is None:
        assert missing_trackers(["tensorboard", "wandb"]) == (
            [] if importlib.util.find_spec("tensorboard") else ["tensorboard"]) + ["wandb"]
        with pytest.raises(FinsftError, match="pip install wandb"):
            check_trackers("wandb")
    if importlib.util.find_spec("comet_ml") is None:
        with pytest.raises(FinsftError, match="pip install comet-ml"):
            check_trackers(["comet_ml"])


@pytest.mark.slow
def test_tensorboard_run_writes_events_with_the_loss_and_the_recipe(make_recipe: Any) -> None:
    pytest.importorskip("tensorboard", reason="pip install 'finsft[tensorboard]' (part of the dev extra)")
    out = run(make_recipe, training={"report_to": "tensorboard", "max_steps": 3})
    acc = events(out)
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3] and all(e.value > 0 for e in losses)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 4) for e in losses] == [round(r["loss"], 4) for r in metrics if "loss" in r]
    texts = acc.Tags()["tensors"]
    assert "finsft_recipe/text_summary" in texts and "args/text_summary" in texts
    recipe_text = acc.Tensors("finsft_recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard"' in recipe_text and '"name_or_path"' in recipe_text
    # the run name is the recipe's name
    args_text = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"run_name": "tiny"' in args_text


@pytest.mark.slow
def test_early_stopping_stops_and_keeps_the_best_checkpoint(make_recipe: Any) -> None:
    # An improvement must exceed 100 to count: every evaluation after the first is "no better", so with
    # patience 2 training stops at the third evaluation, long before max_steps.
    out = run(make_recipe, data=VALIDATION, training={
        "max_steps": 30, "eval_steps": 1, "early_stopping_patience": 2, "early_stopping_threshold": 100})
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["max_steps"] == 30
    evals = [r for r in state["log_history"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    best_step = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert state["best_metric"] == pytest.approx(min(r["eval_loss"] for r in evals))
    best = Path(state["best_model_checkpoint"])
    assert best == out / "checkpoints" / f"checkpoint-{best_step}" and best.is_dir()  # path after publishing
    # load_best_model_at_end (turned on by early stopping): the saved adapter is the best checkpoint's
    assert max_abs_diff(adapter(out), adapter(best)) == 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["global_step"] == 3


@pytest.mark.slow
def test_run_folder_has_trainer_state_and_results_at_the_top(make_recipe: Any) -> None:
    out = run(make_recipe, data=VALIDATION, training={"max_steps": 2, "eval_steps": 2},
              evaluation={"max_samples": 4, "batch_size": 4})
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("loss" in r for r in state["log_history"])
    train_results = json.loads((out / "train_results.json").read_text())
    assert train_results["train_loss"] > 0 and train_results["train_runtime"] > 0
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_loss"] > 0
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results["train_loss"] == train_results["train_loss"]
    assert all_results["eval_loss"] == eval_results["eval_loss"]
    task = json.loads((out / "eval.json").read_text())["metrics"]
    assert all_results["task_accuracy"] == task["accuracy"] and "task_weighted_f1" in all_results


@pytest.mark.slow
def test_task_metric_at_each_evaluation_chooses_the_best_checkpoint(make_recipe: Any) -> None:
    """Classification: each evaluation during training also scores the task on a seeded validation sample;
    eval_weighted_f1 is in metrics.jsonl and trainer_state.json, and metric_for_best_model can use it."""
    out = run(make_recipe, data=VALIDATION, training={
        "max_steps": 4, "eval_steps": 2, "eval_task_samples": 6, "metric_for_best_model": "weighted_f1",
        "load_best_model_at_end": True})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    task = [r for r in records if "eval_weighted_f1" in r]
    assert [r["step"] for r in task] == [2, 4]
    assert all(0 <= r[k] <= 1 for r in task for k in ("eval_accuracy", "eval_macro_f1", "eval_weighted_f1"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(max(r["eval_weighted_f1"] for r in task))
    best_step = max(task, key=lambda r: r["eval_weighted_f1"])["step"]  # first of equals: the Trainer keeps it
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"


def test_task_metrics_need_a_classification_template_and_samples(make_recipe: Any) -> None:
    from finsft.recipe import check_recipe

    ok = make_recipe("ok", data=VALIDATION, training={"eval_steps": 2, "metric_for_best_model": "eval_weighted_f1"})
    assert check_recipe(str(ok))[1] == []
    off = make_recipe("off", data=VALIDATION, training={"eval_steps": 2, "metric_for_best_model": "weighted_f1",
                                                         "eval_task_samples": 0})
    problems = check_recipe(str(off))[1]
    assert [p.path for p in problems] == ["$.training.metric_for_best_model"]
    assert "eval_task_samples > 0" in problems[0].message
