"""Ernie-4.5-MoE: softmax, selection on softmax + the ``moe_statics`` bias, renormalised by
``max(sum, moe_norm_min)``.

model_types: ``ernie4_5_moe``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _ernie4_5_moe_routing(config, router: nn.Module) -> RoutingSpec:
    # softmax, selection on softmax + moe_statics bias, renormalised by max(sum, moe_norm_min).
    return RoutingSpec(
        scoring="softmax",
        top_k=int(router.top_k),
        renormalize=True,
        has_selection_bias=True,
        renormalize_min=float(router.norm_min),
    )


ERNIE4_5_MOE = FamilyAdapter(
    model_type="ernie4_5_moe",
    routing=_ernie4_5_moe_routing,
    shared_attr="shared_experts",
    shared_count_field="moe_num_shared_experts",
    count_fields=("moe_num_experts",),
    top_k_fields=("moe_k", "num_experts_per_tok"),
    intermediate_field_shared=True,  # shared experts are moe_intermediate_size * moe_num_shared_experts wide
    selection_bias_attr="gate.moe_statics.e_score_correction_bias",
    display_name="Ernie-4.5-MoE",
)
