"""Experiment tracking, early stopping, and the Hugging Face-style result files of a run.

* ``training.report_to`` / ``run_name`` go to transformers' integrations (the Trainer builds their callbacks);
  finsft.preflight checks the trackers are installed before loading anything; writes TensorBoard events to the run
  folder's ``runs/`` and logs the resolved recipe to each tracker it knows (TensorBoard, W&B, MLflow).
* ``training.early_stopping_patience`` adds transformers' ``EarlyStoppingCallback``.
* ``write_results`` puts ``trainer_state.json``, ``train_results.json``, ``eval_results.json`` and
  ``all_results.json`` at the top of the run folder, where Hugging Face users look for them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from finsft.files import write_file
from finsft.preflight import MLFLOW_STORE, mlflow_store_path, requested_trackers

TENSORBOARD_DIR = "runs"  # the Trainer's own name for it, under the run folder


def is_tracker(callback: Any) -> bool:
    """One of transformers' report_to integrations (TensorBoardCallback, WandbCallback, MLflowCallback...)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return isinstance(callback, tuple(INTEGRATION_TO_CALLBACK.values()))


def _recipe_callback(trainer: Any, config: dict[str, Any]) -> Any:
    """Logs the resolved recipe to the trackers once they have started (callbacks run in the order they were
    added, and the Trainer adds its integrations first)."""
    from transformers import TrainerCallback

    text = json.dumps(config, indent=2, default=str)

    class RecipeToTrackers(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            for cb in trainer.callback_handler.callbacks:
                name = type(cb).__name__
                if name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                    # TensorBoard renders text as Markdown: indent it as a code block
                    cb.tb_writer.add_text("finsft_recipe", "\n".join("    " + line for line in text.splitlines()))
                    cb.tb_writer.flush()
                elif name == "WandbCallback" and getattr(cb, "_wandb", None) is not None \
                        and cb._wandb.run is not None:
                    cb._wandb.run.config.update({"finsft_recipe": config}, allow_val_change=True)
                elif name == "MLflowCallback" and getattr(cb, "_initialized", False):
                    cb._ml_flow.log_dict(config, "finsft_recipe.json")

    return RecipeToTrackers()


def add_training_callbacks(trainer: Any, recipe: Any) -> None:
    """Early stopping and the trackers' set-up for a trainer built from ``recipe``."""
    train = recipe.training
    if train["early_stopping_patience"] is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=train["early_stopping_patience"],
                                                   early_stopping_threshold=train["early_stopping_threshold"]))
    if requested_trackers(train["report_to"]):
        run_dir = Path(trainer.args.output_dir).parent  # output_dir is <run folder>/checkpoints
        for cb in trainer.callback_handler.callbacks:
            # TENSORBOARD_LOGGING_DIR, when set, wins (the callback read it when it was built).
            if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", "") is None:
                cb.logging_dir = str(run_dir / TENSORBOARD_DIR)
            if type(cb).__name__ == "MLflowCallback":
                _mlflow_destination(cb, run_dir)
        trainer.add_callback(_recipe_callback(trainer, recipe.config))


def _mlflow_destination(callback: Any, run_dir: Path) -> None:
    """MLflow's store: MLFLOW_TRACKING_URI when set (the preflight checked it), else finsft's file store
    ``RUN/mlruns``. The installed client (mlflow-skinny) has no database store, and MLflow 3 keeps its file store
    behind MLFLOW_ALLOW_FILE_STORE: finsft switches it on for a file store (its own, or a file: URI the user set),
    unless the user set it. The URI is set when the callback starts (transformers reads the variable only then, and
    keeps a URI an earlier run of this process set: each run sets its own)."""
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or "").strip() or (run_dir / MLFLOW_STORE).absolute().as_uri()
    if mlflow_store_path(uri) is not None and not uri.lower().startswith("sqlite"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    original = callback.setup

    def setup(*args: Any, **kwargs: Any) -> Any:
        callback._ml_flow.set_tracking_uri(uri)
        return original(*args, **kwargs)

    callback.setup = setup


def move_mlflow_store(work: Path, final: Path) -> None:
    """finsft's MLflow store in the run folder records absolute artifact locations (meta.yaml): point them at the
    folder the run is published as (``work`` is renamed to ``final``)."""
    store = work / MLFLOW_STORE
    if not store.is_dir():
        return
    pairs = [(work.absolute().as_uri(), final.absolute().as_uri()), (str(work.absolute()), str(final.absolute()))]
    for meta in store.rglob("meta.yaml"):
        text = meta.read_text(encoding="utf-8")
        new = text
        for old, replacement in pairs:
            new = new.replace(old + "/", replacement + "/")
        if new != text:
            write_file(meta, new, replace=True, kept="the run is kept in its work folder")  # finsft's own store


def _dump(path: Path, data: Any) -> None:
    write_file(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", replace=True,  # the work folder's
               kept="the run is kept in its work folder")


def write_results(work: Path, final: Path, state: Any, train_metrics: dict[str, Any],
                  task_metrics: dict[str, Any] | None = None) -> None:
    """``trainer_state.json`` (paths of checkpoints as they will be after the run folder is published),
    ``train_results.json``, ``eval_results.json`` (the last validation loss, when the run evaluated) and
    ``all_results.json`` (both, plus the task evaluation's numbers as ``task_*``) in the run folder ``work``."""
    state_json = json.loads(json.dumps(dataclasses.asdict(state), default=str))  # as TrainerState.save_to_json
    for key in ("best_model_checkpoint",):
        if isinstance(state_json.get(key), str) and state_json[key].startswith(str(work)):
            state_json[key] = str(final) + state_json[key][len(str(work)):]
    _dump(work / "trainer_state.json", state_json)
    train = {k: v for k, v in train_metrics.items() if v is not None}
    _dump(work / "train_results.json", train)
    evals = [r for r in state_json.get("log_history", []) if "eval_loss" in r]
    results = dict(train)
    if evals:
        last = {k: v for k, v in evals[-1].items() if k.startswith("eval_") or k == "epoch"}
        _dump(work / "eval_results.json", last)
        results.update(last)
    for key, value in (task_metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            results[f"task_{key}"] = value
    _dump(work / "all_results.json", results)
    move_mlflow_store(work, final)
