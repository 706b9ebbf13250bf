"""HC-SMoE (Chen et al. 2025, methods.md 6.4): merge experts that behave alike on all tokens.

Per MoE layer: each expert is represented by its mean output over *all* calibration tokens (statistic
``mean_expert_output_all_tokens``, which runs every expert on every token: opt-in, costs ``E`` expert FFNs per
token), clustered by agglomerative average linkage on Euclidean distance into ``num_experts_to_keep`` clusters,
merged by a frequency-weighted average (no neuron alignment, as in the paper; ``align: true`` adds it). The router
is unchanged (R1, ``remap``) unless ``router_rule: collapse``.
"""

from __future__ import annotations

from moecompress.analysis.clustering import average_linkage_clusters
from moecompress.models import find_moe_blocks
from moecompress.pruning.merging import ExpertMergingStage, protected_experts
from moecompress.stages import register_stage


@register_stage
class MergeHcsmoeStage(ExpertMergingStage):
    """``method: merge_hcsmoe``: hierarchical clustering of mean expert outputs, frequency-weighted merge."""

    method = "merge_hcsmoe"
    statistics = ("mean_expert_output_all_tokens", "expert_token_counts")
    default_align = False

    def cluster(self, context, statistics):
        protected = protected_experts(context)
        clusters, scores = {}, {}
        for view in find_moe_blocks(context.model):
            layer = view.layer_index
            clusters[layer] = average_linkage_clusters(statistics[layer]["mean_expert_output_all_tokens"],
                                                       self.num_clusters(view), protected.get(layer, []))
            scores[layer] = statistics[layer]["expert_token_counts"].float()
        return clusters, scores

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
HcSmoeMerging = MergeHcsmoeStage
