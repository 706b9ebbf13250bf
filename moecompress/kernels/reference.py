"""Torch reference path: dequantise and use plain torch ops. Always works, on any device; the kernels must agree.

Shapes: ``x [M, K]``, a packed weight ``W [N, K]`` (``y = x @ W^T``), MoE hidden states ``[T, H]``, routing
``top_k_index / top_k_weights [T, k]``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moecompress.kernels.layout import PackedLinearWeight


def packed_linear_reference(x: torch.Tensor, weight: PackedLinearWeight) -> torch.Tensor:
    """``x [..., K] @ W^T -> [..., N]``, accumulated in fp32, returned in ``x``'s dtype."""
    return F.linear(x.float(), weight.dequantize(torch.float32)).to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[S, 2I]`` (gate columns, then up columns) -> ``silu(gate) * up`` ``[S, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: list[PackedLinearWeight],
    down: list[PackedLinearWeight],
    apply_gate: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
) -> torch.Tensor:
    """Routed experts, one expert at a time (the transformers eager loop with dequantised weights).

    hidden_states ``[T, H]``; gate_up[e]: ``[2I, H]``; down[e]: ``[H, I]``; returns ``[T, H]`` in the input dtype.
    Expert ids outside ``[0, len(gate_up))`` (expert-parallel sentinels) contribute nothing.
    """
    output = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    num_experts = len(gate_up)
    for expert in top_k_index.unique().tolist():
        if not 0 <= expert < num_experts:
            continue
        token_idx, slot = torch.where(top_k_index == expert)
        x = hidden_states[token_idx].float()
        intermediate = apply_gate(F.linear(x, gate_up[expert].dequantize(torch.float32)))
        # Round the intermediate to the activation dtype, as every fused kernel stores it between the two GEMMs.
        intermediate = intermediate.to(hidden_states.dtype).float()
        expert_out = F.linear(intermediate, down[expert].dequantize(torch.float32))
        output.index_add_(0, token_idx, expert_out * top_k_weights[token_idx, slot, None].float())
    return output.to(hidden_states.dtype)
