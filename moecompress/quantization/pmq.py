"""MC-MoE PMQ (methods.md section 5): a bit-width per routed expert by a multiple-choice knapsack.

Per expert ``e`` and candidate width ``b``, the cost of giving ``e`` ``b`` bits is
``phi_e^alpha * w_e^beta * eps_{e,b}^gamma * 1000``:

* ``phi_e``: how often the expert is selected (top-k counts), normalised to sum to 1 in its layer;
* ``w_e``: its routing-weight mass, the *raw* (pre-renormalisation) top-k probabilities summed, normalised likewise;
* ``eps_{e,b}``: the quantisation error at ``b`` bits, by ``eps_mode``:

  - ``hessian``: the Hessian proxy ``tr(dW H dW^T)`` summed over gate/up (input Hessian) and down
    (down-projection Hessian), ``dW = W - RTN_b(W)``, from the per-expert Hessians of the calibration pass. It is a
    *squared* output error summed over the expert's routed tokens, so it grows like ``n_e * err^2``;
  - ``hessian_norm``: its square root, ``sqrt(sum_lin ||dW X_lin^T||_F^2)`` (``H = X^T X``), the Frobenius norm of
    the expert's output change on its routed tokens: the reference's units (``~ sqrt(n_e) * err``);
  - ``block_output`` (the reference code): quantise only expert ``e`` with RTN at ``b`` bits and measure
    ``||Z - Z~||_F``, the change of the MoE block's output on (a sample of) the calibration tokens.

  Candidate ``0`` means "drop the expert": its error is the whole weight (``dW = W``) for the Hessian proxy, and the
  block-output change after removing it (routing renormalised over the others, :class:`BlockReconstruction`).

Budgets (one of):

* ``avg_bits``: the reference's per-layer budget ``sum_e b_e <= avg_bits * E``, one knapsack per layer
  (``granularity: layer``: one width per layer, ``sum_l E_l b_l <= avg_bits * sum_l E_l`` across layers);
* ``target_size``: one size for the whole model (:func:`parse_target_size`), one knapsack across all layers, so
  the same objective decides how the bytes spread over layers. Bytes are what the packed format stores: packed
  words, scales at the experts' dtype, zero points (asymmetric), a few bookkeeping bytes per expert; everything
  that is not a routed expert counts at its current size (the estimate is an upper bound when the quantiser also
  quantises attention).

Side constraints: at least one expert per layer at each of ``at_least_one`` widths (the reference code: one 3-bit and
one 2-bit of {1, 2, 3}); with ``0`` among the candidates, at least ``max(top_k, the family's minimum)`` experts of a
layer stay. Super experts are pinned at the widest candidate (``granularity: layer``: their layer is). Solved by
``moecompress.solvers`` (exact DP by default). The result is the run's bit map, which the following ``gptq`` /
``rtn`` stage uses; dropped experts are removed at once with ``keep_experts`` (bit map and super experts remapped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydantic
import torch

from moecompress import progress
from moecompress.analysis.block_outputs import BlockReconstruction
from moecompress.errors import RecipeError
from moecompress.kernels.layout import SUPPORTED_BITS, num_groups, packed_width
from moecompress.models import find_moe_blocks
from moecompress.models.edits import keep_experts, remap_expert_ids
from moecompress.models.families import adapter_for, minimum_experts, text_config
from moecompress.models.summary import model_summary
from moecompress.models.view import MoEBlockView
from moecompress.quantization.packing import quantize_rtn
from moecompress.quantization.stages import check_group_size
from moecompress.solvers import AtLeast, Budget, InfeasibleError, MultipleChoiceKnapsack, solve
from moecompress.stages import RunContext, Stage, StageOptions, StageResult, register_stage

COST_SCALE = 1000.0  # the reference code's s: keeps costs of well-used experts away from float underflow
DROP = 0  # the candidate that removes an expert

# preset mcmoe_code: the reference code's choices (methods.md 5 (c), (d)): RTN block-output error, {1, 2, 3} bits
# with at least one 2-bit and one 3-bit expert per layer, alpha 1, beta 1.5 (its CLI), loss exponent alpha = 1,
# asymmetric min/max groups of 128.
PRESETS = {
    "mcmoe_code": {"eps_mode": "block_output", "candidates": [1, 2, 3], "at_least_one": [2, 3], "alpha": 1.0,
                   "beta": 1.5, "gamma": 1.0, "group_size": 128, "symmetric": False, "scale_search": "minmax"},
}

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+(?:-experts)?)\s*$")


@dataclass(frozen=True)
class TargetSize:
    """kind ``bytes`` (the whole model), ``bpp`` (bits per parameter of the whole model) or ``bpp_experts`` (bits per
    routed-expert parameter); value in bytes or bits."""

    kind: Literal["bytes", "bpp", "bpp_experts"]
    value: float


def parse_target_size(text: str) -> TargetSize:
    """``"4.5GiB"``, ``"1.2MB"``, ``"800KiB"``, ``"123456B"`` (bytes of the whole model; KB/MB/GB are powers of 10,
    KiB/MiB/GiB of 2), ``"2.5bpp"`` (bits per parameter of the whole model, as ``moecompress inspect`` counts them:
    scales and zero points included) or ``"2.5bpp-experts"`` (bits per routed-expert parameter, likewise)."""
    match = _SIZE_PATTERN.match(str(text))
    if match:
        value, unit = float(match.group(1)), match.group(2)
        if unit.lower() == "bpp":
            return TargetSize("bpp", value)
        if unit.lower() == "bpp-experts":
            return TargetSize("bpp_experts", value)
        if unit.upper() in _SIZE_UNITS:
            return TargetSize("bytes", value * _SIZE_UNITS[unit.upper()])
    raise ValueError(f"target_size {text!r} is not a size; write e.g. '4.5GiB', '1.2MB', '2.5bpp' (whole model) or "
                     "'2.5bpp-experts' (routed experts only)")


def packed_expert_bytes(hidden_size: int, intermediate_size: int, bits: int, group_size: int, symmetric: bool,
                        scale_bytes: int) -> int:
    """Bytes one expert (gate_up ``[2I, d]`` + down ``[d, I]``) takes packed at ``bits``: int32 words, scales, int8
    zero points (asymmetric). 0 bits: a dropped expert, 0 bytes."""
    if bits == DROP:
        return 0
    total = 0
    for rows, columns in ((2 * intermediate_size, hidden_size), (hidden_size, intermediate_size)):
        groups = num_groups(columns, group_size)
        total += rows * packed_width(columns, bits) * 4 + rows * groups * scale_bytes
        if not symmetric:
            total += rows * groups
    return total


def pmq_costs(token_counts: torch.Tensor, raw_weight_sums: torch.Tensor, errors: torch.Tensor, *, alpha: float,
              beta: float, gamma: float) -> np.ndarray:
    """``[E, C]`` costs from counts ``[E]``, raw routing-weight sums ``[E]`` and errors ``[E, C]``."""
    frequency = token_counts.double() / token_counts.double().sum().clamp_min(1e-30)
    mass = raw_weight_sums.double() / raw_weight_sums.double().sum().clamp_min(1e-30)
    importance = frequency.pow(alpha) * mass.pow(beta)
    return (importance[:, None] * errors.double().clamp_min(0).pow(gamma) * COST_SCALE).numpy()


def _dequantised(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_search: str = "minmax") -> torch.Tensor:
    """RTN at ``bits`` and back (fp32); 0 bits: the dropped weight, zeros."""
    if bits == DROP:
        return torch.zeros_like(weight, dtype=torch.float32)
    return quantize_rtn(weight, bits, group_size, symmetric, scale_search=scale_search).dequantize(torch.float32)


@torch.no_grad()
def hessian_errors(view: MoEBlockView, input_hessians: torch.Tensor, down_hessians: torch.Tensor,
                   candidates: list[int], group_size: int, symmetric: bool,
                   scale_search: str = "minmax") -> torch.Tensor:
    """``[E, C]``: ``tr(dW H dW^T)`` of gate/up plus down under RTN at each candidate width (the Hessian proxy)."""
    errors = torch.zeros(view.num_experts, len(candidates), dtype=torch.float64)
    for expert in range(view.num_experts):
        weights = view.expert_weights(expert)
        gate_up = torch.cat([weights.gate, weights.up]).float()
        down = weights.down.float()
        for column, bits in enumerate(candidates):
            for weight, hessian in ((gate_up, input_hessians[expert]), (down, down_hessians[expert])):
                delta = weight - _dequantised(weight, bits, group_size, symmetric, scale_search)
                errors[expert, column] += float(((delta @ hessian.float()) * delta).sum())
    return errors


def _expert_output(view: MoEBlockView, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, weights,
                   inputs: torch.Tensor) -> torch.Tensor:
    """``E_e(x)`` with the given gate/up/down matrices (and the expert's own biases): ``[n, d]`` fp32."""
    def linear(x, matrix, bias):
        return torch.nn.functional.linear(x, matrix.float(), None if bias is None else bias.float())

    gate_out, up_out = linear(inputs, gate, weights.gate_bias), linear(inputs, up, weights.up_bias)
    intermediate = view.glu(gate_out, up_out) if view.glu is not None else view.activation(gate_out) * up_out
    return linear(intermediate, down, weights.down_bias)


@torch.no_grad()
def block_output_errors(view: MoEBlockView, inputs: torch.Tensor, candidates: list[int], group_size: int,
                        symmetric: bool, scale_search: str = "minmax") -> torch.Tensor:
    """``[E, C]``: ``||Z - Z~||_F`` on the cached block inputs ``[N, d]`` when only expert ``e`` is RTN-quantised
    at each candidate width (the reference code's ``eps``), or removed (candidate 0).

    The router is untouched by quantisation, so ``Z - Z~`` is nonzero only on the tokens routed to ``e``:
    ``c_e(t) * (E_e(x_t) - E~_e(x_t))``. Removal re-routes tokens, so it uses the NAEE block reconstruction.
    """
    if view.routing.scales_expert_input or view.output_module is not None:
        raise RecipeError(f"layer {view.layer_index}: {view.family} scales expert inputs or normalises the block "
                          "output, which eps_mode: block_output does not model; use eps_mode: hessian")
    inputs = inputs.float().to(view.router_weight.device)
    routing = view.route(inputs)
    errors = torch.zeros(view.num_experts, len(candidates), dtype=torch.float64)
    reconstruction = BlockReconstruction(view, inputs) if DROP in candidates else None
    for expert in range(view.num_experts):
        tokens, slot = torch.where(routing.top_k_index == expert)
        weights = view.expert_weights(expert)
        matrices = [weights.gate, weights.up, weights.down]  # quantised in their own dtype, as the quantiser does
        expert_inputs = inputs[tokens]
        combine = routing.top_k_weights[tokens, slot, None].float()
        full = _expert_output(view, *matrices, weights, expert_inputs)
        for column, bits in enumerate(candidates):
            if bits == DROP:
                errors[expert, column] = reconstruction.loss([e for e in range(view.num_experts) if e != expert])
                continue
            quantised = [_dequantised(matrix, bits, group_size, symmetric, scale_search) for matrix in matrices]
            delta = combine * (full - _expert_output(view, *quantised, weights, expert_inputs))
            errors[expert, column] = float(torch.linalg.norm(delta))
    return errors


def layer_errors(view: MoEBlockView, layer_statistics, options: "PMQOptions") -> torch.Tensor:
    """``[E, C]`` errors of one layer's experts at each candidate width, by ``options.eps_mode`` (module docstring)."""
    if options.eps_mode == "block_output":
        return block_output_errors(view, layer_statistics["moe_block_inputs"], options.candidates,
                                   options.group_size, options.symmetric, options.scale_search)
    errors = hessian_errors(view, layer_statistics["expert_input_hessian"], layer_statistics["down_proj_hessian"],
                            options.candidates, options.group_size, options.symmetric, options.scale_search)
    return errors.clamp_min(0).sqrt() if options.eps_mode == "hessian_norm" else errors


def allocate_layer(costs: np.ndarray, candidates: list[int], avg_bits: float, at_least_one: list[int],
                   pinned: list[int], solver: str = "dp") -> list[int]:
    """Bit-width per expert of one layer: least total cost, ``sum bits <= avg_bits * E``, side constraints."""
    num_experts = costs.shape[0]
    costs = costs.copy()
    for expert in pinned:  # only the widest candidate is allowed
        costs[expert, :-1] = np.inf
    bits = np.tile(np.asarray(candidates, dtype=float), (num_experts, 1))
    problem = MultipleChoiceKnapsack(
        costs=costs,
        budgets=[Budget(bits, limit=avg_bits * num_experts, name="bits")],
        at_least=[AtLeast([candidates.index(width)]) for width in at_least_one],
        choice_labels=list(candidates),
    )
    solution = solve(problem, method=solver)
    return [int(label) for label in solution.labels(problem)]


@dataclass
class LayerCosts:
    """One MoE layer's allocation input: costs ``[E, C]``, bytes per expert at each candidate ``[C]``, pinned experts,
    and the fewest experts it must keep (when 0 is a candidate)."""

    layer: int
    costs: np.ndarray
    expert_bytes: np.ndarray
    pinned: list[int]
    min_kept: int = 1


def allocate_model(layers: list[LayerCosts], candidates: list[int], *, budget: float, budget_kind: str,
                   at_least_one: list[int], granularity: str, solver: str = "dp") -> dict[int, list[int]]:
    """Widths of every expert of every layer from one knapsack across layers.

    budget_kind ``bytes``: ``sum expert bytes <= budget``; ``bits``: ``sum_e b_e <= budget`` (nominal bits).
    granularity ``expert``: one item per expert, the side constraints per layer; ``layer``: one item per layer (its
    experts share a width; cost and weight summed), at least one *layer* at each ``at_least_one`` width.
    Returns ``{layer: [width per expert]}``.
    """
    labels = np.asarray(candidates, dtype=float)
    rows_costs, rows_weights, at_least, owners = [], [], [], []
    for entry in layers:
        num_experts = entry.costs.shape[0]
        weights = np.tile(entry.expert_bytes if budget_kind == "bytes" else labels, (num_experts, 1))
        costs = entry.costs.copy()
        costs[entry.pinned, :-1] = np.inf
        if granularity == "layer":
            layer_costs = costs.sum(axis=0, keepdims=True)
            if entry.pinned:
                layer_costs[0, :-1] = np.inf
            rows_costs.append(layer_costs)
            rows_weights.append(weights.sum(axis=0, keepdims=True))
            owners.append(entry.layer)
            continue
        first = len(owners)
        items = list(range(first, first + num_experts))
        rows_costs.append(costs)
        rows_weights.append(weights)
        owners.extend([entry.layer] * num_experts)
        at_least += [AtLeast([candidates.index(width)], items=items, name=f"layer {entry.layer}: one at {width} bits")
                     for width in at_least_one]
        if DROP in candidates:
            kept_choices = [column for column, width in enumerate(candidates) if width != DROP]
            at_least.append(AtLeast(kept_choices, count=entry.min_kept, items=items,
                                    name=f"layer {entry.layer}: keep {entry.min_kept}"))
    if granularity == "layer":
        at_least = [AtLeast([candidates.index(width)], name=f"one layer at {width} bits") for width in at_least_one]
    problem = MultipleChoiceKnapsack(costs=np.concatenate(rows_costs),
                                     budgets=[Budget(np.concatenate(rows_weights), limit=budget, name=budget_kind)],
                                     at_least=at_least, choice_labels=list(candidates))
    chosen = [int(label) for label in solve(problem, method=solver).labels(problem)]
    widths: dict[int, list[int]] = {}
    for entry in layers:
        if granularity == "layer":
            widths[entry.layer] = [chosen[owners.index(entry.layer)]] * entry.costs.shape[0]
        else:
            widths[entry.layer] = [width for owner, width in zip(owners, chosen) if owner == entry.layer]
    return widths


class PMQOptions(StageOptions):
    avg_bits: float | None = pydantic.Field(None, gt=0, description="average bits per routed expert in every MoE "
                                            "layer (granularity layer: over all layers)")
    target_size: str | None = pydantic.Field(None, description="size of the whole model: '4.5GiB', '1.2MB', '2.5bpp' "
                                             "or '2.5bpp-experts'; one knapsack across layers")
    granularity: Literal["expert", "layer"] = pydantic.Field("expert", description="expert: a width per expert; "
                                                             "layer: one width per MoE layer")
    eps_mode: Literal["hessian", "hessian_norm", "block_output"] | None = pydantic.Field(
        None, description="hessian: tr(dW H dW^T) (default); hessian_norm: its square root (the reference's "
                          "units); block_output: the reference code's RTN block-output error")
    block_output_tokens: int = pydantic.Field(2048, ge=16, description="cached block inputs for eps_mode block_output")
    preset: Literal["mcmoe_code"] | None = pydantic.Field(None, description="mcmoe_code: the reference code's choices")
    candidates: list[int] | None = pydantic.Field(None, description="widths an expert may get (default [2, 3, 4]); "
                                                  "0 = drop the expert")
    at_least_one: list[int] | None = pydantic.Field(None, description="widths at least one expert per layer gets "
                                                    "(default: every nonzero candidate but the narrowest; "
                                                    "granularity layer: none)")
    alpha: float | None = pydantic.Field(None, description="exponent of the selection frequency (default 1)")
    beta: float | None = pydantic.Field(None, description="exponent of the raw routing-weight mass (default 1)")
    gamma: float | None = pydantic.Field(None, description="exponent of the quantisation error (default 1)")
    group_size: int | None = pydantic.Field(None, description="group size of the RTN that measures the errors and "
                                            "the bytes (use the quantiser's; default 128)")
    symmetric: bool | None = pydantic.Field(None, description="symmetric RTN (default true; use the quantiser's)")
    scale_search: Literal["minmax", "mse"] | None = pydantic.Field(
        None, description="group scales of that RTN: minmax (default, as the reference code) or mse (the "
                           "rtn/gptq stages' default scales)")
    solver: str = pydantic.Field("dp", description="dp (exact, default), milp (HiGHS) or pulp (CBC)")

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        defaults = {"eps_mode": "hessian", "candidates": [2, 3, 4], "alpha": 1.0, "beta": 1.0, "gamma": 1.0,
                    "group_size": 128, "symmetric": True, "scale_search": "minmax"}
        if self.preset is not None:
            fixed = PRESETS[self.preset]
            # values equal to the preset's are fine (a report's recipe repeats them), others contradict it
            explicit = [name for name, value in fixed.items() if getattr(self, name) not in (None, value)]
            if explicit:
                raise ValueError(f"preset {self.preset!r} fixes {explicit}; give either the preset or the values")
            defaults.update(fixed)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if (self.avg_bits is None) == (self.target_size is None):
            raise ValueError("give exactly one budget: avg_bits (per layer, the reference) or target_size (the model)")
        if self.target_size is not None:
            parse_target_size(self.target_size)
        unknown = [bits for bits in self.candidates if bits != DROP and bits not in SUPPORTED_BITS]
        if unknown:
            raise ValueError(f"candidates {unknown} cannot be packed; use 0 (drop) or widths from {list(SUPPORTED_BITS)}")
        self.candidates = sorted(set(self.candidates))
        widths = [bits for bits in self.candidates if bits != DROP]
        if not widths:
            raise ValueError("candidates need at least one nonzero width")
        if self.granularity == "layer" and DROP in self.candidates:
            raise ValueError("candidate 0 (drop) works per expert; use granularity: expert")
        if self.at_least_one is None:
            self.at_least_one = [] if self.granularity == "layer" else widths[1:]
        stray = [bits for bits in self.at_least_one if bits not in widths]
        if stray:
            raise ValueError(f"at_least_one {stray} are not among the candidates (nonzero: {widths})")
        if self.avg_bits is not None and not self.candidates[0] <= self.avg_bits:
            raise ValueError(f"avg_bits={self.avg_bits} is below the narrowest candidate {self.candidates[0]}")
        return self


@register_stage
class McmoePmqStage(Stage):
    """``method: mcmoe_pmq``: decide a bit-width per routed expert (the bit map the next quantiser uses); with
    candidate 0, also which experts to drop."""

    method = "mcmoe_pmq"
    Options = PMQOptions
    statistics = ("expert_token_counts", "routing_weight_sums_raw", "expert_input_hessian", "down_proj_hessian")

    def __init__(self, options=None, /, **option_values) -> None:
        super().__init__(options, **option_values)
        error_statistics = (("moe_block_inputs",) if self.options.eps_mode == "block_output"
                            else ("expert_input_hessian", "down_proj_hessian"))
        self.statistics = ("expert_token_counts", "routing_weight_sums_raw", *error_statistics)

    def check(self, context: RunContext) -> None:
        options = self.options
        check_group_size(context.model, options.group_size, self.method)
        if options.target_size is not None:
            self._expert_byte_budget(context, [(view.num_experts, self._expert_bytes(view))
                                               for view in find_moe_blocks(context.model)])
        if options.avg_bits is None or options.granularity == "layer":
            return
        for view in find_moe_blocks(context.model):
            narrowest = options.candidates[0]
            if narrowest == DROP:
                kept = self._min_kept(context, view)
                least = ([min(b for b in options.candidates if b)] * (kept - len(options.at_least_one))
                         + list(options.at_least_one))
                least = sum(least)
            else:
                least = narrowest * (view.num_experts - len(options.at_least_one)) + sum(options.at_least_one)
            if least > options.avg_bits * view.num_experts:
                raise RecipeError(f"mcmoe_pmq: avg_bits={options.avg_bits} is infeasible for layer {view.layer_index} "
                                  f"({view.num_experts} experts, at least one of {options.at_least_one}); the "
                                  f"smallest feasible average is {least / view.num_experts:.3f}")

    @staticmethod
    def _min_kept(context: RunContext, view: MoEBlockView) -> int:
        minimum, _ = minimum_experts(view, adapter_for(text_config(context.model.config), context.model))
        return max(view.routing.top_k, minimum)

    def statistics_options(self) -> dict[str, dict]:
        if self.options.eps_mode == "block_output":
            return {"moe_block_inputs": {"max_tokens": self.options.block_output_tokens}}
        return {}

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        options = self.options
        statistics = context.statistics(list(self.statistics), options=self.statistics_options())
        super_by_layer: dict[int, list[int]] = {}
        for layer, expert in context.super_experts:
            super_by_layer.setdefault(layer, []).append(expert)
        layers, mean_errors = [], {}
        views = find_moe_blocks(context.model)
        for view in views:
            layer_statistics = statistics[view.layer_index]
            errors = layer_errors(view, layer_statistics, options)
            costs = pmq_costs(layer_statistics["expert_token_counts"], layer_statistics["routing_weight_sums_raw"],
                              errors, alpha=options.alpha, beta=options.beta, gamma=options.gamma)
            layers.append(LayerCosts(view.layer_index, costs, self._expert_bytes(view),
                                     super_by_layer.get(view.layer_index, []), self._min_kept(context, view)))
            mean_errors[str(view.layer_index)] = errors.mean(dim=0).tolist()
            progress.detail(len(layers), len(views), "quantisation errors, layer")
        budget_metrics = {}
        if options.target_size is not None:
            limit, budget_metrics = self._expert_byte_budget(
                context, [(entry.costs.shape[0], entry.expert_bytes) for entry in layers])
            try:
                widths = allocate_model(layers, options.candidates, budget=limit, budget_kind="bytes",
                                        at_least_one=options.at_least_one, granularity=options.granularity,
                                        solver=options.solver)
            except InfeasibleError as error:
                raise RecipeError(f"mcmoe_pmq: target_size {options.target_size!r} is too small for the candidates "
                                  f"and side constraints ({error}); raise target_size") from None
        elif options.granularity == "layer":
            total_experts = sum(entry.costs.shape[0] for entry in layers)
            widths = allocate_model(layers, options.candidates, budget=options.avg_bits * total_experts,
                                    budget_kind="bits", at_least_one=options.at_least_one, granularity="layer",
                                    solver=options.solver)
        else:
            widths = {entry.layer: self._allocate_one_layer(entry) for entry in layers}
        bit_widths = {str(layer): values for layer, values in widths.items()}
        allocated_bytes = sum(float(entry.expert_bytes[self.options.candidates.index(width)])
                              for entry in layers for width in widths[entry.layer])
        self._apply(context, bit_widths)
        flat = [bits for values in bit_widths.values() for bits in values]
        kept = [bits for bits in flat if bits != DROP]
        metrics = {"mean_expert_bits": sum(flat) / len(flat), "mean_kept_expert_bits": sum(kept) / len(kept),
                   "dropped_experts": len(flat) - len(kept), "expert_bytes": allocated_bytes,
                   "mean_error_per_candidate": mean_errors, "candidates": options.candidates, **budget_metrics}
        return StageResult(decisions={"bit_widths": bit_widths}, metrics=metrics,
                           changed_structure=DROP in flat)

    def _allocate_one_layer(self, entry: LayerCosts) -> list[int]:
        options = self.options
        if DROP not in options.candidates:
            return allocate_layer(entry.costs, options.candidates, options.avg_bits, options.at_least_one,
                                  entry.pinned, options.solver)
        return allocate_model([entry], options.candidates, budget=options.avg_bits * entry.costs.shape[0],
                              budget_kind="bits", at_least_one=options.at_least_one, granularity="expert",
                              solver=options.solver)[entry.layer]

    def _expert_bytes(self, view: MoEBlockView) -> np.ndarray:
        """``[C]`` bytes of one expert of ``view`` packed at each candidate (scales in the experts' dtype)."""
        scale_bytes = view.expert_weights(0).gate.element_size()
        return np.array([packed_expert_bytes(view.hidden_size, view.intermediate_size, bits, self.options.group_size,
                                             self.options.symmetric, scale_bytes)
                         for bits in self.options.candidates], dtype=float)

    def _expert_byte_budget(self, context: RunContext, layers: list[tuple[int, np.ndarray]]) -> tuple[float, dict]:
        """Bytes the routed experts may take under ``target_size``, and the numbers behind it.

        layers: ``(experts, [C] bytes per expert at each candidate)`` per MoE layer."""
        target = parse_target_size(self.options.target_size)
        summary = model_summary(context.model)
        expert_count = sum(count for count, _ in layers)
        # expert_bits [E] and one expert_slot_w{b} [E] per width present: int32 each (an upper bound)
        bookkeeping = 4 * expert_count * (1 + len([bits for bits in self.options.candidates if bits != DROP]))
        fixed = summary["bytes"]["total"] - summary["bytes"]["routed_experts"] + bookkeeping
        if target.kind == "bpp_experts":
            limit = target.value * summary["parameters"]["routed_experts"] / 8 - bookkeeping
        elif target.kind == "bpp":
            limit = target.value * summary["parameters"]["total"] / 8 - fixed
        else:
            limit = target.value - fixed
        smallest = sum(count * float(expert_bytes.min()) for count, expert_bytes in layers)
        if limit < smallest:
            raise RecipeError(f"mcmoe_pmq: target_size {self.options.target_size!r} leaves {max(limit, 0):.0f} bytes for "
                              f"the routed experts but even the narrowest candidate needs {smallest:.0f} "
                              f"(the rest of the model takes {fixed:.0f}); raise target_size")
        return limit, {"target_size": self.options.target_size, "expert_byte_budget": limit,
                       "non_expert_bytes": fixed}

    def replay(self, context: RunContext, result: StageResult) -> bool:
        self._apply(context, result.decisions["bit_widths"])
        return True

    @staticmethod
    def _apply(context: RunContext, bit_widths: dict[str, list[int]]) -> None:
        """Remove dropped experts (``keep_experts``; super experts remapped) and set the run's bit map."""
        kept = {int(layer): [expert for expert, bits in enumerate(widths) if bits != DROP]
                for layer, widths in bit_widths.items() if DROP in widths}
        if kept:
            keep_experts(context.model, kept)
            context.remap_super_experts(remap_expert_ids(kept))
        context.bit_map = {(int(layer), new): int(bits) for layer, widths in bit_widths.items()
                           for new, bits in enumerate(bits for bits in widths if bits != DROP)}


# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
PMQStage = McmoePmqStage

__all__ = ["McmoePmqStage", "PMQOptions", "PMQStage", "TargetSize", "allocate_layer", "allocate_model",
           "block_output_errors", "hessian_errors", "layer_errors", "packed_expert_bytes", "parse_target_size",
           "pmq_costs"]
