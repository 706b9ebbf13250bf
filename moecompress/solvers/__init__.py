"""LP / ILP / DP formulations shared by the allocators (pulp, scipy HiGHS, exact DP).

Every bit allocator (MC-MoE PMQ, CAMERA-Q, the joint prune-and-quantize budget) is a multiple-choice knapsack:
one choice per item (expert), a cost per choice (the objective, minimised), one or more budgets, and optional
"at least ``count`` items of a group take one of these choices" side constraints::

    from moecompress.solvers import AtLeast, Budget, MultipleChoiceKnapsack, solve
    bits = np.array([1, 2, 3])
    problem = MultipleChoiceKnapsack(
        costs=errors,                                        # [experts, 3]; inf = choice not allowed
        budgets=[Budget(np.tile(bits, (8, 1)), limit=20, name="bits")],
        at_least=[AtLeast([1]), AtLeast([2])],               # >= one 2-bit and one 3-bit expert
        choice_labels=bits.tolist())
    solution = solve(problem)                                # method="dp" (default), "milp" (HiGHS), "pulp" (CBC)
    solution.choices, solution.objective, solution.usage     # [experts] choice index, total cost, {"bits": 20.0}

When there is no feasible assignment, ``solve`` raises :class:`InfeasibleError` naming the smallest feasible
value of each budget that is too small (computed exactly, side constraints respected).
"""

from __future__ import annotations

import numpy as np

from moecompress.solvers.cbc import solve_pulp
from moecompress.solvers.dp import solve_dp
from moecompress.solvers.milp import solve_milp
from moecompress.solvers.problem import (
    AtLeast,
    Budget,
    InfeasibleError,
    KnapsackSolution,
    MultipleChoiceKnapsack,
    SolverError,
)

SOLVERS = {"dp": solve_dp, "milp": solve_milp, "pulp": solve_pulp}


def solve(problem: MultipleChoiceKnapsack, method: str = "dp", **options) -> KnapsackSolution:
    """The minimum-cost assignment of ``problem`` by ``method`` (``dp``, ``milp`` or ``pulp``).

    ``options`` go to the solver (``resolution``, ``max_states``, ``memory_bytes`` for the DP; ``time_limit`` for
    the others). Raises :class:`InfeasibleError` (with ``minimum_budgets``) when no assignment is feasible.
    """
    if method not in SOLVERS:
        raise SolverError(f"unknown solver method {method!r}; choose one of {sorted(SOLVERS)}")
    try:
        return SOLVERS[method](problem, **options)
    except InfeasibleError as error:
        raise _explain_infeasible(problem, error) from None


def _explain_infeasible(problem: MultipleChoiceKnapsack, error: InfeasibleError) -> InfeasibleError:
    """Why a solver found no assignment: the side constraints, a budget below its smallest feasible value (named),
    or budgets that are each feasible but not together (diagnosed only on failure: it costs a DP per budget)."""
    minimum = minimum_budgets(problem)  # raises for side constraints that cannot be met
    too_small = [budget for budget in problem.budgets
                 if budget.limit < minimum[budget.name] - 1e-9 * max(1.0, abs(minimum[budget.name]))]
    if too_small:
        return InfeasibleError("; ".join(
            f"budget {budget.name!r} = {budget.limit:g} is infeasible: the smallest feasible budget is "
            f"{minimum[budget.name]:g}" for budget in too_small) + _side_note(problem), minimum)
    smallest = ", ".join(f"{name} >= {value:g}" for name, value in minimum.items())
    return InfeasibleError(f"{error}; each budget alone is feasible (smallest: {smallest}) but not all together: "
                           "raise one of them", minimum)


def minimum_budgets(problem: MultipleChoiceKnapsack) -> dict[str, float]:
    """The smallest feasible limit of each budget on its own, side constraints respected (exact).

    Raises :class:`InfeasibleError` when the side constraints alone cannot be met.
    """
    _check_side_constraints(problem)
    minimum = {}
    for budget in problem.budgets:
        weights = np.where(problem.allowed, problem.masked_weights(budget), np.inf)
        if not problem.at_least:
            minimum[budget.name] = float(weights.min(axis=1).sum())
            continue
        lightest = MultipleChoiceKnapsack(costs=weights, at_least=problem.at_least,
                                          choice_labels=problem.choice_labels)
        minimum[budget.name] = solve_dp(lightest).objective
    return minimum


def _check_side_constraints(problem: MultipleChoiceKnapsack) -> None:
    for constraint in problem.at_least:
        members = problem.item_indices(constraint.items)
        able = int(problem.allowed[np.ix_(members, list(constraint.choices))].any(axis=1).sum())
        if able < constraint.count:
            labels = [problem.label(choice) for choice in constraint.choices]
            raise InfeasibleError(f"side constraint {constraint.name!r} cannot be met: it needs {constraint.count} "
                                  f"items at choices {labels} but only {able} of its items allow them")
    if problem.at_least:
        free = MultipleChoiceKnapsack(costs=np.where(problem.allowed, 0.0, np.inf), at_least=problem.at_least)
        try:
            solve_dp(free)
        except InfeasibleError:
            names = [constraint.name for constraint in problem.at_least]
            raise InfeasibleError(f"the side constraints {names} cannot all be met together (an item counts for one "
                                  "choice only); relax their counts") from None


def _side_note(problem: MultipleChoiceKnapsack) -> str:
    return " (with the side constraints)" if problem.at_least else ""


__all__ = [
    "SOLVERS",
    "AtLeast",
    "Budget",
    "InfeasibleError",
    "KnapsackSolution",
    "MultipleChoiceKnapsack",
    "SolverError",
    "minimum_budgets",
    "solve",
    "solve_dp",
    "solve_milp",
    "solve_pulp",
]
