"""Flint: top-k of the sigmoid scores, no selection bias, renormalised with ``norm_topk_prob``.

model_types: ``flint``.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _renormalize_flag
from moecompress.models.view import RoutingSpec


def _sigmoid_topk_routing(config, router: nn.Module) -> RoutingSpec:
    """Flint: top-k of the sigmoid scores, no selection bias, renormalised with norm_topk_prob."""
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=_renormalize_flag(config, router))


FLINT = FamilyAdapter(
    model_type="flint",
    routing=_sigmoid_topk_routing,
    shared_attr="shared_expert",  # added in full, no gate
    display_name="Flint",
)
