"""LFM2-MoE: sigmoid scores, optional selection bias (the block's ``expert_bias``), renormalised with eps 1e-6,
then scaled.

model_types: ``lfm2_moe``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _lfm2_moe_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid scores, optional selection bias (the block's expert_bias), renormalised with eps 1e-6, then scaled.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=bool(router.norm_topk_prob),
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=bool(router.use_expert_bias),
        renormalize_eps=1e-6,
    )


LFM2_MOE = FamilyAdapter(
    model_type="lfm2_moe",
    routing=_lfm2_moe_routing,
    block_attr="feed_forward",
    selection_bias_attr="expert_bias",
    display_name="LFM2-MoE",
)
