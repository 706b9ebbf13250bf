"""Copy the full model's row of a benchmarks/mcmoe.py result file into a benchmarks/pruning.py result file (same
tasks, limits and items, so the full model need not be scored twice).

    python scripts/seed_full_row.py results/base_mx.json results/pruning_fix_mx.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(source: str, target: str) -> int:
    row = next(row for row in json.loads(Path(source).read_text())["rows"] if row["config"] == "full")
    path = Path(target)
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["runs"]["full"] = {key: row[key] for key in ("scores", "items", "documents", "mean_acc_mutual_info",
                                                          "mean_bits_per_byte")}
    results["runs"]["full"]["seeded_from"] = source
    path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
