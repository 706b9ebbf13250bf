"""REAP pruning (Lasby et al. 2025, methods.md 6.2): keep the experts with the largest router-weighted activation.

Three scores (``score``):

* ``mean`` (``preset: reap_paper``, the paper and its code): ``S_e = (1/|X_e|) sum over x in X_e of
  g_e(x) ||E_e(x)||_2``, ``X_e`` the calibration tokens routed to ``e`` and ``g`` the model's actual combine weight
  (renormalised, scaled: whatever the family does). A conditional mean, decoupled from frequency: with few experts a
  layer (moe-ref-mx, 8) it keeps rare experts with large outputs over busy ones, and halving the experts collapses
  (61% of the full model's accuracy);
* ``frequency_weighted``: the same sum without the division, ``n_e * S_e``, the expert's total router-weighted
  output over the calibration tokens. An expert that is rarely or never routed scores (near) 0, so it cannot be kept
  over a busy one unless its outputs are larger by the ratio of their token counts;
* ``balance_aware`` (default): per layer, the paper's mean where the router spreads its tokens evenly (coefficient of
  variation of the experts' routed-token counts at most ``balanced_variation``, default 0.5: DeepSeek-V3's balancing
  bias), the frequency-weighted score where it starves some experts (the softmax routers of moe-ref-mx and
  moe-ref-q3). Each form loses clearly where the other wins (README, Quality review, fix 4).

Top-k is unchanged by default: the next surviving expert fills the slot.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from moecompress.analysis.expert_scores import reap_balance_aware_scores, reap_frequency_weighted_scores, reap_scores
from moecompress.pruning.base import BalanceAwareOptions, ProgressiveOptions, ProgressivePruningStage
from moecompress.stages import register_stage

# preset reap_paper: the paper's score (the conditional mean), as its code computes it
PRESETS = {"reap_paper": {"score": "mean"}}


class ReapOptions(ProgressiveOptions, BalanceAwareOptions):
    score: Literal["mean", "frequency_weighted", "balance_aware"] | None = pydantic.Field(
        None, description="balance_aware (default): the mean on a layer with balanced routing, the frequency-weighted "
                          "sum elsewhere; frequency_weighted: sum of g*||E(x)|| over routed tokens; mean: the paper's "
                          "mean over routed tokens")
    preset: Literal["reap_paper"] | None = pydantic.Field(None, description="reap_paper: the paper's mean score")

    @pydantic.model_validator(mode="after")
    def _preset(self):
        if self.preset is not None:
            fixed = PRESETS[self.preset]
            if self.score not in (None, fixed["score"]):
                raise ValueError(f"preset {self.preset!r} fixes score={fixed['score']!r}; give either the preset or "
                                 "the score")
            self.score = fixed["score"]
        if self.score is None:
            self.score = "balance_aware"
        return self


@register_stage
class PruneReapStage(ProgressivePruningStage):
    """``method: prune_reap``: keep the experts with the largest router-weighted activation (``score``: its mean over
    the routed tokens, or its sum, or per layer whichever fits the layer's routing balance, the default)."""

    method = "prune_reap"
    Options = ReapOptions
    statistics = ("reap_sums", "expert_token_counts")

    @property
    def score_name(self) -> str:
        return {"mean": "REAP (mean g*||E_e(x)||)", "frequency_weighted": "REAP x frequency (sum g*||E_e(x)||)",
                "balance_aware": "REAP (mean; x usage share on unbalanced layers)"}[self.options.score]

    def layer_scores(self, view, layer_statistics) -> torch.Tensor:
        if self.options.score == "mean":
            return reap_scores(layer_statistics)
        if self.options.score == "balance_aware":
            return reap_balance_aware_scores(layer_statistics, self.options.balanced_variation)
        return reap_frequency_weighted_scores(layer_statistics)


# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
ReapPruning = PruneReapStage
