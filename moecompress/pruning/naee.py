"""NAEE expert pruning (Lu et al. 2024, methods.md 6.3): per layer, keep the expert set that best reconstructs the
MoE block's output on calibration tokens.

For a candidate kept set, the router is restricted to it (softmax and top-k over the survivors, as after
``keep_experts``) and the loss is ``||Z - Z~||_F`` over the cached block inputs (statistic ``moe_block_inputs``, a
seeded sample of ``max_tokens`` tokens). Layers with at most ``exact_max_experts`` (16) experts try every kept set
(``C(E, K)`` block evaluations; the paper's method); larger layers use greedy backward elimination on the same loss
("NAEE-greedy": drop, one at a time, the expert whose removal hurts least). Super experts are always in the set;
``group_balanced`` only considers sets with the same count in every routing group.

The per-expert score recorded in the report is the loss of removing that expert alone (higher = more important).
NAEE's dynamic-skipping threshold ``beta_l`` (median over calibration tokens of ``w_1/w_0`` of the pruned layer's
routing) is recorded under ``decisions.skip_threshold`` for the online dynamic pruning stage.
``progressive: true`` recollects each layer's inputs after the layers before it were pruned (the paper's variant).
"""

from __future__ import annotations

import itertools
from collections import Counter

import pydantic
import torch

from moecompress.analysis.block_outputs import DEFAULT_MAX_TOKENS, BlockReconstruction
from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.pruning.base import (
    ProgressiveOptions,
    ProgressivePruningStage,
    experts_to_keep,
    layer_groups,
    super_experts_by_layer,
)
from moecompress.stages import RunContext, register_stage


class NaeeOptions(ProgressiveOptions):
    exact_max_experts: int = pydantic.Field(16, ge=1, description="exact search over kept sets up to this many "
                                                                  "experts per layer, greedy elimination above")
    max_tokens: int = pydantic.Field(DEFAULT_MAX_TOKENS, ge=1, description="cached block inputs per layer")


def _group_of(expert: int, num_experts: int, groups: int) -> int:
    return expert // (num_experts // groups)


def exact_search(reconstruction: BlockReconstruction, num_keep: int, protected: list[int], groups: int = 1) -> list[int]:
    """The kept set (sorted) of size ``num_keep`` containing ``protected`` with the smallest loss; with ``groups > 1``
    only sets holding ``num_keep / groups`` experts of every group. Ties go to the lexicographically first set."""
    num_experts = reconstruction.num_experts
    free = [e for e in range(num_experts) if e not in protected]
    best, best_loss = None, float("inf")
    for chosen in itertools.combinations(free, num_keep - len(protected)):
        kept = sorted([*protected, *chosen])
        if groups > 1:
            per_group = Counter(_group_of(e, num_experts, groups) for e in kept)
            if len(per_group) != groups or len(set(per_group.values())) != 1:
                continue
        loss = reconstruction.loss(kept)
        if loss < best_loss:
            best, best_loss = kept, loss
    if best is None:
        raise RecipeError(f"layer {reconstruction.view.layer_index}: no kept set of {num_keep} experts holds the "
                          f"super experts {protected} with equal counts per group; change the budget")
    return best


def greedy_elimination(reconstruction: BlockReconstruction, num_keep: int, protected: list[int], groups: int = 1) -> list[int]:
    """Backward elimination: remove, one at a time, the expert whose removal gives the smallest loss. With
    ``groups > 1`` an expert may only leave a group that holds the most kept experts (counts stay balanced)."""
    num_experts = reconstruction.num_experts
    kept = list(range(num_experts))
    while len(kept) > num_keep:
        counts = Counter(_group_of(e, num_experts, groups) for e in kept)
        fullest = max(counts.values())
        candidates = [e for e in kept if e not in protected
                      and (groups <= 1 or counts[_group_of(e, num_experts, groups)] == fullest)]
        if not candidates:
            raise RecipeError(f"layer {reconstruction.view.layer_index}: cannot remove more experts without removing "
                              f"super experts {protected} (or unbalancing the groups); raise the kept count")
        losses = [(reconstruction.loss([e for e in kept if e != candidate]), candidate) for candidate in candidates]
        kept.remove(min(losses)[1])
    return kept


@register_stage
class PruneNaeeStage(ProgressivePruningStage):
    """``method: prune_naee``: keep the expert set that best reconstructs each MoE block's output."""

    method = "prune_naee"
    Options = NaeeOptions
    statistics = ("moe_block_inputs",)
    score_name = "block-output loss when removed alone"
    decides_from_statistics = False  # the search runs the experts' weights: no streamed run (moecompress.streaming)

    def statistics_options(self) -> dict[str, dict]:
        return {"moe_block_inputs": {"max_tokens": self.options.max_tokens}}

    def check(self, context: RunContext) -> None:
        super().check(context)
        if self.options.budget != "uniform":
            raise RecipeError("prune_naee searches each layer's kept set on its own; use layer_budget: uniform")

    def decide(self, context: RunContext):
        statistics = context.statistics(list(self.statistics), options=self.statistics_options())
        protected = super_experts_by_layer(context)
        scores, kept_experts = {}, {}
        for view in find_moe_blocks(context.model):
            layer = view.layer_index
            scores[layer], kept_experts[layer] = self.decide_layer(view, statistics[layer], protected.get(layer, []))
        return scores, kept_experts

    def decide_layer(self, view, layer_statistics, protected: list[int]) -> tuple[torch.Tensor, list[int]]:
        reconstruction = BlockReconstruction(view, layer_statistics["moe_block_inputs"], top_k=self.options.top_k)
        num_experts = view.num_experts
        num_keep = experts_to_keep(self.options, num_experts)
        groups = layer_groups(view) if self.options.group_balanced else 1
        removal_losses = torch.tensor([reconstruction.loss([e for e in range(num_experts) if e != removed])
                                       for removed in range(num_experts)])
        exact = num_experts <= self.options.exact_max_experts
        search = exact_search if exact else greedy_elimination
        self._search[view.layer_index] = "exact" if exact else "greedy"
        kept = search(reconstruction, num_keep, sorted(protected), groups)
        self._skip_thresholds[view.layer_index] = reconstruction.skip_threshold(kept)
        self._losses[view.layer_index] = reconstruction.loss(kept)
        return removal_losses, kept

    def run(self, context: RunContext):
        self._skip_thresholds: dict[int, float] = {}
        self._losses: dict[int, float] = {}
        self._search: dict[int, str] = {}
        result = super().run(context)
        result.decisions["skip_threshold"] = {str(layer): beta for layer, beta in sorted(self._skip_thresholds.items())}
        result.decisions["search"] = {str(layer): kind for layer, kind in sorted(self._search.items())}
        result.metrics["reconstruction_loss"] = {str(layer): loss for layer, loss in sorted(self._losses.items())}
        return result

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
NaeePruning = PruneNaeeStage
