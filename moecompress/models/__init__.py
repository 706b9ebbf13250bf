"""The MoE surface of every supported architecture: find MoE blocks, routing semantics, expert tensors, edits.

It knows no files: reading and writing checkpoints (``load_model``, validation, the native format) is
:mod:`moecompress.checkpoint`, one layer up."""

from moecompress.models.edits import (
    EditError,
    keep_experts,
    materialize_expert_id_map,
    merge_experts,
    merged_expert_ids,
    remap_expert_ids,
    replace_experts,
    restore_expert_id_map,
    slice_micro_experts,
    sync_config,
    zero_micro_experts,
)
from moecompress.models.families import (
    ADAPTERS,
    FamilyAdapter,
    adapter_for,
    decoder_layers,
    find_moe_blocks,
    supported_families,
)
from moecompress.models.summary import model_summary
from moecompress.models.view import (
    ExpertWeights,
    MoEBlockView,
    RouterOutput,
    RoutingSpec,
    SharedExpert,
    route_from_logits,
)

__all__ = [
    "ADAPTERS",
    "EditError",
    "ExpertWeights",
    "FamilyAdapter",
    "MoEBlockView",
    "RouterOutput",
    "RoutingSpec",
    "SharedExpert",
    "adapter_for",
    "decoder_layers",
    "find_moe_blocks",
    "keep_experts",
    "materialize_expert_id_map",
    "merge_experts",
    "merged_expert_ids",
    "model_summary",
    "remap_expert_ids",
    "replace_experts",
    "restore_expert_id_map",
    "route_from_logits",
    "slice_micro_experts",
    "supported_families",
    "sync_config",
    "zero_micro_experts",
]
