"""UNCURL, training-free (Sarkar et al. 2024, methods.md section 2): merge each layer's experts into clusters found
by spectral clustering of their router-logit similarity.

Per MoE layer: affinity ``S = (1 + cos(H_i, H_j)) / 2`` of the router-logit columns over the calibration (task)
tokens (from the Gram ``H^T H``, statistic ``router_logit_gram``), spectral clustering into
``num_experts_to_keep`` clusters (scikit-learn, precomputed affinity, k-means labels, fixed seed), anchor = the
most-selected member, Hungarian neuron alignment to the anchor, frequency-weighted average. The paper re-initialises
and finetunes the router; here the router rule is R1 (``remap``, default) or R2 (``collapse``).
"""

from __future__ import annotations

from moecompress.analysis.clustering import router_logit_affinity, spectral_clusters
from moecompress.models import find_moe_blocks
from moecompress.pruning.merging import ExpertMergingStage, protected_experts
from moecompress.stages import register_stage


@register_stage
class MergeUncurlStage(ExpertMergingStage):
    """``method: merge_uncurl``: spectral clustering on router-logit affinity, aligned frequency-weighted merge."""

    method = "merge_uncurl"
    statistics = ("router_logit_gram", "expert_token_counts")

    def cluster(self, context, statistics):
        protected = protected_experts(context)
        clusters, scores = {}, {}
        for view in find_moe_blocks(context.model):
            layer = view.layer_index
            affinity = router_logit_affinity(statistics[layer]["router_logit_gram"])
            clusters[layer] = spectral_clusters(affinity, self.num_clusters(view), protected.get(layer, []),
                                                seed=self.options.seed)
            scores[layer] = statistics[layer]["expert_token_counts"].float()
        return clusters, scores

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
UncurlMerging = MergeUncurlStage
