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
def test_trackers_receive_the_task_metric_and_the_scores_before_and_after(
        make_recipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back with the trackers' own readers (TensorBoard's EventAccumulator, MLflow's client on a local store):
    loss at every step, the task metric at each evaluation, the scores before (step 0) and after (final step)
    training, and the recipe. One MLflow run, ended after the scores after training."""
    pytest.importorskip("tensorboard", reason="pip install 'finsft[tensorboard]' (part of the dev extra)")
    pytest.importorskip("mlflow", reason="pip install mlflow-skinny (part of the dev extra)")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "finsft-test")
    # mlflow-skinny has no SQL store; MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = run(make_recipe, data=VALIDATION, training={
        "report_to": ["tensorboard", "mlflow"], "max_steps": 3, "eval_steps": 2, "eval_task_samples": 6},
        evaluation={"max_samples": 6, "batch_size": 6, "before_training": True})
    report = json.loads((out / "eval.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    task = {r["step"]: r for r in state["log_history"] if "eval_weighted_f1" in r}
    assert sorted(task) == [2, 3] and all("eval_loss" in r for r in task.values())  # one log per evaluation
    before = {f"eval_before_{k}": report["base_metrics"][k] for k in ("accuracy", "macro_f1", "weighted_f1")}
    after = {f"eval_after_{k}": report["metrics"][k] for k in ("accuracy", "macro_f1", "weighted_f1")}

    acc = events(out)
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3] and all(e.value > 0 for e in losses)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 4) for e in losses] == [round(r["loss"], 4) for r in metrics if "loss" in r]
    for key in ("eval_accuracy", "eval_macro_f1", "eval_weighted_f1"):
        tb = acc.Scalars("eval/" + key.removeprefix("eval_"))
        assert [(e.step, round(e.value, 5)) for e in tb] == [(s, round(task[s][key], 5)) for s in (2, 3)]
    for key, value in {**before, **after}.items():
        (point,) = acc.Scalars("eval/" + key.removeprefix("eval_"))
        assert point.step == (0 if key in before else 3) and point.value == pytest.approx(value, abs=1e-6)
    texts = acc.Tags()["tensors"]
    assert "finsft_recipe/text_summary" in texts and "args/text_summary" in texts
    recipe_text = acc.Tensors("finsft_recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": [' in recipe_text and '"name_or_path"' in recipe_text
    args_text = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"run_name": "tiny"' in args_text  # the run name is the recipe's name

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("finsft-test")
    (ml_run,) = client.search_runs([experiment.experiment_id])
    assert ml_run.info.status == "FINISHED" and ml_run.info.run_name == "tiny"
    for key in ("eval_accuracy", "eval_macro_f1", "eval_weighted_f1"):
        history = client.get_metric_history(ml_run.info.run_id, key)
        assert sorted((m.step, round(m.value, 5)) for m in history) == [(s, round(task[s][key], 5)) for s in (2, 3)]
    for key, value in {**before, **after}.items():
        (point,) = client.get_metric_history(ml_run.info.run_id, key)
        assert point.step == (0 if key in before else 3) and point.value == pytest.approx(value, abs=1e-6)
    assert [m.step for m in client.get_metric_history(ml_run.info.run_id, "loss")] == [1, 2, 3]
    artifacts = [a.path for a in client.list_artifacts(ml_run.info.run_id)]
    assert "finsft_recipe.json" in artifacts
    # no stub model card anywhere in the run folder: only finsft's
    cards = sorted(p.relative_to(out).as_posix() for p in out.rglob("README.md"))
    assert cards == ["README.md"]


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
