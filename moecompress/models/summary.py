"""What an MoE model is made of: per MoE layer routing and sizes, and where the parameters and bytes are.

Works on a model with real weights and on one built on the ``meta`` device (shapes only), which is how
``moecompress inspect`` describes a checkpoint without reading its weights.

Two sizes, because they differ: ``bytes`` (:func:`model_summary`) is the model **in memory** at its load dtype, each
tensor at the dtype transformers keeps it in (since transformers 5.24 some routers stay float32 in a bf16 model:
DeepSeek-V3's router weight and ``e_score_correction_bias``, ...); ``bytes_on_disk``
(:func:`moecompress.checkpoint.headers.checkpoint_bytes`) is what the safetensors files store, read from their headers.
"""

from __future__ import annotations

from torch import nn

from moecompress.models.families import adapter_for, decoder_layers, find_moe_blocks, text_config


def model_summary(model: nn.Module) -> dict:
    """Describe ``model``'s MoE structure. Returns a JSON-serialisable dict::

        {"family", "model_type", "num_layers", "dense_layers": [layer indices without MoE],
         "moe_layers": [{"layer", "num_experts", "top_k", "scoring", "renormalize", "num_shared_experts",
                         "expert_intermediate_size", "router_outputs", "n_group", "topk_group",
                         "routed_scaling_factor", "routed_expert_params", "shared_expert_params"}],
         "parameters": {"routed_experts", "shared_experts", "other", "total"},
         "bytes": {same keys}}

    Counted tensors are the parameters plus the persistent buffers (DeepSeek's ``e_score_correction_bias``), i.e.
    what a checkpoint stores; tied tensors (embeddings) count once. ``other`` is everything that is not a routed
    or shared expert (attention, norms, embeddings, routers, dense MLPs). ``bytes`` uses each tensor's own dtype
    in memory (a float32-kept router counts 4 bytes per value in a bf16 model); for the checkpoint's own size see
    :func:`moecompress.checkpoint.headers.checkpoint_bytes`.
    """
    config = text_config(model.config)
    adapter = adapter_for(config, model)
    views = find_moe_blocks(model)
    routed_ids: set[int] = set()
    shared_ids: set[int] = set()
    rows = []
    numel = _parameter_counts(model)
    for view in views:
        routed = list(view.experts.parameters()) + list(view.experts.buffers())
        shared = [p for shared_expert in view.shared_experts for p in _shared_parameters(shared_expert)]
        routed_ids.update(id(p) for p in routed)
        shared_ids.update(id(p) for p in shared)
        spec = view.routing
        rows.append(
            {
                "layer": view.layer_index,
                "num_experts": view.num_experts,
                "top_k": spec.top_k,
                "scoring": spec.scoring,
                "renormalize": spec.renormalize,
                "num_shared_experts": view.num_shared_experts,
                "expert_intermediate_size": view.intermediate_size,
                "router_outputs": view.num_router_outputs,
                "n_group": spec.n_group,
                "topk_group": spec.topk_group,
                "routed_scaling_factor": spec.routed_scaling_factor,
                "routed_expert_params": sum(numel(p) for p in routed),
                "shared_expert_params": sum(numel(p) for p in shared),
            }
        )
    counts = {"routed_experts": 0, "shared_experts": 0, "other": 0}
    sizes = {"routed_experts": 0, "shared_experts": 0, "other": 0}
    for parameter in _stored_tensors(model):
        key = "routed_experts" if id(parameter) in routed_ids else "shared_experts" if id(parameter) in shared_ids else "other"
        counts[key] += numel(parameter)
        sizes[key] += parameter.numel() * parameter.element_size()
    counts["total"] = sum(counts.values())
    sizes["total"] = sum(sizes.values())
    moe_layer_indices = {view.layer_index for view in views}
    return {
        "family": adapter.display_name or adapter.model_type,
        "model_type": config.model_type,
        "num_layers": len(decoder_layers(model)),
        "dense_layers": [i for i in range(len(decoder_layers(model))) if i not in moe_layer_indices],
        "moe_layers": rows,
        "parameters": counts,
        "bytes": sizes,
    }


def _parameter_counts(model: nn.Module):
    """``tensor -> weights it holds``: its numel, except for packed (quantised) modules' buffers, which encode their
    module's weights (a packed int32 word holds several) or are overhead (scales), per ``parameter_counts()``."""
    packed: dict[int, int] = {}
    for module in model.modules():
        counts = getattr(module, "parameter_counts", None)
        if callable(counts):
            packed.update(counts())
    return lambda tensor: packed.get(id(tensor), tensor.numel())


def _stored_tensors(model: nn.Module) -> list:
    """Parameters (deduplicated: tied weights appear once) and persistent buffers."""
    tensors = list(model.parameters())
    seen = {id(t) for t in tensors}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set and id(buffer) not in seen:
                seen.add(id(buffer))
                tensors.append(buffer)
    return tensors


def _shared_parameters(shared_expert) -> list[nn.Parameter]:
    parameters = list(shared_expert.module.parameters()) + list(shared_expert.module.buffers())
    if shared_expert.gate is not None:
        parameters += list(shared_expert.gate.parameters())
    return parameters
