"""Kolibri1: top-k of the logits + selection bias, weights the sigmoid of the picked logits, renormalised with
``norm_topk_prob``.

model_types: ``kolibri1``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _renormalize_flag
from moecompress.models.view import RoutingSpec


def _kolibri1_routing(config, router: nn.Module) -> RoutingSpec:
    # top-k of logits + selection bias, weights = sigmoid of the picked logits, renormalised with norm_topk_prob.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        has_selection_bias=True,
        bias_on_logits=True,
        renormalize_eps=0.0,
    )


KOLIBRI1 = FamilyAdapter(
    model_type="kolibri1",
    routing=_kolibri1_routing,
    shared_attr="shared_experts",
    display_name="Kolibri1",
)
