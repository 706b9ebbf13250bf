"""Family adapters: find the MoE blocks of a transformers model and build a :class:`MoEBlockView` for each.

An adapter is a small object per ``config.model_type``: which attribute of a decoder layer holds the MoE block,
which attributes of the block hold the router, experts and shared experts, and how the config spells routing.
Routing semantics are read from the config and the modules (``norm_topk_prob``, ``n_group``, ...), never
assumed from the family name alone. A new architecture is one adapter here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from moecompress.errors import UnsupportedModelError
from moecompress.models.view import MoEBlockView, RoutingSpec, SharedExpert


@dataclass(frozen=True)
class FamilyAdapter:
    """How one family spells its MoE surface.

    model_type: ``config.model_type``.
    block_attr: attribute of a decoder layer holding the MoE block (``mlp``).
    routing: ``fn(config, router_module) -> RoutingSpec``.
    shared_attr: attribute of the block holding shared experts (``shared_experts``/``shared_expert``) or None.
    shared_gate_attr: attribute holding the scalar shared-expert gate (``shared_expert_gate``) or None.
    storage: fused tensor layout, see :class:`MoEBlockView`.
    count_fields: config fields that hold the routed-expert count (all are updated on pruning).
    intermediate_field: config field of the expert intermediate size.
    """

    model_type: str
    routing: Callable[[object, nn.Module], RoutingSpec]
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    storage: str = "concatenated"
    count_fields: tuple[str, ...] = ("num_experts",)
    intermediate_field: str = "moe_intermediate_size"
    display_name: str = ""

    def is_moe_block(self, block: nn.Module) -> bool:
        experts = getattr(block, self.experts_attr, None)
        return experts is not None and hasattr(experts, "gate_up_proj") and hasattr(block, self.router_attr)

    def view(self, model_config, layer_index: int, path: str, block: nn.Module) -> MoEBlockView:
        router = getattr(block, self.router_attr)
        experts = getattr(block, self.experts_attr)
        shared = []
        if self.shared_attr is not None and getattr(block, self.shared_attr, None) is not None:
            gate = getattr(block, self.shared_gate_attr) if self.shared_gate_attr else None
            shared.append(SharedExpert(module=getattr(block, self.shared_attr), gate=gate))
        return MoEBlockView(
            layer_index=layer_index,
            path=path,
            family=self.model_type,
            block=block,
            router=router,
            experts=experts,
            routing=self.routing(model_config, router),
            activation=experts.act_fn,
            storage=self.storage,  # type: ignore[arg-type]
            shared_experts=shared,
        )


def _softmax_routing(always_renormalize: bool = False) -> Callable[[object, nn.Module], RoutingSpec]:
    def routing(config, router: nn.Module) -> RoutingSpec:
        renormalize = always_renormalize or bool(getattr(config, "norm_topk_prob", False))
        return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=renormalize)

    return routing


def _deepseek_v3_routing(config, router: nn.Module) -> RoutingSpec:
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=bool(config.norm_topk_prob),
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        group_score="top2_sum",
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=True,
    )


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


register_adapter(
    FamilyAdapter(
        model_type="mixtral",
        routing=_softmax_routing(always_renormalize=True),
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        display_name="Mixtral",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="qwen3_moe",
        routing=_softmax_routing(),
        count_fields=("num_experts",),
        display_name="Qwen3-MoE",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="deepseek_v3",
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        count_fields=("n_routed_experts",),
        display_name="DeepSeek-V3",
    )
)


def supported_families() -> list[str]:
    """Human-readable names of every supported family, for error messages and docs."""
    return sorted(adapter.display_name or adapter.model_type for adapter in ADAPTERS.values())


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


def adapter_for(config) -> FamilyAdapter:
    """The adapter of a config, or a clear error naming the supported families."""
    model_type = getattr(text_config(config), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported MoE family. Supported: {', '.join(supported_families())}. "
            "For a dense model there are no experts to compress; for a new MoE family add a FamilyAdapter "
            "in moecompress/models/families.py."
        )
    return adapter


def find_moe_blocks(model: nn.Module) -> list[MoEBlockView]:
    """One view per MoE block, in layer order. Raises :class:`UnsupportedModelError` for dense or unknown models."""
    config = text_config(model.config)
    adapter = adapter_for(config)
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
