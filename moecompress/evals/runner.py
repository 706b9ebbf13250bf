"""Run lm-eval in process on a model object and return plain ``{task: {metric: value}}`` scores."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from moecompress.evals.taskdefs import resolve_tasks


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 16,
    include_path: str | Path | None = None,
    add_bos_token: bool | None = None,
    encode_separately: bool = True,
    log_samples: bool = False,
    allow_task_code: bool = False,
) -> dict[str, Any]:
    """lm-eval's full result dict (``results``, ``n-samples``, optionally per-item ``samples``) for ``tasks``.

    Every local task's data is checked before the model runs; ``include_path`` tasks that run Python need
    ``allow_task_code`` (:func:`moecompress.evals.taskdefs.resolve_tasks`). The model is used as given (its dtype and device);
    global random seeds are left alone (lm-eval would otherwise reseed torch, numpy and ``random``).
    """
    import lm_eval  # imported here: it takes seconds, and importing moecompress.evals must stay cheap

    from moecompress.evals.lm import build_lm  # imports lm_eval (seconds): deferred with it

    resolved = resolve_tasks(tasks, include_path=include_path, allow_task_code=allow_task_code)
    language_model = build_lm(
        model, tokenizer, batch_size=batch_size, add_bos_token=add_bos_token, encode_separately=encode_separately
    )
    was_training = getattr(model, "training", False)
    try:
        results = lm_eval.simple_evaluate(
            model=language_model,
            tasks=resolved.specs,
            task_manager=resolved.task_manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=log_samples,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    finally:
        if was_training:
            model.train()
    return results


def scores_from_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results`` (filter suffix ``,none`` and stderr entries dropped)."""
    scores: dict[str, dict[str, float]] = {}
    for task_name, task_results in results["results"].items():
        metrics: dict[str, float] = {}
        for key, value in task_results.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            metrics[name] = float(value) if math.isfinite(float(value)) else float("nan")
        scores[task_name] = metrics
    return scores


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 16,
    include_path: str | Path | None = None,
    add_bos_token: bool | None = None,
    encode_separately: bool = True,
    allow_task_code: bool = False,
) -> dict[str, dict[str, float]]:
    """Score an in-memory model on ``tasks``: ``{task: {metric: value}}``.

    tasks: bundled names (``tb_code_next``...), tags (``testbed``, ``testbed_mc``, ``testbed_ppl``), names from
        ``include_path``, or lm-eval's task names (need the hub or cached data).
    limit: at most this many documents per task (a float in (0, 1) is a fraction).
    add_bos_token: condition every request on the tokenizer's BOS; default: when the tokenizer has one.
    encode_separately: tokenize context and choice apart (default) rather than lm-eval's joint encoding.
    allow_task_code: let ``include_path`` tasks run Python (``!function``, templates reaching Python objects).
    """
    lm_eval_logger = logging.getLogger("lm_eval")  # cut lm-eval's INFO chatter; never lower a level set by the caller
    lm_eval_logger.setLevel(max(lm_eval_logger.getEffectiveLevel(), logging.WARNING))
    results = run_lm_eval(
        model, tokenizer, tasks, limit=limit, batch_size=batch_size, include_path=include_path,
        add_bos_token=add_bos_token, encode_separately=encode_separately, allow_task_code=allow_task_code,
    )
    return scores_from_results(results)
