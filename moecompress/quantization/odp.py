"""``method: mcmoe_odp``: measure MC-MoE ODP's per-layer, per-rank thresholds on calibration tokens and install the
runtime (:mod:`moecompress.kernels.odp`, where the rule, the hooks and their persistence in ``config.json`` are
described)."""

from __future__ import annotations

import math
from typing import Literal

import pydantic

from moecompress.calibration.statistics import histogram_quantile, ranks_over_top
from moecompress.errors import RecipeError
from moecompress.kernels.odp import (
    ODPState,
    apply_odp_from_config,
    install_odp,
    odp_routing,
    odp_state,
    remove_odp,
    reset_odp_counters,
    skipped_fractions,
    token_importance,
)
from moecompress.models.families import find_moe_blocks
from moecompress.stages import RunContext, Stage, StageOptions, StageResult, register_stage


# ----- the stage ------------------------------------------------------------------------------------------------------
class ODPOptions(StageOptions):
    quantile: float = pydantic.Field(0.5, gt=0, lt=1, description="mu = this quantile of w_r/w_0 on calibration "
                                     "(0.5: the median, the paper); lower skips less")
    protect_fraction: float = pydantic.Field(0.02, ge=0, lt=1, description="tokens per sequence that keep all experts")
    drop_fraction: float = pydantic.Field(0.0, ge=0, lt=1, description="least important tokens that skip all experts")
    odp_importance: Literal["paper", "code"] = pydantic.Field("paper", description="paper: attention received "
                                                              "(column sums); code: the reference's row sums")
    layers: list[int] | None = pydantic.Field(None, description="MoE layers to enable (default: all)")


@register_stage
class McmoeOdpStage(Stage):
    """``method: mcmoe_odp``: measure per-layer, per-rank thresholds and install ODP (saved with the model)."""

    method = "mcmoe_odp"
    Options = ODPOptions
    statistics = ("topk_weight_ratio_hist",)

    def check(self, context: RunContext) -> None:
        views = {view.layer_index: view for view in find_moe_blocks(context.model)}
        chosen = self.options.layers if self.options.layers is not None else list(views)
        unknown = sorted(set(chosen) - set(views))
        if unknown:
            raise RecipeError(f"mcmoe_odp: layers {unknown} hold no MoE block; MoE layers are {sorted(views)}")
        single = [layer for layer in chosen if views[layer].routing.top_k < 2]
        if single:
            raise RecipeError(f"mcmoe_odp: layers {single} route each token to one expert, so there is no secondary "
                              "expert to skip; leave them out of `layers`")

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        options = self.options
        statistics = context.statistics(list(self.statistics))
        views = find_moe_blocks(context.model)
        chosen = set(options.layers if options.layers is not None else [view.layer_index for view in views])
        thresholds, expected = {}, {}
        for view in views:
            if view.layer_index not in chosen:
                continue
            hist = statistics[view.layer_index]["topk_weight_ratio_hist"]
            values = [histogram_quantile(hist[rank], options.quantile) for rank in range(hist.shape[0])]
            thresholds[view.layer_index] = [0.0 if math.isnan(value) else value for value in values]
            # the weight rule's share of skipped picks on calibration (before protection): ratio bins below mu
            below = [float(hist[rank, : int(value * hist.shape[1])].sum()) for rank, value in
                     enumerate(thresholds[view.layer_index])]
            picks = float(hist[0].sum()) * view.routing.top_k
            expected[str(view.layer_index)] = sum(below) / picks if picks else 0.0
        settings = {"thresholds": thresholds, "protect_fraction": options.protect_fraction,
                    "drop_fraction": options.drop_fraction, "importance": options.odp_importance}
        install_odp(context.model, settings)
        decisions = {"thresholds": {str(layer): values for layer, values in thresholds.items()},
                     "protect_fraction": options.protect_fraction, "drop_fraction": options.drop_fraction,
                     "importance": options.odp_importance}
        return StageResult(decisions=decisions, metrics={"calibration_skip_fraction_weight_rule": expected})

    def replay(self, context: RunContext, result: StageResult) -> bool:
        decisions = result.decisions
        install_odp(context.model, {**decisions, "thresholds": {int(k): v for k, v in decisions["thresholds"].items()}})
        return True


# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
ODPStage = McmoeOdpStage

__all__ = ["McmoeOdpStage", "ODPStage", "ODPState", "apply_odp_from_config", "install_odp", "odp_routing", "odp_state",
           "ranks_over_top", "remove_odp", "reset_odp_counters", "skipped_fractions", "token_importance"]
