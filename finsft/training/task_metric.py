"""The task metric at each evaluation during training: for classification templates, the likelihood scorer on a
seeded sample of validation rows, logged as eval_accuracy / eval_macro_f1 / eval_weighted_f1 next to eval_loss.

finsft's trainer computes them inside the evaluation (``FinsftTrainer.evaluation_loop``), so they are in the metrics
``Trainer.log`` sends to every ``report_to`` integration, and in those the Trainer picks the best checkpoint and
early stopping reads (``metric_for_best_model: "weighted_f1"`` works).
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


def task_metric(formatter: Formatter, rows: list[dict[str, Any]], batch_size: int) -> Any:
    """The task metric of one evaluation: ``rows`` scored by the likelihood scorer; finsft's trainer adds the
    numbers (prefixed ``eval_``) to the evaluation's metrics."""

    def measure(model: Any) -> dict[str, float]:
        result = evaluate_model(model, formatter, rows, scorer="likelihood", batch_size=batch_size,
                                max_new_tokens=None)
        return {k: float(result.metrics[k]) for k in TASK_KEYS}

    return measure
