"""Cross-field rules of the training section's evaluation, checkpoint and early-stopping keys (the rules the
Trainer would otherwise raise on only after the model has loaded). Pure: no library imports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Found = list[tuple[list[str | int], str]]

# finsft evaluates during training with the validation loss, and for classification templates the task metrics of
# training.eval_task_samples validation rows (finsft.training.task_metric).
LOSS_METRICS = ("loss", "eval_loss")
TASK_METRICS = ("accuracy", "macro_f1", "weighted_f1")


def eval_strategy(train: Mapping[str, Any]) -> str:
    """The evaluation strategy finsft passes ('auto': steps when eval_steps is set, else none)."""
    value = str(train.get("eval_strategy", "auto"))
    if value == "auto":
        return "steps" if train.get("eval_steps") else "no"
    return value


def best_at_end(train: Mapping[str, Any]) -> bool:
    """Whether the best checkpoint is loaded at the end: load_best_model_at_end, which early stopping turns on
    unless the recipe sets it."""
    value = train.get("load_best_model_at_end")
    return value is True or (value is None and train.get("early_stopping_patience") is not None)


def strategies(train: Mapping[str, Any], has_eval: bool = True) -> dict[str, Any]:
    """eval_strategy, save_strategy and save_steps as finsft passes them. save_strategy 'auto': every save_steps
    steps when save_steps is set; else at each evaluation when the best checkpoint is loaded at the end (so that
    every evaluation has its checkpoint); else at the end of each epoch."""
    evaluate = eval_strategy(train) if has_eval else "no"
    save = str(train.get("save_strategy", "auto"))
    save_steps = train.get("save_steps")
    if save == "auto":
        if save_steps:
            save = "steps"
        elif best_at_end(train) and evaluate != "no":
            save = evaluate
        else:
            save = "epoch"
    if save_steps is None:
        save_steps = (train.get("eval_steps") or train.get("logging_steps")) if save == evaluate == "steps" else 500
    return {"eval_strategy": evaluate, "save_strategy": save, "save_steps": save_steps}


def training_rules(train: Mapping[str, Any], has_validation: bool, classification: bool = False) -> Found:
    """Problems of the evaluation/checkpoint/early-stopping keys of a training section with defaults applied."""
    out: Found = []
    resolved = strategies(train)
    evaluate, save = resolved["eval_strategy"], resolved["save_strategy"]
    patience = train.get("early_stopping_patience")
    load_best = best_at_end(train)
    if train.get("eval_strategy", "auto") not in ("auto", "no") and not has_validation:
        out.append((["training", "eval_strategy"], "evaluation needs a validation set: set data.validation_path or "
                                                   "data.validation_size"))
    # (Evaluating without a validation set is reported once, on eval_strategy or eval_steps.)
    for key, on in (("early_stopping_patience", patience is not None),
                    ("load_best_model_at_end", train.get("load_best_model_at_end") is True)):
        if on and evaluate == "no":
            out.append((["training", key], f"{key} compares evaluations, and this recipe does not evaluate during "
                                           "training: set training.eval_steps (or training.eval_strategy \"epoch\") "
                                           "and a validation set"))
    if save == "best" and evaluate == "no":
        out.append((["training", "save_strategy"], "save_strategy \"best\" saves when an evaluation improves, and "
                                                   "this recipe does not evaluate during training: set "
                                                   "training.eval_steps"))
    if load_best and evaluate != "no" and save not in ("best", evaluate):
        out.append((["training", "save_strategy"], f"load_best_model_at_end needs checkpoints where evaluations "
                                                   f"are: save_strategy is \"{save}\" but eval_strategy is "
                                                   f"\"{evaluate}\" (set both to the same, or save_strategy "
                                                   "\"best\")"))
    elif load_best and evaluate == save == "steps":
        every_eval = train.get("eval_steps") or train.get("logging_steps")
        every_save = resolved["save_steps"]
        if isinstance(every_eval, int) and isinstance(every_save, int) and every_save % every_eval:
            out.append((["training", "save_steps"], f"load_best_model_at_end needs a checkpoint at evaluations: "
                                                    f"save_steps ({every_save}) must be a multiple of eval_steps "
                                                    f"({every_eval})"))
    metric = train.get("metric_for_best_model")
    task = classification and bool(train.get("eval_task_samples", 200))
    allowed = [*LOSS_METRICS, *((m for t in TASK_METRICS for m in (t, f"eval_{t}")) if task else ())]
    if isinstance(metric, str) and metric not in allowed:
        why = ("" if task else " (task metrics need a classification template and training.eval_task_samples > 0)")
        out.append((["training", "metric_for_best_model"], f"'{metric}' is not computed by finsft's evaluation during "
                                                           f"training{why}; allowed: {', '.join(allowed)}"))
    return out
