"""Exact dynamic program for the multiple-choice knapsack (the default solver).

**State.** Items are visited one at a time. The state holds, for every constraint that is *open* (its first item
visited, its last not yet), how much of it is used: budget units spent so far (an axis of ``limit_units + 1``
entries) or the number of items that took one of its choices so far (an axis of ``count + 1`` entries, saturating
at ``count``). ``V[state]`` is the least cost reaching it. A constraint opens at its first item and closes after
its last (a budget by the minimum over its axis, a count by keeping only "count reached"), so per-layer budgets and
per-layer side constraints cost one layer's axes at a time: items are ordered so that constraints over the same
items are contiguous.

**Discretisation.** Budgets are enforced on integer units. Each item's cheapest allowed weight is subtracted first
(it is spent whatever the choice), which shrinks the axes. When every remaining weight is an integer (bits, bytes,
parameters), the unit is their greatest common divisor, the limit is floored to whole units (which loses nothing)
and the DP is exact for the real instance. Otherwise (or when the axis would exceed ``resolution`` units) the unit
is ``min(limit, heaviest total) / resolution``, weights are
rounded *up* and the limit down: every DP solution is then feasible for the real instance, and optimal for the
rounded one (the solution's ``discretisation`` says which case applied). A budget that can never bind is dropped.

Only the units the items visited so far can reach are computed at each step.

**Backtracking.** The forward pass keeps the state only at a few checkpoints; each segment is recomputed
(keeping its states) and traced back from its end, so memory follows ``memory_bytes``, not ``N`` times the state.
Ties go to the lowest choice index.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from moecompress.solvers.problem import InfeasibleError, KnapsackSolution, MultipleChoiceKnapsack, SolverError

DEFAULT_RESOLUTION = 200_000  # budget units per budget when weights are not integers (or too many)
DEFAULT_MAX_STATES = 20_000_000  # entries of the state tensor before the DP refuses (use milp instead)
DEFAULT_MEMORY_BYTES = 256 * 2**20  # states kept for backtracking at one time


@dataclass
class _Dimension:
    """One open-able axis of the state: a budget (units per item and choice) or an at-least counter."""

    kind: str  # "budget" | "count"
    size: int  # axis length
    members: np.ndarray  # [N] bool
    units: np.ndarray | None = None  # budget: [N, C] int64
    counts: np.ndarray | None = None  # count: [C] bool, choices that count
    reach: np.ndarray | None = None  # budget: [N] highest reachable units before each item (set by _events)


def solve_dp(problem: MultipleChoiceKnapsack, *, resolution: int = DEFAULT_RESOLUTION,
             max_states: int = DEFAULT_MAX_STATES, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> KnapsackSolution:
    """The optimal assignment of ``problem`` (exact for the discretised instance, see the module docstring).

    Raises :class:`InfeasibleError` when the (discretised) instance has no feasible assignment, and
    :class:`SolverError` when the state would exceed ``max_states`` entries.
    """
    dimensions, discretisation = _dimensions(problem, resolution)
    order = _item_order(problem)
    events = _events(dimensions, order)
    peak = _peak_state_size(dimensions, events)
    if peak > max_states:
        raise SolverError(f"the DP state would hold {peak:,} entries (more than max_states={max_states:,}): too many "
                          "budget units or overlapping constraints; use method='milp', or a coarser resolution")
    costs = problem.costs
    segment_length = max(1, memory_bytes // (8 * peak))
    checkpoints = []
    values, open_dims = np.zeros(()), []
    for start in range(0, len(events), segment_length):
        checkpoints.append((start, values, list(open_dims)))
        if start + segment_length < len(events):  # the last segment runs once, inside _backtrack
            for event in events[start:start + segment_length]:
                values, open_dims = _apply(event, values, open_dims, dimensions, costs)
    choices = _backtrack(checkpoints, events, segment_length, dimensions, costs)
    if choices is None:
        where = ", ".join(f"{name}: unit {info['unit']:g}" for name, info in discretisation.items()
                          if not info["exact"])
        hint = f" after discretising budgets ({where}); raise `resolution` or use method='milp'" if where else ""
        raise InfeasibleError(f"no assignment meets every constraint{hint}")
    solution = problem.evaluate(choices)
    solution.method = "dp"
    solution.discretisation = discretisation
    return solution


# ----- setting up ------------------------------------------------------------------------------------------------
def _dimensions(problem: MultipleChoiceKnapsack, resolution: int) -> tuple[list[_Dimension], dict]:
    """The state axes: one per binding budget (integer units) and one per at-least constraint with count > 0."""
    allowed = problem.allowed
    dimensions, discretisation = [], {}
    for budget in problem.budgets:
        weights = problem.masked_weights(budget)
        base = np.where(allowed, weights, np.inf).min(axis=1)  # spent whatever the choice
        extra = np.where(allowed, weights - base[:, None], 0.0)
        limit = budget.limit - base.sum()
        units, limit_units, unit, exact = _discretise(extra, limit, resolution)
        discretisation[budget.name] = {"unit": unit, "exact": exact}
        if limit_units < 0:
            raise InfeasibleError(f"budget {budget.name!r}: even the lightest choices use {base.sum():g} > limit "
                                  f"{budget.limit:g}")
        most_units = int(np.where(allowed, units, 0).max(axis=1).sum())
        if limit_units >= most_units:
            continue  # never binding
        dimensions.append(_Dimension("budget", limit_units + 1, problem.member_mask(budget.items), units=units))
    for constraint in problem.at_least:
        if constraint.count == 0:
            continue
        counts = np.zeros(problem.num_choices, dtype=bool)
        counts[list(constraint.choices)] = True
        dimensions.append(_Dimension("count", constraint.count + 1, problem.member_mask(constraint.items),
                                     counts=counts))
    return dimensions, discretisation


def _discretise(extra: np.ndarray, limit: float, resolution: int) -> tuple[np.ndarray, int, float, bool]:
    """Integer units of ``extra`` ``[N, C]`` (>= 0) and of ``limit``: ``(units, limit_units, unit, exact)``."""
    if limit < 0:
        return np.zeros(extra.shape, dtype=np.int64), -1, 1.0, True
    rounded = np.round(extra)
    if (np.abs(extra - rounded) <= 1e-6).all():  # integers (bits, bytes, parameters): exact in their gcd
        positive = rounded[rounded > 0].astype(np.int64)
        unit = int(np.gcd.reduce(positive)) if positive.size else 1
        units = rounded.astype(np.int64) // unit
        limit_units = int(math.floor(limit / unit + 1e-9))
        if min(limit_units, int(units.max(axis=1).sum())) <= resolution:
            return units, limit_units, float(unit), True
    cap = min(limit, float(extra.max(axis=1).sum()))
    if cap <= 0:  # the limit is exactly the lightest choices: any positive extra weight is infeasible
        return (extra > 0).astype(np.int64), 0, 1.0, True
    unit = cap / resolution
    units = np.ceil(extra / unit - 1e-9).astype(np.int64)
    return units, int(math.floor(limit / unit + 1e-9)), unit, False


def _item_order(problem: MultipleChoiceKnapsack) -> np.ndarray:
    """Items sorted so that each restricted constraint's items are contiguous where the constraints allow."""
    restricted = [c.items for c in [*problem.budgets, *problem.at_least] if c.items is not None]
    memberships = [problem.member_mask(items) for items in restricted]
    keys = [tuple(index for index, members in enumerate(memberships) if members[item])
            for item in range(problem.num_items)]
    return np.array(sorted(range(problem.num_items), key=lambda item: (keys[item], item)), dtype=np.int64)


