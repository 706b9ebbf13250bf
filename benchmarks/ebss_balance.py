"""Expert-usage balance of EBSS calibration sets against the test-bed text calibration (same size).

For each model: the text calibration (the test bed's calib folder, seeded sampling over its eight domains) and
EBSS sets for each ``--settings`` entry (``tau`` or ``tau:ngN`` for ``no_repeat_ngram=N``; ``paper`` or
``paper:ngN`` for ``preset: moequant_paper``, the paper's sigma on counts of the child sequence at tau 1.2; ``paperT``
for that preset at tau T), all ``--num-samples x --seq-len`` tokens.
sigma = per MoE layer the unbiased std of the top-k selection frequencies over the whole set, averaged over layers
(methods.md 4; the same measure for every set, whatever balance term generated it). Sets are cached
(``--cache-dir``), so a second run only re-measures.

    python benchmarks/ebss_balance.py --models moe-ref-q3,moe-ref-mx --num-samples 16 --seq-len 128 \\
        --settings inf,1.2,0.01,1.2:ng4,0.01:ng4,0.001:ng4
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from _common import TESTBED_CALIB, add_threads_argument, set_threads, testbed_model
from moecompress.calibration import load_calibration
from moecompress.calibration.ebss import EbssOptions, expert_usage_std, generate_ebss
from moecompress.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="moe-ref-q3,moe-ref-mx")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--settings", default="inf,1.2,0.01,1.2:ng4,0.01:ng4,0.001:ng4")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser, 1)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    set_threads(args.threads)

    rows = []
    for name in args.models.split(","):
        model, tokenizer = load_model(testbed_model(name), dtype=torch.float32)
        text = load_calibration(tokenizer, files=[TESTBED_CALIB], num_samples=args.num_samples,
                                seq_len=args.seq_len, seed=args.seed)
        rows.append((name, "test-bed text (8 domains)", expert_usage_std(model, text.input_ids)[0], "", ""))
        for setting in args.settings.split(","):
            tau_text, _, ngram_text = setting.partition(":")
            ngram = int(ngram_text.removeprefix("ng")) if ngram_text else None
            paper = tau_text.startswith("paper")
            tau = float(tau_text.removeprefix("paper") or 1.2)
            options = EbssOptions(num_samples=args.num_samples, seq_len=args.seq_len, tau=tau, seed=args.seed,
                                  no_repeat_ngram=ngram, preset="moequant_paper" if paper else None)
            started = time.perf_counter()
            ebss = generate_ebss(model, tokenizer, options, cache_dir=args.cache_dir)
            seconds = "cached" if ebss.from_cache else f"{time.perf_counter() - started:.0f}"
            label = "plain beam search" if math.isinf(options.tau) else f"tau {options.tau:g}"
            label += " (paper: counts, child)" if paper else ""
            label += f", no_repeat_ngram {ngram}" if ngram else ""
            sample = tokenizer.decode(ebss.input_ids[0, 1:40]).replace("\n", "\\n").replace("|", "/")
            rows.append((name, f"EBSS {label}", ebss.usage_std, seconds, sample))
            print(rows[-1], flush=True)
    print(f"\n{args.num_samples} x {args.seq_len} tokens per set\n")
    print("| model | calibration set | usage std (mean over layers) | generation s | start of the first sequence |")
    print("|---|---|---:|---:|---|")
    for name, label, sigma, seconds, sample in rows:
        print(f"| {name} | {label} | {sigma:.4f} | {seconds} | {sample[:60]} |")


if __name__ == "__main__":
    main()
