"""MC-MoE PMQ (methods.md section 5): a bit-width per routed expert by a multiple-choice knapsack per MoE layer.

Per expert ``e`` and candidate width ``b``, the cost of giving ``e`` ``b`` bits is
``phi_e^alpha * w_e^beta * eps_{e,b}^gamma * 1000``:

* ``phi_e``: how often the expert is selected (top-k counts), normalised to sum to 1 in its layer;
* ``w_e``: its routing-weight mass, the *raw* (pre-renormalisation) top-k probabilities summed, normalised likewise;
* ``eps_{e,b}``: the quantisation error at ``b`` bits. Default (``eps_mode: hessian``): the Hessian proxy
  ``tr(dW H dW^T)`` summed over gate/up (input Hessian) and down (down-projection Hessian), ``dW = W - RTN_b(W)``,
  from the per-expert Hessians the calibration pass collects.

The layer's experts then get the widths of least total cost with ``sum_e b_e <= avg_bits * E`` and at least one
expert at each of ``at_least_one`` widths (the reference code: one 3-bit and one 2-bit of {1, 2, 3}), solved by
``moecompress.solvers`` (exact DP by default). Super experts are pinned at the widest candidate. The result is the
run's bit map, which the following ``gptq`` / ``rtn`` stage uses.
"""

from __future__ import annotations

import numpy as np
import pydantic
import torch

from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.models.view import MoEBlockView
from moecompress.pipeline import RunContext, Stage, StageOptions, StageResult, register_stage
from moecompress.quantization.packing import SUPPORTED_BITS, quantize_rtn
from moecompress.solvers import AtLeast, Budget, MultipleChoiceKnapsack, solve

COST_SCALE = 1000.0  # the reference code's s: keeps costs of well-used experts away from float underflow


def pmq_costs(token_counts: torch.Tensor, raw_weight_sums: torch.Tensor, errors: torch.Tensor, *, alpha: float,
              beta: float, gamma: float) -> np.ndarray:
    """``[E, C]`` costs from counts ``[E]``, raw routing-weight sums ``[E]`` and errors ``[E, C]``."""
    frequency = token_counts.double() / token_counts.double().sum().clamp_min(1e-30)
    mass = raw_weight_sums.double() / raw_weight_sums.double().sum().clamp_min(1e-30)
    importance = frequency.pow(alpha) * mass.pow(beta)
    return (importance[:, None] * errors.double().clamp_min(0).pow(gamma) * COST_SCALE).numpy()


@torch.no_grad()
def hessian_errors(view: MoEBlockView, input_hessians: torch.Tensor, down_hessians: torch.Tensor,
                   candidates: list[int], group_size: int, symmetric: bool) -> torch.Tensor:
    """``[E, C]``: ``tr(dW H dW^T)`` of gate/up plus down under RTN at each candidate width (the Hessian proxy)."""
    errors = torch.zeros(view.num_experts, len(candidates), dtype=torch.float64)
    for expert in range(view.num_experts):
        weights = view.expert_weights(expert)
        gate_up = torch.cat([weights.gate, weights.up]).float()
        down = weights.down.float()
        for column, bits in enumerate(candidates):
            for weight, hessian in ((gate_up, input_hessians[expert]), (down, down_hessians[expert])):
                quantised = quantize_rtn(weight, bits, group_size, symmetric).dequantize(torch.float32)
                delta = weight - quantised
                errors[expert, column] += float(((delta @ hessian.float()) * delta).sum())
    return errors


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


