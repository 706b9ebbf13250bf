"""REAP pruning (Lasby et al. 2025, methods.md 6.2): keep the experts with the largest router-weighted activation.

Score of expert ``e``: ``S_e = (1/|X_e|) sum over x in X_e of g_e(x) ||E_e(x)||_2``, ``X_e`` the calibration tokens
routed to ``e`` and ``g`` the model's actual combine weight (renormalised, scaled: whatever the family does). It is a
conditional mean, so a rarely used expert that matters when used is kept. Top-k is unchanged by default: the next
surviving expert fills the slot.
"""

from __future__ import annotations

import torch

from moecompress.analysis.expert_scores import reap_scores
from moecompress.pruning.base import ProgressivePruningStage
from moecompress.stages import register_stage


@register_stage
class PruneReapStage(ProgressivePruningStage):
    """``method: prune_reap``: keep the experts with the largest mean ``g_e ||E_e(x)||`` over their routed tokens."""

    method = "prune_reap"
    statistics = ("reap_sums", "expert_token_counts")
    score_name = "REAP (mean g*||E_e(x)||)"

    def layer_scores(self, view, layer_statistics) -> torch.Tensor:
        return reap_scores(layer_statistics)

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
ReapPruning = PruneReapStage
