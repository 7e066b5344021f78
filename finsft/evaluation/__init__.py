"""Stage 5 of a run: scoring a model (likelihood or generation), metrics, and the ONE evaluation report
(eval.json) that training and ``finsft eval`` both write. Imports data, templates and recipe; never training."""

from finsft.evaluation.metrics import classification_metrics, headline, map_answer, qa_metrics, token_f1
from finsft.evaluation.report import (
    EvalReport,
    EvalSet,
    ScoringProgress,
    eval_set,
    eval_settings,
    metrics_tables,
    predictions_table,
    rows_fingerprint,
    score,
    write_report,
)
from finsft.evaluation.scorers import (
    EvalResult,
    default_max_new_tokens,
    evaluate_model,
    generate,
    prompt_template,
    resolve_scorer,
    score_likelihood,
)

__all__ = [
    "EvalReport", "EvalResult", "EvalSet", "ScoringProgress", "classification_metrics", "default_max_new_tokens",
    "eval_set", "eval_settings", "evaluate_model", "generate", "headline", "map_answer", "metrics_tables",
    "predictions_table", "prompt_template", "qa_metrics", "resolve_scorer", "rows_fingerprint", "score",
    "score_likelihood", "token_f1", "write_report",
]
