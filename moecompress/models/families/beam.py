"""Beam: DeepSeek-V3's group-limited sigmoid routing (selection bias, top-2-sum groups, ``norm_topk_prob``) with the
``routed_scaling_factor`` applied by the block instead of the router.

model_types: ``beam``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _block_routed_scaling, _renormalize_flag
from moecompress.models.view import RoutingSpec


def _beam_routing(config, router: nn.Module) -> RoutingSpec:
    # DeepSeek-V3's group-limited sigmoid routing; the block applies routed_scaling_factor (block_scaling).
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        group_score="top2_sum",
        has_selection_bias=True,
    )


BEAM = FamilyAdapter(
    model_type="beam",
    routing=_beam_routing,
    block_scaling=_block_routed_scaling,
    group_fields=("n_group", "topk_group"),
    display_name="Beam",
)
