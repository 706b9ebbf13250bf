"""Paired comparison on the same items: the mean difference against a direct computation, the interval's coverage
and width against the unpaired noise it removes, per-item scores read from a real lm-eval run; the same for the
corpus ratio bits per byte (documents resampled together for both runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import load_model
from moecompress.evals import run_lm_eval
from moecompress.evals.paired import (
    bits_per_byte,
    document_ratios,
    item_scores,
    paired_difference,
    paired_ratio_difference,
)


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


def _documents(count: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two runs over the same ``count`` documents: log-likelihoods that share each document's difficulty; ``b``
    loses ``shift`` nats per byte more than ``a``, plus a little per-document noise."""
    generator = np.random.default_rng(seed)
    sizes = generator.integers(200, 2000, count).astype(float)
    difficulty = generator.uniform(0.6, 1.2, count)  # nats per byte of each document
    first = -difficulty * sizes
    second = -(difficulty + shift + generator.normal(0, 0.01, count)) * sizes
    return np.stack([first, sizes], 1), np.stack([second, sizes], 1)


def test_bits_per_byte_difference_is_the_corpus_ratio_difference_with_a_paired_interval():
    a, b = _documents(40, seed=0, shift=0.02)
    difference = paired_ratio_difference({"t": a.tolist()}, {"t": b.tolist()})
    direct = (-a[:, 0].sum() / a[:, 1].sum() + b[:, 0].sum() / b[:, 1].sum()) / np.log(2)
    assert difference.mean == pytest.approx(direct)
    assert bits_per_byte(a) == pytest.approx(-a[:, 0].sum() / a[:, 1].sum() / np.log(2))
    covered, widths = 0, []
    for seed in range(40):
        a, b = _documents(40, seed=seed, shift=0.02)
        difference = paired_ratio_difference({"t": a}, {"t": b}, resamples=2000, seed=seed)
        expected = -0.02 / np.log(2)  # b worse by 0.02 nats per byte on average
        covered += difference.low <= expected <= difference.high
        widths.append(difference.high - difference.low)
    assert covered >= 34
    # unpaired: the spread of one 40-document ratio alone is about std(difficulty) / sqrt(40) / ln 2
    assert np.mean(widths) < 0.3 * 2 * 1.96 * 0.17 / np.sqrt(40) / np.log(2)
    with pytest.raises(ValueError, match="same documents"):
        paired_ratio_difference({"t": a[:3]}, {"t": b})


def test_document_ratios_come_from_a_real_lm_eval_run(testbed, one_thread):
    model, tokenizer = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    results = run_lm_eval(model, tokenizer, ["tb_ppl_kjv"], limit=3, log_samples=True)
    documents = document_ratios(results)
    assert len(documents["tb_ppl_kjv"]) == 3
    assert bits_per_byte(documents["tb_ppl_kjv"]) == pytest.approx(
        results["results"]["tb_ppl_kjv"]["bits_per_byte,none"])
