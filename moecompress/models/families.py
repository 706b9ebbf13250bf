"""Family adapters: find the MoE blocks of a transformers model and build a :class:`MoEBlockView` for each.

An adapter is a small object per ``config.model_type``: which attribute of a decoder layer holds the MoE block,
which attributes of the block hold the router, experts and shared experts, and how the config spells routing.
Routing semantics are read from the config and the modules (``norm_topk_prob``, ``n_group``, ...), never
assumed from the family name alone. A new architecture is one adapter here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from torch import nn

from moecompress.errors import UnsupportedModelError
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


def _renormalize_flag(config, router: nn.Module) -> bool:
    """``norm_topk_prob`` as the router module holds it (Qwen2/3, OLMoE), else as the config spells it."""
    flag = getattr(router, "norm_topk_prob", None)
    if flag is None:
        flag = getattr(config, "norm_topk_prob", False)
    return bool(flag)


def _softmax_routing(always_renormalize: bool = False) -> Callable[[object, nn.Module], RoutingSpec]:
    def routing(config, router: nn.Module) -> RoutingSpec:
        renormalize = always_renormalize or _renormalize_flag(config, router)
        return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=renormalize)

    return routing


def _softmax_over_top_logits_routing(config, router: nn.Module) -> RoutingSpec:
    """GPT-OSS, GraniteMoE: top-k of the logits, softmax over those k (= renormalised top-k softmax)."""
    return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=True, softmax_after_topk=True)


def _deepseek_v2_routing(config, router: nn.Module) -> RoutingSpec:
    grouped = getattr(router, "topk_method", "greedy") == "group_limited_greedy"
    return RoutingSpec(
        scoring="softmax",
        top_k=int(router.top_k),
        renormalize=False,  # DeepSeek-V2's router never renormalises (no norm_topk_prob in its forward)
        n_group=int(router.num_group) if grouped else 1,
        topk_group=int(router.topk_group) if grouped else 1,
        group_score="max",
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def _deepseek_v3_routing(config, router: nn.Module) -> RoutingSpec:
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        group_score="top2_sum",
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=True,
    )


def _phimoe_routing(config, router: nn.Module) -> RoutingSpec:
    # sparsemixer always makes two picks, whatever num_experts_per_tok says (router.top_k is not used by HF).
    return RoutingSpec(
        scoring="softmax",
        top_k=2,
        renormalize=False,
        selection="sparsemixer",
        sparsemixer_eps=float(router.router_jitter_noise),
    )


def _gpt_oss_glu(experts: nn.Module) -> tuple[Callable, Callable]:
    """GPT-OSS's clamped SwiGLU: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha g)`` with ``g = min(gate, limit)``."""
    alpha, limit = float(experts.alpha), float(experts.limit)

    def activation(gate_out: torch.Tensor) -> torch.Tensor:
        gate_out = gate_out.clamp(max=limit)
        return gate_out * torch.sigmoid(gate_out * alpha)

    def glu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        return (up_out.clamp(min=-limit, max=limit) + 1) * activation(gate_out)

    return activation, glu


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter, *aliases: str) -> FamilyAdapter:
    """Make ``adapter`` available for its ``model_type`` (and for alias model types, e.g. a multimodal wrapper)."""
    ADAPTERS[adapter.model_type] = adapter
    for alias in aliases:
        ADAPTERS[alias] = adapter
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
        model_type="qwen2_moe",
        routing=_softmax_routing(),
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
        display_name="Qwen2-MoE",
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
        model_type="qwen3_5_moe_text",
        routing=_softmax_routing(always_renormalize=True),  # its router renormalises unconditionally
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
        display_name="Qwen3.5-MoE",
    ),
    "qwen3_5_moe",
)
register_adapter(
    FamilyAdapter(
        model_type="qwen3_next",
        routing=_softmax_routing(),
        shared_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
        display_name="Qwen3-Next",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="olmoe",
        routing=_softmax_routing(),
        intermediate_field="intermediate_size",
        display_name="OLMoE",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="deepseek_v2",
        routing=_deepseek_v2_routing,
        shared_attr="shared_experts",
        shared_count_field="n_shared_experts",
        count_fields=("n_routed_experts",),
        intermediate_field_shared=True,
        group_fields=("n_group", "topk_group"),
        display_name="DeepSeek-V2",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="deepseek_v3",
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="n_shared_experts",
        count_fields=("n_routed_experts",),
        intermediate_field_shared=True,
        group_fields=("n_group", "topk_group"),
        display_name="DeepSeek-V3",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="gpt_oss",
        routing=_softmax_over_top_logits_routing,
        router_attr="router",
        storage="transposed_interleaved",
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        glu=_gpt_oss_glu,
        display_name="GPT-OSS",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="phimoe",
        routing=_phimoe_routing,
        router_attr="router",
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        display_name="PhiMoE",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="granitemoe",
        routing=_softmax_over_top_logits_routing,
        block_attr="block_sparse_moe",
        router_attr="router",
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        display_name="GraniteMoE",
    )
)

