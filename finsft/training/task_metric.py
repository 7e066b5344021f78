"""The task metric at each evaluation during training: for classification templates, the likelihood scorer on a
seeded sample of validation rows, logged as eval_accuracy / eval_macro_f1 / eval_weighted_f1 next to eval_loss.

The metrics are added to the evaluation's metrics before the Trainer picks the best checkpoint and before early
stopping reads them, so ``metric_for_best_model: "weighted_f1"`` works.
"""

from __future__ import annotations

from typing import Any

from finsft.data import Formatter
from finsft.evaluation import evaluate_model
from finsft.recipe import Recipe

TASK_KEYS = ("accuracy", "macro_f1", "weighted_f1")


def task_rows(recipe: Recipe, formatter: Formatter, validation: Any) -> list[dict[str, Any]]:
    """The seeded sample of validation rows scored at each evaluation; empty when there is nothing to score."""
    n = recipe.training["eval_task_samples"]
    if not n or validation is None or not formatter.template.is_classification:
        return []
    if n < len(validation):
        validation = validation.shuffle(seed=recipe.training["seed"]).select(range(n))
    return [dict(r) for r in validation]


def task_metric_callback(formatter: Formatter, rows: list[dict[str, Any]], batch_size: int, progress: Any) -> Any:
    """A TrainerCallback scoring ``rows`` at each evaluation; ``progress`` (the run's ProgressCallback) shows and
    records the numbers."""
    from transformers import TrainerCallback

    class TaskMetric(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                        model: Any = None, **kwargs: Any) -> None:
            if metrics is None or model is None:
                return
            result = evaluate_model(model, formatter, rows, scorer="likelihood", batch_size=batch_size,
                                    max_new_tokens=None)
            task = {f"eval_{k}": round(float(result.metrics[k]), 6) for k in TASK_KEYS}
            metrics.update(task)  # the same dict the Trainer's best-checkpoint choice reads next
            state.log_history.append({**task, "step": state.global_step})
            progress.on_log(args, state, control, logs=task)

    return TaskMetric()
