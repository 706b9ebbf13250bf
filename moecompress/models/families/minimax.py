"""MiniMax-M2's router and MiniMax-M3's copy: sigmoid scores, selection on scores + an ``e_score_correction_bias``
(on the block for M2, on the router for M3), always renormalised; M3 scales the routed sum in the block.

model_types: ``minimax_m2``, ``minimax_m3_vl_text`` (alias ``minimax_m3_vl``). MiniMax (``minimax``, a softmax
router) is in ``softmax_topk``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _block_routed_scaling
from moecompress.models.view import RoutingSpec


def _minimax_m2_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid scores, selection on scores + the block's e_score_correction_bias, always renormalised.
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=True, has_selection_bias=True)


MINIMAX_M2 = FamilyAdapter(
    model_type="minimax_m2",
    routing=_minimax_m2_routing,
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    selection_bias_attr="e_score_correction_bias",
    display_name="MiniMax-M2",
)


def _minimax_m3_glu(experts: nn.Module) -> tuple[Callable, Callable]:
    """MiniMax-M3's clamped SwiGLU (GPT-OSS's formula on concatenated, not interleaved, gate/up)."""
    alpha, limit = float(experts.swiglu_alpha), float(experts.swiglu_limit)

    def activation(gate_out: torch.Tensor) -> torch.Tensor:
        gate_out = gate_out.clamp(max=limit)
        return gate_out * torch.sigmoid(gate_out * alpha)

    def glu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        return (up_out.clamp(min=-limit, max=limit) + 1) * activation(gate_out)

    return activation, glu


# MiniMax-M3 (text decoder of MiniMax-M3-VL): MiniMax-M2's router with the bias on the router, the routed sum
# scaled in the block, a clamped-SwiGLU shared MLP (fused gate_up_proj Linear) and clamped-SwiGLU experts.
MINIMAX_M3_VL_TEXT = FamilyAdapter(
    model_type="minimax_m3_vl_text",
    routing=_minimax_m2_routing,
    shared_attr="shared_experts",
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    block_scaling=_block_routed_scaling,
    glu=_minimax_m3_glu,
    display_name="MiniMax-M3",
)
