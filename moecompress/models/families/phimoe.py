"""PhiMoE: sparsemixer routing, always two picks (whatever ``num_experts_per_tok`` says), not renormalised.

model_types: ``phimoe``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _phimoe_routing(config, router: nn.Module) -> RoutingSpec:
    # sparsemixer always makes two picks, whatever num_experts_per_tok says (router.top_k is not used by HF).
    return RoutingSpec(
        scoring="softmax",
        top_k=2,
        renormalize=False,
        selection="sparsemixer",
        sparsemixer_eps=float(router.router_jitter_noise),
    )


PHIMOE = FamilyAdapter(
    model_type="phimoe",
    routing=_phimoe_routing,
    router_attr="router",
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    display_name="PhiMoE",
)
