"""Frequency pruning (the baseline of REAP/HC-SMoE tables): keep each layer's most-used experts.

Usage of an expert = how many calibration tokens chose it (top-k selections, statistic ``expert_token_counts``).
Per MoE layer, the ``num_experts_to_keep`` (or ``round(keep_ratio * E)``) most-used experts are kept; ties go to
the lower expert id. Super experts are never removed: they are kept first, the rest of the budget goes by usage.
The model is then edited with ``moecompress.models.edits.keep_experts`` (router rows, expert tensors, config).
"""

from __future__ import annotations

import pydantic

from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.models.edits import keep_experts, remap_expert_ids
from moecompress.pipeline import RunContext, Stage, StageOptions, StageResult, register_stage

import torch


def select_most_used(token_counts: torch.Tensor, num_keep: int, protected: list[int]) -> list[int]:
    """Expert ids to keep (sorted): all ``protected`` ids, then the most-used others up to ``num_keep``.

    token_counts ``[E]``. Raises :class:`RecipeError` when ``num_keep`` is smaller than the protected set.
    """
    protected = sorted(set(protected))
    if num_keep < len(protected):
        raise RecipeError(f"cannot keep only {num_keep} experts: the layer has {len(protected)} super experts "
                          f"{protected} that must stay; raise num_experts_to_keep/keep_ratio")
    order = sorted(range(len(token_counts)), key=lambda expert: (-int(token_counts[expert]), expert))
    kept = list(protected)
    for expert in order:
        if len(kept) >= num_keep:
            break
        if expert not in kept:
            kept.append(expert)
    return sorted(kept)


@register_stage
class FrequencyPruning(Stage):
    """``method: prune_frequency``: keep the most-used experts of every MoE layer."""

    method = "prune_frequency"
    statistics = ("expert_token_counts",)

    class Options(StageOptions):
        num_experts_to_keep: int | None = pydantic.Field(None, ge=1, description="experts kept per MoE layer")
        keep_ratio: float | None = pydantic.Field(None, gt=0, le=1, description="fraction of experts kept per layer")
        top_k: int | None = pydantic.Field(None, ge=1, description="new experts per token (default: unchanged, "
                                                                    "capped at the kept count)")

        @pydantic.model_validator(mode="after")
        def _exactly_one_budget(self):
            if (self.num_experts_to_keep is None) == (self.keep_ratio is None):
                raise ValueError("give exactly one of `num_experts_to_keep` or `keep_ratio`")
            return self

    def num_to_keep(self, num_experts: int) -> int:
        if self.options.num_experts_to_keep is not None:
            return self.options.num_experts_to_keep
        return max(1, round(self.options.keep_ratio * num_experts))

    def check(self, context: RunContext) -> None:
        for view in find_moe_blocks(context.model):
            keep = self.num_to_keep(view.num_experts)
            if keep > view.num_experts:
                raise RecipeError(f"prune_frequency: num_experts_to_keep={keep} but layer {view.layer_index} has only "
                                  f"{view.num_experts} experts; choose at most {view.num_experts}")
            top_k = self.options.top_k
            if top_k is not None and top_k > keep:
                raise RecipeError(f"prune_frequency: top_k={top_k} exceeds the {keep} experts kept per layer")

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        statistics = context.statistics(list(self.statistics))
        super_by_layer: dict[int, list[int]] = {}
        for layer, expert in context.super_experts:
            super_by_layer.setdefault(layer, []).append(expert)
        kept_experts: dict[int, list[int]] = {}
        usage_kept: dict[int, float] = {}
        for view in find_moe_blocks(context.model):
            counts = statistics[view.layer_index]["expert_token_counts"]
            kept = select_most_used(counts, self.num_to_keep(view.num_experts), super_by_layer.get(view.layer_index, []))
            kept_experts[view.layer_index] = kept
            usage_kept[view.layer_index] = float(counts[kept].sum() / counts.sum().clamp_min(1))
        self._apply(context, kept_experts)
        return StageResult(
            decisions={"kept_experts": {str(layer): kept for layer, kept in kept_experts.items()}},
            metrics={"routed_token_share_kept": {str(layer): share for layer, share in usage_kept.items()},
                     "experts_per_layer_after": {str(layer): len(kept) for layer, kept in kept_experts.items()}},
            changed_structure=True,
        )

    def replay(self, context: RunContext, result: StageResult) -> bool:
        kept_experts = {int(layer): list(kept) for layer, kept in result.decisions["kept_experts"].items()}
        self._apply(context, kept_experts)
        return True

    def _apply(self, context: RunContext, kept_experts: dict[int, list[int]]) -> None:
        keep_experts(context.model, kept_experts, top_k=self.options.top_k)
        context.mark_statistics_stale()
        context.remap_super_experts(remap_expert_ids(kept_experts))
