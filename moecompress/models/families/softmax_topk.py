"""Softmax top-k routers: softmax over all experts, the top-k kept, renormalised as the router or config says
(``norm_topk_prob``) or always.

model_types: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``qwen3_5_moe_text`` (alias ``qwen3_5_moe``), ``qwen3_next``,
``olmoe``, ``minimax``, ``flex_olmo``, ``jamba``, ``hunyuan_v1_moe``, ``mellum``, ``qwen3_vl_moe_text`` (alias
``qwen3_vl_moe``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _renormalize_flag
from moecompress.models.view import RoutingSpec


def _softmax_routing(always_renormalize: bool = False) -> Callable[[object, nn.Module], RoutingSpec]:
    def routing(config, router: nn.Module) -> RoutingSpec:
        renormalize = always_renormalize or _renormalize_flag(config, router)
        return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=renormalize)

    return routing


MIXTRAL = FamilyAdapter(
    model_type="mixtral",
    routing=_softmax_routing(always_renormalize=True),
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    display_name="Mixtral",
)
QWEN2_MOE = FamilyAdapter(
    model_type="qwen2_moe",
    routing=_softmax_routing(),
    shared_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    display_name="Qwen2-MoE",
)
QWEN3_MOE = FamilyAdapter(
    model_type="qwen3_moe",
    routing=_softmax_routing(),
    count_fields=("num_experts",),
    display_name="Qwen3-MoE",
)
QWEN3_5_MOE_TEXT = FamilyAdapter(
    model_type="qwen3_5_moe_text",
    routing=_softmax_routing(always_renormalize=True),  # its router renormalises unconditionally
    shared_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    display_name="Qwen3.5-MoE",
)
QWEN3_NEXT = FamilyAdapter(
    model_type="qwen3_next",
    routing=_softmax_routing(),
    shared_attr="shared_expert",
    shared_gate_attr="shared_expert_gate",
    display_name="Qwen3-Next",
)
OLMOE = FamilyAdapter(
    model_type="olmoe",
    routing=_softmax_routing(),
    intermediate_field="intermediate_size",
    display_name="OLMoE",
)
MINIMAX = FamilyAdapter(
    model_type="minimax",
    routing=_softmax_routing(always_renormalize=True),
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    display_name="MiniMax",
)
FLEX_OLMO = FamilyAdapter(
    model_type="flex_olmo",
    routing=_softmax_routing(),
    intermediate_field="intermediate_size",
    display_name="FlexOlmo",
)


# Jamba: Mixtral-style experts between Mamba / attention mixers; softmax top-k without renormalisation.
JAMBA = FamilyAdapter(
    model_type="jamba",
    routing=_softmax_routing(),  # no norm_topk_prob anywhere: never renormalised
    block_attr="feed_forward",
    router_attr="router",
    count_fields=("num_experts",),
    intermediate_field="intermediate_size",
    intermediate_field_shared=True,  # the dense feed-forward layers are intermediate_size wide too
    min_experts=2,  # JambaSparseMoeBlock only when num_experts > 1: one expert reloads as a dense JambaMLP
    display_name="Jamba",
)


# Hunyuan-MoE-V1: Mixtral-style routing (softmax, top-k, always renormalised) from a wrapped Linear ``gate.wg``;
# one dense shared MLP in the block, sized by intermediate_size like the experts.
HUNYUAN_V1_MOE = FamilyAdapter(
    model_type="hunyuan_v1_moe",
    routing=_softmax_routing(always_renormalize=True),
    router_linear_attr="wg",
    shared_attr="shared_mlp",
    count_fields=("num_experts",),
    top_k_fields=("moe_topk", "num_experts_per_tok"),
    intermediate_field="intermediate_size",
    intermediate_field_shared=True,
    display_name="Hunyuan-MoE-V1",
)


MELLUM = FamilyAdapter(model_type="mellum", routing=_softmax_routing(), display_name="Mellum")


# Qwen3-VL-MoE (text decoder): Qwen3-MoE's experts, a router that always renormalises (no norm_topk_prob). The model
# is a vision-language model (``Qwen3VLMoeForConditionalGeneration``, layers at ``model.language_model.layers``).
QWEN3_VL_MOE_TEXT = FamilyAdapter(
    model_type="qwen3_vl_moe_text",
    routing=_softmax_routing(always_renormalize=True),
    display_name="Qwen3-VL-MoE",
)
