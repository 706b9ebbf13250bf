"""Are two sets of compress outputs the same? For every run folder in BEFORE, the folder of the same name in AFTER:
every safetensors tensor bit for bit (dtype, shape, values), config.json and the index, and report.json /
export_report.json with timings, versions and absolute paths left out. Exit status: the number of folders that differ.

    python scripts/compare_runs.py runs-before/ runs-after/

Used to check that a refactoring changes nothing (the same recipes run with the old and the new code).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

# What differs between two runs of the same work: timings, memory, versions, and where it ran (ranks of a run).
VOLATILE = {"seconds", "seconds_per_layer", "timings", "peak_memory_bytes", "versions", "resumed", "source", "ranks"}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                out[key] = handle.get_tensor(key)
    return out


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return value.rsplit("/", 1)[-1]  # absolute paths differ between the two sets: compare the names
    return value


def difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """How much two same-shaped tensors differ: elements that differ, and the largest |a - b| (as float64)."""
    differ = a != b
    largest = (a.double() - b.double()).abs().max().item()
    return f"{int(differ.sum())} of {a.numel()} elements, max |diff| {largest:.3g}"


def compare_folder(a: Path, b: Path) -> tuple[list[str], int]:
    problems = []
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        problems.append(f"{a.name}: tensor keys differ: {sorted(set(ta) ^ set(tb))[:5]}")
    for key in sorted(set(ta) & set(tb)):
        if ta[key].dtype != tb[key].dtype or ta[key].shape != tb[key].shape:
            problems.append(f"{a.name}: tensor {key} differs in dtype or shape")
        elif not torch.equal(ta[key], tb[key]):
            problems.append(f"{a.name}: tensor {key} differs: {difference(ta[key], tb[key])}")
    for name in ("config.json", "model.safetensors.index.json"):
        if (a / name).exists() or (b / name).exists():
            ca, cb = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            ca.pop("transformers_version", None), cb.pop("transformers_version", None)
            if ca != cb:
                problems.append(f"{a.name}: {name} differs")
    for name in ("report.json", "export_report.json"):
        if (a / name).exists():
            ra, rb = strip(json.loads((a / name).read_text())), strip(json.loads((b / name).read_text()))
            if ra != rb:
                keys = [k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)]
                problems.append(f"{a.name}: {name} differs in {keys}")
    return problems, len(ta)


def main(before: Path, after: Path) -> int:
    failures = 0
    for folder in sorted(p for p in before.iterdir() if p.is_dir() and not p.name.startswith(".")):
        other = after / folder.name
        if not other.is_dir():
            print(f"MISSING {folder.name} in {after}")
            failures += 1
            continue
        problems, count = compare_folder(folder, other)
        print(f"{'OK  ' if not problems else 'DIFF'} {folder.name}: {count} tensors" + ("" if not problems else "\n  " + "\n  ".join(problems[:10])))
        failures += bool(problems)
    return failures


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
