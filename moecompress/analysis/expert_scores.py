"""Per-expert importance scores from one layer's calibration statistics (higher = more worth keeping).

Each function takes a :class:`moecompress.calibration.statistics.LayerStatistics` and returns ``[E]`` fp32:

* :func:`frequency_scores`: routed-token counts ``n_e`` (statistic ``expert_token_counts``);
* :func:`ean_scores`: EAN, ``sum over routed tokens of ||E_e(x)||_2`` (``ean_sums``);
* :func:`reap_scores`: REAP (methods.md 6.2), ``(1/n_e) sum over routed tokens of g_e(x) ||E_e(x)||_2`` with the
  model's actual combine weight ``g`` (``reap_sums / expert_token_counts``; an unused expert scores 0);
* :func:`reap_frequency_weighted_scores`: the same sum without the division, ``n_e`` times REAP's mean (the expert's
  total router-weighted output over the calibration tokens): a rare expert must make up for every token it misses;
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


def tcess_scores(statistics: LayerStatistics) -> torch.Tensor:
    return statistics["tcess_markers"].float()
