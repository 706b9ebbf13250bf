"""DeepSeek's routers and the architectures that copy DeepSeek-V3's.

DeepSeek-V2: softmax, optionally group-limited greedy (groups scored by their best expert), scaled, never
renormalised. DeepSeek-V3 and its copies: sigmoid, selection on scores + the router's ``e_score_correction_bias``,
groups scored by their top-2 sum, renormalised with ``norm_topk_prob``, scaled by ``routed_scaling_factor``.

model_types: ``deepseek_v2``, ``deepseek_v3``, ``glm4_moe``, ``dots1``, ``solar_open``, ``glm4_moe_lite``,
``deepseek_v32``, ``exaone_moe``, ``mimo_v2_flash``, ``kimi_linear``, ``glm_moe_dsa``, ``axk1``, ``hy_v4``,
``bailing_hybrid``. Relatives with their own routing function: ``beam``, ``axk2``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _renormalize_flag
from moecompress.models.view import RoutingSpec


def _deepseek_v2_routing(config, router: nn.Module) -> RoutingSpec:
    grouped = getattr(router, "topk_method", "greedy") == "group_limited_greedy"
    return RoutingSpec(
        scoring="softmax",
        top_k=int(router.top_k),
        renormalize=False,  # DeepSeek-V2's router never renormalises (no norm_topk_prob in its forward)
        n_group=int(router.num_group) if grouped else 1,
        topk_group=int(router.topk_group) if grouped else 1,
        group_score="max",
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def _deepseek_v3_routing(config, router: nn.Module) -> RoutingSpec:
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        group_score="top2_sum",
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=True,
    )


DEEPSEEK_V2 = FamilyAdapter(
    model_type="deepseek_v2",
    routing=_deepseek_v2_routing,
    shared_attr="shared_experts",
    shared_count_field="n_shared_experts",
    count_fields=("n_routed_experts",),
    intermediate_field_shared=True,
    group_fields=("n_group", "topk_group"),
    display_name="DeepSeek-V2",
)
DEEPSEEK_V3 = FamilyAdapter(
    model_type="deepseek_v3",
    routing=_deepseek_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="n_shared_experts",
    count_fields=("n_routed_experts",),
    intermediate_field_shared=True,
    group_fields=("n_group", "topk_group"),
    display_name="DeepSeek-V3",
)


# DeepSeek-V3's router, copied into other architectures (sigmoid + selection bias, top-2-sum groups, scaling).
GLM4_MOE, DOTS1, SOLAR_OPEN = (
    FamilyAdapter(
        model_type=model_type,
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="n_shared_experts",
        count_fields=("n_routed_experts",),
        intermediate_field_shared=True,
        group_fields=("n_group", "topk_group"),
        display_name=name,
    )
    for model_type, name in (("glm4_moe", "GLM-4-MoE"), ("dots1", "dots.llm1"), ("solar_open", "Solar-Open"))
)


# More copies of DeepSeek-V3's router (sigmoid + selection bias on the router, top-2-sum groups, scaling).
GLM4_MOE_LITE, DEEPSEEK_V32, EXAONE_MOE = (
    FamilyAdapter(
        model_type=model_type,
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field=shared_count_field,
        count_fields=(count_field,),
        intermediate_field_shared=True,  # shared experts are moe_intermediate_size * shared count wide
        group_fields=("n_group", "topk_group"),
        display_name=name,
    )
    for model_type, name, count_field, shared_count_field in (
        ("glm4_moe_lite", "GLM-4-MoE-Lite", "n_routed_experts", "n_shared_experts"),
        ("deepseek_v32", "DeepSeek-V3.2", "n_routed_experts", "n_shared_experts"),
        ("exaone_moe", "EXAONE-MoE", "num_experts", "num_shared_experts"),
    )
)


# MiMo-V2-Flash: DeepSeek-V3's router, no shared experts.
MIMO_V2_FLASH = FamilyAdapter(
    model_type="mimo_v2_flash",
    routing=_deepseek_v3_routing,
    count_fields=("n_routed_experts",),
    group_fields=("n_group", "topk_group"),
    display_name="MiMo-V2-Flash",
)


# Kimi-Linear: DeepSeek-V3's router and shared experts, between KDA linear-attention and MLA layers.
KIMI_LINEAR = FamilyAdapter(
    model_type="kimi_linear",
    routing=_deepseek_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="num_shared_experts",
    count_fields=("num_experts",),
    top_k_fields=("num_experts_per_token", "num_experts_per_tok"),
    intermediate_field_shared=True,
    group_fields=("num_expert_group", "topk_group"),
    display_name="Kimi-Linear",
)


GLM_MOE_DSA = FamilyAdapter(
    model_type="glm_moe_dsa",
    routing=_deepseek_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="n_shared_experts",
    count_fields=("n_routed_experts",),
    intermediate_field_shared=True,
    group_fields=("n_group", "topk_group"),
    display_name="GLM-MoE-DSA",
)


# A.X-K1: DeepSeek-V3's MoE with an RMSNorm on the block output (``post_mlp_layernorm``).
AXK1 = FamilyAdapter(
    model_type="axk1",
    routing=_deepseek_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="n_shared_experts",
    count_fields=("n_routed_experts",),
    intermediate_field_shared=True,
    group_fields=("n_group", "topk_group"),
    output_attr="post_mlp_layernorm",
    display_name="A.X-K1",
)


def _hy_v4_glu(experts: nn.Module) -> tuple[Callable, Callable]:
    """HY-V4's clamped SwiGLU: ``silu(min(gate, limit)) * clamp(up, ±limit)`` (no alpha, no +1 as in GPT-OSS)."""
    limit = float(experts.swiglu_limit)

    def activation(gate_out: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gate_out.clamp(max=limit))

    def glu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        return activation(gate_out) * up_out.clamp(min=-limit, max=limit)

    return activation, glu


# HY-V4: DeepSeek-V3's router and shared experts, clamped SwiGLU experts, hyper-connections between layers.
HY_V4 = FamilyAdapter(
    model_type="hy_v4",
    routing=_deepseek_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="n_shared_experts",
    count_fields=("n_routed_experts",),
    intermediate_field_shared=True,
    group_fields=("n_group", "topk_group"),
    glu=_hy_v4_glu,
    display_name="Hunyuan-V4",
)


# Bailing-Hybrid (Ling): DeepSeek-V3's router and shared experts between KDA linear-attention and MLA layers.
BAILING_HYBRID = FamilyAdapter(
    model_type="bailing_hybrid",
    routing=_deepseek_v3_routing,
    shared_attr="shared_experts",
    shared_count_field="num_shared_experts",
    count_fields=("num_experts",),
    top_k_fields=("num_experts_per_token", "num_experts_per_tok"),
    intermediate_field_shared=True,
    group_fields=("num_expert_group", "topk_group"),
    display_name="Bailing-Hybrid",
)
