"""The calibration experts backend: the experts forward and every statistic in one pass over the routed slices.

transformers 5 dispatches each fused experts module's forward through ``ExpertsInterface``. During calibration the
model runs with ``experts_implementation="moecompress_calibration"``: :func:`calibration_experts_forward` computes
each hit expert's intermediate ``h`` and output once (through the uniform view, so any storage layout works), adds
the weighted outputs exactly as the eager forward does, and hands the same tensors to the layer's statistics. So
a calibration pass costs a plain forward plus the statistics' own arithmetic, never a second expert evaluation.
The picks are sorted by expert once per batch; statistics that reduce per expert get all of them in one
``RoutedPairs`` event (no per-expert Python), and only those that need each expert's matrices (Hessians) get a
per-expert ``ExpertSlice``.

Shared experts are ordinary modules: forward hooks on them (and a pre-hook on their ``down_proj`` for ``h``) feed
the statistics that need them (super experts, CAMERA energies).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from moecompress.calibration.statistics import (
    STATISTICS,
    ExpertSlice,
    LayerStatistics,
    RoutedPairs,
    RouterBatch,
    SharedSlice,
    Statistic,
)
from moecompress.distributed import World
from moecompress.models.view import MoEBlockView

BACKEND_NAME = "moecompress_calibration"
_COLLECTOR_ATTR = "_moecompress_collector"
_VIEW_ATTR = "_moecompress_view"


class LayerCollector:
    """The statistics of one MoE layer and the hooks that feed them.

    ``domain_ids`` (``[T]`` long, or None) is set by the runner before each batch so per-domain statistics know
    which calibration domain each token came from.
    """

    def __init__(self, view: MoEBlockView, names: list[str], options: dict[str, dict] | None = None) -> None:
        options = options or {}
        self.view = view
        self.statistics: dict[str, Statistic] = {name: STATISTICS[name](view, options.get(name)) for name in names}
        self.num_tokens = 0
        self.domain_ids: torch.Tensor | None = None
        self._uses_shared = any(type(s).on_shared is not Statistic.on_shared for s in self.statistics.values())
        self._uses_router = any(type(s).on_router is not Statistic.on_router or type(s).on_routed is not Statistic.on_routed
                                for s in self.statistics.values())
        self._uses_norms = any(s.needs_output_norms for s in self.statistics.values())
        self._uses_experts = any(type(s).on_expert is not Statistic.on_expert for s in self.statistics.values())
        self._uses_pairs = any(type(s).on_routed_pairs is not Statistic.on_routed_pairs for s in self.statistics.values())
        self._handles: list = []
        self._shared_inputs: dict[int, torch.Tensor] = {}
        self._shared_intermediate: dict[int, torch.Tensor] = {}

    # ----- wiring ----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        setattr(self.view.experts, _COLLECTOR_ATTR, self)
        if self._uses_shared:
            for index, shared in enumerate(self.view.shared_experts):
                self._handles.append(shared.module.register_forward_pre_hook(self._shared_input_hook(index)))
                self._handles.append(shared.module.down_proj.register_forward_pre_hook(self._shared_h_hook(index)))
                self._handles.append(shared.module.register_forward_hook(self._shared_output_hook(index, shared)))

    def detach(self) -> None:
        if getattr(self.view.experts, _COLLECTOR_ATTR, None) is self:
            delattr(self.view.experts, _COLLECTOR_ATTR)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _shared_input_hook(self, index: int):
        def hook(module, args):
            self._shared_inputs[index] = args[0]
        return hook

    def _shared_h_hook(self, index: int):
        def hook(module, args):
            self._shared_intermediate[index] = args[0]
        return hook

    def _shared_output_hook(self, index: int, shared):
        def hook(module, args, output):
            inputs = self._shared_inputs.pop(index).reshape(-1, self.view.hidden_size)
            intermediate = self._shared_intermediate.pop(index)
            intermediate = intermediate.reshape(-1, intermediate.shape[-1])
            if shared.gate is not None:
                gate = torch.sigmoid(shared.gate(inputs).float()).reshape(-1)
            else:
                gate = torch.ones(inputs.shape[0], device=inputs.device)
            shared_slice = SharedSlice(index, inputs, intermediate, output.reshape(-1, self.view.hidden_size), gate)
            for statistic in self.statistics.values():
                statistic.on_shared(shared_slice)
        return hook

    # ----- the pass --------------------------------------------------------------------------------------------
    def routed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts forward (same math as transformers' eager loop) feeding every statistic.

        hidden_states ``[T, d]``, top_k_index ``[T, k]``, top_k_weights ``[T, k]`` -> ``[T, d]``.
        """
        view = self.view
        combine_weights = top_k_weights.float()
        domain_ids = self.domain_ids
        if domain_ids is not None and domain_ids.shape[0] != hidden_states.shape[0]:
            domain_ids = None
        self.num_tokens += hidden_states.shape[0]
        raw_weights = renorm_weights = combine_weights
        if self._uses_router or self._uses_experts or self._uses_pairs:
            logits = view.router_logits(hidden_states)
            if view.routing.softmax_after_topk or getattr(view, "expert_id_map", None) is not None:
                # top-k over k logits only, or stored ids that no longer index the router outputs
                raw_weights = combine_weights
            else:
                scores = torch.softmax(logits, dim=-1) if view.routing.scoring == "softmax" else torch.sigmoid(logits)
                raw_weights = scores.gather(1, top_k_index)
            renorm_weights = raw_weights / raw_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            if self._uses_router:
                batch = RouterBatch(hidden_states, logits, top_k_index, combine_weights, raw_weights, domain_ids)
                for statistic in self.statistics.values():
                    statistic.on_router(batch)
        # All (token, expert) picks sorted by expert: one stable argsort instead of a torch.where scan per expert.
        # Stable keeps tokens ascending within an expert (the order torch.where gave), and experts run in ascending
        # order as before, so the output and every per-expert event are unchanged.
        num_experts = view.num_experts
        top_k = top_k_index.shape[1]
        flat_expert_ids = top_k_index.reshape(-1)  # [T*k]
        is_stored_expert = (flat_expert_ids >= 0) & (flat_expert_ids < num_experts)  # drop expert-parallel sentinels
        pick_positions = is_stored_expert.nonzero().squeeze(1)  # [P] flat positions t * k + slot
        pick_positions = pick_positions[torch.argsort(flat_expert_ids[pick_positions], stable=True)]
        expert_ids = flat_expert_ids[pick_positions]  # [P] ascending
        token_index = pick_positions // top_k  # [P]
        expert_counts = torch.bincount(expert_ids, minlength=num_experts)  # [E]

        num_picks = pick_positions.shape[0]
        pick_inputs = hidden_states[token_index]  # [P, d]
        # [P, d] down-proj outputs (combine weight not applied) and [P, I] intermediates (only when a statistic reads
        # them), allocated at the first expert in the dtype the expert computes in
        pick_outputs = pick_intermediate = None
        pick_weights = top_k_weights.reshape(-1)[pick_positions]  # [P], the model's dtype
        output = torch.zeros_like(hidden_states)
        start = 0
        for expert, count in enumerate(expert_counts.tolist()):
            if count == 0:
                continue
            end = start + count
            inputs = pick_inputs[start:end]
            weights = view.expert_weights(expert)
            intermediate = view.expert_intermediate(expert, inputs, weights)
            expert_output = nn.functional.linear(intermediate, weights.down, weights.down_bias)
            if pick_outputs is None:
                pick_outputs = expert_output.new_empty(num_picks, expert_output.shape[1])
                if self._uses_pairs:
                    pick_intermediate = intermediate.new_empty(num_picks, intermediate.shape[1])
            pick_outputs[start:end] = expert_output
            # One index_put_ per expert (its tokens are distinct), as before: a single one over all picks takes a
            # sort-based path that may add a token's expert outputs in another order. index_put_ with accumulate,
            # not index_add_: same sums, but index_add_ on CPU with several threads was measured 500x slower on
            # small slices
            output.index_put_((token_index[start:end],),
                              (expert_output * pick_weights[start:end, None]).to(output.dtype), accumulate=True)
            if pick_intermediate is not None:
                pick_intermediate[start:end] = intermediate
            if self._uses_experts:
                positions = pick_positions[start:end]
                expert_slice = ExpertSlice(
                    expert=expert,
                    token_index=token_index[start:end],
                    inputs=inputs,
                    intermediate=intermediate,
                    outputs=expert_output,
                    combine_weights=combine_weights.reshape(-1)[positions],
                    raw_weights=raw_weights.reshape(-1)[positions],
                    renorm_weights=renorm_weights.reshape(-1)[positions],
                )
                for statistic in self.statistics.values():
                    statistic.on_expert(expert_slice)
            start = end

        if pick_outputs is None:  # no stored expert was picked
            pick_outputs = hidden_states.new_empty(0, view.hidden_size)
            pick_intermediate = hidden_states.new_empty(0, view.intermediate_size)


        output_norms = None  # [T, k] fp32 ||E_e(x)||_2 of each pick (0 for sentinels)
        if self._uses_norms:
            output_norms = torch.zeros_like(combine_weights)
            output_norms.view(-1)[pick_positions] = pick_outputs.float().norm(dim=-1)
        if self._uses_pairs:
            pairs = RoutedPairs(
                expert_ids=expert_ids,
                token_index=token_index,
                slot=pick_positions % top_k,
                intermediate=pick_intermediate,
                outputs=pick_outputs,
                combine_weights=combine_weights.reshape(-1)[pick_positions],
                raw_weights=raw_weights.reshape(-1)[pick_positions],
                renorm_weights=renorm_weights.reshape(-1)[pick_positions],
                expert_counts=expert_counts,
            )
            for statistic in self.statistics.values():
                statistic.on_routed_pairs(pairs)
        if self._uses_router:
            batch.output_norms = output_norms
            for statistic in self.statistics.values():
                statistic.on_routed(batch)
        return output

    def combine_ranks(self, world: World, hessian_owners: list[int] | None = None) -> None:
        """Combine every statistic (and the token count) with the other ranks' (:meth:`Statistic.combine_ranks`); with
        ``hessian_owners``, each per-expert Hessian goes only to the rank that owns the expert."""
        self.num_tokens = int(world.all_reduce_(torch.tensor([self.num_tokens], dtype=torch.int64))[0])
        for statistic in self.statistics.values():
            statistic.combine_ranks(world, hessian_owners)

    def result(self) -> LayerStatistics:
        return LayerStatistics(
            layer_index=self.view.layer_index,
            num_experts=self.view.num_experts,
            num_tokens=self.num_tokens,
            values={name: statistic.result() for name, statistic in self.statistics.items()},
        )


