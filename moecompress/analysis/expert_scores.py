"""Per-expert importance scores from one layer's calibration statistics (higher = more worth keeping).

Each function takes a :class:`moecompress.calibration.statistics.LayerStatistics` and returns ``[E]`` fp32:

* :func:`frequency_scores`: routed-token counts ``n_e`` (statistic ``expert_token_counts``);
* :func:`ean_scores`: EAN, ``sum over routed tokens of ||E_e(x)||_2`` (``ean_sums``);
* :func:`reap_scores`: REAP (methods.md 6.2), ``(1/n_e) sum over routed tokens of g_e(x) ||E_e(x)||_2`` with the
  model's actual combine weight ``g`` (``reap_sums / expert_token_counts``; an unused expert scores 0);
* :func:`reap_frequency_weighted_scores`: the same sum without the division, ``n_e`` times REAP's mean (the expert's
  total router-weighted output over the calibration tokens): a rare expert must make up for every token it misses;
* :func:`reap_usage_floor_scores`: REAP's mean times ``min(1, share_e / floor)``, ``share_e`` the expert's routed
  tokens over a uniform expert's (:func:`usage_shares`): the paper's score wherever the router uses an expert at
  least ``floor`` times a fair share, and scaled down by its usage where it does not;
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
    "reap_usage_floor": ("reap_sums", "expert_token_counts"),
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


def reap_usage_floor_scores(statistics: LayerStatistics, floor: float) -> torch.Tensor:
    """REAP's mean scaled by ``min(1, share / floor)`` (``floor > 0``, in fair shares).

    Why: on a router that spreads its tokens (DeepSeek-V3's balancing bias, every share 0.5-1.4 on moe-ref-ds) the
    frequency factor is noise and the paper's mean ranks better; on one that starves some experts (moe-ref-mx,
    shares 0-3.6) the mean keeps experts routed a fifth of a fair share over busy ones. Below the floor an expert's
    score falls with its usage, so a dead one scores 0."""
    shares = usage_shares(statistics["expert_token_counts"])
    return (reap_scores(statistics).double() * (shares / floor).clamp(max=1.0)).float()


def tcess_scores(statistics: LayerStatistics) -> torch.Tensor:
    return statistics["tcess_markers"].float()
