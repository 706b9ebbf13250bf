"""M-SMoE (Li et al. 2024, the merging step of MC-SMoE; methods.md 6.4): merge every expert into a dominant one.

1. Dominant experts by usage (routed-token counts, as shares of the layer's tokens). ``layer_budget: uniform``:
   the ``num_experts_to_keep`` most-used of each layer. ``layer_budget: global`` (the paper's): each layer's most
   used expert first, then the most-used experts across all layers up to the same total, so layers get different
   counts. Super experts are dominant and stay alone.
2. Every other expert joins the dominant expert of its layer with the most similar router-logit column (cosine
   over the calibration tokens, from ``router_logit_gram``).
3. Members are aligned to the dominant expert (Hungarian) and averaged with frequency weights. The router is kept
   (R1, ``remap``) unless ``router_rule: collapse``. MC-SMoE's low-rank compression and finetuning are not part of it.
"""

from __future__ import annotations

from moecompress.analysis.clustering import dominant_expert_groups, router_logit_affinity
from moecompress.models import find_moe_blocks
from moecompress.pruning.base import select_kept_experts
from moecompress.pruning.merging import ExpertMergingStage, protected_experts
from moecompress.stages import register_stage


@register_stage
class MergeMsmoeStage(ExpertMergingStage):
    """``method: merge_msmoe``: dominant experts by usage absorb their most router-similar experts."""

    method = "merge_msmoe"
    statistics = ("router_logit_gram", "expert_token_counts")
    global_budget_supported = True

    def cluster(self, context, statistics):
        protected = protected_experts(context)
        views = {view.layer_index: view for view in find_moe_blocks(context.model)}
        usage = {layer: statistics[layer]["expert_token_counts"].float() for layer in views}
        dominants = select_kept_experts(usage, max(self.num_clusters(view) for view in views.values()),
                                        protected=protected, layer_budget=self.options.budget,
                                        min_per_layer={layer: 1 for layer in views}, method=self.method)
        clusters = {}
        for layer in views:
            similarity = router_logit_affinity(statistics[layer]["router_logit_gram"])
            clusters[layer] = dominant_expert_groups(similarity, dominants[layer], protected.get(layer, []))
        return clusters, usage

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
MSmoeMerging = MergeMsmoeStage
