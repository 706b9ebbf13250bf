"""A.X-K2: DeepSeek-V3's routing with optional groups (``num_group`` None: no groups); experts outside the chosen
groups score 0 (not -inf) for selection.

model_types: ``axk2``. A.X-K1 (``axk1``) is in ``deepseek``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _renormalize_flag
from moecompress.models.view import RoutingSpec


def _axk2_routing(config, router: nn.Module) -> RoutingSpec:
    # DeepSeek-V3's routing, except that groups are optional (num_group None) and experts outside the chosen
    # groups score 0 (not -inf) for selection.
    grouped = router.num_group is not None
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        n_group=int(router.num_group) if grouped else 1,
        topk_group=int(router.topk_group) if grouped else 1,
        group_score="top2_sum",
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=True,
        group_mask_value=0.0,
    )


AXK2 = FamilyAdapter(
    model_type="axk2",
    routing=_axk2_routing,
    shared_attr="shared_experts",
    shared_count_field="n_shared_experts",
    count_fields=("n_routed_experts",),
    intermediate_field_shared=True,
    group_fields=("n_group", "topk_group"),
    display_name="A.X-K2",
)
