"""The knapsack solved by pulp with its bundled CBC (messages off)."""

from __future__ import annotations

import warnings

import numpy as np
import pulp

from moecompress.solvers.linear import linear_program
from moecompress.solvers.problem import InfeasibleError, KnapsackSolution, MultipleChoiceKnapsack, SolverError


def solve_pulp(problem: MultipleChoiceKnapsack, *, time_limit: float | None = None) -> KnapsackSolution:
    """The optimal assignment of ``problem`` by CBC through pulp. Raises :class:`InfeasibleError` when there is
    none."""
    program = linear_program(problem)
    model = pulp.LpProblem("multiple_choice_knapsack", pulp.LpMinimize)
    variables = [_binary(model, f"x_{item}_{choice}")
                 for item, choice in zip(program.items.tolist(), program.choices.tolist())]
    model += pulp.lpSum(cost * variable for cost, variable in zip(program.cost.tolist(), variables))
    matrix = program.matrix
    for row, name in enumerate(program.row_names):
        start, stop = matrix.indptr[row], matrix.indptr[row + 1]
        expression = pulp.lpSum(coefficient * variables[column] for coefficient, column
                                in zip(matrix.data[start:stop].tolist(), matrix.indices[start:stop].tolist()))
        lower, upper = program.lower[row], program.upper[row]
        if lower == upper:
            model += expression == lower, f"c{row}"
        else:
            if np.isfinite(lower):
                model += expression >= lower, f"c{row}_lower"
            if np.isfinite(upper):
                model += expression <= upper, f"c{row}_upper"
    # gapRel=0: prove optimality, so CBC agrees with the exact DP. PuLP 3.3 deprecates PULP_CBC_CMD in favour of an
    # external CBC (`pulp[cbc]`); the bundled one is what a plain `pip install pulp` has, so it stays, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        status = model.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, timeLimit=time_limit))
    if status == pulp.LpStatusInfeasible:
        raise InfeasibleError("CBC: no assignment meets every constraint")
    if status != pulp.LpStatusOptimal:
        raise SolverError(f"CBC did not prove an optimum (status {pulp.LpStatus[status]}); raise time_limit or use "
                          "method='dp'")
    values = np.array([variable.varValue or 0.0 for variable in variables])
    solution = problem.evaluate(program.assignment(values, problem.num_items))
    solution.method = "pulp"
    return solution


def _binary(model: pulp.LpProblem, name: str) -> pulp.LpVariable:
    """A binary variable of ``model`` (PuLP >= 3.3 creates them through the problem; older versions directly)."""
    if hasattr(model, "add_variable"):
        return model.add_variable(name, 0, 1, cat=pulp.LpBinary)
    return pulp.LpVariable(name, cat=pulp.LpBinary)