# DeepSeek-V3's router, copied into other architectures (sigmoid + selection bias, top-2-sum groups, scaling).
for _model_type, _name in (("glm4_moe", "GLM-4-MoE"), ("dots1", "dots.llm1"), ("solar_open", "Solar-Open")):
    register_adapter(
        FamilyAdapter(
            model_type=_model_type,
            routing=_deepseek_v3_routing,
            shared_attr="shared_experts",
            shared_count_field="n_shared_experts",
            count_fields=("n_routed_experts",),
            intermediate_field_shared=True,
            group_fields=("n_group", "topk_group"),
            display_name=_name,
        )
    )
register_adapter(
    FamilyAdapter(
        model_type="minimax",
        routing=_softmax_routing(always_renormalize=True),
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        display_name="MiniMax",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="flex_olmo",
        routing=_softmax_routing(),
        intermediate_field="intermediate_size",
        display_name="FlexOlmo",
    )
)

def _llama4_routing(config, router: nn.Module) -> RoutingSpec:
    # top-k of the logits, sigmoid of each picked logit, no renormalisation; the weight scales the expert input.
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=False, scales_expert_input=True)


# Llama4 is not on the experts interface: its experts run a dense bmm over every expert, so a remap merge (which
# needs top_k_index) cannot be installed; pruning, collapse merges and micro-expert edits work.
register_adapter(
    FamilyAdapter(
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
    ),
    "llama4",
)


def _ernie4_5_moe_routing(config, router: nn.Module) -> RoutingSpec:
    # softmax, selection on softmax + moe_statics bias, renormalised by max(sum, moe_norm_min).
    return RoutingSpec(
        scoring="softmax",
        top_k=int(router.top_k),
        renormalize=True,
        has_selection_bias=True,
        renormalize_min=float(router.norm_min),
    )


register_adapter(
    FamilyAdapter(
        model_type="ernie4_5_moe",
        routing=_ernie4_5_moe_routing,
        shared_attr="shared_experts",
        shared_count_field="moe_num_shared_experts",
        count_fields=("moe_num_experts",),
        top_k_fields=("moe_k", "num_experts_per_tok"),
        intermediate_field_shared=True,  # shared experts are moe_intermediate_size * moe_num_shared_experts wide
        selection_bias_attr="gate.moe_statics.e_score_correction_bias",
        display_name="Ernie-4.5-MoE",
    )
)


def _minimax_m2_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid scores, selection on scores + the block's e_score_correction_bias, always renormalised.
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=True, has_selection_bias=True)


register_adapter(
    FamilyAdapter(
        model_type="minimax_m2",
        routing=_minimax_m2_routing,
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        selection_bias_attr="e_score_correction_bias",
        display_name="MiniMax-M2",
    )
)


