"""Expert pruning and merging benchmark: every method at several keep counts on a test-bed model, scored on tasks.

    python benchmarks/pruning.py --model moe-ref-q3 --profiles pycode,general --keeps 24,16,8 \
        --tasks tb_code_next,tb_ppl_pycode --json-out results/pruning_q3.json
    python benchmarks/pruning.py --model moe-ref-mx --profiles general --keeps 6,4 \
        --tasks tb_code_next,tb_kjv_next,tb_austen_next --json-out results/pruning_mx.json
    python benchmarks/pruning.py --model moe-ref-ds --profiles general --keeps 24,16 --group-balanced both \
        --tasks tb_code_next,tb_kjv_next,tb_austen_next --json-out results/pruning_ds.json
    python benchmarks/pruning.py --table results/pruning_q3.json     # print the markdown table of a finished run
    python benchmarks/pruning.py --model moe-ref-q3 --profiling-cost --threads 1  # each method's cost vs one pass

A profile is the calibration text the methods are tuned on (``../shared/testbed/calib``, never the tasks):
``general`` = all eight domains mixed, or one domain name (``pycode``) = that domain's file only. For each profile
the original model gets ONE calibration pass collecting every statistic any method needs (super experts too); each
method then runs on a copy of the model from those cached statistics (no method needs another pass) and the result
is scored with moecompress's lm-eval machinery (fp32, CPU). Results are written after every model, and a rerun with
the same ``--json-out`` skips what is already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from _common import TESTBED_CALIB, add_repo_to_path, add_threads_argument, set_offline, set_threads, testbed_model

set_offline()
add_repo_to_path()

PRUNERS = ("prune_frequency", "prune_ean", "prune_reap", "prune_premoe", "prune_naee")
MERGERS = ("merge_uncurl", "merge_hcsmoe", "merge_msmoe")
PRIMARY_METRIC = {"tb_ppl_pycode": "word_perplexity"}
NAEE_MAX_TOKENS = 512  # cached block inputs per layer for NAEE's search (the stage's default is 2048)


def stage_for(method: str, keep: int, group_balanced: bool):
    from moecompress.pipeline import STAGE_REGISTRY
    from moecompress.recipe import known_methods

    known_methods()  # imports every stage module
    options = {"num_experts_to_keep": keep}
    if method == "prune_naee":
        options["max_tokens"] = NAEE_MAX_TOKENS
    if group_balanced:
        options["group_balanced"] = True
    return STAGE_REGISTRY[method](options)


def profile_statistics(model, calibration, stages) -> tuple[dict, list[str], dict, int]:
    """One pass over the original model collecting what every stage asks for (with its options): per-layer
    statistics, their names, their options, the number of decoder layers."""
    from moecompress.calibration import LayerwiseRunner

    names = ["max_abs_expert_output", "expert_token_counts"]
    options: dict[str, dict] = {}
    for stage in stages:
        names += [name for name in stage.statistics if name not in names]
        if hasattr(stage, "statistics_options"):
            options.update(stage.statistics_options())
    run = LayerwiseRunner.from_source(model).run(calibration, names, options=options, batch_size=8)
    return run.layers, set(names), options, run.num_hidden_layers


def cached_context(model, tokenizer, source: str, calibration, super_experts, statistics, names, options,
                   output_dir: Path):
    """A run context whose statistics cache holds the profiling pass, so a stage decides without another pass."""
    from moecompress.pipeline import RunContext

    return RunContext(model=model, tokenizer=tokenizer, source=source, output_dir=output_dir,
                      calibration=calibration, super_experts=list(super_experts), batch_size=8,
                      statistics_cache=statistics, statistics_names=set(names), statistics_options=dict(options))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moe-ref-q3")
    parser.add_argument("--profiles", default="general", help="comma-separated: general and/or calibration domains")
    parser.add_argument("--keeps", default="16", help="comma-separated experts kept (merged) per layer")
    parser.add_argument("--methods", default=",".join(PRUNERS + MERGERS))
    parser.add_argument("--group-balanced", choices=("no", "yes", "both"), default="no",
                        help="group_balanced for the pruners (DeepSeek-V3); merges never")
    parser.add_argument("--tasks", default="tb_code_next")
    parser.add_argument("--limit", type=int, default=250)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    add_threads_argument(parser, 2)
    parser.add_argument("--json-out", type=Path, required=False)
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of finished runs and exit")
    parser.add_argument("--profiling-cost", action="store_true",
                        help="time each method's profiling (its statistics pass and its decision) against one plain "
                             "calibration pass over the same tokens, and exit")
    args = parser.parse_args(argv)
    if args.table:
        for path in args.table:
            print(markdown_table(json.loads(path.read_text())))
        return 0
    if args.profiling_cost:
        return profiling_cost(args)

    import torch

    from moecompress.analysis.super_experts import find_super_experts
    from moecompress.calibration import load_calibration
    from moecompress.checkpoint import load_model
    from moecompress.evals import evaluate_model

    set_threads(args.threads)
    tasks = args.tasks.split(",")
    results = json.loads(args.json_out.read_text()) if args.json_out and args.json_out.exists() else {}
    results.setdefault("command", " ".join(["python benchmarks/pruning.py", *(argv or sys.argv[1:])]))
    results.setdefault("runs", {})

    def save():
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(results, indent=1))

    source = testbed_model(args.model)
    model, tokenizer = load_model(str(source), dtype=torch.float32)
    if "full" not in results["runs"]:
        results["runs"]["full"] = {"scores": evaluate_model(model, tokenizer, tasks, limit=args.limit, batch_size=32)}
        save()
        print("full", results["runs"]["full"]["scores"], flush=True)
    methods = args.methods.split(",")
    balanced_choices = {"no": [False], "yes": [True], "both": [False, True]}[args.group_balanced]
    for profile in args.profiles.split(","):
        files = [TESTBED_CALIB] if profile == "general" else [TESTBED_CALIB / f"{profile}.jsonl"]
        calibration = load_calibration(tokenizer, files=[str(f) for f in files], num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=0)
        plan = [(method, keep, balanced) for keep in map(int, args.keeps.split(",")) for method in methods
                for balanced in balanced_choices if not (balanced and method in MERGERS)]
        todo = [item for item in plan if _key(profile, *item) not in results["runs"]]
        if not todo:
            continue
        statistics, names, options, num_layers = profile_statistics(model, calibration,
                                                                    [stage_for(m, k, b) for m, k, b in todo])
        super_experts = find_super_experts(statistics, num_layers).routed
        for method, keep, balanced in todo:
            pruned = copy.deepcopy(model)
            context = cached_context(pruned, tokenizer, str(source), calibration, super_experts, statistics, names,
                                     options, Path(f"/tmp/pruning-bench/{args.model}"))
            result = stage_for(method, keep, balanced).run(context)
            scores = evaluate_model(pruned, tokenizer, tasks, limit=args.limit, batch_size=32)
            results["runs"][_key(profile, method, keep, balanced)] = {
                "profile": profile, "method": method, "keep": keep, "group_balanced": balanced, "scores": scores,
                "extra_calibration_passes": context.calibration_passes,
                "super_experts": [list(p) for p in super_experts]}
            save()
            print(_key(profile, method, keep, balanced), scores, flush=True)
            del pruned, context, result
    print(markdown_table(results))
    return 0


def profiling_cost(args) -> int:
    """Per method, on the general profile: seconds of the calibration pass collecting that method's statistics
    (with its options) plus seconds of its decision and edit, against one plain calibration pass (the layer-wise
    runner counting routed tokens only) over the same tokens, in one process, one after the other."""
    import torch

    from moecompress.analysis.super_experts import find_super_experts
    from moecompress.calibration import LayerwiseRunner, load_calibration
    from moecompress.checkpoint import load_model

    set_threads(args.threads)
    model, tokenizer = load_model(str(testbed_model(args.model)), dtype=torch.float32)
    calibration = load_calibration(tokenizer, files=[str(TESTBED_CALIB)], num_samples=args.num_samples,
                                   seq_len=args.seq_len, seed=0)
    keep = int(args.keeps.split(",")[0])
    LayerwiseRunner.from_source(model).run(calibration, ["expert_token_counts"], batch_size=8)  # warm-up
    started = time.perf_counter()
    LayerwiseRunner.from_source(model).run(calibration, ["expert_token_counts"], batch_size=8)
    plain_seconds = time.perf_counter() - started
    print(f"`python benchmarks/pruning.py --model {args.model} --profiling-cost --keeps {keep} --num-samples "
          f"{args.num_samples} --seq-len {args.seq_len} --threads {args.threads}`: one plain calibration pass "
          f"({args.num_samples} x {args.seq_len} tokens) = {plain_seconds:.2f} s\n")
    print("| method | statistics pass (s) | decision + edit (s) | total (s) | total / plain pass |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        stage = stage_for(method, keep, False)
        started = time.perf_counter()
        statistics, names, options, num_layers = profile_statistics(model, calibration, [stage])
        pass_seconds = time.perf_counter() - started
        pruned = copy.deepcopy(model)
        context = cached_context(pruned, tokenizer, args.model, calibration,
                                 find_super_experts(statistics, num_layers).routed, statistics, names, options,
                                 Path("/tmp/pruning-cost"))
        started = time.perf_counter()
        stage.run(context)
        decision_seconds = time.perf_counter() - started
        total = pass_seconds + decision_seconds
        print(f"| {method} | {pass_seconds:.2f} | {decision_seconds:.2f} | {total:.2f} | {total / plain_seconds:.2f}x |",
              flush=True)
        del pruned, context
    return 0


def _key(profile: str, method: str, keep: int, balanced: bool) -> str:
    return f"{profile}/{method}/{keep}" + ("/group_balanced" if balanced else "")


def _metric(task: str, scores: dict) -> float:
    metric = PRIMARY_METRIC.get(task, "acc_mutual_info")
    return scores.get(task, {}).get(metric, float("nan"))


def markdown_table(results: dict) -> str:
    """One row per (profile, method, group_balanced), one column per (keep, task); the full model first."""
    runs = results["runs"]
    full = runs["full"]["scores"]
    tasks = list(full)
    keeps = sorted({run["keep"] for key, run in runs.items() if key != "full"}, reverse=True)
    columns = [(keep, task) for keep in keeps for task in tasks]
    multi_task = len([t for t in tasks if t not in PRIMARY_METRIC]) > 1
    if multi_task:
        columns = [(keep, "mean") for keep in keeps]
    header = ["profile", "method"] + [f"{keep} kept: {task}" for keep, task in columns]
    lines = [f"`{results.get('command', '')}`", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]

    def cell(scores, task):
        if task == "mean":
            values = [_metric(t, scores) for t in tasks if t not in PRIMARY_METRIC]
            return f"{sum(values) / len(values):.3f}"
        value = _metric(task, scores)
        return f"{value:.2f}" if task in PRIMARY_METRIC else f"{value:.3f}"

    lines.append("| - | full model | " + " | ".join(cell(full, task) for _, task in columns) + " |")
    rows = {}
    for key, run in runs.items():
        if key == "full":
            continue
        name = run["method"] + (" (group_balanced)" if run["group_balanced"] else "")
        rows.setdefault((run["profile"], name), {})[run["keep"]] = run["scores"]
    for (profile, name), by_keep in rows.items():
        cells = [cell(by_keep[keep], task) if keep in by_keep else "" for keep, task in columns]
        lines.append(f"| {profile} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