def calibration_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ExpertsInterface`` entry: route to the attached collector (or compute plainly when none is attached)."""
    collector: LayerCollector | None = getattr(experts, _COLLECTOR_ATTR, None)
    if collector is None:
        view = getattr(experts, _VIEW_ATTR, None)
        if view is None:
            raise RuntimeError(
                "the moecompress calibration experts backend ran on an experts module without a view; "
                "use moecompress.calibration.calibration_backend(model) to enable it"
            )
        collector = LayerCollector(view, [])
    return collector.routed_forward(hidden_states, top_k_index, top_k_weights)


def register_backend() -> None:
    """Register :func:`calibration_experts_forward` with transformers' ``ExpertsInterface`` (idempotent)."""
    ExpertsInterface.register(BACKEND_NAME, calibration_experts_forward)


@contextmanager
def calibration_backend(model: nn.Module, views: list[MoEBlockView]) -> Iterator[None]:
    """Run ``model``'s experts through the calibration backend inside the block, restoring the previous one after."""
    register_backend()
    config = model.config
    previous = getattr(config, "_experts_implementation", None)
    for view in views:
        setattr(view.experts, _VIEW_ATTR, view)
    _set_experts_implementation(model, BACKEND_NAME)
    try:
        yield
    finally:
        _set_experts_implementation(model, previous or "eager")
        for view in views:
            if hasattr(view.experts, _VIEW_ATTR):
                delattr(view.experts, _VIEW_ATTR)


def _set_experts_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    try:
        if setter is not None:
            setter(name)
            return
    except (ValueError, KeyError):
        pass
    # every experts module reads the shared config at call time
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = name
