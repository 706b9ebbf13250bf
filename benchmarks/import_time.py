"""How long ``import moecompress`` takes, in whole new processes, for two checkouts side by side.

    python benchmarks/import_time.py --before /path/to/other/checkout --after . --runs 20

Each run is ``python -c "import moecompress"`` in a fresh process with that checkout first on ``PYTHONPATH``; the
two checkouts alternate run by run, so a machine growing busier affects both alike. Reported per checkout: the
median and range of the wall time of the whole process, its peak resident memory, and how many modules the import
loaded (and whether torch and transformers were among them), which does not depend on the machine's load. Run it
on a quiet machine: the times are only comparable there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBE = ("import sys, moecompress, resource; print(len(sys.modules), 'torch' in sys.modules, "
         "'transformers' in sys.modules, moecompress.__file__, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def one_run(checkout: Path) -> tuple[float, list[str]]:
    """``(seconds, the probe's output fields)`` of one fresh process."""
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, cwd="/")
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{checkout}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return seconds, done.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout (the repository root) to compare with")
    parser.add_argument("--after", type=Path, default=Path("."), help="this checkout (default: .)")
    parser.add_argument("--runs", type=int, default=20, help="processes per checkout (default 20)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, dict] = {name: {"seconds": [], "peak_kib": []} for name in checkouts}
    for _ in range(args.runs):
        for name, checkout in checkouts.items():
            seconds, (modules, has_torch, has_transformers, location, peak) = one_run(checkout)
            if not location.startswith(str(checkout)):
                raise SystemExit(f"{name}: imported {location}, not the checkout {checkout}")
            results[name]["seconds"].append(seconds)
            results[name]["peak_kib"].append(int(peak))
            results[name].update(modules=int(modules), torch=has_torch == "True",
                                 transformers=has_transformers == "True")
    summary = {}
    for name, numbers in results.items():
        seconds = numbers["seconds"]
        summary[name] = {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
                         "peak_mib": max(numbers["peak_kib"]) / 1024, "modules": numbers["modules"],
                         "imports_torch": numbers["torch"], "imports_transformers": numbers["transformers"]}
    summary["ratio_after_over_before"] = summary["after"]["median_s"] / summary["before"]["median_s"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name in checkouts:
        row = summary[name]
        print(f"{name:>6}: median {row['median_s']:.3f} s (range {row['min_s']:.3f}-{row['max_s']:.3f}) over "
              f"{args.runs} processes, peak {row['peak_mib']:.0f} MiB, {row['modules']} modules, torch "
              f"{'yes' if row['imports_torch'] else 'no'}, transformers {'yes' if row['imports_transformers'] else 'no'}")
    print(f"after / before: {summary['ratio_after_over_before']:.3f}")


if __name__ == "__main__":
    main()