# More copies of DeepSeek-V3's router (sigmoid + selection bias on the router, top-2-sum groups, scaling).
for _model_type, _name, _count_field, _shared_count_field in (
    ("glm4_moe_lite", "GLM-4-MoE-Lite", "n_routed_experts", "n_shared_experts"),
    ("deepseek_v32", "DeepSeek-V3.2", "n_routed_experts", "n_shared_experts"),
    ("exaone_moe", "EXAONE-MoE", "num_experts", "num_shared_experts"),
):
    register_adapter(
        FamilyAdapter(
            model_type=_model_type,
            routing=_deepseek_v3_routing,
            shared_attr="shared_experts",
            shared_count_field=_shared_count_field,
            count_fields=(_count_field,),
            intermediate_field_shared=True,  # shared experts are moe_intermediate_size * shared count wide
            group_fields=("n_group", "topk_group"),
            display_name=_name,
        )
    )


def _cohere2_moe_routing(config, router: nn.Module) -> RoutingSpec:
    # top-k of the logits, then softmax over those k or sigmoid of each (renormalised with norm_topk_prob).
    if router.expert_selection_fn == "softmax":
        return RoutingSpec(scoring="softmax", top_k=int(router.top_k), renormalize=True, softmax_after_topk=True)
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=bool(router.norm_topk_prob))


def _cohere2_moe_averaged(config) -> bool:
    """The ``average`` combination: ``(routed + shared) / 2``, i.e. both halved (only with shared experts)."""
    return int(getattr(config, "num_shared_experts", 0) or 0) > 0 and (
        getattr(config, "shared_expert_combination_strategy", "sum") == "average"
    )


def _cohere2_moe_block_scaling(config, block: nn.Module) -> float:
    return 0.5 if _cohere2_moe_averaged(config) else 1.0


def _cohere2_moe_shared_scale(config) -> float:
    return 0.5 if _cohere2_moe_averaged(config) else 1.0


register_adapter(
    FamilyAdapter(
        model_type="cohere2_moe",
        routing=_cohere2_moe_routing,
        shared_attr="shared_experts",
        shared_count_field="num_shared_experts",
        count_fields=("num_experts",),
        intermediate_field="intermediate_size",
        intermediate_field_shared=True,  # shared experts are intermediate_size * num_shared_experts wide
        shared_scale=_cohere2_moe_shared_scale,
        block_scaling=_cohere2_moe_block_scaling,
        display_name="Cohere2-MoE",
    )
)


def _lfm2_moe_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid scores, optional selection bias (the block's expert_bias), renormalised with eps 1e-6, then scaled.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=bool(router.norm_topk_prob),
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=bool(router.use_expert_bias),
        renormalize_eps=1e-6,
    )


register_adapter(
    FamilyAdapter(
        model_type="lfm2_moe",
        routing=_lfm2_moe_routing,
        block_attr="feed_forward",
        selection_bias_attr="expert_bias",
        display_name="LFM2-MoE",
    )
)


# GraniteMoE with a dense shared MLP: the MoE block is GraniteMoE's (top-k logits, softmax over k); the shared
# ``shared_mlp`` (fused ``input_linear`` [2S, d] / ``output_linear``) sits on the decoder layer, outside the block,
# and is added by the layer: it is not a view shared expert (edits never touch it; it stays dense). The hybrid
# variant interleaves Mamba2 layers; its MoE blocks are the same.
for _model_type, _name in (("granitemoeshared", "GraniteMoE-Shared"), ("granitemoehybrid", "GraniteMoE-Hybrid")):
    register_adapter(
        FamilyAdapter(
            model_type=_model_type,
            routing=_softmax_over_top_logits_routing,
            block_attr="block_sparse_moe",
            router_attr="router",
            count_fields=("num_local_experts",),
            intermediate_field="intermediate_size",
            display_name=_name,
        )
    )


