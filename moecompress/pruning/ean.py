"""EAN pruning (REAP's cheap baseline, methods.md 6.2): keep the experts with the largest summed output norm.

Score of expert ``e``: ``sum over the tokens routed to e of ||E_e(x)||_2`` (statistic ``ean_sums``), i.e. frequency
times mean output norm, without the router weight.
"""

from __future__ import annotations

import torch

from moecompress.analysis.expert_scores import ean_scores
from moecompress.pruning.base import ProgressivePruningStage
from moecompress.stages import register_stage


@register_stage
class PruneEanStage(ProgressivePruningStage):
    """``method: prune_ean``: keep the experts with the largest summed output norm over their routed tokens."""

    method = "prune_ean"
    statistics = ("ean_sums",)
    score_name = "EAN (sum of ||E_e(x)||)"

    def layer_scores(self, view, layer_statistics) -> torch.Tensor:
        return ean_scores(layer_statistics)

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
EanPruning = PruneEanStage
