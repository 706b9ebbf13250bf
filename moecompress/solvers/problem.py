"""The multiple-choice knapsack every allocator solves: data types, validation, and checking a solution.

``N`` items (experts), each taking exactly one of ``C`` choices (bit-widths, "drop"). Choice ``c`` of item ``i``
costs ``costs[i, c]`` (the objective, minimised; ``inf`` = the choice is not allowed for that item, e.g. a super
expert pinned at the widest choice) and uses ``budget.weights[i, c]`` of each budget's resource (bits, bytes).
Constraints:

* :class:`Budget`: ``sum_{i in items} weights[i, x_i] <= limit`` (``items`` defaults to all; a per-layer budget
  names that layer's items);
* :class:`AtLeast`: at least ``count`` items of ``items`` take a choice in ``choices`` (MC-MoE's "at least one
  2-bit and one 3-bit expert per layer"; "at least top-k experts of a layer are kept").

Solvers (``moecompress.solvers.solve``) only see these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from moecompress.errors import MoECompressError


class SolverError(MoECompressError):
    """A knapsack instance is malformed, or too large for the chosen solver."""


class InfeasibleError(SolverError):
    """No assignment meets every constraint. ``minimum_budgets[name]`` is the smallest feasible limit of each
    budget on its own (side constraints respected), ``None`` when the side constraints alone cannot be met."""

    def __init__(self, message: str, minimum_budgets: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.minimum_budgets = minimum_budgets


@dataclass
class Budget:
    """``sum_{i in items} weights[i, x_i] <= limit``. weights ``[N, C]``, non-negative; ``items`` None = all."""

    weights: np.ndarray
    limit: float
    items: Sequence[int] | None = None
    name: str = "budget"


@dataclass
class AtLeast:
    """At least ``count`` of ``items`` (None = all) take one of ``choices`` (choice indices)."""

    choices: Sequence[int]
    count: int = 1
    items: Sequence[int] | None = None
    name: str = "at_least"


@dataclass
class MultipleChoiceKnapsack:
    """One choice per item, minimum total cost, under budgets and side constraints (module docstring).

    costs: ``[N, C]`` float, ``inf`` where a choice is not allowed (every item needs at least one allowed choice).
    choice_labels: optional names of the ``C`` choices (e.g. bit-widths) used in messages.
    """

    costs: np.ndarray
    budgets: list[Budget] = field(default_factory=list)
    at_least: list[AtLeast] = field(default_factory=list)
    choice_labels: Sequence | None = None

    def __post_init__(self) -> None:
        self.costs = np.asarray(self.costs, dtype=np.float64)
        if self.costs.ndim != 2 or self.costs.shape[0] < 1 or self.costs.shape[1] < 1:
            raise SolverError(f"costs must be a [items, choices] array with at least one of each, got shape "
                              f"{self.costs.shape}")
        if np.isnan(self.costs).any() or (self.costs == -np.inf).any():
            raise SolverError("costs hold NaN or -inf; give finite costs, or +inf for a choice that is not allowed")
        no_choice = np.flatnonzero(~self.allowed.any(axis=1))
        if no_choice.size:
            raise SolverError(f"items {no_choice[:10].tolist()} have no allowed choice (every cost is inf); allow "
                              "at least one choice per item")
        for index, budget in enumerate(self.budgets):
            self._check_budget(index, budget)
        for constraint in self.at_least:
            self._check_at_least(constraint)
        names = [budget.name for budget in self.budgets]
        if len(set(names)) != len(names):
            raise SolverError(f"budget names must be distinct, got {names}")

    # ----- shape -----------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.costs.shape[0])

    @property
    def num_choices(self) -> int:
        return int(self.costs.shape[1])

    @property
    def allowed(self) -> np.ndarray:
        """``[N, C]`` bool: choices an item may take."""
        return np.isfinite(self.costs)

    def label(self, choice: int):
        return self.choice_labels[choice] if self.choice_labels is not None else choice

    def item_indices(self, items: Sequence[int] | None) -> np.ndarray:
        """The sorted item ids of a constraint's ``items`` (None = all)."""
        return np.arange(self.num_items) if items is None else np.unique(np.asarray(items, dtype=np.int64))

    def member_mask(self, items: Sequence[int] | None) -> np.ndarray:
        """``[N]`` bool: items a constraint covers."""
        mask = np.zeros(self.num_items, dtype=bool)
        mask[self.item_indices(items)] = True
        return mask

    def masked_weights(self, budget: Budget) -> np.ndarray:
        """``[N, C]`` weights of ``budget``, zero for items it does not cover and for choices not allowed."""
        weights = np.where(self.allowed, budget.weights, 0.0)
        return np.where(self.member_mask(budget.items)[:, None], weights, 0.0)

    # ----- checking a solution ---------------------------------------------------------------------------------
    def evaluate(self, choices: Sequence[int]) -> "KnapsackSolution":
        """The objective and budget usage of an assignment ``choices`` ``[N]``, and whether it is feasible."""
        choices = np.asarray(choices, dtype=np.int64)
        rows = np.arange(self.num_items)
        usage = {budget.name: float(self.masked_weights(budget)[rows, choices].sum()) for budget in self.budgets}
        return KnapsackSolution(choices=choices, objective=float(self.costs[rows, choices].sum()), usage=usage,
                                method="evaluate")

    def violations(self, choices: Sequence[int], *, tolerance: float = 1e-9) -> list[str]:
        """Every constraint ``choices`` breaks, in words (empty when feasible)."""
        choices = np.asarray(choices, dtype=np.int64)
        problems = []
        if choices.shape != (self.num_items,) or choices.min() < 0 or choices.max() >= self.num_choices:
            return [f"choices must be {self.num_items} indices in [0, {self.num_choices})"]
        rows = np.arange(self.num_items)
        not_allowed = np.flatnonzero(~self.allowed[rows, choices])
        if not_allowed.size:
            problems.append(f"items {not_allowed[:10].tolist()} take a choice that is not allowed")
        for budget in self.budgets:
            used = float(self.masked_weights(budget)[rows, choices].sum())
            if used > budget.limit + tolerance * max(1.0, abs(budget.limit)):
                problems.append(f"budget {budget.name!r}: uses {used:g} > limit {budget.limit:g}")
        for constraint in self.at_least:
            members = self.item_indices(constraint.items)
            taken = int(np.isin(choices[members], list(constraint.choices)).sum())
            if taken < constraint.count:
                problems.append(f"{constraint.name!r}: {taken} items take choices "
                                f"{[self.label(c) for c in constraint.choices]}, need {constraint.count}")
        return problems

    # ----- validation ------------------------------------------------------------------------------------------
    def _check_budget(self, index: int, budget: Budget) -> None:
        budget.weights = np.asarray(budget.weights, dtype=np.float64)
        if budget.weights.shape != self.costs.shape:
            raise SolverError(f"budget {budget.name!r}: weights have shape {budget.weights.shape}, costs "
                              f"{self.costs.shape}; give one weight per (item, choice)")
        finite = np.where(self.allowed, budget.weights, 0.0)
        if not np.isfinite(finite).all() or (finite < 0).any():
            raise SolverError(f"budget {budget.name!r}: weights of allowed choices must be finite and >= 0")
        if not np.isfinite(budget.limit):
            raise SolverError(f"budget {budget.name!r}: limit must be finite, got {budget.limit}")
        self._check_items(budget.name, budget.items)

    def _check_at_least(self, constraint: AtLeast) -> None:
        choices = list(constraint.choices)
        if not choices or min(choices) < 0 or max(choices) >= self.num_choices:
            raise SolverError(f"{constraint.name!r}: choices {choices} must be non-empty indices in "
                              f"[0, {self.num_choices})")
        if constraint.count < 0:
            raise SolverError(f"{constraint.name!r}: count must be >= 0, got {constraint.count}")
        self._check_items(constraint.name, constraint.items)

    def _check_items(self, name: str, items: Sequence[int] | None) -> None:
        if items is None:
            return
        ids = np.asarray(items, dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.num_items:
            raise SolverError(f"{name!r}: items must be non-empty ids in [0, {self.num_items})")


@dataclass
class KnapsackSolution:
    """choices ``[N]`` (choice index per item), objective (total cost), usage (per budget name), method, and for
    the DP how weights were discretised (``{budget: {"unit": u, "exact": bool}}``)."""

    choices: np.ndarray
    objective: float
    usage: dict[str, float]
    method: str
    discretisation: dict[str, dict] | None = None

    def labels(self, problem: MultipleChoiceKnapsack) -> list:
        """The chosen choice of every item, by label (e.g. bit-width)."""
        return [problem.label(int(choice)) for choice in self.choices]