# MiMo-V2-Flash: DeepSeek-V3's router, no shared experts.
register_adapter(
    FamilyAdapter(
        model_type="mimo_v2_flash",
        routing=_deepseek_v3_routing,
        count_fields=("n_routed_experts",),
        group_fields=("n_group", "topk_group"),
        display_name="MiMo-V2-Flash",
    )
)


# Jamba: Mixtral-style experts between Mamba / attention mixers; softmax top-k without renormalisation.
register_adapter(
    FamilyAdapter(
        model_type="jamba",
        routing=_softmax_routing(),  # no norm_topk_prob anywhere: never renormalised
        block_attr="feed_forward",
        router_attr="router",
        count_fields=("num_experts",),
        intermediate_field="intermediate_size",
        intermediate_field_shared=True,  # the dense feed-forward layers are intermediate_size wide too
        min_experts=2,  # JambaSparseMoeBlock only when num_experts > 1: one expert reloads as a dense JambaMLP
        display_name="Jamba",
    )
)
# Kimi-Linear: DeepSeek-V3's router and shared experts, between KDA linear-attention and MLA layers.
register_adapter(
    FamilyAdapter(
        model_type="kimi_linear",
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="num_shared_experts",
        count_fields=("num_experts",),
        top_k_fields=("num_experts_per_token", "num_experts_per_tok"),
        intermediate_field_shared=True,
        group_fields=("num_expert_group", "topk_group"),
        display_name="Kimi-Linear",
    )
)


# Hunyuan-MoE-V1: Mixtral-style routing (softmax, top-k, always renormalised) from a wrapped Linear ``gate.wg``;
# one dense shared MLP in the block, sized by intermediate_size like the experts.
register_adapter(
    FamilyAdapter(
        model_type="hunyuan_v1_moe",
        routing=_softmax_routing(always_renormalize=True),
        router_linear_attr="wg",
        shared_attr="shared_mlp",
        count_fields=("num_experts",),
        top_k_fields=("moe_topk", "num_experts_per_tok"),
        intermediate_field="intermediate_size",
        intermediate_field_shared=True,
        display_name="Hunyuan-MoE-V1",
    )
)


def _afmoe_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid scores from the wrapped Linear router.gate, selection on scores + the block's expert_bias,
    # always renormalised, then multiplied by route_scale.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=True,
        routed_scaling_factor=float(router.route_scale),
        has_selection_bias=True,
    )


register_adapter(
    FamilyAdapter(
        model_type="afmoe",
        routing=_afmoe_routing,
        router_attr="router",
        router_linear_attr="gate",
        shared_attr="shared_experts",
        shared_count_field="num_shared_experts",
        intermediate_field_shared=True,  # shared experts are moe_intermediate_size * num_shared_experts wide
        selection_bias_attr="expert_bias",
        display_name="AfMoE",
    )
)


def _sigmoid_topk_routing(config, router: nn.Module) -> RoutingSpec:
    """Flint: top-k of the sigmoid scores, no selection bias, renormalised with norm_topk_prob."""
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=_renormalize_flag(config, router))


def _hy_v3_routing(config, router: nn.Module) -> RoutingSpec:
    # MiniMax-M2's routing (sigmoid, the block's e_score_correction_bias for selection, renormalised) scaled by
    # router_scaling_factor.
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=True,
        routed_scaling_factor=float(router.router_scaling_factor),
        has_selection_bias=True,
    )


