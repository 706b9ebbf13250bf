"""Expert pruning and merging benchmark: every method at several keep counts on a test-bed model, scored on tasks.

    python benchmarks/pruning.py --model moe-ref-q3 --profiles pycode,general --keeps 24,16,8 \
        --tasks tb_code_next,tb_ppl_pycode --json-out results/pruning_q3.json
    python benchmarks/pruning.py --model moe-ref-mx --profiles general --keeps 6,4 \
        --tasks tb_code_next,tb_kjv_next,tb_austen_next --json-out results/pruning_mx.json
    python benchmarks/pruning.py --model moe-ref-ds --profiles general --keeps 24,16 --group-balanced both \
        --tasks tb_code_next,tb_kjv_next,tb_austen_next --json-out results/pruning_ds.json
    python benchmarks/pruning.py --table results/pruning_q3.json     # print the markdown table of a finished run
    python benchmarks/pruning.py --model moe-ref-q3 --profiling-cost --threads 1  # each method's cost vs one pass

With ``--ppl-tasks`` each run is scored like the quantisation benchmarks (``_common.score_model``): mean
``acc_mutual_info`` over ``--tasks`` with per-item scores, mean bits per byte over ``--ppl-tasks`` (``--ppl-limit``
documents) with per-document log-likelihoods, so that ``--compare`` prints paired differences (the recommended form
against its paper preset, each against frequency) with 95% bootstrap intervals:

    python benchmarks/pruning.py --model moe-ref-mx --profiles general --keeps 6,4 \
        --methods prune_reap,prune_reap_paper,merge_hcsmoe,merge_hcsmoe_paper,prune_frequency \
        --tasks tb_code_next,tb_kjv_next,tb_austen_next --ppl-tasks tb_ppl_pycode,tb_ppl_kjv,tb_ppl_austen \
        --json-out results/pruning_fix_mx.json
    python benchmarks/pruning.py --compare results/pruning_fix_mx.json

Method names are stage methods, or variants: ``prune_reap_paper`` / ``merge_hcsmoe_paper`` (the paper presets),
``prune_reap_freq`` / ``merge_hcsmoe_freq`` (frequency-weighted score / frequency seeds on every layer),
``prune_reap_progressive`` (``progressive: true``). ``--folder LABEL=PATH`` also scores a model folder made
elsewhere (e.g. llm-compressor's REAP) with the same tasks.

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

from _common import (TESTBED_CALIB, add_repo_to_path, add_threads_argument, calibration_bits_per_byte,
                     calibration_pieces, paired_rows, score_model, set_offline, set_threads, testbed_model)

set_offline()
add_repo_to_path()

PRUNERS = ("prune_frequency", "prune_ean", "prune_reap", "prune_premoe", "prune_naee")
# variants: name -> (stage method, options)
VARIANTS = {"prune_reap_paper": ("prune_reap", {"preset": "reap_paper"}),
            "prune_reap_progressive": ("prune_reap", {"progressive": True}),
            "prune_reap_paper_progressive": ("prune_reap", {"preset": "reap_paper", "progressive": True}),
            "merge_hcsmoe_paper": ("merge_hcsmoe", {"preset": "hcsmoe_paper"}),
            "prune_reap_freq": ("prune_reap", {"score": "frequency_weighted"}),
            "merge_hcsmoe_freq": ("merge_hcsmoe", {"clustering": "frequency_seeds"})}
PAIRS = (("prune_reap", "prune_reap_paper"), ("merge_hcsmoe", "merge_hcsmoe_paper"),
         ("prune_reap", "prune_reap_freq"), ("merge_hcsmoe", "merge_hcsmoe_freq"),
         ("prune_reap", "prune_frequency"), ("prune_reap_paper", "prune_frequency"),
         ("merge_hcsmoe", "prune_frequency"), ("merge_hcsmoe_paper", "prune_frequency"),
         ("prune_reap_progressive", "prune_reap_paper_progressive"))
MERGERS = ("merge_uncurl", "merge_hcsmoe", "merge_msmoe")
PRIMARY_METRIC = {"tb_ppl_pycode": "word_perplexity"}
NAEE_MAX_TOKENS = 512  # cached block inputs per layer for NAEE's search (the stage's default is 2048)


def stage_for(method: str, keep: int, group_balanced: bool):
    from moecompress.pipeline import STAGE_REGISTRY
    from moecompress.recipe import known_methods

    known_methods()  # imports every stage module
    method, variant_options = VARIANTS.get(method, (method, {}))
    options = {"num_experts_to_keep": keep, **variant_options}
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
    parser.add_argument("--ppl-tasks", default="", help="rolling-perplexity tasks scored as mean bits per byte "
                        "(turns on per-item and per-document records for --compare)")
    parser.add_argument("--ppl-limit", type=int, default=40, help="documents per --ppl-tasks task")
    parser.add_argument("--score", choices=("tasks", "calibration"), default="tasks",
                        help="calibration: bits per byte per 1,500-character piece of the calibration text (what "
                             "defaults are chosen on; pairable) instead of --tasks / --ppl-tasks")
    parser.add_argument("--folder", action="append", default=[], metavar="LABEL=PATH",
                        help="also score this model folder (made elsewhere) with the same tasks")
    parser.add_argument("--compare", type=Path, nargs="+", help="paired differences of finished runs and exit")
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
    if args.compare:
        for path in args.compare:
            print(comparison_table(json.loads(path.read_text())))
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

    def score(scored_model) -> dict:
        if args.score == "calibration":  # each domain is a "task" of pieces, so the tables and --compare read it
            scored = calibration_bits_per_byte(scored_model, tokenizer, calibration_pieces(TESTBED_CALIB))
            return {"scores": {domain: {"bits_per_byte": value} for domain, value in scored["per_domain"].items()},
                    "items": {}, "documents": scored["documents"], "mean_bits_per_byte": scored["mean"]}
        if not args.ppl_tasks:
            return {"scores": evaluate_model(scored_model, tokenizer, tasks, limit=args.limit, batch_size=32)}
        return score_model(scored_model, tokenizer, limit=args.limit, ppl_limit=args.ppl_limit,
                           accuracy_tasks=[task for task in tasks if task], perplexity_tasks=args.ppl_tasks.split(","))

    if "full" not in results["runs"]:
        results["runs"]["full"] = score(model)
        save()
        print("full", results["runs"]["full"]["scores"], flush=True)
    for entry in args.folder:
        label, _, path = entry.partition("=")
        if f"folder/{label}" not in results["runs"]:
            folder_model, _ = load_model(path, dtype=torch.float32)
            results["runs"][f"folder/{label}"] = {"profile": "-", "method": label, "keep": None,
                                                  "group_balanced": False, "path": path, **score(folder_model)}
            save()
            del folder_model
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
            scored = score(pruned)
            results["runs"][_key(profile, method, keep, balanced)] = {
                "profile": profile, "method": method, "keep": keep, "group_balanced": balanced, **scored,
                "kept_experts": result.decisions.get("kept_experts"), "clusters": result.decisions.get("clusters"),
                "extra_calibration_passes": context.calibration_passes,
                "super_experts": [list(p) for p in super_experts]}
            save()
            print(_key(profile, method, keep, balanced), scored["scores"], flush=True)
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


def comparison_table(results: dict) -> str:
    """Paired differences ``a - b`` (:data:`PAIRS`, each at every keep count both ran with the same profile) of
    runs scored with ``--ppl-tasks``: accuracy on the same items and bits per byte on the same documents, with 95%
    bootstrap intervals; each run against the full model and against every ``--folder`` run."""
    runs = results["runs"]
    tasks = list(runs["full"].get("items") or [])
    lines = [f"`{results.get('command', '')}`", "", "| profile | kept | pair | accuracy difference [95% CI] | "
             "bits/byte difference [95% CI] |", "|---|---:|---|---|---:|"]
    groups: dict[tuple, dict] = {}
    for run in runs.values():
        if run.get("keep") is not None and not run.get("group_balanced"):
            groups.setdefault((run["profile"], run["keep"]), {})[run["method"]] = run
    # --folder runs (e.g. a peer's output): every method of every keep count against each of them
    folders = {run["method"]: run for key, run in runs.items() if key != "full" and run.get("keep") is None}
    for (profile, keep), by_method in sorted(groups.items(), key=lambda item: (item[0][0], -item[0][1])):
        pairs = (list(PAIRS) + [(method, "full") for method in by_method]
                 + [(method, folder) for method in by_method for folder in folders])
        for first, second, accuracy, bpb in paired_rows({**by_method, **folders, "full": runs["full"]}, pairs,
                                                        accuracy_tasks=tasks):
            lines.append(f"| {profile} | {keep} | {first} - {second} | {accuracy} | {bpb} |")
    return "\n".join(lines)


def _key(profile: str, method: str, keep: int, balanced: bool) -> str:
    return f"{profile}/{method}/{keep}" + ("/group_balanced" if balanced else "")


def _metric(task: str, scores: dict) -> float:
    metric = PRIMARY_METRIC.get(task, "acc_mutual_info")
    return scores.get(task, {}).get(metric, float("nan"))


def markdown_table(results: dict) -> str:
    """One row per (profile, method, group_balanced), one column per (keep, task); the full model first."""
    runs = results["runs"]
    full = runs["full"]["scores"]
    ppl_tasks = list(runs["full"].get("documents") or [])  # runs scored with --ppl-tasks
    tasks = list(full)
    keeps = sorted({run["keep"] for key, run in runs.items() if key != "full" and run.get("keep") is not None},
                   reverse=True)
    columns = [(keep, task) for keep in keeps for task in tasks]
    multi_task = len([t for t in tasks if t not in PRIMARY_METRIC and t not in ppl_tasks]) > 1
    if multi_task:
        columns = [(keep, "mean") for keep in keeps]
    if ppl_tasks:
        tasks = [t for t in tasks if t not in PRIMARY_METRIC or t in ppl_tasks]
        columns = [(keep, kind) for keep in keeps for kind in (["mean"] if multi_task or len(tasks) > len(ppl_tasks)
                                                                 else []) + ["bits/byte"]]
    header = ["profile", "method"] + [f"{keep} kept: {task}" for keep, task in columns]
    lines = [f"`{results.get('command', '')}`", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]

    def cell(scores, task):
        if task == "mean":
            values = [_metric(t, scores) for t in tasks if t not in PRIMARY_METRIC and t not in ppl_tasks]
            return f"{sum(values) / len(values):.3f}"
        if task == "bits/byte":
            values = [scores[t]["bits_per_byte"] for t in tasks if t in ppl_tasks]
            return f"{sum(values) / len(values):.4f}"
        value = _metric(task, scores)
        return f"{value:.2f}" if task in PRIMARY_METRIC else f"{value:.3f}"

    lines.append("| - | full model | " + " | ".join(cell(full, task) for _, task in columns) + " |")
    rows = {}
    for key, run in runs.items():
        if key == "full" or run.get("keep") is None:
            continue
        name = run["method"] + (" (group_balanced)" if run["group_balanced"] else "")
        rows.setdefault((run["profile"], name), {})[run["keep"]] = run["scores"]
    for (profile, name), by_keep in rows.items():
        cells = [cell(by_keep[keep], task) if keep in by_keep else "" for keep, task in columns]
        lines.append(f"| {profile} | {name} | " + " | ".join(cells) + " |")
    for key, run in runs.items():
        if run.get("keep") is None and key != "full":  # --folder runs: the same cell in every keep column
            lines.append(f"| - | {run['method']} | " + " | ".join(cell(run["scores"], task) for _, task in columns)
                         + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
