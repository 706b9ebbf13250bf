"""Validation: lm-eval in process on a model object, bundled offline tasks, before/after scores, the run report.

``evaluate_model(model, tokenizer, tasks)`` scores a model in memory; ``EvaluateStage`` (recipe ``method: evaluate``)
ends a pipeline by scoring the original and the compressed model on the same tasks; ``write_report_markdown`` turns
``report.json`` into ``report.md`` with plots.
"""

from moecompress.evals.report_md import write_report_markdown
from moecompress.evals.runner import evaluate_model, run_lm_eval, scores_from_results
from moecompress.evals.stage import EvaluateStage, score_deltas
from moecompress.evals.taskdefs import BUNDLED_TASK_DIR, bundled_task_names, resolve_tasks

__all__ = [
    "BUNDLED_TASK_DIR",
    "EvaluateStage",
    "bundled_task_names",
    "evaluate_model",
    "resolve_tasks",
    "run_lm_eval",
    "score_deltas",
    "scores_from_results",
    "write_report_markdown",
]
