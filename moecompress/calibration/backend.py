"""The calibration experts backend: the experts forward and every statistic in one pass over the routed slices.

transformers 5 dispatches each fused experts module's forward through ``ExpertsInterface``. During calibration the
model runs with ``experts_implementation="moecompress_calibration"``: :func:`calibration_experts_forward` computes
each hit expert's intermediate ``h`` and output once (through the uniform view, so any storage layout works), adds
the weighted outputs exactly as the eager forward does, and hands the same tensors to the layer's statistics. So
a calibration pass costs a plain forward plus the statistics' own arithmetic, never a second expert evaluation.

Shared experts are ordinary modules: forward hooks on them (and a pre-hook on their ``down_proj`` for ``h``) feed
the statistics that need them (super experts, CAMERA energies).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from moecompress.calibration.statistics import STATISTICS, ExpertSlice, LayerStatistics, RouterBatch, SharedSlice, Statistic
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
        if self._uses_router or self._uses_experts:
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
        output_norms = torch.zeros_like(combine_weights) if self._uses_norms else None

        output = torch.zeros_like(hidden_states)
        num_experts = view.num_experts
        for expert in torch.unique(top_k_index).tolist():
            if expert >= num_experts or expert < 0:  # expert-parallel sentinels
                continue
            token_index, slot = torch.where(top_k_index == expert)
            inputs = hidden_states[token_index]
            weights = view.expert_weights(expert)
            intermediate = view.expert_intermediate(expert, inputs)
            expert_output = nn.functional.linear(intermediate, weights.down, weights.down_bias)
            slot_weights = top_k_weights[token_index, slot]
            # index_put_ with accumulate, not index_add_: same sums (a token picks an expert at most once), but
            # index_add_ on CPU with several threads was measured 500x slower on small slices
            output.index_put_((token_index,), (expert_output * slot_weights[:, None]).to(output.dtype), accumulate=True)
            if output_norms is not None:
                output_norms[token_index, slot] = expert_output.float().norm(dim=-1)
            if self._uses_experts:
                expert_slice = ExpertSlice(
                    expert=expert,
                    token_index=token_index,
                    inputs=inputs,
                    intermediate=intermediate,
                    outputs=expert_output,
                    combine_weights=combine_weights[token_index, slot],
                    raw_weights=raw_weights[token_index, slot],
                    renorm_weights=renorm_weights[token_index, slot],
                )
                for statistic in self.statistics.values():
                    statistic.on_expert(expert_slice)
        if self._uses_router:
            batch.output_norms = output_norms
            for statistic in self.statistics.values():
                statistic.on_routed(batch)
        return output

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
    from transformers.integrations.moe import ExpertsInterface

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
