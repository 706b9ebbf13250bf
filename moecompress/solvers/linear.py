"""The knapsack as an integer linear program, shared by the HiGHS and CBC solvers.

One binary variable ``x[i, c]`` per *allowed* (item, choice) pair; minimise ``sum cost[i, c] x[i, c]`` subject to
rows ``lower <= A x <= upper``: ``sum_c x[i, c] = 1`` per item, ``sum w[i, c] x[i, c] <= limit`` per budget, and
``sum_{i in items, c in choices} x[i, c] >= count`` per at-least constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse

from moecompress.solvers.problem import MultipleChoiceKnapsack


@dataclass
class LinearProgram:
    """items/choices ``[V]``: the pair behind each variable; cost ``[V]``; matrix ``[R, V]`` (CSR); lower/upper
    ``[R]``; row_names ``[R]``."""

    items: np.ndarray
    choices: np.ndarray
    cost: np.ndarray
    matrix: scipy.sparse.csr_matrix
    lower: np.ndarray
    upper: np.ndarray
    row_names: list[str]

    def assignment(self, values: np.ndarray, num_items: int) -> np.ndarray:
        """Choice per item ``[N]`` from the variables' values (the one set to 1)."""
        chosen = np.asarray(values) > 0.5
        choices = np.full(num_items, -1, dtype=np.int64)
        choices[self.items[chosen]] = self.choices[chosen]
        return choices


def linear_program(problem: MultipleChoiceKnapsack) -> LinearProgram:
    items, choices = np.nonzero(problem.allowed)
    num_variables = items.size
    columns = np.arange(num_variables)
    row_blocks, lower, upper, names = [], [], [], []

    # one choice per item
    row_blocks.append(scipy.sparse.csr_matrix((np.ones(num_variables), (items, columns)),
                                              shape=(problem.num_items, num_variables)))
    lower.append(np.ones(problem.num_items))
    upper.append(np.ones(problem.num_items))
    names += [f"item_{item}" for item in range(problem.num_items)]

    for budget in problem.budgets:
        weights = problem.masked_weights(budget)[items, choices]
        row_blocks.append(scipy.sparse.csr_matrix(weights[None, :]))
        lower.append(np.array([-np.inf]))
        upper.append(np.array([budget.limit]))
        names.append(budget.name)

    for constraint in problem.at_least:
        counted = problem.member_mask(constraint.items)[items] & np.isin(choices, list(constraint.choices))
        row_blocks.append(scipy.sparse.csr_matrix(counted.astype(np.float64)[None, :]))
        lower.append(np.array([float(constraint.count)]))
        upper.append(np.array([np.inf]))
        names.append(constraint.name)

    return LinearProgram(items=items, choices=choices, cost=problem.costs[items, choices],
                         matrix=scipy.sparse.vstack(row_blocks, format="csr"), lower=np.concatenate(lower),
                         upper=np.concatenate(upper), row_names=names)
