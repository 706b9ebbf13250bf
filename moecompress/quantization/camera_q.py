"""CAMERA-Q: mixed precision over micro-experts (Xu et al., AAAI 2026; methods.md section 3).

Per MoE layer, the routed micro-experts (expert channels) are split by CAMERA energy into three bit groups
``bits = [hi, mid, lo]``; all three vectors of a channel (gate row, up row, down column) share its width
("cross-matrix consistent precision"). Steps:

1. **Shares.** The layer's channels, sorted by energy, are cut into ``buckets`` equal buckets; a multiple-choice
   knapsack (``moecompress.solvers``) gives each bucket a width, minimising ``sum energy * 4^-bits`` (the
   quantisation-noise proxy: RTN error power falls 4x per bit) under ``sum bits <= avg_bits * channels`` and, when
   set, a cap on the ``lo`` share (``max_lo_share``; the spec's ``p_lo <= 0.1`` for 1-bit). Channels of super
   experts are pinned to ``hi`` (they count in the budget). Shared experts stay in full precision (not quantised
   here; the spec pins them high).
2. **Permutation.** In every expert the channels are reordered by energy (descending), so equal-width channels are
   contiguous: ``[hi | mid | lo]``. Gate/up rows and down columns move together, so the function is unchanged.
3. **Segments.** The segment boundaries are rounded to multiples of ``group_size`` (down columns are GPTQ input
   columns, quantised group-wise with one width per group); the effective average is reported.
4. **Quantise.** Layer by layer on the already-quantised model (:meth:`LayerwiseRunner.sweep`): GPTQ of each
   segment's gate/up rows ``[2 w_s, H]`` with the expert's input Hessian (rows are independent in GPTQ, so this
   is exactly GPTQ of the whole matrix with a width per row), then of the down projection ``[H, I]`` on the down
   Hessian (``h`` recomputed with the quantised gate/up). ``down_sweep: joint`` (default) quantises all of
   ``W_down`` in ONE GPTQ sweep with a width per column group (:func:`gptq_quantize_mixed`), so the rounding error
   of the high-width segment is compensated in the lower ones; ``down_sweep: segments`` quantises each segment's
   columns ``[H, w_s]`` on its own diagonal block of the Hessian (each segment a sub-FFN,
   ``E(x) = sum_s W_down[:, S_s] (act(W_gate[S_s] x) * W_up[S_s] x)``, the spec's recipe, methods.md 3 (e)), which
   never compensates one segment's error in another. Group scales: ``scale_search`` (default ``mse``, as the
   ``rtn``/``gptq`` stages). ``preset: camera_spec`` is the spec's form: ``down_sweep: segments``, ``minmax``.
5. **Store.** Each layer's experts become :class:`moecompress.kernels.variable_width.SegmentedPackedExperts`
   (per expert up to three packed sub-FFNs); ``config.moecompress["camera_q"]`` records the segment widths and bits
   so the native format reloads it.

The segment GPTQ runs in this stage (it calls the same GPTQ sweep as the ``gptq`` stage): the ``gptq`` stage's
engine packs one width per expert, and a per-channel width inside an expert needs the sub-FFN storage above.

```yaml
- method: camera_q
  avg_bits: 2.5          # target average over routed micro-experts of each layer
  bits: [4, 3, 2]        # hi, mid, lo (packable widths: 2, 3, 4, 8)
  group_size: 16         # segment boundaries and down-projection groups
  alpha: 0.9
  # down_sweep: joint    # one GPTQ sweep over W_down with a width per group; segments: each segment alone
  # scale_search: mse    # or minmax;  preset: camera_spec = segments + minmax (the spec's recipe)
```
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic
import torch

from moecompress.analysis.camera import DEFAULT_ALPHA, STATISTICS, layer_energies
from moecompress.calibration import LayerwiseRunner
from moecompress.errors import CalibrationError, RecipeError
from moecompress.kernels.layout import SUPPORTED_BITS, PackedLinearWeight
from moecompress.kernels.variable_width import SegmentedPackedExperts
from moecompress.models import find_moe_blocks
from moecompress.models.edits import _config_record, replace_experts
from moecompress.pruning.base import super_experts_by_layer
from moecompress.quantization.gptq import gptq_quantize, gptq_quantize_mixed
from moecompress.quantization.packing import quantize_rtn
from moecompress.quantization.stages import check_group_size
from moecompress.solvers import Budget, MultipleChoiceKnapsack, solve
from moecompress.stages import RunContext, Stage, StageOptions, StageResult, register_stage

RECORD_KEY = "camera_q"
# preset camera_spec: the spec's recipe (methods.md 3 (e)): each down-projection segment quantised as its own
# sub-FFN, min/max group scales (the form measured before the joint sweep became the default).
PRESETS = {"camera_spec": {"down_sweep": "segments", "scale_search": "minmax"}}


# ----- 1. group shares ----------------------------------------------------------------------------------------------
def solve_channel_bits(energies: torch.Tensor, bits: list[int], avg_bits: float, *, pinned: torch.Tensor | None = None,
                       buckets: int = 20, max_lo_share: float | None = None, solver: str = "dp") -> torch.Tensor:
    """Width of every channel of a layer: energies ``[N]`` -> ``[N]`` long bits from ``bits`` (hi, mid, lo).

    ``pinned`` ``[N]`` bool: channels fixed at ``hi`` (counted in the budget). The free channels, sorted by energy,
    form ``buckets`` buckets; one knapsack choice per bucket (see the module docstring).
    """
    bits = list(bits)
    pinned = torch.zeros_like(energies, dtype=torch.bool) if pinned is None else pinned
    free = torch.nonzero(~pinned).flatten()
    result = torch.full_like(energies, bits[0], dtype=torch.long)
    if free.numel() == 0:
        return result
    order = free[torch.sort(energies[free].double(), descending=True, stable=True).indices]
    groups = [group for group in torch.tensor_split(order, min(buckets, order.numel())) if group.numel()]
    counts = np.array([group.numel() for group in groups], dtype=float)
    bucket_energy = np.array([float(energies[group].double().sum()) for group in groups])
    widths = np.array(bits, dtype=float)
    costs = bucket_energy[:, None] * 4.0 ** (-widths[None, :]) + 1e-12 * widths[None, :] * counts[:, None]
    limit = avg_bits * energies.numel() - bits[0] * int(pinned.sum())
    budgets = [Budget(counts[:, None] * widths[None, :], limit=limit, name="bits")]
    if max_lo_share is not None:
        lo = (widths == min(bits)).astype(float)
        budgets.append(Budget(counts[:, None] * lo[None, :], limit=max_lo_share * energies.numel(), name="lo_channels"))
    problem = MultipleChoiceKnapsack(costs=costs, budgets=budgets, choice_labels=bits)
    for group, width in zip(groups, solve(problem, method=solver).labels(problem)):
        result[group] = int(width)
    return result


# ----- 2./3. permutation and segments --------------------------------------------------------------------------------
def expert_segments(channel_bits: torch.Tensor, energies: torch.Tensor, bits: list[int],
                    group_size: int) -> tuple[torch.Tensor, list[int]]:
    """One expert: channel_bits ``[I]`` and energies ``[I]`` -> (order ``[I]``: new position -> old channel, by
    energy descending; segment widths ``[3]`` for ``bits``, boundaries rounded to multiples of ``group_size``)."""
    width = channel_bits.numel()
    counts = [int((channel_bits == b).sum()) for b in bits]
    boundaries, total = [], 0
    for count in counts[:-1]:
        total += count
        rounded = int(round(total / group_size)) * group_size if group_size > 0 else total
        boundaries.append(min(max(rounded, boundaries[-1] if boundaries else 0), width))
    edges = [0, *boundaries, width]
    order = torch.sort(energies.double(), descending=True, stable=True).indices
    return order, [edges[i + 1] - edges[i] for i in range(len(bits))]


def permute_expert_channels(view, expert: int, order: torch.Tensor) -> None:
    """Reorder expert ``expert``'s channels in place (new channel ``j`` = old ``order[j]``): gate and up rows and
    down columns together, so the expert computes the same function (fused ``concatenated`` storage)."""
    experts = view.experts
    size = view.intermediate_size
    order = order.to(experts.gate_up_proj.device)
    with torch.no_grad():
        experts.gate_up_proj.data[expert] = experts.gate_up_proj.data[expert][torch.cat([order, order + size])]
        experts.down_proj.data[expert] = experts.down_proj.data[expert][:, order]


# ----- 4. segment GPTQ ------------------------------------------------------------------------------------------------
def _segment_ranges(widths: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for width in widths:
        ranges.append((start, start + width))
        start += width
    return ranges


def _quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float,
              tokens: int, scale_dtype: torch.dtype, scale_search: str) -> PackedLinearWeight:
    """``weight`` fp32 ``[out, in]``; scales are stored in ``scale_dtype`` (the model's dtype)."""
    if tokens == 0 or float(hessian.diagonal().sum()) == 0:  # no calibration signal: plain rounding
        return quantize_rtn(weight, bits, group_size, True, scale_dtype=scale_dtype, scale_search=scale_search)
    return gptq_quantize(weight, hessian, bits, group_size=group_size, symmetric=True, damp=damp,
                         scale_dtype=scale_dtype, scale_search=scale_search).packed


def _quantize_down_joint(weight: torch.Tensor, hessian: torch.Tensor, widths: list[int], bits: list[int],
                         group_size: int, damp: float, tokens: int, scale_dtype: torch.dtype,
                         scale_search: str) -> list[PackedLinearWeight | None]:
    """One expert's ``W_down [H, I]`` (channels permuted into segments of ``widths``, each a multiple of
    ``group_size`` but the last) in one GPTQ sweep, each column group at its segment's width; one packed weight per
    non-empty segment (None for an empty one)."""
    ranges = _segment_ranges(widths)
    if tokens == 0 or float(hessian.diagonal().sum()) == 0:  # no calibration signal: plain rounding per segment
        return [None if stop == start else quantize_rtn(weight[:, start:stop], width, group_size, True,
                                                        scale_dtype=scale_dtype, scale_search=scale_search)
                for (start, stop), width in zip(ranges, bits)]
    group_bits = [width for (start, stop), width in zip(ranges, bits) for _ in range(start, stop, group_size)]
    result = gptq_quantize_mixed(weight, hessian, group_bits, group_size=group_size, symmetric=True, damp=damp,
                                 scale_dtype=scale_dtype, scale_search=scale_search)
    return [None if stop == start else result.packed_columns(start, stop) for start, stop in ranges]


def quantize_layer_segments(view, replay, segments: dict[int, list[int]], bits: list[int], group_size: int,
                            damp: float, *, down_sweep: str = "joint", scale_search: str = "mse",
                            ) -> dict[int, list[tuple[PackedLinearWeight, PackedLinearWeight] | None]]:
    """GPTQ every segment of every expert of one layer (gate/up first, then down on the quantised gate/up's ``h``,
    in one sweep per expert or per segment: ``down_sweep``); the dequantised weights are written into the fused
    tensors. Returns ``{expert: [(gate_up, down) or None per segment]}``."""
    experts, size = view.experts, view.intermediate_size
    statistics = replay.collect(["expert_input_hessian", "expert_token_counts"])[view.layer_index]
    input_hessians, tokens = statistics["expert_input_hessian"], statistics["expert_token_counts"]
    packed: dict[int, list] = {}
    for expert, widths in segments.items():
        packed[expert] = []
        for (start, stop), width in zip(_segment_ranges(widths), bits):
            if stop == start:
                packed[expert].append(None)
                continue
            rows = torch.cat([torch.arange(start, stop), torch.arange(start, stop) + size]).to(experts.gate_up_proj.device)
            gate_up = _quantize(experts.gate_up_proj.data[expert][rows].float(), input_hessians[expert].to(rows.device),
                                width, group_size, damp, int(tokens[expert]), experts.gate_up_proj.dtype, scale_search)
            experts.gate_up_proj.data[expert][rows] = gate_up.dequantize(experts.gate_up_proj.dtype)
            packed[expert].append([gate_up, None])
    down_hessians = replay.collect(["down_proj_hessian"])[view.layer_index]["down_proj_hessian"]
    for expert, widths in segments.items():
        weight, hessian = experts.down_proj.data[expert], down_hessians[expert].to(experts.down_proj.device)
        if down_sweep == "joint":
            downs = _quantize_down_joint(weight.float(), hessian, widths, bits, group_size, damp, int(tokens[expert]),
                                         experts.down_proj.dtype, scale_search)
        else:  # each segment on its own diagonal block of the Hessian
            downs = [None if stop == start else
                     _quantize(weight[:, start:stop].float(), hessian[start:stop, start:stop], width, group_size, damp,
                               int(tokens[expert]), experts.down_proj.dtype, scale_search)
                     for (start, stop), width in zip(_segment_ranges(widths), bits)]
        for index, ((start, stop), down) in enumerate(zip(_segment_ranges(widths), downs)):
            if down is None:
                continue
            experts.down_proj.data[expert][:, start:stop] = down.dequantize(experts.down_proj.dtype)
            packed[expert][index][1] = down
    return {expert: [tuple(pair) if pair is not None else None for pair in pairs] for expert, pairs in packed.items()}


# ----- the stage ------------------------------------------------------------------------------------------------------
class CameraQuantizeOptions(StageOptions):
    avg_bits: float = pydantic.Field(..., gt=0, description="average bits per routed micro-expert in each layer")
    bits: list[int] = pydantic.Field([4, 3, 2], description="hi, mid, lo widths (packable: 2, 3, 4, 8)")
    group_size: int = pydantic.Field(16, gt=0, description="segment boundaries and quantisation groups (multiple of 16)")
    alpha: float = pydantic.Field(DEFAULT_ALPHA, ge=0, le=1, description="weight of the max term in the energy")
    buckets: int = pydantic.Field(20, ge=1, description="energy buckets the group shares are solved over")
    max_lo_share: float | None = pydantic.Field(None, ge=0, le=1, description="cap on the share of lo channels")
    damp: float = pydantic.Field(0.01, ge=0, lt=1, description="GPTQ damping (fraction of the mean diagonal)")
    solver: str = pydantic.Field("dp", description="dp, milp or pulp")
    down_sweep: Literal["joint", "segments"] | None = pydantic.Field(
        None, description="joint (default): one GPTQ sweep over down_proj with a width per column group; segments: "
                          "each segment alone on its diagonal Hessian block (the spec's recipe)")
    scale_search: Literal["mse", "minmax"] | None = pydantic.Field(
        None, description="group scales: mse (default, as the rtn/gptq stages) or minmax")
    preset: Literal["camera_spec"] | None = pydantic.Field(
        None, description="camera_spec: the spec's recipe (down_sweep segments, minmax scales)")

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        defaults = {"down_sweep": "joint", "scale_search": "mse"}
        if self.preset is not None:
            fixed = PRESETS[self.preset]
            contradicting = [name for name, value in fixed.items() if getattr(self, name) not in (None, value)]
            if contradicting:
                raise ValueError(f"preset {self.preset!r} fixes {contradicting}; give either the preset or the values")
            defaults.update(fixed)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if len(self.bits) != 3 or sorted(self.bits, reverse=True) != self.bits or len(set(self.bits)) != 3:
            raise ValueError(f"bits must be three distinct widths, highest first (e.g. [4, 3, 2]); got {self.bits}")
        unknown = [b for b in self.bits if b not in SUPPORTED_BITS]
        if unknown:
            raise ValueError(f"bits {unknown} cannot be packed; use widths from {list(SUPPORTED_BITS)}")
        if not self.bits[2] <= self.avg_bits <= self.bits[0]:
            raise ValueError(f"avg_bits={self.avg_bits} must lie between the lo and hi widths {self.bits[2]} and "
                             f"{self.bits[0]}")
        if self.group_size % 16:
            raise ValueError("group_size must be a multiple of 16 (the kernels read one scale per 16-column tile)")
        return self


@register_stage
class CameraQStage(Stage):
    """``method: camera_q``: per-channel bit groups by CAMERA energy, segment GPTQ, segment-packed experts."""

    method = "camera_q"
    Options = CameraQuantizeOptions

    def check(self, context: RunContext) -> None:
        check_group_size(context.model, self.options.group_size, self.method, per_row=False)
        for view in find_moe_blocks(context.model):
            if view.storage != "concatenated" or view.glu is not None or getattr(view.experts, "gate_up_proj_bias", None) is not None:
                raise RecipeError(f"camera_q: layer {view.layer_index} ({view.family}, {view.storage}) is not fused "
                                  "dense experts without biases; CAMERA-Q runs on unquantised concatenated experts")

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        if context.calibration is None:
            raise CalibrationError("camera_q needs calibration data; add a `calibration:` section to the recipe")
        options = self.options
        protected = super_experts_by_layer(context)
        decisions: dict[str, dict] = {}
        packed_layers: dict[int, tuple] = {}

        def process_layer(layer_index, layer, replay):
            for view in replay.views():
                statistics = replay.collect(list(STATISTICS))[view.layer_index]
                energies = layer_energies(view, statistics, options.alpha).routed  # [E, I]
                pinned = torch.zeros_like(energies, dtype=torch.bool)
                pinned[protected.get(view.layer_index, [])] = True
                channel_bits = solve_channel_bits(energies.flatten(), options.bits, options.avg_bits,
                                                  pinned=pinned.flatten(), buckets=options.buckets,
                                                  max_lo_share=options.max_lo_share, solver=options.solver)
                channel_bits = channel_bits.view_as(energies)
                segments, orders = {}, {}
                for expert in range(view.num_experts):
                    order, widths = expert_segments(channel_bits[expert], energies[expert], options.bits,
                                                    options.group_size)
                    permute_expert_channels(view, expert, order)
                    segments[expert], orders[expert] = widths, order
                packed = quantize_layer_segments(view, replay, segments, options.bits, options.group_size, options.damp,
                                                 down_sweep=options.down_sweep, scale_search=options.scale_search)
                packed_layers[view.layer_index] = (view, packed)
                decisions[str(view.layer_index)] = {
                    "segment_widths": [segments[e] for e in range(view.num_experts)],
                    "solved_shares": [float((channel_bits == b).float().mean()) for b in options.bits],
                }

        def finish_layer(layer_index, layer):  # after propagation: swap in the packed module
            for layer_key in [key for key in packed_layers if key == layer_index]:
                view, packed = packed_layers.pop(layer_key)
                module = SegmentedPackedExperts.from_packed([packed[e] for e in range(view.num_experts)], options.bits,
                                                            view.experts.act_fn, config=getattr(view.experts, "config", None))
                replace_experts(view, module)

        LayerwiseRunner.from_source(context.model, device=context.device).sweep(
            context.calibration, process_layer, batch_size=context.batch_size, on_layer=context.on_layer,
            finish_layer=finish_layer)
        context.calibration_passes += 1
        record = {layer: {"segment_widths": value["segment_widths"], "bits": options.bits, "group_size": options.group_size}
                  for layer, value in decisions.items()}
        _config_record(context.model)[RECORD_KEY] = record
        context.mark_statistics_stale()
        average = {layer: sum(w * b for widths in value["segment_widths"] for w, b in zip(widths, options.bits))
                   / sum(sum(widths) for widths in value["segment_widths"]) for layer, value in decisions.items()}
        return StageResult(decisions={"layers": decisions, "bits": options.bits},
                           metrics={"effective_avg_bits": average,
                                    "mean_effective_avg_bits": sum(average.values()) / max(len(average), 1)},
                           changed_structure=True)


# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
CameraQuantization = CameraQStage

__all__ = ["CameraQStage", "CameraQuantization", "expert_segments", "permute_expert_channels",
           "quantize_layer_segments", "solve_channel_bits"]
