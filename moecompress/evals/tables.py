"""Score tables: one row per (task, metric), one column per model; rich for terminals, markdown for reports."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

# Metrics where lower is better (perplexities, bits per byte); everything else is higher-is-better.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


def lower_is_better(metric: str) -> bool:
    return any(marker in metric for marker in LOWER_IS_BETTER)


def format_value(value: Any) -> str:
    """Accuracies with 3 decimals, perplexities with 2 (they are large), missing values as a dash."""
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def score_rows(scores_by_model: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str, list[Any]]]:
    """``[(task, metric, [value per model])]`` over the union of tasks and metrics, in first-seen order."""
    models = list(scores_by_model)
    rows: dict[tuple[str, str], list[Any]] = {}
    for model_index, model_name in enumerate(models):
        for task_name, metrics in scores_by_model[model_name].items():
            for metric, value in metrics.items():
                rows.setdefault((task_name, metric), [None] * len(models))[model_index] = value
    return [(task, metric, values) for (task, metric), values in rows.items()]


def scores_table(scores_by_model: dict[str, dict[str, dict[str, float]]], *, title: str | None = None):
    """A ``rich.table.Table`` of ``{model: {task: {metric: value}}}``."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for model_name in scores_by_model:
        table.add_column(model_name, justify="right")
    previous_task = None
    for task_name, metric, values in score_rows(scores_by_model):
        table.add_row(task_name if task_name != previous_task else "", metric, *(format_value(v) for v in values))
        previous_task = task_name
    return table


def scores_markdown(scores_by_model: dict[str, dict[str, dict[str, float]]]) -> str:
    """The same table in GitHub markdown."""
    models = list(scores_by_model)
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for task_name, metric, values in score_rows(scores_by_model):
        lines.append(f"| {task_name} | {metric} | " + " | ".join(format_value(v) for v in values) + " |")
    return "\n".join(lines) + "\n"
