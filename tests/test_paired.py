"""Paired comparison on the same items: the mean difference against a direct computation, the interval's coverage
and width against the unpaired noise it removes, per-item scores read from a real lm-eval run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import load_model
from moecompress.evals import run_lm_eval
from moecompress.evals.paired import item_scores, paired_difference


def _correlated_runs(items: int, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two runs that answer alike except on a ``flip`` share of items, where ``b`` is wrong more often."""
    generator = np.random.default_rng(seed)
    first = (generator.random(items) < 0.7).astype(float)
    second = first.copy()
    flipped = generator.random(items) < flip
    second[flipped] = (generator.random(int(flipped.sum())) < 0.3).astype(float)
    return first, second


def test_the_mean_is_the_mean_of_per_task_means_of_item_differences():
    a = {"x": [1, 1, 0, 1], "y": [0, 1, 1, 1, 1, 0, 0, 0]}
    b = {"x": [0, 1, 0, 0], "y": [0, 0, 1, 1, 1, 0, 0, 1]}
    difference = paired_difference(a, b)
    assert difference.mean == pytest.approx((0.5 + 0.0) / 2)
    assert difference.low <= difference.mean <= difference.high
    same = paired_difference(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.significant


def test_the_interval_covers_the_true_difference_and_is_narrower_than_unpaired_noise():
    covered, widths = 0, []
    for seed in range(40):
        first, second = _correlated_runs(250, flip=0.2, seed=seed)
        difference = paired_difference({"t": first}, {"t": second}, resamples=2000, seed=seed)
        # expected difference: on flipped items a is right 70% of the time, b 30%: 0.2 * 0.4
        covered += difference.low <= 0.08 <= difference.high
        widths.append(difference.high - difference.low)
    assert covered >= 34  # a 95% interval: about 38 of 40
    unpaired_width = 2 * 1.96 * np.sqrt(2 * 0.7 * 0.3 / 250)  # two independent 250-item accuracies
    assert np.mean(widths) < 0.6 * unpaired_width


def test_runs_over_different_items_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_difference({"t": [1, 0, 1]}, {"t": [1, 0]})


def test_item_scores_come_from_a_real_lm_eval_run(testbed, one_thread):
    model, tokenizer = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    results = run_lm_eval(model, tokenizer, ["tb_code_next"], limit=12, log_samples=True)
    scores = item_scores(results, "acc_mutual_info")
    assert len(scores["tb_code_next"]) == 12 and set(scores["tb_code_next"]) <= {0.0, 1.0}
    aggregate = results["results"]["tb_code_next"]["acc_mutual_info,none"]
    assert np.mean(scores["tb_code_next"]) == pytest.approx(aggregate)
    with pytest.raises(ValueError, match="log_samples=True"):
        item_scores({"results": {}}, "acc_mutual_info")


def test_drawing_in_small_chunks_gives_the_same_interval(monkeypatch):
    """Large tasks are resampled in bounded chunks; the random stream, and so the interval, must not change."""
    import moecompress.evals.paired as paired

    first, second = _correlated_runs(300, flip=0.3, seed=3)
    whole = paired_difference({"t": first}, {"t": second})
    monkeypatch.setattr(paired, "_DRAW_CHUNK", 1000)  # 3 resamples per chunk
    assert paired_difference({"t": first}, {"t": second}) == whole


def test_pairs_of_runs_are_compared_only_when_both_ran():
    from moecompress.evals.paired import paired_differences

    runs = {"gptq": {"t": [1, 1, 0, 1]}, "rtn": {"t": [0, 1, 0, 0]}}
    compared = paired_differences(runs, [("gptq", "rtn"), ("gptq+agq", "gptq")])
    assert [(first, second) for first, second, _ in compared] == [("gptq", "rtn")]
    assert compared[0][2] == paired_difference(runs["gptq"], runs["rtn"])
