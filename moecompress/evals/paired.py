"""Paired comparison of two models on the same evaluation items.

Two compressed models scored on the same 250 items of a task differ by far less noise than two independent 250-item
samples would: most items are answered alike by both. So the question "is A better than B" is asked of the per-item
differences, with a bootstrap interval over items. Over several tasks the mean is the mean of the per-task means
(each task keeps its weight), and the bootstrap resamples items within each task.

    scores = item_scores(run_lm_eval(model, tokenizer, tasks, log_samples=True), "acc_mutual_info")
    difference = paired_difference(scores_a, scores_b)    # PairedDifference(mean, low, high)

Bits per byte is a corpus ratio (``-sum log p / sum bytes / ln 2`` over a task's documents), not a mean of per-item
scores: :func:`document_ratios` keeps each document's ``(log-likelihood, bytes)`` and
:func:`paired_ratio_difference` resamples documents (the same ones for both models) and recomputes the ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of ``a - b`` over the tasks' per-task means, and its ``confidence`` bootstrap interval."""

    mean: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def item_scores(results: dict[str, Any], metric: str) -> dict[str, list[float]]:
    """``{task: [metric per item, in document order]}`` from lm-eval's results of a ``log_samples=True`` run."""
    if "samples" not in results:
        raise ValueError("lm-eval results hold no per-item samples; run it with log_samples=True")
    scores = {}
    for task, samples in results["samples"].items():
        ordered = sorted(samples, key=lambda sample: sample["doc_id"])
        if ordered and metric not in ordered[0]:
            raise ValueError(f"task {task} has no per-item {metric!r}; it has {sorted(ordered[0].get('metrics', []))}")
        scores[task] = [float(sample[metric]) for sample in ordered]
    return scores


def paired_difference(scores_a: dict[str, list[float]], scores_b: dict[str, list[float]], *,
                      tasks: list[str] | None = None, resamples: int = 10_000, confidence: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """Mean over ``tasks`` (default: all of ``scores_a``) of the per-task mean of ``a - b``, item by item, with a
    bootstrap interval: each resample draws every task's items with replacement. Both must hold the same items in
    the same order (lm-eval's ``limit`` takes a task's first documents, so runs with the same limit do); only the
    counts can be checked here. For per-item metrics (accuracies); corpus ratios such as bits per byte need another
    statistic."""
    tasks = list(tasks or scores_a)
    generator = np.random.default_rng(seed)
    observed, draws = [], []
    for task in tasks:
        first, second = np.asarray(scores_a[task], float), np.asarray(scores_b[task], float)
        if first.shape != second.shape or first.size == 0:
            raise ValueError(f"task {task}: the two runs scored {first.size} and {second.size} items; a paired "
                             "comparison needs the same items (the same --limit)")
        differences = first - second
        observed.append(differences.mean())
        draws.append(_bootstrap_means(differences, resamples, generator))
    draws_mean = np.mean(draws, axis=0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws_mean, [tail, 100 - tail])
    return PairedDifference(float(np.mean(observed)), float(low), float(high), confidence)


def document_ratios(results: dict[str, Any], metric: str = "bits_per_byte") -> dict[str, list[list[float]]]:
    """``{task: [[log-likelihood, bytes] per document, in document order]}`` of the rolling-perplexity tasks of a
    ``log_samples=True`` lm-eval run (lm-eval logs each document's ``(log-likelihood, bytes)`` pair under
    ``metric``); tasks without that pair are left out."""
    if "samples" not in results:
        raise ValueError("lm-eval results hold no per-item samples; run it with log_samples=True")
    ratios = {}
    for task, samples in results["samples"].items():
        ordered = sorted(samples, key=lambda sample: sample["doc_id"])
        if ordered and isinstance(ordered[0].get(metric), (list, tuple)):
            ratios[task] = [[float(sample[metric][0]), float(sample[metric][1])] for sample in ordered]
    return ratios


def bits_per_byte(documents: list[list[float]] | np.ndarray) -> float:
    """lm-eval's corpus bits per byte of ``[[log-likelihood, bytes], ...]``: ``-sum ll / sum bytes / ln 2``."""
    values = np.asarray(documents, float)
    return float(-values[:, 0].sum() / values[:, 1].sum() / np.log(2))


def paired_ratio_difference(documents_a: dict[str, list[list[float]]], documents_b: dict[str, list[list[float]]], *,
                            tasks: list[str] | None = None, resamples: int = 10_000, confidence: float = 0.95,
                            seed: int = 0) -> PairedDifference:
    """Mean over ``tasks`` of ``bits_per_byte(a) - bits_per_byte(b)`` per task, with a bootstrap interval that draws
    each task's documents with replacement, the same draw for both runs (:func:`document_ratios` gives the
    inputs; both must hold the same documents in the same order, e.g. the same ``limit``)."""
    tasks = list(tasks or documents_a)
    generator = np.random.default_rng(seed)
    observed, draws = [], []
    for task in tasks:
        first, second = np.asarray(documents_a[task], float), np.asarray(documents_b[task], float)
        if first.shape != second.shape or first.size == 0:
            raise ValueError(f"task {task}: the two runs scored {len(first)} and {len(second)} documents; a paired "
                             "comparison needs the same documents (the same limit)")
        observed.append(bits_per_byte(first) - bits_per_byte(second))
        task_draws = np.empty(resamples)
        for start in range(0, resamples, 1024):
            picks = generator.integers(0, len(first), size=(min(1024, resamples - start), len(first)))
            sums_a, sums_b = first[picks].sum(axis=1), second[picks].sum(axis=1)  # [draws, 2]
            task_draws[start:start + len(picks)] = (-sums_a[:, 0] / sums_a[:, 1] + sums_b[:, 0] / sums_b[:, 1]) / np.log(2)
        draws.append(task_draws)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.mean(draws, axis=0), [tail, 100 - tail])
    return PairedDifference(float(np.mean(observed)), float(low), float(high), confidence)


def paired_differences(items_by_run: dict[str, dict[str, list[float]]], pairs, *, tasks: list[str] | None = None,
                       ) -> list[tuple[str, str, PairedDifference]]:
    """``(a, b, paired_difference(a, b))`` for each ``(a, b)`` of ``pairs`` whose runs are both in ``items_by_run``
    (``{run name: item scores}``), in the order of ``pairs``."""
    return [(first, second, paired_difference(items_by_run[first], items_by_run[second], tasks=tasks))
            for first, second in pairs if first in items_by_run and second in items_by_run]


# Resampled indices are drawn this many at a time, so a large task never holds a [resamples, items] array at once.
_DRAW_CHUNK = 1 << 22


def _bootstrap_means(values: np.ndarray, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """``[resamples]`` means of ``values`` resampled with replacement, drawn in row chunks of bounded memory."""
    rows_per_chunk = max(1, _DRAW_CHUNK // values.size)
    means = np.empty(resamples)
    for start in range(0, resamples, rows_per_chunk):
        stop = min(start + rows_per_chunk, resamples)
        picks = generator.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[picks].mean(axis=1)
    return means
