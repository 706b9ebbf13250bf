"""What the expert-merging stages (UNCURL, HC-SMoE, M-SMoE) share: options, anchors, alignment, the merge edit.

A merging stage decides a partition of each layer's experts (``cluster``); this base then, per cluster,
1. picks the anchor: the member most often selected on the calibration tokens (ties: lower id);
2. if ``align``, permutes every other member's neurons to match the anchor (Hungarian, ``analysis.alignment``);
3. merges the members by a frequency-weighted average (weights = routed-token counts; uniform when no member was
   used) with :func:`moecompress.models.edits.merge_experts`.

Router rules: ``remap`` (R1, default: the full router stays, a token that picks any member reaches the merged
expert with that member's weight) or ``collapse`` (R2: one averaged router row per cluster, a plain transformers
model, lossy). Super experts are clusters of their own. ``num_experts_to_keep`` / ``keep_ratio`` is the number of
merged experts per layer; merges keep the router's top-k.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from moecompress.analysis.alignment import align_cluster
from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.models.edits import merge_experts, merged_expert_ids
from moecompress.pruning.base import (
    ExpertBudgetOptions,
    check_budget,
    expert_edit_result,
    experts_to_keep,
    scores_plot,
    super_experts_by_layer,
)
from moecompress.stages import RunContext, Stage, StageResult


class MergeOptions(ExpertBudgetOptions):
    router_rule: Literal["remap", "collapse"] = pydantic.Field(
        "remap", description="remap (R1): keep the full router, tokens reach the merged expert; "
                             "collapse (R2): one averaged router row per cluster (plain HF export, lossy)")
    align: bool | None = pydantic.Field(None, description="align members' neurons to the anchor before averaging "
                                                          "(default: the method's own choice)")
    seed: int = pydantic.Field(0, description="seed of the clustering's k-means")


def cluster_anchor(members: list[int], token_counts: torch.Tensor) -> int:
    """The member selected most often (ties: lower id)."""
    return min(members, key=lambda e: (-int(token_counts[e]), e))


def cluster_weights(members: list[int], token_counts: torch.Tensor) -> list[float]:
    """Frequency weights of a cluster's members (uniform when none was selected)."""
    counts = [float(token_counts[e]) for e in members]
    return counts if sum(counts) > 0 else [1.0] * len(members)


class ExpertMergingStage(Stage):
    """Base of merging stages: subclasses set ``method``/``statistics``/``default_align`` and implement ``cluster``."""

    Options = MergeOptions
    default_align: bool = True
    global_budget_supported: bool = False
    score_name: str = "routed-token count"

    def check(self, context: RunContext) -> None:
        check_budget(self.method, self.options, context, merging=True)
        if self.options.top_k is not None:
            raise RecipeError(f"{self.method}: merges keep the router's top-k; remove top_k (or prune instead)")
        if self.options.budget == "global" and not self.global_budget_supported:
            raise RecipeError(f"{self.method} merges every layer into the same number of experts; use layer_budget: "
                              "uniform (merge_msmoe supports a global budget)")

    def cluster(self, context: RunContext, statistics: dict) -> tuple[dict[int, list[list[int]]], dict[int, torch.Tensor]]:
        """``({layer: partition}, {layer: [E] scores for the report})``."""
        raise NotImplementedError  # pragma: no cover - interface

    def num_clusters(self, view) -> int:
        return experts_to_keep(self.options, view.num_experts)

    @property
    def align(self) -> bool:
        return self.default_align if self.options.align is None else self.options.align

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        statistics = context.statistics(list(dict.fromkeys([*self.statistics, "expert_token_counts"])))
        clusters, scores = self.cluster(context, statistics)
        counts = {layer: statistics[layer]["expert_token_counts"] for layer in clusters}
        anchors = {layer: [cluster_anchor(members, counts[layer]) for members in partition]
                   for layer, partition in clusters.items()}
        weights = {layer: [cluster_weights(members, counts[layer]) for members in partition]
                   for layer, partition in clusters.items()}
        self._apply(context, clusters, anchors, weights)
        plot = scores_plot({layer: values.tolist() for layer, values in scores.items()}, None,
                           context.output_dir / "plots" / f"{self.method}_clusters.png", clusters=clusters,
                           title=f"{self.method}: {self.score_name}")
        return expert_edit_result(
            context, self, scores, {layer: len(partition) for layer, partition in clusters.items()}, plot,
            {"clusters": {str(layer): partition for layer, partition in clusters.items()},
             "anchors": {str(layer): anchor for layer, anchor in anchors.items()},
             "member_weights": {str(layer): w for layer, w in weights.items()},
             "router_rule": self.options.router_rule, "aligned": self.align})

    def replay(self, context: RunContext, result: StageResult) -> bool:
        decisions = result.decisions
        clusters = {int(layer): partition for layer, partition in decisions["clusters"].items()}
        anchors = {int(layer): anchor for layer, anchor in decisions["anchors"].items()}
        weights = {int(layer): w for layer, w in decisions["member_weights"].items()}
        self._apply(context, clusters, anchors, weights)  # alignment is deterministic: the same permutations
        return True

    def _apply(self, context: RunContext, clusters, anchors, weights) -> None:
        if self.align:
            views = {view.layer_index: view for view in find_moe_blocks(context.model)}
            for layer, partition in clusters.items():
                for members, anchor in zip(partition, anchors[layer]):
                    align_cluster(views[layer], anchor, members)
        merge_experts(context.model, clusters, member_weights=weights, router_rule=self.options.router_rule)
        context.mark_statistics_stale()
        context.remap_super_experts(merged_expert_ids(clusters))


def protected_experts(context: RunContext) -> dict[int, list[int]]:
    return super_experts_by_layer(context)
