"""Llama4: top-k of the router logits, sigmoid of each picked logit, not renormalised; the weight scales the
expert's input.

model_types: ``llama4_text`` (alias ``llama4``).
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.view import RoutingSpec


def _llama4_routing(config, router: nn.Module) -> RoutingSpec:
    # top-k of the logits, sigmoid of each picked logit, no renormalisation; the weight scales the expert input.
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=False, scales_expert_input=True)


# Llama4 is not on the experts interface: its experts run a dense bmm over every expert, so a remap merge (which
# needs top_k_index) cannot be installed; pruning, collapse merges and micro-expert edits work.
LLAMA4_TEXT = FamilyAdapter(
    model_type="llama4_text",
    routing=_llama4_routing,
    block_attr="feed_forward",
    router_attr="router",
    shared_attr="shared_expert",
    storage="transposed",
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    intermediate_field_shared=True,  # the shared expert is sized by intermediate_size too
    display_name="Llama4",
)
