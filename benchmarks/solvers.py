"""Time the three knapsack solvers (exact DP, HiGHS, CBC) on PMQ-shaped instances of 64, 1,024 and 6,144 experts.

Each instance is a model's routed experts (``layers x experts``: 8 x 8, 16 x 64, 24 x 256) choosing a width among
``--bits`` (default 1/2/3/4) with an MC-MoE-like cost (``frequency x weight mass x error(bits)``), every 97th expert
pinned at the widest width (a super expert), and at least one expert per layer at each of the two middle widths.
Two budgets shapes:

* ``per-layer``: ``avg_bits`` per layer, one budget per layer (the reference code's problem, all layers at once);
* ``global``: one budget over the whole model (``target_size``).

Every solver's objective is checked against the others. Run on a quiet machine (timings are best of
``--repeats``)::

    python benchmarks/solvers.py --repeats 3 [--markdown]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moecompress.solvers import AtLeast, Budget, MultipleChoiceKnapsack, solve

SIZES = {64: (8, 8), 1024: (16, 64), 6144: (24, 256)}


def instance(layers: int, experts: int, bits: np.ndarray, avg_bits: float, shape: str,
             seed: int = 0) -> MultipleChoiceKnapsack:
    rng = np.random.default_rng(seed)
    items = layers * experts
    frequency, mass = rng.dirichlet(np.ones(experts), layers).ravel(), rng.random(items)
    error = rng.lognormal(0.0, 0.5, (items, 1)) * np.exp(-0.7 * bits)[None, :]
    costs = 1000 * frequency[:, None] * mass[:, None] * error
    costs[::97, :-1] = np.inf
    groups = [list(range(layer * experts, (layer + 1) * experts)) for layer in range(layers)]
    middle = [len(bits) // 2 - 1, len(bits) // 2] if len(bits) > 2 else [0]
    at_least = [AtLeast([choice], 1, group, name=f"layer{layer}_{bits[choice]:g}bit")
                for layer, group in enumerate(groups) for choice in middle]
    weights = np.tile(bits, (items, 1))
    if shape == "global":
        budgets = [Budget(weights, avg_bits * items, name="bits")]
    else:
        budgets = [Budget(weights, avg_bits * experts, items=group, name=f"layer{layer}")
                   for layer, group in enumerate(groups)]
    return MultipleChoiceKnapsack(costs, budgets, at_least, choice_labels=bits.tolist())


def best_of(repeats: int, function) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,1024,6144", help="comma-separated expert counts (64, 1024, 6144)")
    parser.add_argument("--bits", default="1,2,3,4")
    parser.add_argument("--avg-bits", type=float, default=2.5)
    parser.add_argument("--methods", default="dp,milp,pulp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    bits = np.array([float(value) for value in args.bits.split(",")])
    methods = args.methods.split(",")

    rows = []
    for size in (int(value) for value in args.sizes.split(",")):
        layers, experts = SIZES[size]
        for shape in ("per-layer", "global"):
            problem = instance(layers, experts, bits, args.avg_bits, shape)
            seconds, objectives = {}, {}
            for method in methods:
                seconds[method], solution = best_of(args.repeats, lambda: solve(problem, method))
                objectives[method] = solution.objective
            reference = objectives[methods[0]]
            agree = all(abs(value - reference) <= 1e-9 * max(1.0, abs(reference)) for value in objectives.values())
            rows.append((size, f"{layers}x{experts}", shape, seconds, agree))
            if not args.markdown:
                print(f"{size:>5} experts ({layers}x{experts}) {shape:>9}: "
                      + "  ".join(f"{method} {seconds[method]:.3f} s" for method in methods)
                      + f"  same optimum: {agree}", flush=True)
    if args.markdown:
        header = " | ".join(f"{method} (s)" for method in methods)
        print(f"| experts | layers x experts | budget | {header} | same optimum |")
        print("|---:|---|---|" + "---:|" * len(methods) + "---|")
        for size, layout, shape, seconds, agree in rows:
            print(f"| {size:,} | {layout} | {shape} | " + " | ".join(f"{seconds[m]:.3f}" for m in methods)
                  + f" | {'yes' if agree else 'NO'} |")


if __name__ == "__main__":
    main()
