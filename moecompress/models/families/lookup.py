"""Lookups over the registered adapters: the adapter of a config or model, its MoE blocks as views, the decoder
layers, the text config, the supported families and the fewest experts a block can keep.
"""

from __future__ import annotations

import transformers
from torch import nn

from moecompress.errors import UnsupportedModelError
from moecompress.models.families.registry import ADAPTERS, FamilyAdapter
from moecompress.models.view import MoEBlockView


def minimum_experts(view: MoEBlockView, adapter: FamilyAdapter) -> tuple[int, str]:
    """Fewest routed experts (stored and router outputs) ``view``'s block can keep and still run and reload as an
    MoE block under the family's transformers code, and why. ``(1, "")`` when nothing stops a single expert."""
    if view.routing.selection == "sparsemixer":
        return 2, "PhiMoE's sparsemixer always picks exactly 2 experts"
    if view.routing.group_score == "top2_sum" and getattr(view.router, "num_group", None) is not None:
        # DeepSeek-V3's router scores every expert group by its two best experts (topk(2) on each group) even when
        # group routing is off (n_group = 1: one group of all experts), so one expert fails on the first forward.
        return 2, f"{adapter.display_name}'s router scores expert groups by their top-2 experts (also with n_group=1)"
    if adapter.min_experts > 1:
        return adapter.min_experts, (
            f"{adapter.display_name}'s transformers code builds a dense MLP instead of an MoE block for fewer "
            f"than {adapter.min_experts} experts"
        )
    return 1, ""


def supported_families() -> list[str]:
    """Human-readable names of every supported family, for error messages and docs."""
    return sorted({adapter.display_name or adapter.model_type for adapter in ADAPTERS.values()})


def text_config(config):
    """The config that describes the decoder (multimodal configs nest it as ``text_config``)."""
    return getattr(config, "get_text_config", lambda: config)()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.model.layers`` for every supported family)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(base, "language_model"):
        layers = getattr(base.language_model, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"could not find decoder layers on {type(model).__name__}; expected `model.layers`. "
            f"Supported MoE families: {', '.join(supported_families())}."
        )
    return layers


def adapter_for(config, model: nn.Module | None = None) -> FamilyAdapter:
    """The adapter of a config (and its model, when there is one), or a clear error naming the supported families.

    Found by ``model_type`` first; a ``model_type`` without an adapter still finds one through the classes that build
    the model: a config class derived from a supported one, an ``architectures`` entry naming a supported
    transformers class (configs that build ``DeepseekV3ForCausalLM`` under a new name), or ``model``'s own class
    hierarchy. The MoE blocks are then those of the supported family, so views and edits apply unchanged.
    """
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type) or _adapter_from_classes(config, model)
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported MoE family. Supported: {', '.join(supported_families())}. "
            "For a dense model there are no experts to compress; for a new MoE family add a FamilyAdapter "
            "module in moecompress/models/families/ and register it in its __init__.py."
        )
    return adapter


def _adapter_from_classes(config, model: nn.Module | None) -> FamilyAdapter | None:
    """The adapter of the first supported ``model_type`` among the classes behind ``config`` / ``model``."""
    candidate_types = [getattr(cls, "model_type", None) for cls in type(config).__mro__]
    model_classes = [type(model)] if model is not None else []
    for name in getattr(config, "architectures", None) or []:
        architecture = getattr(transformers, str(name), None)
        if isinstance(architecture, type):
            model_classes.append(architecture)
    for model_class in model_classes:
        for cls in model_class.__mro__:
            config_class = getattr(cls, "config_class", None)
            candidate_types.append(getattr(config_class, "model_type", None))
    return next((ADAPTERS[t] for t in candidate_types if t in ADAPTERS), None)


def find_moe_blocks(model: nn.Module) -> list[MoEBlockView]:
    """One view per MoE block, in layer order. Raises :class:`UnsupportedModelError` for dense or unknown models."""
    config = text_config(model.config)
    adapter = adapter_for(config, model)
    views = []
    layers = decoder_layers(model)
    for layer_index, layer in enumerate(layers):
        block = getattr(layer, adapter.block_attr, None)
        if block is not None and adapter.is_moe_block(block):
            path = f"{_layers_path(model, layers)}.{layer_index}.{adapter.block_attr}"
            views.append(adapter.view(config, layer_index, path, block))
    if not views:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE blocks (a dense model?). moecompress compresses Mixture-of-Experts "
            f"models: {', '.join(supported_families())}."
        )
    return views


def _layers_path(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    return "model.layers"
