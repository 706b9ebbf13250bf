"""The MoE surface of every supported architecture: find MoE blocks, routing semantics, expert tensors, edits."""

from moecompress.models.families import (
    ADAPTERS,
    FamilyAdapter,
    adapter_for,
    decoder_layers,
    find_moe_blocks,
    supported_families,
)
from moecompress.models.view import ExpertWeights, MoEBlockView, RouterOutput, RoutingSpec, SharedExpert, route_from_logits

__all__ = [
    "ADAPTERS",
    "ExpertWeights",
    "FamilyAdapter",
    "MoEBlockView",
    "RouterOutput",
    "RoutingSpec",
    "SharedExpert",
    "adapter_for",
    "decoder_layers",
    "find_moe_blocks",
    "route_from_logits",
    "supported_families",
]
