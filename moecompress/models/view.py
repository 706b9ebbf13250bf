"""One uniform view of an MoE block, whatever the family.

Methods never touch architecture details: they ask a :class:`MoEBlockView` for routing (``route``), expert
weights in one canonical layout (``expert_weights``), expert computation (``expert_forward``) and the shared
experts. Family adapters (``moecompress.models.families``) build the view from a module and its config.

Canonical layout of expert ``e`` (whatever the storage: fused, transposed, interleaved):
    gate ``[I, d]``, up ``[I, d]``, down ``[d, I]``, optional biases gate ``[I]``, up ``[I]``, down ``[d]``,
    and ``E_e(x) = down @ act(gate @ x + b_g) * (up @ x + b_u) + b_d`` (``activation`` may be a clamped GLU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class RoutingSpec:
    """How a router turns logits into top-k expert choices and combine weights.

    scoring: ``softmax`` or ``sigmoid`` of the router logits.
    top_k: experts per token.
    renormalize: the selected weights are divided by their sum (Mixtral, Qwen3 with ``norm_topk_prob``, DS-V3).
    n_group, topk_group: group-limited routing (DeepSeek); ``n_group == 1`` means no groups.
    group_score: how a group is scored: ``max`` (DeepSeek-V2) or ``top2_sum`` (DeepSeek-V3).
    routed_scaling_factor: multiplies the final combine weights (DeepSeek).
    softmax_after_topk: GPT-OSS / GraniteMoE pick top-k on raw logits and take the softmax over those k only
        (the same numbers as a renormalised softmax, so such families report ``renormalize=True``).
    has_selection_bias: DeepSeek-V3's ``e_score_correction_bias``: added to scores for *selection only*.
    selection: ``topk`` (every family but one) or ``sparsemixer`` (PhiMoE: two sequential argmax picks, each
        weighted by a softmax over the logits within ``2 * sparsemixer_eps`` relative distance of the pick).
    sparsemixer_eps: PhiMoE's ``router_jitter_noise`` (the relative threshold of sparsemixer's mask).
    scales_expert_input: Llama4 multiplies the expert's *input* by the combine weight (``E_e(g x)``) instead of
        its output (``g E_e(x)``, every other family).
    renormalize_eps: added to the sum of the selected weights before dividing (``1e-20`` for most families;
        LFM2-MoE uses ``1e-6``).
    renormalize_min: when positive, the normaliser is ``max(sum, renormalize_min)`` instead of ``sum + eps``
        (Ernie-4.5-MoE's ``moe_norm_min``).
    group_mask_value: what experts outside the chosen groups score for selection (``-inf``; A.X-K2 and
        Mistral4 fill ``0``, which a negative biased score of an allowed expert can lose to).
    bias_on_logits: the selection bias is added to the raw logits, not to the scores (Kolibri1: top-k of
        ``logits + bias``, weights ``sigmoid`` of the picked logits).
    """

    scoring: Literal["softmax", "sigmoid"]
    top_k: int
    renormalize: bool
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    routed_scaling_factor: float = 1.0
    softmax_after_topk: bool = False
    has_selection_bias: bool = False
    selection: Literal["topk", "sparsemixer"] = "topk"
    sparsemixer_eps: float = 0.0
    scales_expert_input: bool = False
    renormalize_eps: float = 1e-20
    renormalize_min: float = 0.0
    bias_on_logits: bool = False
    group_mask_value: float = float("-inf")


@dataclass
class RouterOutput:
    """logits ``[T, E]`` (pre-activation, fp32), top_k_index ``[T, k]`` (long), top_k_weights ``[T, k]`` (fp32)."""

    logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor


@dataclass
class ExpertWeights:
    """One expert in canonical layout. gate/up ``[I, d]``, down ``[d, I]``; biases optional."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class SharedExpert:
    """A dense shared expert (always on) and its optional scalar sigmoid gate (Qwen2-MoE: ``Linear(d, 1)``)."""

    module: nn.Module  # has gate_proj / up_proj / down_proj Linears and act_fn
    gate: nn.Module | None = None
    count: int = 1  # DeepSeek fuses ``n_shared_experts`` experts into one wider MLP; this records how many
    scale: float = 1.0  # constant factor on the output (Cohere2-MoE's ``average`` combination: 0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states ``[T, d]`` -> ``[T, d]``, gate and scale applied."""
        out = self.module(hidden_states)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(hidden_states)) * out
        if self.scale != 1.0:
            out = out * self.scale
        return out