register_adapter(
    FamilyAdapter(
        model_type="granitemoe_swa",
        routing=_softmax_over_top_logits_routing,
        block_attr="block_sparse_moe",
        router_attr="router",
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        display_name="GraniteMoE-SWA",
    )
)
register_adapter(
    FamilyAdapter(model_type="mellum", routing=_softmax_routing(), display_name="Mellum")
)
register_adapter(
    FamilyAdapter(
        model_type="flint",
        routing=_sigmoid_topk_routing,
        shared_attr="shared_expert",  # added in full, no gate
        display_name="Flint",
    )
)
register_adapter(
    FamilyAdapter(
        model_type="hy_v3",
        routing=_hy_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="num_shared_experts",
        intermediate_field_shared=True,  # shared experts are moe_intermediate_size * num_shared_experts wide
        selection_bias_attr="e_score_correction_bias",
        display_name="Hunyuan-V3",
    )
)
for _model_type, _name in (("glm_moe_dsa", "GLM-MoE-DSA"),):
    register_adapter(
        FamilyAdapter(
            model_type=_model_type,
            routing=_deepseek_v3_routing,
            shared_attr="shared_experts",
            shared_count_field="n_shared_experts",
            count_fields=("n_routed_experts",),
            intermediate_field_shared=True,
            group_fields=("n_group", "topk_group"),
            display_name=_name,
        )
    )


def _laguna_routing(config, router: nn.Module) -> RoutingSpec:
    # sigmoid of (optionally soft-capped) logits, router-held selection bias, always renormalised; the block
    # multiplies the routed sum by moe_routed_scaling_factor (block_scaling).
    return RoutingSpec(scoring="sigmoid", top_k=int(router.top_k), renormalize=True, has_selection_bias=True)


def _laguna_router_logits(config, router: nn.Module):
    cap = float(router.router_logit_softcapping)
    if cap <= 0:
        return None

    def logits_fn(hidden_states: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden_states.float(), router.weight.float())
        return torch.tanh(logits / cap) * cap

    return logits_fn


def _block_routed_scaling(config, block: nn.Module) -> float:
    return float(block.routed_scaling_factor)


register_adapter(
    FamilyAdapter(
        model_type="laguna",
        routing=_laguna_routing,
        shared_attr="shared_experts",
        block_scaling=_block_routed_scaling,
        router_logits=_laguna_router_logits,
        display_name="Laguna",
    )
)


def _beam_routing(config, router: nn.Module) -> RoutingSpec:
    # DeepSeek-V3's group-limited sigmoid routing; the block applies routed_scaling_factor (block_scaling).
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        group_score="top2_sum",
        has_selection_bias=True,
    )


register_adapter(
    FamilyAdapter(
        model_type="beam",
        routing=_beam_routing,
        block_scaling=_block_routed_scaling,
        group_fields=("n_group", "topk_group"),
        display_name="Beam",
    )
)


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


register_adapter(
    FamilyAdapter(
        model_type="kolibri1",
        routing=_kolibri1_routing,
        shared_attr="shared_experts",
        display_name="Kolibri1",
    )
)


# A.X-K1: DeepSeek-V3's MoE with an RMSNorm on the block output (``post_mlp_layernorm``).
register_adapter(
    FamilyAdapter(
        model_type="axk1",
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="n_shared_experts",
        count_fields=("n_routed_experts",),
        intermediate_field_shared=True,
        group_fields=("n_group", "topk_group"),
        output_attr="post_mlp_layernorm",
        display_name="A.X-K1",
    )
)


def _hy_v4_glu(experts: nn.Module) -> tuple[Callable, Callable]:
    """HY-V4's clamped SwiGLU: ``silu(min(gate, limit)) * clamp(up, ±limit)`` (no alpha, no +1 as in GPT-OSS)."""
    limit = float(experts.swiglu_limit)

    def activation(gate_out: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gate_out.clamp(max=limit))

    def glu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        return activation(gate_out) * up_out.clamp(min=-limit, max=limit)

    return activation, glu