def _events(dimensions: list[_Dimension], order: np.ndarray) -> list[tuple[str, int]]:
    """``("open", dim)``, ``("item", item)``, ``("close", dim)`` in visiting order."""
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    opens: dict[int, list[int]] = {}
    closes: dict[int, list[int]] = {}
    for index, dimension in enumerate(dimensions):
        positions = position[dimension.members]
        opens.setdefault(int(positions.min()), []).append(index)
        closes.setdefault(int(positions.max()), []).append(index)
        if dimension.kind == "budget":  # the heaviest choices of the items visited before bound the used units
            heaviest_in_order = np.where(dimension.members, dimension.units.max(axis=1), 0)[order]
            reach_in_order = np.minimum(np.cumsum(heaviest_in_order) - heaviest_in_order, dimension.size - 1)
            dimension.reach = np.empty(len(order), dtype=np.int64)
            dimension.reach[order] = reach_in_order
    events = []
    for step, item in enumerate(order.tolist()):
        events += [("open", index) for index in opens.get(step, [])]
        events.append(("item", item))
        events += [("close", index) for index in closes.get(step, [])]
    return events


def _peak_state_size(dimensions: list[_Dimension], events: list[tuple[str, int]]) -> int:
    size, peak = 1, 1
    for kind, index in events:
        if kind == "open":
            size *= dimensions[index].size
        elif kind == "close":
            size //= dimensions[index].size
        peak = max(peak, size)
    return peak


# ----- forward ---------------------------------------------------------------------------------------------------
def _apply(event, values: np.ndarray, open_dims: list[int], dimensions, costs) -> tuple[np.ndarray, list[int]]:
    """One event on the state tensor ``values`` (axes = ``open_dims`` in order)."""
    kind, index = event
    if kind == "open":  # a new first axis; nothing used yet. (Long-lived axes, opened first, stay innermost and
        grown = np.full((dimensions[index].size,) + values.shape, np.inf)  # contiguous: the shifts run fast.)
        grown[0] = values
        return grown, [index, *open_dims]
    if kind == "close":
        axis = open_dims.index(index)
        remaining = [dim for dim in open_dims if dim != index]
        if dimensions[index].kind == "budget":
            return values.min(axis=axis), remaining
        return np.take(values, dimensions[index].size - 1, axis=axis), remaining
    return _item_step(index, values, open_dims, dimensions, costs), open_dims


