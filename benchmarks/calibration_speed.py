"""Cost of a calibration pass against a plain forward over the same tokens, in one process.

For each test-bed model (in memory, fp32, eager experts, CPU):

* ``plain``: ``model.model(input_ids)`` batch by batch, transformers' own eager experts loop (no lm head: the
  calibration pass does not compute logits either);
* ``layerwise``: moecompress's layer-by-layer runner with no statistics (catch + sweep overhead only);
* ``calibration``: the runner collecting every statistic except the opt-in ones (Hessians, all-token expert
  outputs): router logit mean/Gram, TCESS, counts (overall and per domain), routing-weight sums (raw,
  renormalised, combine), REAP and EAN sums, max |expert output| (routed and shared), top-2 ratio histogram,
  CAMERA energies;
* ``+hessians``: the same plus the four per-expert Hessians (reported, not part of the 1.5x claim).

Each timing is the best of ``--repeats`` runs. Thread count is fixed (``--threads``, default 1): on a shared
2-core machine several threads made every variant slower and noisier.

    python benchmarks/calibration_speed.py --num-samples 32 --seq-len 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import TESTBED, add_threads_argument, set_threads
from moecompress.calibration import STATISTICS, LayerwiseRunner, load_calibration

OPT_IN = {"mean_expert_output_all_tokens", "expert_input_hessian", "expert_input_hessian_affinity",
          "down_proj_hessian", "down_proj_hessian_affinity"}
HESSIANS = ["expert_input_hessian", "expert_input_hessian_affinity", "down_proj_hessian", "down_proj_hessian_affinity"]


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, default=TESTBED)
    parser.add_argument("--models", nargs="+", default=["moe-ref-q3", "moe-ref-mx", "moe-ref-ds"])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    add_threads_argument(parser, 1)
    args = parser.parse_args()
    set_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    default_names = sorted(set(STATISTICS) - OPT_IN)
    print(f"{args.num_samples} x {args.seq_len} tokens, batch {args.batch_size}, {args.threads} thread(s), fp32 CPU")
    print(f"calibration statistics: {', '.join(default_names)}")
    print("| model | plain forward (s) | layerwise, no stats (s) | calibration pass (s) | ratio to plain | "
          "+ Hessians (s) | ratio to plain |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        folder = args.testbed / "models" / name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        calibration = load_calibration(tokenizer, files=[args.testbed / "calib"], num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager")
        model.eval()
        runner = LayerwiseRunner.from_source(model)

        def plain():
            with torch.no_grad():
                for start in range(0, args.num_samples, args.batch_size):
                    model.model(input_ids=calibration.input_ids[start:start + args.batch_size], use_cache=False)

        plain_seconds = best_of(args.repeats, plain)
        layerwise_seconds = best_of(args.repeats, lambda: runner.run(calibration, [], batch_size=args.batch_size))
        calibration_seconds = best_of(args.repeats, lambda: runner.run(calibration, default_names, batch_size=args.batch_size))
        hessian_seconds = best_of(1, lambda: runner.run(calibration, default_names + HESSIANS, batch_size=args.batch_size))
        print(f"| {name} | {plain_seconds:.2f} | {layerwise_seconds:.2f} | {calibration_seconds:.2f} | "
              f"{calibration_seconds / plain_seconds:.2f}x | {hessian_seconds:.2f} | {hessian_seconds / plain_seconds:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