@dataclass
class MoEBlockView:
    """Uniform view of one MoE block.

    A view is a snapshot: ``routing`` is read from the modules when the view is built, so fetch views again
    (``find_moe_blocks``) after an edit. The tensors it returns are the live ones.

    Attributes:
        layer_index: decoder layer index in the model.
        path: dotted module path of the block (``model.layers.3.mlp``).
        family: adapter name (``qwen3_moe``, ``mixtral``, ``deepseek_v3``, ...).
        block / router / experts: the live HF modules (edits go through ``moecompress.models.edits``).
        routing: :class:`RoutingSpec`.
        activation: elementwise activation of the gate branch (``act_fn`` of the experts module).
        glu: ``fn(gate_out, up_out) -> h`` (default ``act(gate) * up``; GPT-OSS uses a clamped variant).
        shared_experts: always-on experts (may be empty).
        storage: how the fused tensors are laid out: ``concatenated`` (``[E, 2I, d]`` gate rows then up rows,
            down ``[E, d, I]``), ``transposed_interleaved`` (GPT-OSS: ``[E, d, 2I]`` gate/up interleaved,
            down ``[E, I, d]``), ``transposed`` (``[E, d, 2I]`` concatenated, down ``[E, I, d]``), ``packed``
            (quantized experts from ``moecompress.kernels``: ``expert_weights`` dequantises).
    """

    layer_index: int
    path: str
    family: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    routing: RoutingSpec
    activation: Callable[[torch.Tensor], torch.Tensor]
    storage: Literal["concatenated", "transposed", "transposed_interleaved", "packed"] = "concatenated"
    shared_experts: list[SharedExpert] = field(default_factory=list)
    glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Optional family hooks (set by adapters that need them).
    router_logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Where the selection bias lives when it is not ``router.e_score_correction_bias``: the owning module and the
    # attribute name (MiniMax-M2 / LFM2-MoE keep it on the block, Ernie-4.5-MoE in ``gate.moe_statics`` as [1, E]).
    selection_bias_owner: nn.Module | None = None
    selection_bias_name: str = "e_score_correction_bias"
    # The nn.Linear holding the router weight when the router module wraps one (Hunyuan ``gate.wg``, AfMoE
    # ``router.gate``); None when the router module holds ``weight`` itself.
    router_linear: nn.Module | None = None
    # The factor of ``routing.routed_scaling_factor`` that HF applies in the block, after its router returned its
    # weights (Laguna / Beam scale the routed sum, Cohere2-MoE's ``average`` halves it); 1 when all of it is the
    # router's. ``route`` always returns the effective combine weights.
    scaling_outside_router: float = 1.0
    # A module the block applies to its summed output (A.X-K1's ``post_mlp_layernorm``), else None.
    output_module: nn.Module | None = None

    # ----- sizes -----------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        """Routed experts stored in this block (after merging: the merged count)."""
        if self.storage == "packed":
            return int(self.experts.num_experts)
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def num_router_outputs(self) -> int:
        """Rows of the router: equals ``num_experts`` unless a merge kept the full router (``expert_id_map``)."""
        return int(self.router_weight.shape[0])

    @property
    def expert_id_map(self) -> torch.Tensor | None:
        """``[num_router_outputs]`` long: router output -> stored expert, installed by a ``remap`` merge, else None."""
        return getattr(self.experts, EXPERT_ID_MAP_ATTR, None)

    @property
    def num_shared_experts(self) -> int:
        return sum(shared.count for shared in self.shared_experts)

    @property
    def hidden_size(self) -> int:
        return int(self.router_weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        """Expert intermediate size ``I``."""
        if self.storage == "packed":
            return int(self.experts.intermediate_dim)
        gate_up = self.experts.gate_up_proj
        return int(gate_up.shape[1] if self.storage == "concatenated" else gate_up.shape[2]) // 2

    # ----- router ----------------------------------------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:
        """``[E, d]``."""
        return (self.router_linear if self.router_linear is not None else self.router).weight

    @property
    def router_bias(self) -> torch.Tensor | None:
        """``[E]`` bias added to the logits (GPT-OSS), else None."""
        bias = getattr(self.router_linear if self.router_linear is not None else self.router, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def selection_bias(self) -> torch.Tensor | None:
        """``[E]`` DeepSeek-V3 ``e_score_correction_bias`` (selection only; a live view of it), else None."""
        if not self.routing.has_selection_bias:
            return None
        owner = self.selection_bias_owner if self.selection_bias_owner is not None else self.router
        bias = getattr(owner, self.selection_bias_name, None)
        return bias.view(-1) if isinstance(bias, torch.Tensor) else None

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states ``[T, d]`` -> logits ``[T, E]`` in fp32."""
        if self.router_logits_fn is not None:
            return self.router_logits_fn(hidden_states)
        logits = torch.nn.functional.linear(hidden_states.float(), self.router_weight.float())
        if self.router_bias is not None:
            logits = logits + self.router_bias.float()
        return logits

    def route(self, hidden_states: torch.Tensor) -> RouterOutput:
        """Reproduce the family's routing from the uniform spec. hidden_states ``[T, d]``.

        ``top_k_index`` holds *stored expert* ids: after a ``remap`` merge, router outputs are mapped through
        :attr:`expert_id_map` (two picks of one token may then name the same merged expert; their weights add).
        """
        logits = self.router_logits(hidden_states)
        routed = route_from_logits(logits, self.routing, self.selection_bias)
        id_map = self.expert_id_map
        if id_map is not None:
            routed.top_k_index = id_map.to(routed.top_k_index.device)[routed.top_k_index]
        return routed

    # ----- experts ---------------------------------------------------------------------------------------------
    def expert_weights(self, expert: int) -> ExpertWeights:
        """Expert ``expert`` in canonical layout (views into the fused tensors where the layout allows).

        Packed (quantized) experts are dequantised: the result is what the packed kernels compute with.
        """
        experts = self.experts
        if self.storage == "packed":
            gate, up = experts.expert_linear(expert, "gate_up_proj").dequantize().chunk(2, dim=0)
            return ExpertWeights(gate=gate, up=up, down=experts.expert_linear(expert, "down_proj").dequantize())
        gate_up = experts.gate_up_proj[expert]
        down = experts.down_proj[expert]
        gate_up_bias = getattr(experts, "gate_up_proj_bias", None)
        down_bias = getattr(experts, "down_proj_bias", None)
        gate_bias = up_bias = None
        if self.storage == "concatenated":
            gate, up = gate_up.chunk(2, dim=0)
            if gate_up_bias is not None:
                gate_bias, up_bias = gate_up_bias[expert].chunk(2, dim=0)
        elif self.storage == "transposed":
            gate, up = gate_up.t().chunk(2, dim=0)
            down = down.t()
            if gate_up_bias is not None:
                gate_bias, up_bias = gate_up_bias[expert].chunk(2, dim=0)
        else:  # transposed_interleaved (GPT-OSS): columns 0,2,4.. gate; 1,3,5.. up
            gate, up = gate_up[:, 0::2].t(), gate_up[:, 1::2].t()
            down = down.t()
            if gate_up_bias is not None:
                gate_bias, up_bias = gate_up_bias[expert][0::2], gate_up_bias[expert][1::2]
        return ExpertWeights(
            gate=gate,
            up=up,
            down=down,
            gate_bias=gate_bias,
            up_bias=up_bias,
            down_bias=down_bias[expert] if down_bias is not None else None,
        )

    def expert_intermediate(self, expert: int, hidden_states: torch.Tensor,
                            weights: ExpertWeights | None = None) -> torch.Tensor:
        """``h = glu(gate x, up x)``: hidden_states ``[n, d]`` -> ``[n, I]`` (the micro-expert activations).
        ``weights``: the expert's :meth:`expert_weights` when the caller has them already (packed experts are then
        not dequantised twice)."""
        if self.storage == "concatenated" and getattr(self.experts, "gate_up_proj_bias", None) is None:
            # One matmul over the fused [2I, d] slice instead of two over its halves (the calibration hot path).
            gate_up = self.experts.gate_up_proj[expert]
            gate_out, up_out = torch.nn.functional.linear(hidden_states.to(gate_up.dtype), gate_up).chunk(2, dim=-1)
            return self.glu(gate_out, up_out) if self.glu is not None else self.activation(gate_out) * up_out
        weights = weights or self.expert_weights(expert)
        x = hidden_states.to(weights.gate.dtype)
        gate_out = torch.nn.functional.linear(x, weights.gate, weights.gate_bias)
        up_out = torch.nn.functional.linear(x, weights.up, weights.up_bias)
        if self.glu is not None:
            return self.glu(gate_out, up_out)
        return self.activation(gate_out) * up_out

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """``E_e(x)``: hidden_states ``[n, d]`` -> ``[n, d]`` (combine weight not applied)."""
        weights = self.expert_weights(expert)
        intermediate = self.expert_intermediate(expert, hidden_states)
        return torch.nn.functional.linear(intermediate, weights.down, weights.down_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Our own block forward from the uniform view (the reference the equivalence tests check against HF).

        hidden_states ``[T, d]`` -> ``[T, d]``: routed experts weighted by the combine weights, plus shared experts.
        """
        routing = self.route(hidden_states)
        output = torch.zeros_like(hidden_states, dtype=torch.float32)
        for expert in routing.top_k_index.unique().tolist():
            token_idx, slot = torch.where(routing.top_k_index == expert)
            combine_weights = routing.top_k_weights[token_idx, slot, None]
            if self.routing.scales_expert_input:
                scaled_input = (hidden_states[token_idx].float() * combine_weights).to(hidden_states.dtype)
                output.index_add_(0, token_idx, self.expert_forward(expert, scaled_input).float())
            else:
                expert_out = self.expert_forward(expert, hidden_states[token_idx]).float()
                output.index_add_(0, token_idx, expert_out * combine_weights)
        for shared in self.shared_experts:
            output = output + shared.forward(hidden_states).float()
        if self.output_module is not None:
            return self.output_module(output.to(hidden_states.dtype))
        return output.to(hidden_states.dtype)


# Attribute of an experts module holding the router-output -> stored-expert map of a ``remap`` merge.
EXPERT_ID_MAP_ATTR = "moecompress_expert_id_map"


def route_from_logits(
    logits: torch.Tensor, spec: RoutingSpec, selection_bias: torch.Tensor | None = None
) -> RouterOutput:
    """Top-k selection and combine weights from router logits ``[T, E]`` (the math of every supported family)."""
    logits = logits.float()
    num_experts = logits.shape[-1]
    if spec.selection == "sparsemixer":
        top_k_index, weights = _sparsemixer_select(logits, spec.top_k, spec.sparsemixer_eps)
        return RouterOutput(logits, top_k_index, weights)
    if spec.softmax_after_topk:  # GPT-OSS
        top_logits, top_k_index = torch.topk(logits, spec.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        if spec.routed_scaling_factor != 1.0:
            weights = weights * spec.routed_scaling_factor
        return RouterOutput(logits, top_k_index, weights)

    scores = torch.softmax(logits, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if selection_bias is None else (logits if spec.bias_on_logits else scores) + selection_bias.float()
    if spec.n_group > 1:
        grouped = choice.view(-1, spec.n_group, num_experts // spec.n_group)
        if spec.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_index = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts).bool()
        choice = choice.masked_fill(~expert_mask, spec.group_mask_value)
    top_k_index = torch.topk(choice, spec.top_k, dim=-1).indices
    weights = scores.gather(1, top_k_index)
    if spec.renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        if spec.renormalize_min > 0:
            weights = weights / total.clamp(min=spec.renormalize_min)
        else:
            weights = weights / (total + spec.renormalize_eps)
    weights = weights * spec.routed_scaling_factor
    return RouterOutput(logits, top_k_index, weights)


def _sparsemixer_select(logits: torch.Tensor, top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's inference-time sparsemixer: pick the arg-max, then the arg-max of the rest, ``top_k`` times.

    Each pick's weight is a softmax over the logits that lie within a relative distance ``2 * eps`` of that pick
    (``(pick - z) / max(|z|, pick) <= 2 eps``), logits already picked excluded. Returns index and weights ``[T, k]``.
    """
    remaining = logits.clone()
    indices, weights = [], []
    for _ in range(top_k):
        best_logit, best_index = remaining.max(dim=-1, keepdim=True)
        relative_gap = (best_logit - logits) / logits.abs().clamp(min=best_logit)
        candidates = remaining.masked_fill(relative_gap > 2 * eps, float("-inf"))
        weights.append(torch.softmax(candidates, dim=-1).gather(-1, best_index))
        indices.append(best_index)
        remaining = remaining.scatter(-1, best_index, float("-inf"))
    return torch.cat(indices, dim=-1), torch.cat(weights, dim=-1)