@register_stage
class PMQStage(Stage):
    """``method: mcmoe_pmq``: decide a bit-width per routed expert (the bit map the next quantiser uses)."""

    method = "mcmoe_pmq"
    statistics = ("expert_token_counts", "routing_weight_sums_raw", "expert_input_hessian", "down_proj_hessian")

    class Options(StageOptions):
        avg_bits: float = pydantic.Field(..., gt=0, description="average bits per routed expert in every MoE layer")
        candidates: list[int] = pydantic.Field([2, 3, 4], description="widths an expert may get")
        at_least_one: list[int] | None = pydantic.Field(None, description="widths at least one expert per layer "
                                                        "gets (default: every candidate but the narrowest)")
        alpha: float = pydantic.Field(1.0, description="exponent of the selection frequency")
        beta: float = pydantic.Field(1.0, description="exponent of the raw routing-weight mass")
        gamma: float = pydantic.Field(1.0, description="exponent of the quantisation error")
        group_size: int = pydantic.Field(128, description="group size of the RTN used to measure the errors "
                                                          "(use the quantiser's)")
        symmetric: bool = True
        solver: str = pydantic.Field("dp", description="dp (exact, default), milp (HiGHS) or pulp (CBC)")

        @pydantic.model_validator(mode="after")
        def _consistent(self):
            unknown = [bits for bits in self.candidates if bits not in SUPPORTED_BITS]
            if unknown:
                raise ValueError(f"candidates {unknown} cannot be packed; use widths from {list(SUPPORTED_BITS)}")
            self.candidates = sorted(set(self.candidates))
            if self.at_least_one is None:
                self.at_least_one = self.candidates[1:]
            stray = [bits for bits in self.at_least_one if bits not in self.candidates]
            if stray:
                raise ValueError(f"at_least_one {stray} are not among the candidates {self.candidates}")
            if not self.candidates[0] <= self.avg_bits:
                raise ValueError(f"avg_bits={self.avg_bits} is below the narrowest candidate {self.candidates[0]}")
            return self

    def check(self, context: RunContext) -> None:
        options = self.options
        for view in find_moe_blocks(context.model):
            least = options.candidates[0] * (view.num_experts - len(options.at_least_one)) + sum(options.at_least_one)
            if least > options.avg_bits * view.num_experts:
                raise RecipeError(f"mcmoe_pmq: avg_bits={options.avg_bits} is infeasible for layer {view.layer_index} "
                                  f"({view.num_experts} experts, at least one of {options.at_least_one}); the "
                                  f"smallest feasible average is {least / view.num_experts:.3f}")

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        options = self.options
        statistics = context.statistics(list(self.statistics))
        super_by_layer: dict[int, list[int]] = {}
        for layer, expert in context.super_experts:
            super_by_layer.setdefault(layer, []).append(expert)
        bit_widths: dict[str, list[int]] = {}
        mean_errors: dict[str, list[float]] = {}
        for view in find_moe_blocks(context.model):
            layer_statistics = statistics[view.layer_index]
            errors = hessian_errors(view, layer_statistics["expert_input_hessian"], layer_statistics["down_proj_hessian"],
                                    options.candidates, options.group_size, options.symmetric)
            costs = pmq_costs(layer_statistics["expert_token_counts"], layer_statistics["routing_weight_sums_raw"],
                              errors, alpha=options.alpha, beta=options.beta, gamma=options.gamma)
            bit_widths[str(view.layer_index)] = allocate_layer(costs, options.candidates, options.avg_bits,
                                                               options.at_least_one,
                                                               super_by_layer.get(view.layer_index, []), options.solver)
            mean_errors[str(view.layer_index)] = errors.mean(dim=0).tolist()
        self._apply(context, bit_widths)
        flat = [bits for widths in bit_widths.values() for bits in widths]
        return StageResult(decisions={"bit_widths": bit_widths},
                           metrics={"mean_expert_bits": sum(flat) / len(flat), "mean_error_per_candidate": mean_errors})

    def replay(self, context: RunContext, result: StageResult) -> bool:
        self._apply(context, result.decisions["bit_widths"])
        return True

    @staticmethod
    def _apply(context: RunContext, bit_widths: dict[str, list[int]]) -> None:
        context.bit_map = {(int(layer), expert): int(bits) for layer, widths in bit_widths.items()
                           for expert, bits in enumerate(widths)}


__all__ = ["PMQStage", "allocate_layer", "hessian_errors", "pmq_costs"]