def _item_step(item: int, values: np.ndarray, open_dims: list[int], dimensions, costs) -> np.ndarray:
    """``new[s] = min_c values[s - step(c)] + cost(item, c)`` over the item's allowed choices.

    Each choice is a few in-place minimums over shifted views (no shifted copies: this is the hot loop).
    """
    best = np.full(values.shape, np.inf)
    for choice in np.flatnonzero(np.isfinite(costs[item])):
        per_axis = [_axis_moves(dimensions[index], item, choice, values.shape[axis])
                    for axis, index in enumerate(open_dims)]
        if any(not moves for moves in per_axis):
            continue  # the choice overflows a budget from every state
        for moves in itertools.product(*per_axis):
            target = tuple(move[0] for move in moves)
            source = tuple(move[1] for move in moves)
            np.minimum(best[target], values[source] + costs[item, choice], out=best[target])
    return best


def _axis_moves(dimension: _Dimension, item: int, choice: int, size: int) -> list[tuple[slice, slice]]:
    """``(target, source)`` slices along one axis for ``item`` taking ``choice``: a budget shifts by the choice's
    units (what falls off the end is infeasible); a counter shifts by one and saturates at its last entry."""
    if not dimension.members[item]:
        return [(slice(None), slice(None))]
    if dimension.kind == "budget":  # only states up to the reachable units hold finite values: skip the rest
        amount = int(dimension.units[item, choice])
        length = min(int(dimension.reach[item]) + 1, size - amount)
        if length <= 0:
            return []
        return [(slice(amount, amount + length), slice(0, length))]
    if not dimension.counts[choice]:
        return [(slice(None), slice(None))]
    last = size - 1
    return [(slice(1, None), slice(0, last)), (slice(last, None), slice(last, None))]


# ----- backtracking ----------------------------------------------------------------------------------------------
def _backtrack(checkpoints, events, segment_length, dimensions, costs) -> np.ndarray | None:
    """Trace the optimal assignment back from the final (scalar) state, one recomputed segment at a time.

    Returns the choice per item ``[N]``, or None when the final state is infeasible.
    """
    choices = np.full(costs.shape[0], -1, dtype=np.int64)
    state: tuple[int, ...] = ()
    for segment, (start, values, open_dims) in enumerate(reversed(checkpoints)):
        history = []  # (values before, open dims before) for each event of the segment
        for event in events[start:start + segment_length]:
            history.append((values, open_dims))
            values, open_dims = _apply(event, values, open_dims, dimensions, costs)
        if segment == 0 and not np.isfinite(values):  # the last segment ends in the final (scalar) state
            return None
        for event, (before, before_dims) in zip(reversed(events[start:start + segment_length]), reversed(history)):
            target = values[state]
            state = _previous_state(event, state, target, before, before_dims, dimensions, costs, choices)
            values = before
    return choices


def _previous_state(event, state, target, before, before_dims, dimensions, costs, choices) -> tuple[int, ...]:
    """The state before ``event`` from which ``target`` (the value at ``state`` after it) was reached."""
    kind, index = event
    if kind == "open":
        return state[1:]
    if kind == "close":
        axis = before_dims.index(index)
        if dimensions[index].kind == "count":
            return state[:axis] + (dimensions[index].size - 1,) + state[axis:]
        for used in range(dimensions[index].size):
            candidate = state[:axis] + (used,) + state[axis:]
            if before[candidate] == target:
                return candidate
        raise AssertionError("DP backtracking lost the optimum at a budget close")  # pragma: no cover
    item = index
    for choice in np.flatnonzero(np.isfinite(costs[item])):
        for candidate in _predecessors(item, choice, state, before_dims, dimensions):
            if before[candidate] + costs[item, choice] == target:
                choices[item] = choice
                return candidate
    raise AssertionError("DP backtracking lost the optimum at an item")  # pragma: no cover


def _predecessors(item, choice, state, open_dims, dimensions):
    """States before ``item`` took ``choice`` that lead to ``state`` (a saturated counter has two)."""
    options = []
    for axis, index in enumerate(open_dims):
        dimension = dimensions[index]
        position = state[axis]
        if not dimension.members[item]:
            options.append([position])
        elif dimension.kind == "budget":
            used = position - int(dimension.units[item, choice])
            if used < 0:
                return []
            options.append([used])
        elif dimension.counts[choice]:
            if position == 0:
                return []
            last = dimension.size - 1
            options.append([position - 1, last] if position == last else [position - 1])
        else:
            options.append([position])
    return [tuple(candidate) for candidate in itertools.product(*options)]
