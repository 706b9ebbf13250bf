"""GraniteMoE's router and Aria's copy of it: top-k of the router logits, softmax over those k.

model_types: ``granitemoe``, ``granitemoeshared``, ``granitemoehybrid``, ``granitemoe_swa``, ``aria_text`` (alias
``aria``). GPT-OSS routes the same way (``gpt_oss``).
"""

from __future__ import annotations

from moecompress.models.families.registry import FamilyAdapter
from moecompress.models.families.shared_routing import _softmax_over_top_logits_routing

GRANITEMOE = FamilyAdapter(
    model_type="granitemoe",
    routing=_softmax_over_top_logits_routing,
    block_attr="block_sparse_moe",
    router_attr="router",
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    display_name="GraniteMoE",
)


# GraniteMoE with a dense shared MLP: the MoE block is GraniteMoE's (top-k logits, softmax over k); the shared
# ``shared_mlp`` (fused ``input_linear`` [2S, d] / ``output_linear``) sits on the decoder layer, outside the block,
# and is added by the layer: it is not a view shared expert (edits never touch it; it stays dense). The hybrid
# variant interleaves Mamba2 layers; its MoE blocks are the same.
GRANITEMOESHARED, GRANITEMOEHYBRID = (
    FamilyAdapter(
        model_type=model_type,
        routing=_softmax_over_top_logits_routing,
        block_attr="block_sparse_moe",
        router_attr="router",
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        display_name=name,
    )
    for model_type, name in (("granitemoeshared", "GraniteMoE-Shared"), ("granitemoehybrid", "GraniteMoE-Hybrid"))
)


GRANITEMOE_SWA = FamilyAdapter(
    model_type="granitemoe_swa",
    routing=_softmax_over_top_logits_routing,
    block_attr="block_sparse_moe",
    router_attr="router",
    count_fields=("num_local_experts",),
    intermediate_field="intermediate_size",
    display_name="GraniteMoE-SWA",
)


# Aria (text decoder): GraniteMoE's routing (top-k logits, softmax over k), experts stored transposed
# ([E, d, 2I] gate then up, down [E, I, d]), shared experts sized intermediate_size * moe_num_shared_experts.
ARIA_TEXT = FamilyAdapter(
    model_type="aria_text",
    routing=_softmax_over_top_logits_routing,
    router_attr="router",
    shared_attr="shared_experts",
    shared_count_field="moe_num_shared_experts",
    storage="transposed",
    count_fields=("moe_num_experts",),
    top_k_fields=("moe_topk",),
    intermediate_field="intermediate_size",
    intermediate_field_shared=True,
    display_name="Aria",
)
