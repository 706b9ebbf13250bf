"""AfMoE: sigmoid scores from a wrapped Linear, selection on scores + the block's ``expert_bias``, always
renormalised, multiplied by ``route_scale``.

model_types: ``afmoe``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _afmoe_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid scores from the wrapped Linear router.gate, selection on scores + the block's expert_bias,
    # always renormalised, then multiplied by route_scale.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=True,
        routed_scaling_factor=float(router.route_scale),
        has_selection_bias=True,
    )


AFMOE = FamilyAdapter(
    model_type="afmoe",
    routing=_afmoe_routing,
    router_attr="router",
    router_linear_attr="gate",
    shared_attr="shared_experts",
    shared_count_field="num_shared_experts",
    intermediate_field_shared=True,  # shared experts are moe_intermediate_size * num_shared_experts wide
    selection_bias_attr="expert_bias",
    display_name="AfMoE",
)
