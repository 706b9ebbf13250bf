"""MC-MoE benchmark: PMQ bit allocation against uniform, random and frequency-only allocations of the same widths,
the joint prune-and-quantize budget against prune-then-quantize at the same bytes, ODP skipped calls vs quality,
and GPTQ calibrated on EBSS vs on text.

    python benchmarks/mcmoe.py --models moe-ref-mx --configs full,uniform2,pmq,random,frequency --limit 100
    python benchmarks/mcmoe.py --models moe-ref-mx --configs joint,prune_then_quantize --target 2.75bpp-experts
    python benchmarks/mcmoe.py --models moe-ref-mx --configs odp0.5,odp0.3
    python benchmarks/mcmoe.py --models moe-ref-mx --configs uniform2,uniform2_ebss
    python benchmarks/mcmoe.py --merge runs/mcmoe-*.json            # one table from earlier runs
    python benchmarks/mcmoe.py --compare runs/mcmoe-*.json          # paired differences (pmq - uniform2/random/...)

Every configuration runs the compression pipeline in fp32 on ``--num-samples x --seq-len`` tokens of the test-bed
calibration text (all domains, seeded), saves the model, reloads it with ``moecompress.checkpoint.load_model`` and scores
it: mean ``acc_mutual_info`` over tb_code_next, tb_kjv_next, tb_austen_next (``--limit`` items each) and mean
``bits_per_byte`` over tb_ppl_pycode, tb_ppl_kjv, tb_ppl_austen (``--ppl-limit`` documents each). Expert bits are
the mean nominal width over routed experts (dropped experts count 0); ``expert bytes`` is what the saved routed experts
take (packed words, scales, zero points). Quantiser: GPTQ, groups of ``--group-size``, symmetric, scales by
``--scale-search``. Each row keeps the per-item correctness of the accuracy tasks, so that ``--compare`` gives paired
differences on the same items with a 95% bootstrap interval (``moecompress.evals.paired``).

Configurations:
  full                 the unquantised model
  uniform2             every expert GPTQ 2-bit
  pmq                  mcmoe_pmq avg_bits ``--avg-bits`` over {2, 3, 4} (Hessian proxy), then GPTQ at those widths
  random               PMQ's widths per layer, shuffled over the experts (seeded): the same size
  frequency            PMQ's widths per layer, the widest to the most frequently selected experts: the same size
  joint                mcmoe_pmq candidates {0, 2, 3, 4}, target_size ``--target``: pruning and widths in one knapsack
  prune_then_quantize  prune_frequency to ``--keep`` experts per layer, then mcmoe_pmq {2, 3, 4} at the same target
  odp<q>               the full model with mcmoe_odp (thresholds = quantile q of w_r/w_0, 2% protected tokens);
                       reports the fraction of expert calls skipped while scoring
  uniform2_ebss        uniform2 calibrated on an EBSS set (tau 1.2, beam 4) of the same size instead of text
  uniform2_ebss_balanced  the same with tau 0.001 and no_repeat_ngram 4 (the setting where the balance term works
                       on the test bed, benchmarks/ebss_balance.py)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from _common import (TESTBED_CALIB, add_merge_compare_arguments, add_repo_to_path, add_threads_argument,
                     print_merged_or_compared, set_offline, set_threads, testbed_model)

set_offline()
add_repo_to_path()

ACCURACY_TASKS = ("tb_code_next", "tb_kjv_next", "tb_austen_next")
PERPLEXITY_TASKS = ("tb_ppl_pycode", "tb_ppl_kjv", "tb_ppl_austen")

import pydantic  # noqa: E402
import torch  # noqa: E402

from moecompress.checkpoint import load_model  # noqa: E402
from moecompress.models import find_moe_blocks  # noqa: E402
from moecompress.pipeline import RunContext, Stage, StageOptions, StageResult, register_stage  # noqa: E402


class _FixedWidthsOptions(StageOptions):
    widths: dict[str, list[int]]
    order: str = pydantic.Field(..., pattern="^(random|frequency)$")
    seed: int = 0


@register_stage
class FixedWidthsStage(Stage):
    """Benchmark-only allocator: the given per-layer widths, placed at random or by selection frequency."""

    method = "benchmark_fixed_widths"
    Options = _FixedWidthsOptions
    statistics = ("expert_token_counts",)

    def run(self, context: RunContext) -> StageResult:
        generator = random.Random(self.options.seed)
        counts = context.statistics(["expert_token_counts"]) if self.options.order == "frequency" else None
        placed = {}
        for layer, widths in self.options.widths.items():
            widths = sorted(widths, reverse=True)
            if counts is None:
                generator.shuffle(widths)
                placed[layer] = widths
                continue
            by_frequency = torch.argsort(counts[int(layer)]["expert_token_counts"], descending=True).tolist()
            placed[layer] = [0] * len(widths)
            for rank, expert in enumerate(by_frequency):
                placed[layer][expert] = widths[rank]
        context.bit_map = {(int(layer), expert): bits for layer, values in placed.items()
                           for expert, bits in enumerate(values)}
        return StageResult(decisions={"bit_widths": placed})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="moe-ref-mx,moe-ref-q3")
    parser.add_argument("--configs", default="full,uniform2,pmq,random,frequency")
    parser.add_argument("--avg-bits", type=float, default=2.5)
    parser.add_argument("--target", default="2.75bpp-experts", help="target_size of joint / prune_then_quantize")
    parser.add_argument("--keep", type=int, default=None, help="experts per layer prune_then_quantize keeps "
                        "(default: three quarters)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=100, help="items per multiple-choice task")
    parser.add_argument("--ppl-limit", type=int, default=40, help="documents per perplexity task")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json-out", type=Path, default=Path("runs/mcmoe.json"))
    parser.add_argument("--scale-search", default="minmax", choices=["minmax", "mse"], help="GPTQ's group scales")
    add_merge_compare_arguments(parser)
    add_threads_argument(parser, None)
    args = parser.parse_args(argv)
    if print_merged_or_compared(args, markdown_table, comparison_table):
        return 0
    set_threads(args.threads)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.json_out.read_text())["rows"] if args.json_out.exists() else []
    for model_name in args.models.split(","):
        pmq_widths = None
        for config in args.configs.split(","):
            if config in ("random", "frequency") and pmq_widths is None:
                pmq_widths = next((row["bit_widths"] for row in rows
                                   if row["model"] == model_name and row["config"] == "pmq"), None)
                if pmq_widths is None:
                    raise SystemExit(f"{config} needs the pmq row of {model_name}: run config pmq first")
            row = run_configuration(args, model_name, config, pmq_widths)
            if config == "pmq":
                pmq_widths = row["bit_widths"]
            rows = [old for old in rows if (old["model"], old["config"]) != (model_name, config)] + [row]
            args.json_out.write_text(json.dumps({"rows": rows}, indent=1))
            print(markdown_table([row], header=False), file=sys.stderr, flush=True)
    print(markdown_table(rows))
    return 0


def stages_for(args, config: str, pmq_widths, num_experts: int) -> tuple[list, dict]:
    """The pipeline stages of one configuration and its calibration section."""
    from moecompress.pruning.frequency import FrequencyPruning
    from moecompress.quantization.odp import ODPStage
    from moecompress.quantization.pmq import PMQStage
    from moecompress.quantization.stages import GPTQStage

    calibration = {"files": [str(TESTBED_CALIB)], "num_samples": args.num_samples, "seq_len": args.seq_len,
                   "seed": 0}
    gptq = GPTQStage({"bits": 2, "group_size": args.group_size, "scale_search": args.scale_search})
    pmq = {"group_size": args.group_size}
    if config == "full":
        return [], calibration
    if config == "uniform2":
        return [gptq], calibration
    if config == "uniform2_ebss":
        return [gptq], {**calibration, "ebss": {"tau": 1.2, "beam": 4, "compare_text": True}}
    if config == "uniform2_ebss_balanced":
        return [gptq], {**calibration, "ebss": {"tau": 0.001, "beam": 4, "no_repeat_ngram": 4, "compare_text": True}}
    if config == "pmq":
        return [PMQStage({**pmq, "avg_bits": args.avg_bits, "candidates": [2, 3, 4]}), gptq], calibration
    if config in ("random", "frequency"):
        return [FixedWidthsStage({"widths": pmq_widths, "order": config}), gptq], calibration
    if config == "joint":
        return [PMQStage({**pmq, "target_size": args.target, "candidates": [0, 2, 3, 4], "at_least_one": []}),
                gptq], calibration
    if config == "prune_then_quantize":
        keep = args.keep or (3 * num_experts) // 4
        return [FrequencyPruning({"num_experts_to_keep": keep}),
                PMQStage({**pmq, "target_size": whole_model_bytes(args), "candidates": [2, 3, 4],
                          "at_least_one": []}),
                gptq], calibration
    if config.startswith("odp"):
        return [ODPStage({"quantile": float(config[3:]), "protect_fraction": 0.02})], calibration
    raise SystemExit(f"unknown configuration {config!r}")


def whole_model_bytes(args) -> str:
    """``--target`` as bytes of the whole model, so that pruning first does not shrink a per-parameter budget."""
    from moecompress.models.summary import model_summary
    from moecompress.quantization.pmq import parse_target_size

    target = parse_target_size(args.target)
    if target.kind == "bytes":
        return args.target
    summary = model_summary(load_model(testbed_model(args.current_model), dtype=torch.float32)[0])
    rest = summary["bytes"]["total"] - summary["bytes"]["routed_experts"]
    if target.kind == "bpp_experts":
        return f"{int(rest + target.value * summary['parameters']['routed_experts'] / 8)}B"
    return f"{int(target.value * summary['parameters']['total'] / 8)}B"


def run_configuration(args, model_name: str, config: str, pmq_widths) -> dict:
    from moecompress.evals import evaluate_model, run_lm_eval, scores_from_results
    from moecompress.evals.paired import item_scores
    from moecompress.pipeline import Pipeline
    from moecompress.quantization.odp import reset_odp_counters, skipped_fractions

    source = testbed_model(model_name)
    args.current_model = model_name
    num_experts = find_moe_blocks(load_model(source)[0])[0].num_experts
    stages, calibration = stages_for(args, config, pmq_widths, num_experts)
    with tempfile.TemporaryDirectory(prefix="mcmoe-bench-") as folder:
        report = {"stages": []}
        if stages:
            report = Pipeline(stages, calibration=calibration).run(source, Path(folder) / "out", dtype="float32")
            model, tokenizer = load_model(Path(folder) / "out", dtype=torch.float32)
        else:
            model, tokenizer = load_model(source, dtype=torch.float32)
        reset_odp_counters(model)
        results = run_lm_eval(model, tokenizer, list(ACCURACY_TASKS), limit=args.limit, log_samples=True)
        scores, items = scores_from_results(results), item_scores(results, "acc_mutual_info")
        scores.update(evaluate_model(model, tokenizer, list(PERPLEXITY_TASKS), limit=args.ppl_limit))
        skipped = skipped_fractions(model)
        bit_widths = {}
        for view in find_moe_blocks(model):
            bits = getattr(view.experts, "expert_bits", None)
            bit_widths[str(view.layer_index)] = bits.tolist() if bits is not None else [32] * view.num_experts
        pmq_decided = next((stage["decisions"]["bit_widths"] for stage in report["stages"]
                            if stage.get("method") == "mcmoe_pmq"), None)
        expert_bytes = sum(tensor.numel() * tensor.element_size() for view in find_moe_blocks(model)
                           for tensor in [*view.experts.parameters(), *view.experts.buffers()])
    allocated = pmq_decided or bit_widths
    # over the original experts: a pruned or dropped expert counts 0 bits
    total_bits = sum(bits for widths in allocated.values() for bits in widths)
    return {
        "model": model_name, "config": config, "bit_widths": pmq_decided or bit_widths,
        "mean_expert_bits": total_bits / (num_experts * len(allocated)), "expert_bytes": expert_bytes,
        "mean_acc_mutual_info": sum(scores[task]["acc_mutual_info"] for task in ACCURACY_TASKS) / len(ACCURACY_TASKS),
        "mean_bits_per_byte": sum(scores[task]["bits_per_byte"] for task in PERPLEXITY_TASKS) / len(PERPLEXITY_TASKS),
        "skipped_fraction": (sum(skipped.values()) / len(skipped)) if skipped else None,
        "skipped_per_layer": {str(layer): value for layer, value in skipped.items()},
        "scores": scores, "items": items, "scale_search": args.scale_search, "limit": args.limit,
        "ppl_limit": args.ppl_limit, "group_size": args.group_size,
        "target": args.target if config in ("joint", "prune_then_quantize") else None,
        "ebss_usage_std": _ebss_std(report),
    }


def _ebss_std(report: dict):
    calibration = report.get("calibration") or {}
    return calibration.get("ebss") if isinstance(calibration, dict) else None


PAIRS = (("pmq", "uniform2"), ("pmq", "random"), ("pmq", "frequency"), ("joint", "prune_then_quantize"),
         ("uniform2_ebss", "uniform2"), ("uniform2_ebss_balanced", "uniform2"),
         ("odp0.5", "full"), ("odp0.3", "full"))


def comparison_table(rows: list[dict]) -> str:
    """Paired differences ``a - b`` per model (rows of the same ``--limit`` and scales): mean accuracy on the same
    items with its 95% bootstrap interval, and mean bits per byte."""
    from moecompress.evals.paired import paired_differences

    lines = ["| model | pair | accuracy difference [95% CI] | bits/byte difference |", "|---|---|---|---:|"]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        if "items" in row:
            by_model.setdefault(row["model"], {})[row["config"]] = row
    for model, configs in by_model.items():
        items = {config: row["items"] for config, row in configs.items()}
        for first, second, difference in paired_differences(items, PAIRS, tasks=list(ACCURACY_TASKS)):
            bpb = configs[first]["mean_bits_per_byte"] - configs[second]["mean_bits_per_byte"]
            lines.append(f"| {model} | {first} - {second} | {difference} | {bpb:+.4f} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict], header: bool = True) -> str:
    lines = ["| model | configuration | mean expert bits | expert bytes | skipped expert calls | mean acc_mutual_info | "
             "mean bits/byte |", "|---|---|---:|---:|---:|---:|---:|"] if header else []
    for row in rows:
        bits = "fp32" if row["config"].startswith(("full", "odp")) else f"{row['mean_expert_bits']:.2f}"
        skipped = "-" if row.get("skipped_fraction") is None else f"{row['skipped_fraction']:.1%}"
        lines.append(f"| {row['model']} | {row['config']} | {bits} | {row['expert_bytes']:,} | {skipped} | "
                     f"{row['mean_acc_mutual_info']:.3f} | {row['mean_bits_per_byte']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
