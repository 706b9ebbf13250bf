"""HC-SMoE (Chen et al. 2025, methods.md 6.4): merge experts that behave alike on all tokens.

Per MoE layer: each expert is represented by its mean output over *all* calibration tokens (statistic
``mean_expert_output_all_tokens``, which runs every expert on every token: opt-in, costs ``E`` expert FFNs per
token), grouped into ``num_experts_to_keep`` clusters, and merged by a frequency-weighted average (no neuron
alignment, as in the paper; ``align: true`` adds it). The router is unchanged (R1, ``remap``) unless
``router_rule: collapse``.

Three groupings (``clustering``):

* ``average_linkage`` (``preset: hcsmoe_paper``): agglomerative average linkage on Euclidean distance. On an
  8-expert model (moe-ref-mx at 4 of 8) it leaves one giant cluster and keeps dead experts (0-6 picks) as
  singletons: an expert the router never picks is far from the others precisely because nothing trained it;
* ``frequency_seeds``: the most used experts seed the clusters and every other expert joins the nearest
  seed (:func:`moecompress.analysis.clustering.frequency_seeded_clusters`), so a dead expert is merged (with weight
  ~0) into a busy one instead of taking a cluster of its own;
* ``balance_aware`` (default): per layer, average linkage where the router spreads its tokens evenly (coefficient of
  variation of the routed-token counts at most ``balanced_variation``, default 0.5: DeepSeek-V3's balancing bias,
  no dead experts to isolate), frequency seeds where it starves some experts. Each loses clearly where the other
  wins (README, Quality review, fix 4).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from moecompress.analysis.clustering import average_linkage_clusters, frequency_seeded_clusters
from moecompress.analysis.expert_scores import routing_is_balanced
from moecompress.models import find_moe_blocks
from moecompress.pruning.base import BalanceAwareOptions
from moecompress.pruning.merging import ExpertMergingStage, MergeOptions, protected_experts
from moecompress.stages import register_stage

# preset hcsmoe_paper: the paper's average-linkage clustering
PRESETS = {"hcsmoe_paper": {"clustering": "average_linkage"}}


class HcSmoeOptions(MergeOptions, BalanceAwareOptions):
    clustering: Literal["average_linkage", "frequency_seeds", "balance_aware"] | None = pydantic.Field(
        None, description="balance_aware (default): average linkage on a layer with balanced routing, frequency seeds "
                          "elsewhere; frequency_seeds: the most used experts seed the clusters; average_linkage: the "
                          "paper's agglomerative clustering")
    preset: Literal["hcsmoe_paper"] | None = pydantic.Field(None, description="hcsmoe_paper: average linkage")

    @pydantic.model_validator(mode="after")
    def _preset(self):
        if self.preset is not None:
            fixed = PRESETS[self.preset]
            if self.clustering not in (None, fixed["clustering"]):
                raise ValueError(f"preset {self.preset!r} fixes clustering={fixed['clustering']!r}; give either the "
                                 "preset or the clustering")
            self.clustering = fixed["clustering"]
        if self.clustering is None:
            self.clustering = "balance_aware"
        return self


@register_stage
class MergeHcsmoeStage(ExpertMergingStage):
    """``method: merge_hcsmoe``: cluster the experts by their mean outputs, frequency-weighted merge."""

    method = "merge_hcsmoe"
    Options = HcSmoeOptions
    statistics = ("mean_expert_output_all_tokens", "expert_token_counts")
    default_align = False

    def cluster(self, context, statistics):
        protected = protected_experts(context)
        clusters, scores = {}, {}
        for view in find_moe_blocks(context.model):
            layer = view.layer_index
            outputs, counts = (statistics[layer]["mean_expert_output_all_tokens"],
                               statistics[layer]["expert_token_counts"])
            clusters[layer] = self.layer_clusters(outputs, counts, self.num_clusters(view), protected.get(layer, []))
            scores[layer] = counts.float()
        return clusters, scores

    def layer_clusters(self, outputs, counts, num_clusters: int, protected: list[int]) -> list[list[int]]:
        """One layer's partition from its experts' mean outputs ``[E, d]`` and routed-token counts ``[E]``."""
        linkage = self.options.clustering == "average_linkage" or (
            self.options.clustering == "balance_aware" and routing_is_balanced(counts, self.options.balanced_variation))
        if linkage:
            return average_linkage_clusters(outputs, num_clusters, protected)
        return frequency_seeded_clusters(outputs, counts, num_clusters, protected)


# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
HcSmoeMerging = MergeHcsmoeStage
