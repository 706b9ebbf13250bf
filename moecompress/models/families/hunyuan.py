"""Hunyuan-V3: MiniMax-M2's routing (sigmoid, selection on scores + the block's ``e_score_correction_bias``,
renormalised) scaled by ``router_scaling_factor``.

model_types: ``hy_v3``. Hunyuan-MoE-V1 (``hunyuan_v1_moe``, a softmax router) is in ``softmax_topk``, Hunyuan-V4
(``hy_v4``, DeepSeek-V3's router) in ``deepseek``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _hy_v3_routing(config, router: nn.Module) -> RoutingSpec:
    # MiniMax-M2's routing (sigmoid, the block's e_score_correction_bias for selection, renormalised) scaled by
    # router_scaling_factor.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=True,
        routed_scaling_factor=float(router.router_scaling_factor),
        has_selection_bias=True,
    )


HY_V3 = FamilyAdapter(
    model_type="hy_v3",
    routing=_hy_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="num_shared_experts",
    intermediate_field_shared=True,  # shared experts are moe_intermediate_size * num_shared_experts wide
    selection_bias_attr="e_score_correction_bias",
    display_name="Hunyuan-V3",
)
