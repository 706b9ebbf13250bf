"""GPT-OSS: top-k of the router logits, softmax over those k; experts stored transposed and interleaved, with a
clamped SwiGLU.

model_types: ``gpt_oss``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _softmax_over_top_logits_routing


def _gpt_oss_glu(experts: nn.Module) -> tuple[Callable, Callable]:
    """GPT-OSS's clamped SwiGLU: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha g)`` with ``g = min(gate, limit)``."""
    alpha, limit = float(experts.alpha), float(experts.limit)

    def activation(gate_out: torch.Tensor) -> torch.Tensor:
        gate_out = gate_out.clamp(max=limit)
        return gate_out * torch.sigmoid(gate_out * alpha)

    def glu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        return (up_out.clamp(min=-limit, max=limit) + 1) * activation(gate_out)

    return activation, glu


GPT_OSS = FamilyAdapter(
    model_type="gpt_oss",
    routing=_softmax_over_top_logits_routing,
    router_attr="router",
    storage="transposed_interleaved",
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    glu=_gpt_oss_glu,
    display_name="GPT-OSS",
)
