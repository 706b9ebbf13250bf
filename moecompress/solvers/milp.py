"""The knapsack solved by ``scipy.optimize.milp`` (HiGHS branch and cut) on a sparse constraint matrix."""

from __future__ import annotations

import numpy as np
import scipy.optimize

from moecompress.solvers.linear import linear_program
from moecompress.solvers.problem import InfeasibleError, KnapsackSolution, MultipleChoiceKnapsack, SolverError

# HiGHS stops at a relative gap of 1e-4 by default; 0 makes it prove optimality, so it agrees with the exact DP.
_OPTIONS = {"mip_rel_gap": 0.0, "disp": False}


def solve_milp(problem: MultipleChoiceKnapsack, *, time_limit: float | None = None) -> KnapsackSolution:
    """The optimal assignment of ``problem`` by HiGHS. Raises :class:`InfeasibleError` when there is none."""
    program = linear_program(problem)
    options = dict(_OPTIONS, **({"time_limit": time_limit} if time_limit is not None else {}))
    result = scipy.optimize.milp(
        c=program.cost,
        constraints=scipy.optimize.LinearConstraint(program.matrix, program.lower, program.upper),
        integrality=np.ones(program.cost.size),
        bounds=scipy.optimize.Bounds(0.0, 1.0),
        options=options,
    )
    if result.status == 2:
        raise InfeasibleError("HiGHS: no assignment meets every constraint")
    if result.status != 0 or result.x is None:
        raise SolverError(f"HiGHS did not prove an optimum: {result.message} (status {result.status}); raise "
                          "time_limit or use method='dp'")
    solution = problem.evaluate(program.assignment(result.x, problem.num_items))
    solution.method = "milp"
    return solution
