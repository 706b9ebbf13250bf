"""Per-expert importance scores from one layer's calibration statistics (higher = more worth keeping).

Each function takes a :class:`moecompress.calibration.statistics.LayerStatistics` and returns ``[E]`` fp32:

* :func:`frequency_scores`: routed-token counts ``n_e`` (statistic ``expert_token_counts``);
* :func:`ean_scores`: EAN, ``sum over routed tokens of ||E_e(x)||_2`` (``ean_sums``);
* :func:`reap_scores`: REAP (methods.md 6.2), ``(1/n_e) sum over routed tokens of g_e(x) ||E_e(x)||_2`` with the
  model's actual combine weight ``g`` (``reap_sums / expert_token_counts``; an unused expert scores 0);
* :func:`reap_frequency_weighted_scores`: the same sum without the division, ``n_e`` times REAP's mean (the expert's
  total router-weighted output over the calibration tokens): a rare expert must make up for every token it misses;
* :func:`reap_balance_aware_scores`: REAP's mean on a layer whose router spreads its tokens evenly
  (:func:`routing_is_balanced`), the frequency-weighted score (in the mean's units: mean times usage share) on one
  that starves some experts;
* :func:`tcess_scores`: PreMoe's TCESS (methods.md 1), the mean PreMoe marker over all tokens (``tcess_markers``).
"""

from __future__ import annotations

import torch

from moecompress.calibration.statistics import LayerStatistics

STATISTICS_FOR = {
    "frequency": ("expert_token_counts",),
    "ean": ("ean_sums",),
    "reap": ("reap_sums", "expert_token_counts"),
    "reap_frequency_weighted": ("reap_sums",),
    "reap_balance_aware": ("reap_sums", "expert_token_counts"),
    "tcess": ("tcess_markers",),
}


def frequency_scores(statistics: LayerStatistics) -> torch.Tensor:
    return statistics["expert_token_counts"].float()


def ean_scores(statistics: LayerStatistics) -> torch.Tensor:
    return statistics["ean_sums"].float()


def reap_scores(statistics: LayerStatistics) -> torch.Tensor:
    counts = statistics["expert_token_counts"].double()
    sums = statistics["reap_sums"].double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums)).float()


def reap_frequency_weighted_scores(statistics: LayerStatistics) -> torch.Tensor:
    return statistics["reap_sums"].float()


def usage_shares(token_counts: torch.Tensor) -> torch.Tensor:
    """``[E]`` routed tokens of each expert over a uniform expert's (``sum(n) / E``): 1 = a fair share, 0 = never
    routed. All zeros when no token was routed."""
    counts = token_counts.double()
    total = counts.sum()
    if total <= 0:
        return torch.zeros_like(counts)
    return counts * len(counts) / total


def routing_is_balanced(token_counts: torch.Tensor, max_variation: float) -> bool:
    """Whether the coefficient of variation (std / mean) of a layer's routed-token counts ``[E]`` is at most
    ``max_variation``. The test bed splits cleanly: DeepSeek-V3's balancing bias keeps it at 0.12-0.17 on every layer
    of moe-ref-ds, while the softmax routers of moe-ref-mx / moe-ref-q3 starve some experts (0.69-1.38)."""
    shares = usage_shares(token_counts)
    return bool(shares.std() <= max_variation)  # the shares' mean is 1, so their std is the variation


def reap_balance_aware_scores(statistics: LayerStatistics, max_variation: float) -> torch.Tensor:
    """REAP's mean where the layer's routing is balanced (:func:`routing_is_balanced`), else the mean times each
    expert's usage share (the frequency-weighted sum, ranked the same, scaled to the mean's units so that layers stay
    comparable under a global budget).

    Why: measured on the calibration text (README, Quality review, fix 4), frequency weighting wins by 0.07-0.47 bits
    per byte where some experts are nearly dead (mx, q3) and loses by 0.04-0.10 where the router spreads its tokens
    (ds): there the frequency factor is the balancing bias's noise, not a signal."""
    mean = reap_scores(statistics)
    if routing_is_balanced(statistics["expert_token_counts"], max_variation):
        return mean
    return (mean.double() * usage_shares(statistics["expert_token_counts"])).float()


def tcess_scores(statistics: LayerStatistics) -> torch.Tensor:
    return statistics["tcess_markers"].float()
