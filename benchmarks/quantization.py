"""Quantisation benchmark: RTN vs GPTQ vs GPTQ+AGQ on the test-bed models, quality and (optionally) cost.

    python benchmarks/quantization.py                                   # mx and q3, 2/3/4 bits, groups 128 and 32
    python benchmarks/quantization.py --models moe-ref-mx --bits 2 --group-sizes 32 --limit 100
    python benchmarks/quantization.py --merge runs/quant-*.json         # print one table from earlier runs
    python benchmarks/quantization.py --timing --models moe-ref-q3      # GPTQ time vs one plain calibration pass
    python benchmarks/quantization.py --scale-search minmax,mse          # both scale rules, side by side
    python benchmarks/quantization.py --compare runs/quant-*.json        # paired differences with bootstrap CIs

Quality: mean ``acc_mutual_info`` over tb_code_next, tb_kjv_next, tb_austen_next (``--limit`` items per task) and
mean ``bits_per_byte`` over tb_ppl_pycode, tb_ppl_kjv, tb_ppl_austen (``--ppl-limit`` documents per task), each model quantised in fp32 on
calibration text from ``../shared/testbed/calib`` (all domains, seeded), never on the evaluation tasks.
Results are written after every configuration to ``--json-out``, so a long run keeps what it has; each row keeps
the per-item correctness of every accuracy task, so ``--compare`` can give paired differences (GPTQ - RTN and
AGQ - GPTQ on the same items) with a 95% bootstrap interval instead of comparing two noisy means.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import (TESTBED_CALIB, add_merge_compare_arguments, add_threads_argument, print_merged_or_compared,
                     set_offline, set_threads, stdout_to_stderr, testbed_model)

set_offline()

ACCURACY_TASKS = ("tb_code_next", "tb_kjv_next", "tb_austen_next")
PERPLEXITY_TASKS = ("tb_ppl_pycode", "tb_ppl_kjv", "tb_ppl_austen")
METHODS = {"rtn": {"method": "rtn"}, "gptq": {"method": "gptq"}, "gptq+agq": {"method": "gptq", "agq": True}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="moe-ref-mx,moe-ref-q3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-sizes", default="128,32")
    parser.add_argument("--limit", type=int, default=250, help="documents per multiple-choice task")
    parser.add_argument("--ppl-limit", type=int, default=None, help="documents per perplexity task (default: --limit)")
    parser.add_argument("--no-full", action="store_true", help="skip the unquantised model's row")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json-out", type=Path, default=Path("runs/quantization.json"))
    parser.add_argument("--scale-search", default="minmax", help="comma list of group-scale rules: minmax, mse")
    add_merge_compare_arguments(parser,
                                compare_help="paired differences (GPTQ - RTN, AGQ - GPTQ) of earlier runs' rows")
    parser.add_argument("--timing", action="store_true", help="measure GPTQ time against one calibration pass")
    add_threads_argument(parser, None)
    args = parser.parse_args(argv)
    if print_merged_or_compared(args, markdown_table, comparison_table):
        return 0

    set_threads(args.threads)
    if args.timing:
        return timing(args)
    rows = []
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    for model_name in args.models.split(","):
        if not args.no_full:
            rows.append(evaluate_configuration(args, model_name, None, None, None))
            _write(args.json_out, rows)
        for group_size in (int(size) for size in args.group_sizes.split(",")):
            for bits in (int(bits) for bits in args.bits.split(",")):
                for scale_search in args.scale_search.split(","):
                    for method in args.methods.split(","):
                        rows.append(evaluate_configuration(args, model_name, method, bits, group_size, scale_search))
                        _write(args.json_out, rows)
                        print(markdown_table(rows[-1:], header=False), file=sys.stderr)
    print(markdown_table(rows))
    return 0


def evaluate_configuration(args, model_name: str, method: str | None, bits: int | None, group_size: int | None,
                           scale_search: str = "minmax") -> dict:
    """Quantise (unless ``method`` is None: the full model) and score one configuration."""
    import torch

    from moecompress.calibration import load_calibration
    from moecompress.checkpoint import load_model
    from moecompress.evals import evaluate_model
    from moecompress.evals.paired import item_scores
    from moecompress.evals.runner import run_lm_eval, scores_from_results
    from moecompress.quantization.sequential import QuantizationSettings, quantize_model

    model, tokenizer = load_model(testbed_model(model_name), dtype=torch.float32)
    seconds = 0.0
    if method is not None:
        calibration = load_calibration(tokenizer, files=[TESTBED_CALIB], num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=0)
        started = time.perf_counter()
        settings = QuantizationSettings(bits=bits, group_size=group_size, scale_search=scale_search, **METHODS[method])
        quantize_model(model, settings, calibration)
        seconds = time.perf_counter() - started
    with stdout_to_stderr():
        results = run_lm_eval(model, tokenizer, list(ACCURACY_TASKS), limit=args.limit, log_samples=True)
        scores = scores_from_results(results)
        items = item_scores(results, "acc_mutual_info")
        scores.update(evaluate_model(model, tokenizer, list(PERPLEXITY_TASKS), limit=args.ppl_limit or args.limit))
    accuracy = sum(scores[task]["acc_mutual_info"] for task in ACCURACY_TASKS) / len(ACCURACY_TASKS)
    bits_per_byte = sum(scores[task]["bits_per_byte"] for task in PERPLEXITY_TASKS) / len(PERPLEXITY_TASKS)
    return {"model": model_name, "method": method or "full", "bits": bits, "group_size": group_size,
            "scale_search": scale_search if method else None, "mean_acc_mutual_info": accuracy,
            "mean_bits_per_byte": bits_per_byte, "scores": scores, "items": items, "quantize_seconds": seconds}


def markdown_table(rows: list[dict], header: bool = True) -> str:
    lines = ["| model | method | bits | group | scales | mean acc_mutual_info | mean bits/byte |",
             "|---|---|---:|---:|---|---:|---:|"] if header else []
    for row in rows:
        lines.append(f"| {row['model']} | {row['method']} | {row['bits'] or 'fp32'} | {row['group_size'] or '-'} | "
                     f"{row.get('scale_search') or '-'} | {row['mean_acc_mutual_info']:.3f} | "
                     f"{row['mean_bits_per_byte']:.3f} |")
    return "\n".join(lines)


PAIRS = (("gptq", "rtn"), ("gptq+agq", "gptq"))


def comparison_table(rows: list[dict]) -> str:
    """Paired differences ``a - b`` for each configuration (model, bits, group, scales) holding both methods: the
    mean accuracy difference on the same items with its 95% bootstrap interval
    (:func:`moecompress.evals.paired.paired_difference`), and the mean bits-per-byte difference."""
    from moecompress.evals.paired import paired_differences

    lines = ["| model | bits | group | scales | pair | accuracy difference [95% CI] | bits/byte difference |",
             "|---|---:|---:|---|---|---|---:|"]
    by_configuration: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["method"] != "full" and "items" in row:
            key = (row["model"], row["bits"], row["group_size"], row.get("scale_search") or "minmax")
            by_configuration.setdefault(key, {})[row["method"]] = row
    for (model, bits, group, scales), methods in by_configuration.items():
        items = {method: row["items"] for method, row in methods.items()}
        for first, second, difference in paired_differences(items, PAIRS, tasks=list(ACCURACY_TASKS)):
            bpb = methods[first]["mean_bits_per_byte"] - methods[second]["mean_bits_per_byte"]
            lines.append(f"| {model} | {bits} | {group} | {scales} | {first} - {second} | {difference} | "
                         f"{bpb:+.4f} |")
    return "\n".join(lines)


def timing(args) -> int:
    """GPTQ(+AGQ) on one model against one plain calibration pass over the same tokens (same process, in a row)."""
    import torch

    from moecompress.calibration import LayerwiseRunner, load_calibration
    from moecompress.checkpoint import load_model
    from moecompress.quantization.sequential import QuantizationSettings, quantize_model

    for model_name in args.models.split(","):
        model, tokenizer = load_model(testbed_model(model_name), dtype=torch.float32)
        calibration = load_calibration(tokenizer, files=[TESTBED_CALIB], num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=0)
        started = time.perf_counter()
        LayerwiseRunner(model).run(calibration, ["expert_token_counts"])
        plain = time.perf_counter() - started
        for method in ("gptq", "gptq+agq"):
            model, _ = load_model(testbed_model(model_name), dtype=torch.float32)
            started = time.perf_counter()
            settings = QuantizationSettings(bits=4, group_size=128, scale_search=args.scale_search.split(",")[0],
                                            **METHODS[method])
            quantize_model(model, settings, calibration)
            seconds = time.perf_counter() - started
            print(f"{model_name} {method}: {seconds:.1f} s = {seconds / plain:.1f}x one calibration pass "
                  f"({plain:.1f} s, {args.num_samples} x {args.seq_len} tokens)")
    return 0


def _write(path: Path, rows: list[dict]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"rows": rows}, indent=1))
    temporary.replace(path)


if __name__ == "__main__":
    sys.exit(main())
