"""One process against the peer: moecompress's GPTQ and llm-compressor 0.14's GPTQ, back to back, same model, same
calibration tokens, same threads. Wall time of each whole command (process start to exit, as a user waits), plus the
phases each side reports.

    python benchmarks/peer_gptq.py --model moe-ref-mx --samples 64 --seq-len 512 --bits 2 --group-size 128 \\
        --threads 2 --repeats 3 --json-out results/peer_gptq.json

Ours: ``moecompress compress MODEL --recipe R --threads T`` with a GPTQ-only recipe at the defaults (``mse`` scales,
streamed). The peer: ``benchmarks/llmcompressor_gptq.py`` in ``--peer-python``'s venv (default
``/work/venvs/llmc/bin/python``), given the very token ids moecompress calibrates on. The two alternate
(ours, peer, ours, peer, ...) so that a change in the machine's load hits both; the table shows the median and range.
Run it on a quiet machine (``flock /work/locks/heavy.lock`` on the project's machines). ``--skip-peer`` times ours
alone (no llm-compressor venv needed).
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

from _common import REPO_ROOT, TESTBED_CALIB, add_repo_to_path, set_offline, testbed_model

set_offline()
add_repo_to_path()

PEER_SCRIPT = Path(__file__).with_name("llmcompressor_gptq.py")


def calibration_tokens(model: Path, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """The token ids moecompress calibrates on for this recipe (its own sampling of the test bed's text)."""
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    calibration = load_calibration(tokenizer, files=[str(TESTBED_CALIB)], num_samples=samples, seq_len=seq_len,
                                   seed=seed)
    return calibration.input_ids.tolist()


def recipe(samples: int, seq_len: int, bits: int, group_size: int, seed: int, scale_search: str | None) -> dict:
    gptq = {"method": "gptq", "bits": bits, "group_size": group_size}
    if scale_search:
        gptq["scale_search"] = scale_search
    return {"calibration": {"files": [str(TESTBED_CALIB)], "num_samples": samples, "seq_len": seq_len, "seed": seed},
            "stages": [gptq]}


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def run_ours(model: Path, recipe_path: Path, out: Path, threads: int) -> dict:
    command = [sys.executable, "-m", "moecompress", "compress", str(model), "--recipe", str(recipe_path),
               "--out", str(out), "--threads", str(threads), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    seconds, _ = timed(command, env)
    report = json.loads((out / "report.json").read_text())
    return {"wall": seconds, "phases": report["timings"]}


def run_peer(python: str, model: Path, tokens: Path, out: Path, bits: int, group_size: int, threads: int) -> dict:
    command = [python, str(PEER_SCRIPT), str(model), str(out), str(tokens), "--bits", str(bits),
               "--group-size", str(group_size), "--threads", str(threads)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    seconds, stdout = timed(command, {**env, "TQDM_DISABLE": "1"})
    return {"wall": seconds, "phases": json.loads(stdout.strip().splitlines()[-1])}


def summary(walls: list[float]) -> str:
    return f"{statistics.median(walls):.1f} s (range {min(walls):.1f}-{max(walls):.1f}, n={len(walls)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="moe-ref-mx")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-search", choices=["mse", "minmax"], default=None, help="ours (default: the stage's)")
    parser.add_argument("--peer-python", default="/work/venvs/llmc/bin/python")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    model = testbed_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="moecompress-peer-"))
    recipe_path = work / "recipe.json"  # YAML is a superset of JSON
    recipe_path.write_text(json.dumps(recipe(args.samples, args.seq_len, args.bits, args.group_size, args.seed,
                                             args.scale_search)))
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps({"input_ids": calibration_tokens(model, args.samples, args.seq_len, args.seed)}))
    ours, peer = [], []
    for repeat in range(args.repeats):
        ours.append(run_ours(model, recipe_path, work / "ours", args.threads))
        print(f"repeat {repeat + 1}: ours {ours[-1]['wall']:.1f} s", file=sys.stderr)
        if not args.skip_peer:
            peer.append(run_peer(args.peer_python, model, tokens, work / f"peer-{repeat}", args.bits, args.group_size,
                                 args.threads))
            print(f"repeat {repeat + 1}: peer {peer[-1]['wall']:.1f} s", file=sys.stderr)
    print(f"{args.model}, {args.samples} x {args.seq_len} tokens, {args.bits}-bit group {args.group_size}, "
          f"{args.threads} threads")
    print(f"moecompress GPTQ (whole command): {summary([run['wall'] for run in ours])}")
    phases = ours[-1]["phases"]
    print("  last run's phases (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items()))
    if peer:
        print(f"llm-compressor GPTQ (whole command): {summary([run['wall'] for run in peer])}; "
              f"in oneshot {summary([run['phases']['oneshot'] for run in peer])}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"arguments": vars(args) | {"json_out": str(args.json_out)},
                                             "ours": ours, "peer": peer}, indent=1))


if __name__ == "__main__":
    main()
