"""Frequency pruning (the baseline of REAP/HC-SMoE tables): keep each layer's most-used experts.

Usage of an expert = how many calibration tokens chose it (top-k selections, statistic ``expert_token_counts``).
Per MoE layer, the ``num_experts_to_keep`` (or ``round(keep_ratio * E)``) most-used experts are kept; ties go to
the lower expert id. Super experts are never removed: they are kept first, the rest of the budget goes by usage.
The common budget options (``top_k``, ``layer_budget``, ``group_balanced``, ``progressive``) are those of
:mod:`moecompress.pruning.base`.
"""

from __future__ import annotations

import torch

from moecompress.analysis.expert_scores import frequency_scores
from moecompress.pruning.base import ProgressivePruningStage, select_kept_experts
from moecompress.stages import register_stage


def select_most_used(token_counts: torch.Tensor, num_keep: int, protected: list[int]) -> list[int]:
    """Expert ids to keep (sorted): all ``protected`` ids, then the most-used others up to ``num_keep``.

    token_counts ``[E]``. Raises :class:`RecipeError` when ``num_keep`` is smaller than the protected set.
    """
    return select_kept_experts({0: token_counts}, num_keep, protected={0: list(protected)},
                               method="prune_frequency")[0]


@register_stage
class PruneFrequencyStage(ProgressivePruningStage):
    """``method: prune_frequency``: keep the most-used experts of every MoE layer."""

    method = "prune_frequency"
    statistics = ("expert_token_counts",)
    score_name = "routed-token count"

    def layer_scores(self, view, layer_statistics) -> torch.Tensor:
        return frequency_scores(layer_statistics)

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
FrequencyPruning = PruneFrequencyStage
