"""MoE block outputs with a subset of experts, for NAEE's reconstruction loss (methods.md 6.3).

``moe_block_inputs`` is a calibration statistic that keeps (a seeded sample of) the MoE block's inputs ``X``; a
:class:`BlockReconstruction` then evaluates, for any set of kept experts, the block output ``Z~`` the model would
produce after :func:`moecompress.models.edits.keep_experts` (router restricted to the survivors: softmax and top-k
run over them, renormalised as the family does) and its loss ``||Z - Z~||_F`` against the full block's ``Z``.
Every expert's output on every cached token is computed once, so one subset costs a routing and a gather.
"""

from __future__ import annotations

import dataclasses

import torch

from moecompress.calibration.statistics import Statistic, register_statistic
from moecompress.errors import RecipeError
from moecompress.models.view import MoEBlockView, RoutingSpec, route_from_logits

DEFAULT_MAX_TOKENS = 2048


@register_statistic
class MoEBlockInputs(Statistic):
    name = "moe_block_inputs"
    description = "[N, d] fp32 MoE block inputs (router inputs), a seeded sample of at most max_tokens (NAEE)"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.max_tokens = int(self.options.get("max_tokens", DEFAULT_MAX_TOKENS))
        self.seed = int(self.options.get("seed", 0))
        self.batches: list[torch.Tensor] = []
        self.sampled = False  # set by ``reduce``: the batches are already the sample

    def on_router(self, batch):
        self.batches.append(batch.hidden_states.float().cpu())

    def _sample(self, total: int) -> torch.Tensor | None:
        """Sorted indices of the kept tokens among ``total`` (None: all are kept)."""
        if total <= self.max_tokens:
            return None
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(total, generator=generator)[: self.max_tokens].sort().values

    def combine_ranks(self, world, owners=None):
        # ranks hold consecutive runs of the calibration tokens: each sends the sampled rows in its run, so the
        # gathered rows are the ones (and in the order) one process samples
        inputs = torch.cat(self.batches) if self.batches else torch.zeros(0, self.hidden_size)
        counts = world.all_gather_objects(int(inputs.shape[0]))
        offset = sum(counts[:world.rank])
        chosen = self._sample(sum(counts))
        if chosen is not None:
            inputs = inputs[chosen[(chosen >= offset) & (chosen < offset + inputs.shape[0])] - offset]
        self.batches = [torch.cat(world.all_gather_objects(inputs))]
        self.sampled = True

    def result(self):
        inputs = torch.cat(self.batches) if self.batches else torch.zeros(0, self.hidden_size)
        chosen = None if self.sampled else self._sample(inputs.shape[0])
        return inputs if chosen is None else inputs[chosen]


def routing_after_keep(spec: RoutingSpec, num_experts: int, kept: list[int], top_k: int | None = None) -> RoutingSpec:
    """The routing of a layer of ``num_experts`` experts after keeping ``kept`` (mirrors ``keep_experts``): top-k
    capped at the kept count, group routing kept only when the kept experts are the original groups, equal counts."""
    new_top_k = min(spec.top_k, len(kept)) if top_k is None else top_k
    n_group, topk_group = 1, 1
    if spec.n_group > 1:
        group_size = num_experts // spec.n_group
        per_group = torch.bincount(torch.tensor(kept) // group_size, minlength=spec.n_group)
        count = int(per_group[0])
        minimum = 2 if spec.group_score == "top2_sum" else 1
        if bool((per_group == count).all()) and count >= minimum and spec.topk_group * count >= new_top_k:
            n_group, topk_group = spec.n_group, spec.topk_group
    return dataclasses.replace(spec, top_k=new_top_k, n_group=n_group, topk_group=topk_group)


class BlockReconstruction:
    """Block outputs of one MoE layer on cached inputs for any kept set.

    inputs ``[N, d]``; the full block's output ``Z`` ``[N, d]`` and every expert's output ``[E, N, d]`` are computed
    once (fp32). ``loss(kept)`` = ``||Z - Z~(kept)||_F``.
    """

    def __init__(self, view: MoEBlockView, inputs: torch.Tensor, *, top_k: int | None = None) -> None:
        self.num_experts = view.num_experts  # before any edit: everything below is a snapshot
        if view.routing.scales_expert_input:
            raise RecipeError(f"layer {view.layer_index}: {view.family} scales expert inputs by the router weight, "
                              "which NAEE's cached expert outputs cannot express; use prune_reap or prune_frequency")
        if view.expert_id_map is not None:
            raise RecipeError(f"layer {view.layer_index} holds merged experts behind a full router; prune before merging")
        self.view = view
        self.top_k = top_k
        device = view.router_weight.device
        self.inputs = inputs.to(device=device, dtype=view.router_weight.dtype)
        with torch.no_grad():
            self.logits = view.router_logits(self.inputs).float()  # [N, E]
            bias = view.selection_bias
            self.selection_bias = None if bias is None else bias.detach().float().clone()  # [E] or None
            self.expert_outputs = torch.stack([view.expert_forward(e, self.inputs).float()
                                               for e in range(self.num_experts)])  # [E, N, d]
            self.shared = torch.zeros_like(self.expert_outputs[0])
            for shared in view.shared_experts:
                self.shared += shared.forward(self.inputs).float()
            self.full_output = self.output(list(range(self.num_experts)), top_k=None)

    def routing(self, kept: list[int], top_k: int | None = None):
        """Router output after keeping ``kept``: top_k_index in *original* expert ids ``[N, k]``, weights ``[N, k]``."""
        spec = routing_after_keep(self.view.routing, self.num_experts, kept, top_k)
        index = torch.tensor(kept, device=self.logits.device)
        bias = None if self.selection_bias is None else self.selection_bias.to(index.device)[index]
        routed = route_from_logits(self.logits[:, index], spec, bias)
        return index[routed.top_k_index], routed.top_k_weights

    def output(self, kept: list[int], top_k: int | None = None) -> torch.Tensor:
        """``[N, d]`` block output with only ``kept`` experts."""
        expert_index, weights = self.routing(kept, top_k)
        tokens = torch.arange(expert_index.shape[0], device=expert_index.device)[:, None]
        routed = (self.expert_outputs[expert_index, tokens] * weights[..., None]).sum(dim=1)  # [N, d]
        output = routed + self.shared
        if self.view.output_module is not None:
            output = self.view.output_module(output.to(self.inputs.dtype)).float()
        return output

    def loss(self, kept: list[int]) -> float:
        with torch.no_grad():
            return float(torch.linalg.norm(self.full_output - self.output(kept, self.top_k)))

    def skip_threshold(self, kept: list[int]) -> float:
        """NAEE's dynamic-skipping ``beta``: median over the cached tokens of ``w_1 / w_0`` (second over first combine
        weight) of the routing after keeping ``kept``; NaN with top-1 routing."""
        _, weights = self.routing(kept, self.top_k)
        if weights.shape[1] < 2:
            return float("nan")
        top2 = torch.topk(weights, 2, dim=-1).values
        return float((top2[:, 1] / top2[:, 0].clamp_min(1e-30)).median())
