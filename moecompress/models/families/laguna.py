"""Laguna: sigmoid of (optionally tanh soft-capped) logits, the router's selection bias, always renormalised; the
block scales the routed sum by ``moe_routed_scaling_factor``.

model_types: ``laguna``.
"""

from __future__ import annotations

import torch
from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _block_routed_scaling
from moecompress.models.view import RoutingSpec


def _laguna_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid of (optionally soft-capped) logits, router-held selection bias, always renormalised; the block
    # multiplies the routed sum by moe_routed_scaling_factor (block_scaling).
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=True, has_selection_bias=True)


def _laguna_router_logits(config, router: nn.Module):
    cap = float(router.router_logit_softcapping)
    if cap <= 0:
        return None

    def logits_fn(hidden_states: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden_states.float(), router.weight.float())
        return torch.tanh(logits / cap) * cap

    return logits_fn


LAGUNA = FamilyAdapter(
    model_type="laguna",
    routing=_laguna_routing,
    shared_attr="shared_experts",
    block_scaling=_block_routed_scaling,
    router_logits=_laguna_router_logits,
    display_name="Laguna",
)
