"""CAMERA-P: structured micro-expert pruning (Xu et al., AAAI 2026; methods.md section 3).

Per MoE layer, ``n_prune = floor(ratio * (E * I + sum I_s))`` micro-experts (expert channels: gate row, up row, down
column) with the lowest CAMERA energy are removed, ranked globally over the layer's routed AND shared experts.
Layers are processed in order in one streamed sweep: layer ``l``'s energies are computed on inputs that already
went through the pruned layers ``< l`` (statistics recomputed on the current, edited model). Guards: no expert
(routed or shared) loses more than ``max_expert_share`` of its channels (methods.md 3(g): 0.9), and the channels
of super experts (``context.super_experts``) are never pruned.

```yaml
- method: prune_camera
  ratio: 0.2             # share of the layer's micro-experts removed
  alpha: 0.9             # energy = ||w_down||^2 [(1 - alpha) sum phi^2 + alpha max phi^2]
  mode: masked           # masked: zeroed channels, same shapes | physical: experts really become smaller
  pad_to: 64             # physical only: one width per model (max kept, rounded up) in the plain HF layout
  score: camera          # camera (default) | weight_norm | random: the baselines of the benchmark
  max_expert_share: 0.9  # no expert loses more than this share of its channels
  protect_super_experts: true
  # preset: camera_code  # the released code's form: alpha 0.9, no floor, no super-expert guard
```

``physical`` replaces each layer's experts by :class:`moecompress.kernels.variable_width.VariableWidthExperts`
(per-expert widths, no padding) and slices the shared experts; the widths are recorded under
``config.moecompress["variable_width"]`` and the checkpoint saves in the native format. With ``pad_to`` every expert
of every layer keeps the same width ``W`` (the widest expert's kept count, rounded up to ``pad_to``, pruned channels
fill the gap as zeros): the fused HF layout holds it, so plain ``from_pretrained`` (and vLLM) load it.
A ``physical`` model without ``pad_to`` is final: statistics-based stages (quantisation) cannot run after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch
from torch import nn

from moecompress.analysis.camera import (
    DEFAULT_ALPHA,
    STATISTICS,
    LayerEnergies,
    energy_plot,
    layer_energies,
    random_scores,
    weight_norm_scores,
)
from moecompress.calibration import LayerwiseRunner
from moecompress.errors import CalibrationError, RecipeError
from moecompress.kernels.variable_width import VariableWidthExperts, slice_linear_rows_and_columns
from moecompress.models import find_moe_blocks
from moecompress.models.edits import (
    EditError,
    _config_record,
    _replace_tensor,
    replace_experts,
    sync_config,
    zero_micro_experts,
)
from moecompress.models.families import adapter_for, text_config
from moecompress.pruning.base import super_experts_by_layer
from moecompress.stages import RunContext, Stage, StageOptions, StageResult, register_stage

VARIABLE_WIDTH_KEY = "variable_width"


@dataclass
class LayerPrunePlan:
    """Pruned channels of one MoE layer: ``routed {expert: [channels]}``, ``shared {shared index: [channels]}``."""

    layer_index: int
    routed: dict[int, list[int]] = field(default_factory=dict)
    shared: dict[int, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"routed": {str(e): c for e, c in self.routed.items()}, "shared": {str(s): c for s, c in self.shared.items()}}

    @classmethod
    def from_json(cls, layer_index: int, record: dict) -> "LayerPrunePlan":
        return cls(layer_index, {int(e): list(c) for e, c in record["routed"].items()},
                   {int(s): list(c) for s, c in record["shared"].items()})

    @property
    def num_pruned(self) -> int:
        return sum(map(len, self.routed.values())) + sum(map(len, self.shared.values()))


def plan_layer(scores: LayerEnergies, ratio: float, *, max_expert_share: float = 0.9,
               protected_experts: list[int] = ()) -> LayerPrunePlan:
    """The ``floor(ratio * N)`` lowest-score micro-experts of the layer (``N`` = all routed and shared channels),
    skipping any that would make its expert lose more than ``max_expert_share`` of its channels or that belong to a
    protected (super) expert. Fewer are pruned only when the guards leave too few candidates."""
    widths = [scores.routed.shape[1]] * scores.routed.shape[0] + [int(s.numel()) for s in scores.shared]
    owner = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))  # [N] owner of each channel
    channel = torch.cat([torch.arange(width) for width in widths])
    caps = torch.tensor([math.floor(max_expert_share * width) for width in widths])
    caps[list(protected_experts)] = 0
    order = torch.sort(scores.flat().double(), stable=True).indices
    owner_sorted = owner[order]
    # rank of each sorted channel among its owner's channels (0 = its owner's lowest): greedy with per-owner caps
    by_owner = torch.sort(owner_sorted, stable=True).indices
    starts = torch.cumsum(torch.bincount(owner_sorted, minlength=len(widths)), 0) - torch.bincount(owner_sorted, minlength=len(widths))
    rank = torch.empty_like(order)
    rank[by_owner] = torch.arange(order.numel()) - starts[owner_sorted[by_owner]]
    eligible = order[rank < caps[owner_sorted]]
    chosen = eligible[: math.floor(ratio * owner.numel())]
    plan = LayerPrunePlan(scores.layer_index)
    num_routed = scores.routed.shape[0]
    for flat_index in sorted(chosen.tolist()):
        who, which = int(owner[flat_index]), int(channel[flat_index])
        if who < num_routed:
            plan.routed.setdefault(who, []).append(which)
        else:
            plan.shared.setdefault(who - num_routed, []).append(which)
    return plan


# ----- edits ------------------------------------------------------------------------------------------------------
def apply_masked(model: nn.Module, plan: LayerPrunePlan) -> None:
    """Zero the plan's channels: routed through :func:`zero_micro_experts`, shared experts' gate/up rows and down
    columns here (shapes unchanged)."""
    if plan.routed:
        zero_micro_experts(model, {plan.layer_index: plan.routed})
    views = [view for view in find_moe_blocks(model) if view.layer_index == plan.layer_index]
    for shared_index, channels in plan.shared.items():
        module = views[0].shared_experts[shared_index].module
        index = torch.tensor(channels, dtype=torch.long, device=module.down_proj.weight.device)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj"):
                getattr(module, name).weight.index_fill_(0, index, 0.0)
                if getattr(module, name).bias is not None:
                    getattr(module, name).bias.index_fill_(0, index, 0.0)
            module.down_proj.weight.index_fill_(1, index, 0.0)


def kept_channels(width: int, pruned: list[int]) -> torch.Tensor:
    """``[width - len(pruned)]`` long: the channels not in ``pruned``, ascending."""
    keep = torch.ones(width, dtype=torch.bool)
    keep[list(pruned)] = False
    return torch.nonzero(keep).flatten()


def make_physical(model: nn.Module, plans: dict[int, LayerPrunePlan]) -> dict[str, dict]:
    """Replace each planned layer's experts by :class:`VariableWidthExperts` holding only the kept channels, slice
    its shared experts, and record the widths under ``config.moecompress["variable_width"]``. Returns the record."""
    record = {}
    for view in find_moe_blocks(model):
        plan = plans.get(view.layer_index)
        if plan is None:
            continue
        _check_physical_layout(view)
        gate, up, down = [], [], []
        for expert in range(view.num_experts):
            weights = view.expert_weights(expert)
            keep = kept_channels(view.intermediate_size, plan.routed.get(expert, [])).to(weights.gate.device)
            gate.append(weights.gate.index_select(0, keep))
            up.append(weights.up.index_select(0, keep))
            down.append(weights.down.index_select(1, keep))
        replace_experts(view, VariableWidthExperts.from_dense(gate, up, down, view.experts.act_fn,
                                                              config=getattr(view.experts, "config", None)))
        shared_widths = []
        for shared_index, shared in enumerate(view.shared_experts):
            width = int(shared.module.down_proj.in_features)
            keep = kept_channels(width, plan.shared.get(shared_index, []))
            if keep.numel() < width:
                slice_linear_rows_and_columns(shared.module, keep)
            shared_widths.append(int(keep.numel()))
        record[str(view.layer_index)] = {"expert_widths": [int(g.shape[0]) for g in gate], "shared_widths": shared_widths}
    _config_record(model)[VARIABLE_WIDTH_KEY] = record
    return record


def make_padded(model: nn.Module, plans: dict[int, LayerPrunePlan], pad_to: int) -> int:
    """Slice every expert of every planned layer to one width ``W`` (returned): the widest kept count (routed, and
    shared per fused expert when the config's expert width also sizes the shared experts), rounded up to ``pad_to``.
    Each expert keeps its kept channels plus its lowest-index pruned (zeroed) ones as filler, in original order, so
    the function equals the masked model's. Writes ``W`` into the config: plain ``from_pretrained`` loads it."""
    model_config = text_config(model.config)
    adapter = adapter_for(model_config, model)
    views = [view for view in find_moe_blocks(model) if view.layer_index in plans]
    needed = 1
    for view in views:
        _check_physical_layout(view)
        plan = plans[view.layer_index]
        needed = max([needed, *[view.intermediate_size - len(plan.routed.get(e, [])) for e in range(view.num_experts)]])
        if adapter.intermediate_field_shared:
            for shared_index, shared in enumerate(view.shared_experts):
                kept = int(shared.module.down_proj.in_features) - len(plan.shared.get(shared_index, []))
                needed = max(needed, math.ceil(kept / shared.count))
    full = max(view.intermediate_size for view in views)
    width = min(full, math.ceil(needed / pad_to) * pad_to)
    if any(view.intermediate_size != full for view in views):
        raise EditError("pad_to needs every pruned MoE layer at the same expert width before pruning")
    for view in views:
        plan = plans[view.layer_index]
        experts = view.experts
        indices = [_padded_channels(full, plan.routed.get(e, []), width) for e in range(view.num_experts)]
        gate_up = torch.stack([torch.cat([experts.gate_up_proj[e].index_select(0, idx.to(experts.gate_up_proj.device)),
                                          experts.gate_up_proj[e].index_select(0, (idx + full).to(experts.gate_up_proj.device))])
                               for e, idx in enumerate(indices)])
        down = torch.stack([experts.down_proj[e].index_select(1, idx.to(experts.down_proj.device)) for e, idx in enumerate(indices)])
        _replace_tensor(experts, "gate_up_proj", gate_up)
        _replace_tensor(experts, "down_proj", down)
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if isinstance(getattr(experts, attr, None), int):
                setattr(experts, attr, width)
        if adapter.intermediate_field_shared:  # DeepSeek: the shared MLP is count * the expert width
            for shared_index, shared in enumerate(view.shared_experts):
                shared_width = int(shared.module.down_proj.in_features)
                slice_linear_rows_and_columns(shared.module, _padded_channels(
                    shared_width, plan.shared.get(shared_index, []), width * shared.count))
    if adapter.intermediate_field_shared:
        setattr(model_config, adapter.intermediate_field, width)  # so sync_config sees a config that describes it
    sync_config(model)
    return width


def _padded_channels(full: int, pruned: list[int], width: int) -> torch.Tensor:
    """``[width]``: the kept channels plus the lowest pruned ones (zeroed) up to ``width``, ascending."""
    keep = kept_channels(full, pruned)
    filler = sorted(pruned)[: width - keep.numel()]
    return torch.sort(torch.cat([keep, torch.tensor(filler, dtype=torch.long)])).values


def _check_physical_layout(view) -> None:
    if view.storage != "concatenated" or view.glu is not None or getattr(view.experts, "gate_up_proj_bias", None) is not None:
        raise EditError(f"layer {view.layer_index} ({view.family}): physical CAMERA-P supports fused concatenated "
                        "experts without biases or custom GLU; use mode: masked for this model")
    if view.expert_id_map is not None:
        raise EditError(f"layer {view.layer_index} holds merged experts with a router map; run prune_camera with "
                        "mode: masked after a remap merge")


# ----- the stage ----------------------------------------------------------------------------------------------------
DEFAULTS = {"alpha": DEFAULT_ALPHA, "max_expert_share": 0.9, "protect_super_experts": True}
# The released code (xuyuzhuang11/CAMERA run.sh): alpha 0.9, pure global ranking, no guards.
PRESETS = {"camera_code": {"alpha": 0.9, "max_expert_share": 1.0, "protect_super_experts": False}}


class CameraPruneOptions(StageOptions):
    ratio: float = pydantic.Field(..., gt=0, lt=1, description="share of each layer's micro-experts removed")
    alpha: float | None = pydantic.Field(None, ge=0, le=1, description="weight of the max term in the energy "
                                         f"(default {DEFAULT_ALPHA})")
    mode: Literal["masked", "physical"] = pydantic.Field("masked", description="masked: zero channels, same "
                                                         "shapes; physical: experts really become smaller")
    pad_to: int | None = pydantic.Field(None, gt=0, description="physical only: one width for every expert, "
                                        "rounded up to this multiple (plain HF layout)")
    max_expert_share: float | None = pydantic.Field(None, gt=0, le=1, description="most an expert may lose "
                                                    "(default 0.9)")
    protect_super_experts: bool | None = pydantic.Field(None, description="never prune channels of super experts "
                                                        "(default true)")
    preset: Literal["camera_code"] | None = pydantic.Field(None, description="camera_code: the released code's "
                                                           "form (alpha 0.9, no per-expert floor, no super-expert guard)")
    score: Literal["camera", "weight_norm", "random"] = pydantic.Field("camera", description="camera energies, or "
                                                                       "the weight-norm / random baselines")
    seed: int = pydantic.Field(0, description="seed of score: random")

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        if self.pad_to is not None and self.mode != "physical":
            raise ValueError("pad_to applies to mode: physical (masked mode keeps every shape)")
        if self.preset is not None:
            explicit = [name for name in PRESETS[self.preset] if getattr(self, name) is not None]
            if explicit:
                raise ValueError(f"preset {self.preset!r} fixes {explicit}; give either the preset or the values")
        return self

    def setting(self, name: str):
        """The effective value of ``alpha`` / ``max_expert_share`` / ``protect_super_experts``: explicit, preset,
        or default."""
        value = getattr(self, name)
        if value is not None:
            return value
        return (PRESETS[self.preset] if self.preset is not None else DEFAULTS)[name]


@register_stage
class PruneCameraStage(Stage):
    """``method: prune_camera``: CAMERA-P micro-expert pruning, layer by layer on the already-pruned model."""

    method = "prune_camera"
    Options = CameraPruneOptions

    def check(self, context: RunContext) -> None:
        for view in find_moe_blocks(context.model):
            if isinstance(view.experts, VariableWidthExperts):
                raise RecipeError(f"prune_camera: layer {view.layer_index} already has variable-width experts; prune "
                                  "once, in masked mode, or with pad_to")

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        options = self.options
        if options.score == "camera" and context.calibration is None:
            raise RecipeError("prune_camera needs calibration data for its energies; add a `calibration:` section "
                              "to the recipe (or use score: weight_norm)")
        protected = super_experts_by_layer(context) if options.setting("protect_super_experts") else {}
        plans: dict[int, LayerPrunePlan] = {}
        all_scores: dict[int, LayerEnergies] = {}

        def prune_view(view, statistics):
            if options.score == "camera":
                scores = layer_energies(view, statistics, options.setting("alpha"))
            elif options.score == "weight_norm":
                scores = weight_norm_scores(view)
            else:
                scores = random_scores(view, options.seed)
            plan = plan_layer(scores, options.ratio, max_expert_share=options.setting("max_expert_share"),
                              protected_experts=protected.get(view.layer_index, []))
            apply_masked(context.model, plan)
            plans[view.layer_index], all_scores[view.layer_index] = plan, scores

        if options.score == "camera":
            sweep_pruning(context, prune_view)
        else:
            for view in find_moe_blocks(context.model):
                prune_view(view, None)
        width = self._finish(context, plans)
        plot = energy_plot(list(all_scores.values()), context.output_dir / "plots" / "prune_camera_scores.png",
                           title=f"prune_camera: {options.score} scores (cumulative)")
        return StageResult(decisions={"pruned_channels": {str(layer): plan.to_json() for layer, plan in plans.items()},
                                      "mode": options.mode, "padded_width": width},
                           metrics=self._metrics(all_scores, plans),
                           plots=[str(plot.relative_to(context.output_dir))], changed_structure=True)

    def replay(self, context: RunContext, result: StageResult) -> bool:
        plans = {int(layer): LayerPrunePlan.from_json(int(layer), record)
                 for layer, record in result.decisions["pruned_channels"].items()}
        for plan in plans.values():
            apply_masked(context.model, plan)
        self._finish(context, plans)
        return True

    def _finish(self, context: RunContext, plans: dict[int, LayerPrunePlan]) -> int | None:
        context.mark_statistics_stale()
        if self.options.mode != "physical":
            return None
        if self.options.pad_to is not None:
            return make_padded(context.model, plans, self.options.pad_to)
        make_physical(context.model, plans)
        return None

    @staticmethod
    def _metrics(all_scores: dict[int, LayerEnergies], plans: dict[int, LayerPrunePlan]) -> dict:
        per_layer = {}
        for layer, scores in all_scores.items():
            plan = plans[layer]
            pruned_score = sum(float(scores.routed[e, c].double().sum()) for e, c in plan.routed.items()) + sum(
                float(scores.shared[s][c].double().sum()) for s, c in plan.shared.items())
            routed_left = [scores.routed.shape[1] - len(plan.routed.get(e, [])) for e in range(scores.routed.shape[0])]
            per_layer[str(layer)] = {
                "pruned": plan.num_pruned, "micro_experts": int(scores.flat().numel()),
                "pruned_score_share": pruned_score / max(float(scores.flat().double().sum()), 1e-300),
                "expert_widths": routed_left,
                "shared_pruned": {str(s): len(c) for s, c in plan.shared.items()},
            }
        return {"layers": per_layer}


def sweep_pruning(context: RunContext, prune_view) -> None:
    """One streamed sweep (:meth:`LayerwiseRunner.sweep`): per decoder layer, the CAMERA statistics of its MoE
    blocks on the current (already pruned) inputs, then ``prune_view(view, layer_statistics)`` edits the block;
    the edited layer's outputs feed the next layer."""
    if context.calibration is None:
        raise CalibrationError("prune_camera needs calibration data; add a `calibration:` section to the recipe")

    def process_layer(layer_index, layer, replay):
        if not replay.views():
            return
        statistics = replay.collect(list(STATISTICS))
        for view in replay.views():
            prune_view(view, statistics[view.layer_index])

    runner = LayerwiseRunner.from_source(context.model, device=context.device)
    runner.sweep(context.calibration, process_layer, batch_size=context.batch_size, on_layer=context.on_layer)
    context.calibration_passes += 1

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
CameraPruning = PruneCameraStage

__all__ = ["CameraPStage", "CameraPruning", "LayerPrunePlan", "PruneCameraStage", "apply_masked", "kept_channels",
           "make_padded", "make_physical", "plan_layer", "sweep_pruning"]


@register_stage
class CameraPStage(PruneCameraStage):
    """``method: camera_p``: the name the CAMERA issue and methods.md use; the same stage as ``prune_camera``."""

    method = "camera_p"


CameraPPruning = CameraPStage  # the name before the naming scheme, kept as an alias
