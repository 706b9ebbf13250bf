"""What every expert-level pruning and merging stage shares: the budget options and the choice of experts to keep.

Every pruner scores the experts of each MoE layer (higher = more worth keeping) and this module turns the scores
into kept sets:

* ``num_experts_to_keep`` or ``keep_ratio``: how many experts each layer keeps (``round(keep_ratio * E)``);
* ``top_k``: an optional lower number of experts per token (default: unchanged, capped at the kept count);
* ``layer_budget``: ``uniform`` (every layer keeps the same count) or ``global`` (the same total, but one ranking
  across layers, so important layers keep more: scores are first normalised to shares of their layer's total
  ``|score|`` so that layers with larger activations do not win everything);
* ``group_balanced``: group-limited routers (DeepSeek-V3 ``n_group``) keep the same number of experts in every
  group, so the original groups survive and group routing stays on (``keep_experts`` keeps it then);
* super experts (``context.super_experts``) are always kept: they are ranked first whatever their score.

Ties go to the lower expert id. A global budget gives layers different counts; such a model saves in moecompress's
native format (``config.moecompress.num_experts_per_layer``), not as a plain transformers checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Mapping

import pydantic
import torch

from moecompress.calibration import LayerwiseRunner
from moecompress.distributed import current_world
from moecompress.errors import CalibrationError, RecipeError
from moecompress.models import decoder_layers, find_moe_blocks
from moecompress.models.edits import keep_experts, remap_expert_ids
from moecompress.stages import RunContext, Stage, StageOptions, StageResult


class ExpertBudgetOptions(StageOptions):
    """Options every expert-level pruning or merging stage has."""

    num_experts_to_keep: int | None = pydantic.Field(None, ge=1, description="experts kept per MoE layer")
    keep_ratio: float | None = pydantic.Field(None, gt=0, le=1, description="fraction of experts kept per layer")
    top_k: int | None = pydantic.Field(None, ge=1, description="new experts per token (default: unchanged, "
                                                                "capped at the kept count)")
    # None defaults (= uniform / off) keep the recorded recipe of a plain run as short as the user wrote it
    layer_budget: Literal["uniform", "global"] | None = pydantic.Field(
        None, description="uniform (default): the same count in every layer; global: one ranking across layers")
    group_balanced: bool | None = pydantic.Field(None, description="keep the same number of experts in every routing "
                                                                   "group (DeepSeek-V3), so group routing stays on")

    @pydantic.model_validator(mode="after")
    def _exactly_one_budget(self):
        if (self.num_experts_to_keep is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of `num_experts_to_keep` or `keep_ratio`")
        return self

    @property
    def budget(self) -> str:
        """``uniform`` or ``global``."""
        return self.layer_budget or "uniform"


def experts_to_keep(options: ExpertBudgetOptions, num_experts: int) -> int:
    """Per-layer kept count of a layer with ``num_experts`` experts."""
    if options.num_experts_to_keep is not None:
        return options.num_experts_to_keep
    return max(1, round(options.keep_ratio * num_experts))


def super_experts_by_layer(context: RunContext) -> dict[int, list[int]]:
    protected: dict[int, list[int]] = {}
    for layer, expert in context.super_experts:
        protected.setdefault(int(layer), []).append(int(expert))
    return protected


def layer_groups(view) -> int:
    """Number of routing groups of a layer (1 without group-limited routing)."""
    return max(1, int(getattr(view.router, "num_group", None) or 1))


def check_budget(method: str, options: ExpertBudgetOptions, context: RunContext, *, merging: bool = False) -> None:
    """Reject budgets impossible for this model (before any work): too many experts, top-k above the kept count,
    a group-balanced budget that does not split into the groups."""
    for view in find_moe_blocks(context.model):
        keep = experts_to_keep(options, view.num_experts)
        if keep > view.num_experts:
            raise RecipeError(f"{method}: num_experts_to_keep={keep} but layer {view.layer_index} has only "
                              f"{view.num_experts} experts; choose at most {view.num_experts}")
        if options.top_k is not None and options.top_k > keep:
            raise RecipeError(f"{method}: top_k={options.top_k} exceeds the {keep} experts kept per layer")
        if options.group_balanced:
            groups = layer_groups(view)
            if groups <= 1:
                raise RecipeError(f"{method}: group_balanced needs a group-limited router (n_group > 1), but layer "
                                  f"{view.layer_index} has none; remove group_balanced")
            if keep % groups:
                raise RecipeError(f"{method}: group_balanced keeps the same count in each of the {groups} groups, so "
                                  f"the kept count must be a multiple of {groups}; got {keep}")
            if merging:
                raise RecipeError(f"{method}: group_balanced is for pruning; merged experts straddle groups, so "
                                  "merging turns group routing off (remove group_balanced)")


def _ranking(scores: torch.Tensor, protected: set[int]) -> list[int]:
    """Expert ids best first: protected ones first, then by decreasing score, ties to the lower id."""
    values = scores.tolist()
    return sorted(range(len(values)), key=lambda e: (e not in protected, -values[e], e))


def _units(scores: torch.Tensor, protected: set[int], groups: int) -> list[tuple[list[int], float]]:
    """The layer's experts as units kept whole, best first, with the score that ranks a unit across layers.

    groups == 1: one expert per unit. groups > 1 (group-balanced): unit ``j`` is the ``j``-th best expert of every
    group, scored by the smallest of their scores (a tier is only as good as its weakest member).
    """
    if groups <= 1:
        return [([e], math.inf if e in protected else float(scores[e])) for e in _ranking(scores, protected)]
    size = len(scores) // groups
    per_group = [[g * size + e for e in _ranking(scores[g * size:(g + 1) * size], {p - g * size for p in protected})]
                 for g in range(groups)]
    units = []
    for tier in range(size):
        members = [ranking[tier] for ranking in per_group]
        tier_scores = [math.inf if e in protected else float(scores[e]) for e in members]
        units.append((members, min(tier_scores)))
    return units


def select_kept_experts(scores: Mapping[int, torch.Tensor], keep_per_layer: int, *,
                        protected: Mapping[int, list[int]] | None = None, groups: Mapping[int, int] | None = None,
                        layer_budget: str = "uniform", min_per_layer: Mapping[int, int] | None = None,
                        method: str = "pruning") -> dict[int, list[int]]:
    """``{layer: sorted kept ids}`` from ``{layer: scores [E]}`` (higher = keep).

    keep_per_layer: the uniform count; with ``layer_budget="global"`` the total is ``keep_per_layer x layers`` and
        each layer keeps at least ``min_per_layer[layer]`` (default 1) and its protected experts.
    groups: ``{layer: n_group}`` for group-balanced selection (counts become multiples of n_group).
    Raises :class:`RecipeError` when the protected experts do not fit in the budget.
    """
    protected = {int(layer): set(ids) for layer, ids in (protected or {}).items()}
    groups = dict(groups or {})
    units = {layer: _units(layer_scores.float(), protected.get(layer, set()), groups.get(layer, 1))
             for layer, layer_scores in scores.items()}
    for layer, layer_units in units.items():
        unit_size = len(layer_units[0][0])
        needed = sum(1 for members, _ in layer_units if any(e in protected.get(layer, ()) for e in members))
        if layer_budget == "uniform" and needed * unit_size > keep_per_layer:
            raise RecipeError(f"{method}: cannot keep only {keep_per_layer} experts in layer {layer}: its super experts "
                              f"{sorted(protected[layer])} must stay; raise num_experts_to_keep/keep_ratio")
    if layer_budget == "uniform":
        taken = {layer: keep_per_layer // len(layer_units[0][0]) for layer, layer_units in units.items()}
    elif layer_budget == "global":
        taken = _global_unit_counts(scores, units, keep_per_layer, protected, min_per_layer or {})
    else:
        raise RecipeError(f"{method}: layer_budget must be 'uniform' or 'global', got {layer_budget!r}")
    return {layer: sorted(e for members, _ in units[layer][:taken[layer]] for e in members) for layer in units}


def _global_unit_counts(scores, units, keep_per_layer, protected, min_per_layer) -> dict[int, int]:
    """How many units each layer keeps under one ranking across layers (scores as shares of the layer's |score|)."""
    total_budget = keep_per_layer * len(units)
    taken: dict[int, int] = {}
    candidates = []
    for layer, layer_units in units.items():
        unit_size = len(layer_units[0][0])
        mandatory_experts = max(int(min_per_layer.get(layer, 1)),
                                sum(unit_size for members, _ in layer_units if any(e in protected.get(layer, ()) for e in members)))
        taken[layer] = min(len(layer_units), -(-mandatory_experts // unit_size))
        scale = float(scores[layer].float().abs().sum()) or 1.0
        candidates += [(unit_score / scale, layer, index) for index, (_, unit_score) in enumerate(layer_units)
                       if index >= taken[layer]]
    remaining = total_budget - sum(taken[layer] * len(units[layer][0][0]) for layer in units)
    if remaining < 0:
        raise RecipeError(f"global budget of {total_budget} experts is smaller than what every layer must keep "
                          f"(top-k and super experts); raise num_experts_to_keep/keep_ratio")
    # Within a layer units come best first, so taking candidates by score keeps each layer's prefix.
    for _, layer, index in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        unit_size = len(units[layer][0][0])
        if unit_size > remaining:
            continue
        if index == taken[layer]:
            taken[layer] += 1
            remaining -= unit_size
    return taken


class ExpertPruningStage(Stage):
    """Base of score-then-keep pruners: subclasses set ``method``/``statistics`` and implement :meth:`expert_scores`.

    ``run`` checks the budget, scores every MoE layer, keeps the best experts (super experts always), applies
    :func:`moecompress.models.edits.keep_experts`, remaps super-expert ids, and records scores, kept sets and a
    plot of both in the report.
    """

    Options = ExpertBudgetOptions
    score_name: str = "score"
    # True when ``decide`` reads only calibration statistics, not weights: the stage can then decide on a meta
    # skeleton and a streamed run applies its decision layer by layer (moecompress.streaming)
    decides_from_statistics: bool = True

    def check(self, context: RunContext) -> None:
        check_budget(self.method, self.options, context)

    def expert_scores(self, context: RunContext) -> dict[int, torch.Tensor]:  # pragma: no cover - interface
        """``{layer: [E] fp32 scores}``, higher = more worth keeping."""
        raise NotImplementedError

    def select(self, context: RunContext, scores: dict[int, torch.Tensor]) -> dict[int, list[int]]:
        views = {view.layer_index: view for view in find_moe_blocks(context.model)}
        keep = {layer: experts_to_keep(self.options, views[layer].num_experts) for layer in scores}
        min_per_layer = {layer: min(self.options.top_k or views[layer].routing.top_k, views[layer].num_experts)
                         for layer in scores}
        groups = {layer: layer_groups(views[layer]) for layer in scores} if self.options.group_balanced else None
        return select_kept_experts(scores, max(keep.values()), protected=super_experts_by_layer(context),
                                   groups=groups, layer_budget=self.options.budget,
                                   min_per_layer=min_per_layer, method=self.method)

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        scores, kept_experts = self.decide(context)
        extra_decisions = self.extra_decisions(context, kept_experts)
        self._apply(context, kept_experts)
        return self.result(context, scores, kept_experts, extra_decisions)

    def decide(self, context: RunContext) -> tuple[dict[int, torch.Tensor], dict[int, list[int]]]:
        """``({layer: scores [E]}, {layer: kept ids})``; default: score, then keep the best within the budget."""
        scores = self.expert_scores(context)
        return scores, self.select(context, scores)

    def extra_decisions(self, context: RunContext, kept_experts: dict[int, list[int]]) -> dict:
        """Method-specific record (e.g. NAEE's skipping thresholds); default none."""
        return {}

    def result(self, context: RunContext, scores: dict[int, torch.Tensor], kept_experts: dict[int, list[int]],
               extra_decisions: dict | None = None) -> StageResult:
        plot = scores_plot({layer: scores[layer].tolist() for layer in scores}, kept_experts,
                           context.output_dir / "plots" / f"{self.method}_scores.png",
                           title=f"{self.method}: {self.score_name}")
        return expert_edit_result(
            context, self, scores, {layer: len(kept) for layer, kept in kept_experts.items()}, plot,
            {"kept_experts": {str(layer): kept for layer, kept in kept_experts.items()}, **(extra_decisions or {})})

    def replay(self, context: RunContext, result: StageResult) -> bool:
        kept_experts = {int(layer): list(kept) for layer, kept in result.decisions["kept_experts"].items()}
        self._apply(context, kept_experts)
        return True

    def _apply(self, context: RunContext, kept_experts: dict[int, list[int]]) -> None:
        keep_experts(context.model, kept_experts, top_k=self.options.top_k)
        context.mark_statistics_stale()
        context.remap_super_experts(remap_expert_ids(kept_experts))


class ProgressiveOptions(ExpertBudgetOptions):
    progressive: bool | None = pydantic.Field(None, description="decide layer l on statistics recomputed after layers < l "
                                                          "were pruned, in one streamed sweep (uniform budget only)")


class BalanceAwareOptions(StageOptions):
    """The threshold of the stages whose default form is chosen per layer by its routing balance (REAP's score,
    HC-SMoE's clustering; :func:`moecompress.analysis.expert_scores.routing_is_balanced`)."""

    balanced_variation: float = pydantic.Field(
        0.5, gt=0.0, description="balance_aware: a layer whose routed-token counts vary by at most this (std / mean) "
                                 "counts as balanced")


class ProgressivePruningStage(ExpertPruningStage):
    """A pruner whose scores come from each layer's calibration statistics (``layer_scores``), with a
    ``progressive`` mode (methods.md 7.1): one layer-by-layer sweep over the model being pruned in which layer
    ``l`` is scored on inputs that already went through the pruned layers ``< l``, pruned at once, and its outputs
    recomputed before layer ``l + 1`` runs. Without it, every layer is scored on the original model's pass.
    """

    Options = ProgressiveOptions

    def statistics_options(self) -> dict[str, dict]:
        """Options of the statistics this stage asks for (default: none)."""
        return {}

    def layer_scores(self, view, layer_statistics) -> torch.Tensor:  # pragma: no cover - interface
        """``[E]`` fp32 scores of one layer from its statistics (higher = keep)."""
        raise NotImplementedError

    def decide_layer(self, view, layer_statistics, protected: list[int]) -> tuple[torch.Tensor, list[int]]:
        """One layer's ``(scores [E], kept ids)`` under a uniform budget (progressive mode; NAEE overrides it)."""
        layer = view.layer_index
        layer_scores = self.layer_scores(view, layer_statistics)
        groups = {layer: layer_groups(view)} if self.options.group_balanced else None
        kept = select_kept_experts({layer: layer_scores}, experts_to_keep(self.options, view.num_experts),
                                   protected={layer: protected}, groups=groups, method=self.method)[layer]
        return layer_scores, kept

    def check(self, context: RunContext) -> None:
        super().check(context)
        if self.options.progressive and self.options.budget != "uniform":
            raise RecipeError(f"{self.method}: progressive mode decides one layer at a time, so it needs "
                              "layer_budget: uniform (a global budget ranks all layers at once)")

    def expert_scores(self, context: RunContext) -> dict[int, torch.Tensor]:
        statistics = context.statistics(list(self.statistics), options=self.statistics_options() or None)
        views = {view.layer_index: view for view in find_moe_blocks(context.model)}
        return {layer: self.layer_scores(views[layer], statistics[layer]) for layer in sorted(views)}

    def run(self, context: RunContext) -> StageResult:
        if not self.options.progressive:
            return super().run(context)
        self.check(context)
        scores, kept_experts = progressive_sweep(context, self)
        context.mark_statistics_stale()
        context.remap_super_experts(remap_expert_ids(kept_experts))
        return self.result(context, scores, kept_experts)


def scores_plot(scores: dict, kept_experts: dict | None, out_file: Path, **options) -> Path:
    """``out_file``, drawn by :func:`moecompress.pruning.plots.expert_scores_plot` on rank 0 only: every rank decides
    the same from the same combined statistics, so the other ranks name the same file without writing it again."""
    if current_world().is_main:
        from moecompress.pruning.plots import expert_scores_plot  # imports matplotlib (heavy): deferred to the plot

        expert_scores_plot(scores, kept_experts, out_file, **options)
    return out_file


def expert_edit_result(context: RunContext, stage: Stage, scores: dict[int, torch.Tensor],
                       experts_per_layer: dict[int, int], plot: Path, decisions: dict) -> StageResult:
    """The report entry of an expert-level edit (pruning or merging): its ``decisions`` plus whether every layer kept
    as many experts, the per-layer ``scores [E]`` and expert counts as metrics, and its ``plot``."""
    return StageResult(
        decisions={**decisions, "uniform_layers": len(set(experts_per_layer.values())) == 1},
        metrics={"scores": {str(layer): [float(v) for v in values.tolist()] for layer, values in scores.items()},
                 "score_name": stage.score_name,
                 "experts_per_layer_after": {str(layer): count for layer, count in experts_per_layer.items()}},
        plots=[str(plot.relative_to(context.output_dir))],
        changed_structure=True,
    )


def progressive_sweep(context: RunContext, stage: ProgressivePruningStage):
    """One calibration sweep over ``context.model`` that prunes each MoE layer as soon as its statistics are in.

    Returns ``({layer: scores [E]}, {layer: kept ids})``. The layer's outputs for the next layer are recomputed
    with the pruned layer (captured inputs re-run through it, written into the runner's cache in place).
    """
    if context.calibration is None:
        raise CalibrationError(f"{stage.method} needs calibration data; add a `calibration:` section to the recipe")
    protected = super_experts_by_layer(context)
    captured: dict[int, list] = {}
    handles = []

    def remember_inputs(layer_index):
        def hook(module, args, kwargs):
            captured.setdefault(layer_index, []).append([args, kwargs, None])
        return hook

    def remember_output(layer_index):
        def hook(module, args, output):
            captured[layer_index][-1][2] = output[0] if isinstance(output, tuple) else output
        return hook

    for index, layer in enumerate(decoder_layers(context.model)):
        handles.append(layer.register_forward_pre_hook(remember_inputs(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(remember_output(index)))
    scores: dict[int, torch.Tensor] = {}
    kept_experts: dict[int, list[int]] = {}

    def prune_layer(layer_index, layer, collectors):
        records = captured.pop(layer_index, [])
        for collector in collectors:
            layer_scores, kept = stage.decide_layer(collector.view, collector.result(), protected.get(layer_index, []))
            scores[layer_index], kept_experts[layer_index] = layer_scores, kept
            keep_experts(context.model, {layer_index: kept}, top_k=stage.options.top_k)
        if collectors:
            for args, kwargs, output in records:  # the next layer must see this layer's pruned outputs
                new_output = layer(*args, **kwargs)
                output.copy_(new_output[0] if isinstance(new_output, tuple) else new_output)
        captured.pop(layer_index, None)  # the re-run was recorded too

    try:
        runner = LayerwiseRunner.from_source(context.model, device=context.device)
        runner.run(context.calibration, list(stage.statistics), options=stage.statistics_options() or None,
                   batch_size=context.batch_size, on_layer=context.on_layer, layer_callback=prune_layer)
    finally:
        for handle in handles:
            handle.remove()
    context.calibration_passes += 1
    return scores, kept_experts
