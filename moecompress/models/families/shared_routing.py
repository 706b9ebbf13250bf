"""Routing helpers that several family modules share.

``_renormalize_flag`` (``norm_topk_prob`` from the router, else the config), the softmax over the top-k logits
(GPT-OSS, GraniteMoE, Aria) and the routed-sum scaling a block applies after its router (Laguna, Beam, MiniMax-M3).
"""

from __future__ import annotations

from torch import nn

from moecompress.models.view import RoutingSpec


def _renormalize_flag(config, router: nn.Module) -> bool:
    """``norm_topk_prob`` as the router module holds it (Qwen2/3, OLMoE), else as the config spells it."""
    flag = getattr(router, "norm_topk_prob", None)
    if flag is None:
        flag = getattr(config, "norm_topk_prob", False)
    return bool(flag)


def _softmax_over_top_logits_routing(config, router: nn.Module) -> RoutingSpec:
    """GPT-OSS, GraniteMoE: top-k of the logits, softmax over those k (= renormalised top-k softmax)."""
    return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=True, softmax_after_topk=True)


def _block_routed_scaling(config, block: nn.Module) -> float:
    return float(block.routed_scaling_factor)
