"""Cohere2-MoE: top-k of the router logits, then softmax over those k or sigmoid of each (renormalised with
``norm_topk_prob``); the ``average`` combination halves the routed and the shared output.

model_types: ``cohere2_moe``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _cohere2_moe_routing(config, router: nn.Module) -> RoutingSpec:
    # top-k of the logits, then softmax over those k or sigmoid of each (renormalised with norm_topk_prob).
    if router.expert_selection_fn == "softmax":
        return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=True, softmax_after_topk=True)
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=bool(router.norm_topk_prob))


def _cohere2_moe_averaged(config) -> bool:
    """The ``average`` combination: ``(routed + shared) / 2``, i.e. both halved (only with shared experts)."""
    return int(getattr(config, "num_shared_experts", 0) or 0) > 0 and (
        getattr(config, "shared_expert_combination_strategy", "sum") == "average"
    )


def _cohere2_moe_block_scaling(config, block: nn.Module) -> float:
    return 0.5 if _cohere2_moe_averaged(config) else 1.0


def _cohere2_moe_shared_scale(config) -> float:
    return 0.5 if _cohere2_moe_averaged(config) else 1.0


COHERE2_MOE = FamilyAdapter(
    model_type="cohere2_moe",
    routing=_cohere2_moe_routing,
    shared_attr="shared_experts",
    shared_count_field="num_shared_experts",
    count_fields=("num_experts",),
    intermediate_field="intermediate_size",
    intermediate_field_shared=True,  # shared experts are intermediate_size * num_shared_experts wide
    shared_scale=_cohere2_moe_shared_scale,
    block_scaling=_cohere2_moe_block_scaling,
    display_name="Cohere2-MoE",
)
