"""One compress over 1 and over N ranks (``compress --nproc N``, gloo on CPU): wall-clock time, the GPTQ sweep's time
and each rank's peak memory, the runs alternating so that a change in the machine's load hits both.

    python benchmarks/ranks.py --model moe-ref-mx --nproc 1,2 --samples 64 --seq-len 512 --repeats 3
    python benchmarks/ranks.py --model /tmp/moecompress-bench-3gb --nproc 1,2 --samples 8 --seq-len 128 \\
        --stages prune+gptq --budget-fraction 0.34     # the 2.76 GiB checkpoint of calibration_memory.py

The machine's cores are shared out: N ranks get ``--cores / N`` threads each (1 rank: all of them), so the ratio
compares the same hardware used two ways. Peak memory per rank is each rank's ``ru_maxrss`` at the end of the
model's last edit (``report.json``: ``ranks.peak_memory_bytes``) and, independently, the highest resident memory a
watchdog saw for each process of the run (polled every 20 ms; with ``--budget-fraction`` a process above that share
of the checkpoint size is killed and the run fails). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, TESTBED_CALIB, testbed_model

DEMO_MODEL = REPO_ROOT / "demo" / "models" / "moe-ref-q3"


def recipe(stages: str, samples: int, seq_len: int, batch_size: int, bits: int) -> dict:
    gptq = {"method": "gptq", "bits": bits, "group_size": 128}
    chain = [{"method": "prune_frequency", "keep_ratio": 0.75}, gptq] if stages == "prune+gptq" else [gptq]
    return {"calibration": {"files": [str(TESTBED_CALIB)], "num_samples": samples, "seq_len": seq_len,
                            "batch_size": batch_size}, "stages": chain}


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(child) for child in children]
        frontier += [int(child) for child in children]
    return found


def resident(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(command: list[str], budget: int | None) -> tuple[float, dict[int, int], subprocess.CompletedProcess | None]:
    """Run ``command`` watching the resident memory of each of its processes; ``(seconds, {pid: peak}, result)``."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"})
        peaks: dict[int, int] = {}
        killed = False
        while process.poll() is None:
            for pid in descendants(process.pid):
                peaks[pid] = max(peaks.get(pid, 0), resident(pid))
            if budget and max(peaks.values(), default=0) > budget:
                for pid in reversed(descendants(process.pid)):
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
                killed = True
                break
            time.sleep(0.02)
        process.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    return seconds, peaks, None if killed else result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moe-ref-mx", help="a test-bed model name or a checkpoint folder")
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--stages", choices=["gptq", "prune+gptq"], default="gptq")
    parser.add_argument("--dtype", default="auto", help="compress --dtype (float32 for the random bf16 checkpoint)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-fraction", type=float, default=None,
                        help="kill a process above this share of the checkpoint size (and fail)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    model = Path(args.model) if Path(args.model).is_dir() else testbed_model(args.model)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a random checkpoint borrows the demo's tokenizer
        if not (model / name).is_file():
            (model / name).write_bytes((DEMO_MODEL / name).read_bytes())
    checkpoint_bytes = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    budget = int(checkpoint_bytes * args.budget_fraction) if args.budget_fraction else None
    work = Path(tempfile.mkdtemp(prefix="moecompress-ranks-"))
    recipe_path = work / "recipe.json"
    recipe_path.write_text(json.dumps(recipe(args.stages, args.samples, args.seq_len, args.batch_size, args.bits)))
    counts = [int(n) for n in args.nproc.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for repeat in range(args.repeats):
        for nproc in counts:
            out = work / f"out-{nproc}"
            command = [sys.executable, "-m", "moecompress", "compress", str(model), "--recipe", str(recipe_path),
                       "--out", str(out), "--overwrite", "--dtype", args.dtype,
                       "--threads", str(max(1, args.cores // nproc)), "--log-dir", str(work / "logs")]
            if nproc > 1:
                command += ["--nproc", str(nproc)]
            seconds, peaks, result = run(command, budget)
            if result is None:
                raise SystemExit(f"{nproc} rank(s): a process went over the memory budget of "
                                 f"{budget / 2**30:.2f} GiB ({max(peaks.values()) / 2**30:.2f} GiB)")
            if result.returncode != 0:
                raise SystemExit(f"{nproc} rank(s) failed:\n{result.stderr[-3000:]}")
            report = json.loads((out / "report.json").read_text())
            runs[nproc].append({"wall": seconds, "sweep": report["timings"].get("stream layers"),
                                "rank_peaks": report["ranks"]["peak_memory_bytes"],
                                "watchdog_peaks": sorted(peaks.values(), reverse=True)[:nproc + 1]})
            print(f"repeat {repeat + 1}, {nproc} rank(s): {seconds:.1f} s", file=sys.stderr)
    print(f"{model.name}: {checkpoint_bytes / 2**30:.2f} GiB checkpoint, {args.stages}, {args.samples} x "
          f"{args.seq_len} tokens, {args.bits}-bit, {args.cores} cores shared by the ranks")
    base = statistics.median(run_["wall"] for run_ in runs[counts[0]])
    base_sweep = statistics.median(run_["sweep"] for run_ in runs[counts[0]])
    for nproc in counts:
        walls = [run_["wall"] for run_ in runs[nproc]]
        sweeps = [run_["sweep"] for run_ in runs[nproc]]
        peaks = [max(run_["rank_peaks"]) for run_ in runs[nproc]]
        print(f"{nproc} rank(s): wall {statistics.median(walls):.1f} s (range {min(walls):.1f}-{max(walls):.1f}), "
              f"speed-up {base / statistics.median(walls):.2f}x; sweep {statistics.median(sweeps):.1f} s, "
              f"speed-up {base_sweep / statistics.median(sweeps):.2f}x; peak memory per rank "
              f"{[round(p / 2**30, 2) for p in runs[nproc][-1]['rank_peaks']]} GiB (largest over repeats "
              f"{max(peaks) / 2**30:.2f} GiB)")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()},
                                             "checkpoint_bytes": checkpoint_bytes, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