# HY-V4: DeepSeek-V3's router and shared experts, clamped SwiGLU experts, hyper-connections between layers.
register_adapter(
    FamilyAdapter(
        model_type="hy_v4",
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="n_shared_experts",
        count_fields=("n_routed_experts",),
        intermediate_field_shared=True,
        group_fields=("n_group", "topk_group"),
        glu=_hy_v4_glu,
        display_name="Hunyuan-V4",
    )
)
# Bailing-Hybrid (Ling): DeepSeek-V3's router and shared experts between KDA linear-attention and MLA layers.
register_adapter(
    FamilyAdapter(
        model_type="bailing_hybrid",
        routing=_deepseek_v3_routing,
        shared_attr="shared_experts",
        shared_count_field="num_shared_experts",
        count_fields=("num_experts",),
        top_k_fields=("num_experts_per_token", "num_experts_per_tok"),
        intermediate_field_shared=True,
        group_fields=("num_expert_group", "topk_group"),
        display_name="Bailing-Hybrid",
    )
)


def _axk2_routing(config, router: nn.Module) -> RoutingSpec:
    # DeepSeek-V3's routing, except that groups are optional (num_group None) and experts outside the chosen
    # groups score 0 (not -inf) for selection.
    grouped = router.num_group is not None
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(router.top_k),
        renormalize=_renormalize_flag(config, router),
        n_group=int(router.num_group) if grouped else 1,
        topk_group=int(router.topk_group) if grouped else 1,
        group_score="top2_sum",
        routed_scaling_factor=float(router.routed_scaling_factor),
        has_selection_bias=True,
        group_mask_value=0.0,
    )


register_adapter(
    FamilyAdapter(
        model_type="axk2",
        routing=_axk2_routing,
        shared_attr="shared_experts",
        shared_count_field="n_shared_experts",
        count_fields=("n_routed_experts",),
        intermediate_field_shared=True,
        group_fields=("n_group", "topk_group"),
        display_name="A.X-K2",
    )
)


# Aria (text decoder): GraniteMoE's routing (top-k logits, softmax over k), experts stored transposed
# ([E, d, 2I] gate then up, down [E, I, d]), shared experts sized intermediate_size * moe_num_shared_experts.
register_adapter(
    FamilyAdapter(
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
    ),
    "aria",
)


def _minimax_m3_glu(experts: nn.Module) -> tuple[Callable, Callable]:
    """MiniMax-M3's clamped SwiGLU (GPT-OSS's formula on concatenated, not interleaved, gate/up)."""
    alpha, limit = float(experts.swiglu_alpha), float(experts.swiglu_limit)

    def activation(gate_out: torch.Tensor) -> torch.Tensor:
        gate_out = gate_out.clamp(max=limit)
        return gate_out * torch.sigmoid(gate_out * alpha)

    def glu(gate_out: torch.Tensor, up_out: torch.Tensor) -> torch.Tensor:
        return (up_out.clamp(min=-limit, max=limit) + 1) * activation(gate_out)

    return activation, glu


# MiniMax-M3 (text decoder of MiniMax-M3-VL): MiniMax-M2's router with the bias on the router, the routed sum
# scaled in the block, a clamped-SwiGLU shared MLP (fused gate_up_proj Linear) and clamped-SwiGLU experts.
register_adapter(
    FamilyAdapter(
        model_type="minimax_m3_vl_text",
        routing=_minimax_m2_routing,
        shared_attr="shared_experts",
        count_fields=("num_local_experts",),
        intermediate_field="intermediate_size",
        block_scaling=_block_routed_scaling,
        glu=_minimax_m3_glu,
        display_name="MiniMax-M3",
    ),
    "minimax_m3_vl",
)


# Qwen3-VL-MoE (text decoder): Qwen3-MoE's experts, a router that always renormalises (no norm_topk_prob). The model
# is a vision-language model (``Qwen3VLMoeForConditionalGeneration``, layers at ``model.language_model.layers``).
register_adapter(
    FamilyAdapter(
        model_type="qwen3_vl_moe_text",
        routing=_softmax_routing(always_renormalize=True),
        display_name="Qwen3-VL-MoE",
    ),
    "qwen3_vl_moe",
)


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
            "in moecompress/models/families.py."
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
