"""The adapter type and the registry of adapters by ``config.model_type``.

:class:`FamilyAdapter` says how one family spells its MoE surface; :data:`ADAPTERS` maps each ``model_type`` (and
alias) to its adapter. The family modules of this package define the adapters; ``moecompress.models.families``
registers them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moecompress.models.view import MoEBlockView, RoutingSpec, SharedExpert


@dataclass(frozen=True)
class FamilyAdapter:
    """How one family spells its MoE surface.

    model_type: ``config.model_type`` (of the text config for multimodal models).
    routing: ``fn(config, router_module) -> RoutingSpec``; reads the router's own attributes first (edits update
        them per layer), the config second.
    block_attr: attribute of a decoder layer holding the MoE block (``mlp``; GraniteMoE ``block_sparse_moe``).
    router_attr / experts_attr: attributes of the block holding the router and the fused experts.
    shared_attr: attribute of the block holding shared experts (``shared_experts``/``shared_expert``) or None.
    shared_gate_attr: attribute holding the scalar shared-expert gate (``shared_expert_gate``) or None.
    shared_count_field: config field with how many shared experts are fused into that MLP (DeepSeek), or None (1).
    storage: fused tensor layout, see :class:`MoEBlockView`.
    count_fields: config fields that hold the routed-expert count (all are updated on pruning).
    top_k_fields: config fields that hold the experts per token (all are updated when an edit lowers top-k, so a
        plain reload routes with the new top-k: ``moe_topk`` for Aria and Hunyuan, ``moe_k`` for Ernie).
    intermediate_field: config field of the expert intermediate size.
    intermediate_field_shared: the intermediate field also sizes other modules (DeepSeek's shared experts are
        ``moe_intermediate_size * n_shared_experts`` wide), so slicing routed channels must not rewrite it.
    glu: ``fn(experts_module) -> (activation, glu)`` for experts without a plain ``act_fn`` (GPT-OSS).
    group_fields: config fields of group-limited routing (``n_group``, ``topk_group``) or None.
    selection_bias_attr: dotted path, from the block, of a selection bias that is not the router's own
        ``e_score_correction_bias`` (MiniMax-M2: ``e_score_correction_bias`` on the block; Ernie-4.5-MoE:
        ``gate.moe_statics.e_score_correction_bias``), or None.
    router_linear_attr: attribute of the router module holding the ``nn.Linear`` with the router weight when the
        router wraps one (Hunyuan ``wg``, AfMoE ``gate``), or None (the router holds ``weight`` itself).
    block_scaling: ``fn(config, block) -> float``: a factor the block applies to the routed sum after the router
        (Laguna's ``moe_routed_scaling_factor``); folded into ``routing.routed_scaling_factor``.
    output_attr: attribute of the block holding a module applied to the block's summed output (A.X-K1's
        ``post_mlp_layernorm``), or None.
    router_logits: ``fn(config, router) -> logits_fn or None`` for routers whose logits are not a plain linear
        map (Laguna's tanh soft-capping); becomes the view's ``router_logits_fn``.
    shared_scale: ``fn(config) -> float``: constant factor on the shared expert's output (Cohere2-MoE's
        ``average`` combination halves it), or None (1).
    min_experts: fewest routed experts per layer the family's transformers code can build as an MoE block
        (Jamba builds a dense MLP for ``num_experts == 1``: 2). Limits that follow from the routing (DeepSeek-V3's
        top-2 group scores, PhiMoE's two picks) come from :func:`minimum_experts`.
    """

    model_type: str
    routing: Callable[[object, nn.Module], RoutingSpec]
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    shared_count_field: str | None = None
    storage: str = "concatenated"
    count_fields: tuple[str, ...] = ("num_experts",)
    top_k_fields: tuple[str, ...] = ("num_experts_per_tok",)
    intermediate_field: str = "moe_intermediate_size"
    intermediate_field_shared: bool = False
    glu: Callable[[nn.Module], tuple[Callable, Callable | None]] | None = None
    group_fields: tuple[str, str] | None = None
    selection_bias_attr: str | None = None
    shared_scale: Callable[[object], float] | None = None
    router_linear_attr: str | None = None
    block_scaling: Callable[[object, nn.Module], float] | None = None
    output_attr: str | None = None
    router_logits: Callable[[object, nn.Module], Callable[[torch.Tensor], torch.Tensor] | None] | None = None
    min_experts: int = 1
    display_name: str = ""

    def is_moe_block(self, block: nn.Module) -> bool:
        experts = getattr(block, self.experts_attr, None)
        # Packed (quantized) experts expose `expert_linear` instead of fused float tensors.
        is_experts = experts is not None and (hasattr(experts, "gate_up_proj") or hasattr(experts, "expert_linear"))
        return is_experts and hasattr(block, self.router_attr)

    def view(self, model_config, layer_index: int, path: str, block: nn.Module) -> MoEBlockView:
        router = getattr(block, self.router_attr)
        experts = getattr(block, self.experts_attr)
        shared = []
        if self.shared_attr is not None and getattr(block, self.shared_attr, None) is not None:
            gate = getattr(block, self.shared_gate_attr) if self.shared_gate_attr else None
            count = int(getattr(model_config, self.shared_count_field, 1) or 1) if self.shared_count_field else 1
            scale = float(self.shared_scale(model_config)) if self.shared_scale is not None else 1.0
            shared.append(SharedExpert(module=getattr(block, self.shared_attr), gate=gate, count=count, scale=scale))
        bias_owner, bias_name = None, "e_score_correction_bias"
        if self.selection_bias_attr is not None:
            *owner_path, bias_name = self.selection_bias_attr.split(".")
            bias_owner = block
            for name in owner_path:
                bias_owner = getattr(bias_owner, name)
        if self.glu is not None:
            activation, glu = self.glu(experts)
        else:
            activation, glu = experts.act_fn, None
        routing = self.routing(model_config, router)
        scaling_outside = float(self.block_scaling(model_config, block)) if self.block_scaling is not None else 1.0
        if scaling_outside != 1.0:
            routing = dataclasses.replace(
                routing, routed_scaling_factor=routing.routed_scaling_factor * scaling_outside
            )
        return MoEBlockView(
            layer_index=layer_index,
            path=path,
            family=self.model_type,
            block=block,
            router=router,
            experts=experts,
            routing=routing,
            activation=activation,
            storage="packed" if hasattr(experts, "expert_linear") else self.storage,  # type: ignore[arg-type]
            shared_experts=shared,
            glu=glu,
            selection_bias_owner=bias_owner,
            selection_bias_name=bias_name,
            router_linear=getattr(router, self.router_linear_attr) if self.router_linear_attr else None,
            scaling_outside_router=scaling_outside,
            output_module=getattr(block, self.output_attr) if self.output_attr else None,
            router_logits_fn=self.router_logits(model_config, router) if self.router_logits is not None else None,
        )


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter, *aliases: str) -> FamilyAdapter:
    """Make ``adapter`` available for its ``model_type`` (and for alias model types, e.g. a multimodal wrapper)."""
    ADAPTERS[adapter.model_type] = adapter
    for alias in aliases:
        ADAPTERS[alias] = adapter
    return adapter
