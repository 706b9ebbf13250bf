"""CAMERA-P benchmark: micro-expert pruning at several ratios against random and weight-norm channel pruning.

    python benchmarks/camera.py --model moe-ref-q3 --ratios 0.2,0.4,0.6 --limit 100 --json-out results/camera_q3.json
    python benchmarks/camera.py --table results/camera_q3.json results/camera_mx.json results/camera_ds.json

Every run calibrates on the mixed test-bed calibration text (``../shared/testbed/calib``, all eight domains, never
the tasks): one pass for the super experts, then one layer-wise sweep per CAMERA-P run (energies of layer ``l``
on the model with layers ``< l`` already pruned). Scores: ``acc_mutual_info`` of tb_code_next, tb_kjv_next,
tb_austen_next (and their mean) and ``bits_per_byte`` of tb_ppl_pycode, tb_ppl_kjv, tb_ppl_austen, all with
moecompress's lm-eval machinery (fp32, CPU). ``--physical`` adds the physical-mode check at the first ratio: logits
of the physical (variable-width) and ``pad_to`` models against the masked one, bytes in memory and on disk (measured
from the tensors and the saved safetensors files). The energy-pass cost model for a 30B model is printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

from _common import TESTBED_CALIB, add_repo_to_path, add_threads_argument, set_offline, set_threads, testbed_model

set_offline()
add_repo_to_path()

ACC_TASKS = ("tb_code_next", "tb_kjv_next", "tb_austen_next")
PPL_TASKS = ("tb_ppl_pycode", "tb_ppl_kjv", "tb_ppl_austen")
# Qwen3-30B-A3B (its config.json): the cost model's 30B example
QWEN3_30B = {"hidden_size": 2048, "intermediate_size": 768, "top_k": 8, "num_moe_layers": 48, "num_experts": 128}


def model_bytes(model) -> int:
    """Bytes of every parameter and persistent buffer (what the model holds in memory)."""
    from moecompress.models.summary import _stored_tensors

    return sum(tensor.numel() * tensor.element_size() for tensor in _stored_tensors(model))


def saved_bytes(model) -> int:
    """Bytes of the safetensors files ``model`` saves to (native format when it needs it)."""
    from moecompress.checkpoint import save_model

    with tempfile.TemporaryDirectory() as folder:
        save_model(model, None, Path(folder))
        return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def run_stage(model, tokenizer, calibration, super_experts, options: dict):
    from moecompress.pipeline import RunContext
    from moecompress.pruning.camera_p import CameraPruning

    pruned = copy.deepcopy(model)
    context = RunContext(model=pruned, tokenizer=tokenizer, source="benchmark", output_dir=Path(tempfile.mkdtemp()),
                         calibration=calibration, super_experts=list(super_experts), batch_size=8)
    result = CameraPruning(options).run(context)
    return pruned, result


def physical_check(model, tokenizer, calibration, super_experts, ratio: float) -> dict:
    """Masked vs physical vs pad_to 64 (and 16) at ``ratio``: max |logit difference|, bytes in memory and on disk."""
    import torch

    tokens = torch.randint(1, 8000, (4, 64), generator=torch.Generator().manual_seed(0))
    record = {"ratio": ratio, "dense": {"memory_bytes": model_bytes(model), "file_bytes": saved_bytes(model)}}
    masked, result = run_stage(model, tokenizer, calibration, super_experts, {"ratio": ratio})
    with torch.no_grad():
        reference = masked(tokens).logits
    record["masked"] = {"memory_bytes": model_bytes(masked), "file_bytes": saved_bytes(masked)}
    from moecompress.models import find_moe_blocks
    from moecompress.pipeline import RunContext, StageResult
    from moecompress.pruning.camera_p import CameraPruning

    for name, options in (("physical", {"mode": "physical"}), ("pad_to_64", {"mode": "physical", "pad_to": 64}),
                          ("pad_to_16", {"mode": "physical", "pad_to": 16})):
        edited = copy.deepcopy(model)
        stage = CameraPruning({"ratio": ratio, **options})
        context = RunContext(model=edited, tokenizer=tokenizer, source="benchmark", output_dir=Path(tempfile.mkdtemp()))
        stage.replay(context, StageResult(decisions=result.decisions))  # the masked run's decisions, made physical
        with torch.no_grad():
            difference = float((edited(tokens).logits - reference).abs().max())
        record[name] = {"max_abs_logit_difference": difference, "memory_bytes": model_bytes(edited),
                        "file_bytes": saved_bytes(edited)}
        print(name, record[name], flush=True)
    pruned = sum(layer["pruned"] for layer in result.metrics["layers"].values())
    total = sum(layer["micro_experts"] for layer in result.metrics["layers"].values())
    record["pruned_share_of_micro_experts"] = pruned / total
    hidden = next(iter(find_moe_blocks(model))).hidden_size
    record["expected_bytes_saved"] = pruned * 3 * hidden * next(model.parameters()).element_size()  # 3 vectors each
    return record


def quantized_run(model, tokenizer, calibration, super_experts, tasks, args, method: str, options: dict) -> dict:
    """One quantisation stage (``camera_q`` or ``gptq``) on a copy of ``model``, then the task scores."""
    from moecompress.evals import evaluate_model
    from moecompress.pipeline import STAGE_REGISTRY, RunContext
    from moecompress.recipe import known_methods

    known_methods()
    quantized = copy.deepcopy(model)
    context = RunContext(model=quantized, tokenizer=tokenizer, source="benchmark", output_dir=Path(tempfile.mkdtemp()),
                         calibration=calibration, super_experts=list(super_experts), batch_size=8)
    result = STAGE_REGISTRY[method](options).run(context)
    scores = evaluate_model(quantized, tokenizer, tasks, limit=args.limit, batch_size=32)
    average = result.metrics.get("mean_effective_avg_bits", options.get("bits"))
    print(method, options, average, scores, flush=True)
    return {"score": method, "ratio": 0.0, "options": options, "avg_bits": average, "scores": scores,
            "memory_bytes": model_bytes(quantized)}


def analysis_time(model, tokenizer) -> dict:
    """Seconds of the CAMERA energy pass (one layer-wise sweep, energies of every layer) with 128 x 512 tokens."""
    import time

    from moecompress.analysis.camera import STATISTICS, layer_energies
    from moecompress.calibration import LayerwiseRunner, load_calibration

    calibration = load_calibration(tokenizer, files=[str(TESTBED_CALIB)], num_samples=128, seq_len=512, seed=0)
    energies = []
    started = time.perf_counter()
    LayerwiseRunner.from_source(model).run(calibration, list(STATISTICS), batch_size=8, layer_callback=lambda index, layer, collectors: energies.extend(
        layer_energies(collector.view, collector.result()) for collector in collectors))
    return {"seconds": time.perf_counter() - started, "tokens": 128 * 512, "layers": len(energies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="moe-ref-q3")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--scores", default="camera,weight_norm,random")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.9)
    add_threads_argument(parser, 1)
    parser.add_argument("--physical", action="store_true", help="also measure physical vs masked at the first ratio")
    parser.add_argument("--camera-q", default="", help="comma-separated average bits: CAMERA-Q runs (bits 4/3/2) "
                        "against uniform GPTQ at 2 and 3 bits, same group size")
    parser.add_argument("--group-size", type=int, default=16, help="--camera-q: group size of every quantiser")
    parser.add_argument("--analysis-time", action="store_true", help="time the energy pass with 128 x 512 "
                        "calibration tokens (the lead's measurement; the cost model is printed either way)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of finished runs and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(path.read_text()) for path in args.table]))
        return 0

    import torch

    from moecompress.analysis.camera import energy_pass_cost
    from moecompress.analysis.super_experts import find_super_experts
    from moecompress.calibration import LayerwiseRunner, load_calibration
    from moecompress.checkpoint import load_model
    from moecompress.evals import evaluate_model

    set_threads(args.threads)
    tasks = [*ACC_TASKS, *PPL_TASKS]
    results = json.loads(args.json_out.read_text()) if args.json_out and args.json_out.exists() else {}
    results.setdefault("command", " ".join(["python benchmarks/camera.py", *(argv or sys.argv[1:])]))
    results["model"] = args.model
    results.setdefault("runs", {})

    def save():
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(results, indent=1))

    results["cost_model_qwen3_30b_128x2048"] = energy_pass_cost(num_tokens=128 * 2048, **QWEN3_30B)
    model, tokenizer = load_model(str(testbed_model(args.model)), dtype=torch.float32)
    if "full" not in results["runs"]:
        results["runs"]["full"] = {"scores": evaluate_model(model, tokenizer, tasks, limit=args.limit, batch_size=32)}
        save()
        print("full", results["runs"]["full"]["scores"], flush=True)
    calibration = load_calibration(tokenizer, files=[str(TESTBED_CALIB)], num_samples=args.num_samples,
                                   seq_len=args.seq_len, seed=0)
    profile = LayerwiseRunner.from_source(model).run(calibration, ["max_abs_expert_output"], batch_size=8)
    super_experts = find_super_experts(profile.layers, profile.num_hidden_layers).routed
    results["super_experts"] = [list(pair) for pair in super_experts]
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        for score in args.scores.split(","):
            key = f"{score}/{ratio:g}"
            if key in results["runs"]:
                continue
            pruned, result = run_stage(model, tokenizer, calibration, super_experts,
                                       {"ratio": ratio, "alpha": args.alpha, "score": score})
            scores = evaluate_model(pruned, tokenizer, tasks, limit=args.limit, batch_size=32)
            share = [layer["pruned_score_share"] for layer in result.metrics["layers"].values()]
            results["runs"][key] = {"score": score, "ratio": ratio, "scores": scores,
                                    "mean_pruned_score_share": sum(share) / len(share)}
            save()
            print(key, scores, flush=True)
            del pruned, result
    for average in [float(a) for a in args.camera_q.split(",") if a]:
        key = f"camera_q/{average:g}"
        if key not in results["runs"]:
            results["runs"][key] = quantized_run(model, tokenizer, calibration, super_experts, tasks, args,
                                                 "camera_q", {"avg_bits": average, "bits": [4, 3, 2],
                                                              "group_size": args.group_size, "alpha": args.alpha})
            save()
    if args.camera_q:
        for bits in (2, 3):
            key = f"gptq/{bits}"
            if key not in results["runs"]:
                results["runs"][key] = quantized_run(model, tokenizer, calibration, super_experts, tasks, args,
                                                     "gptq", {"bits": bits, "group_size": args.group_size})
                save()
    if args.analysis_time and "analysis_time" not in results:
        results["analysis_time"] = analysis_time(model, tokenizer)
        save()
    if args.physical and "physical" not in results:
        results["physical"] = physical_check(model, tokenizer, calibration, super_experts,
                                             float(args.ratios.split(",")[0]))
        save()
    print(markdown_table([results]))
    return 0


def _row_name(run: dict) -> str:
    if run.get("avg_bits") is not None:  # a quantised run
        return f"{run['score']} {float(run['avg_bits']):.2f} bits (group {run['options']['group_size']})"
    return run["score"]


def _mean_acc(scores: dict) -> float:
    return sum(scores[task]["acc_mutual_info"] for task in ACC_TASKS) / len(ACC_TASKS)


def markdown_table(all_results: list[dict]) -> str:
    """One row per (model, score method, ratio): mean acc_mutual_info, its share of the full model's, and bits per
    byte per ppl task; then the physical-mode measurements."""
    header = ["model", "method", "ratio", "mean acc_mi", "of full", *[f"{task} acc_mi" for task in ACC_TASKS],
              *[f"{task.removeprefix('tb_ppl_')} bpb" for task in PPL_TASKS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    physical_lines, notes = [], []
    for results in all_results:
        full = results["runs"]["full"]["scores"]
        full_mean = _mean_acc(full)
        rows = [("full model", 0.0, full)] + [(_row_name(run), run["ratio"], run["scores"]) for key, run in
                                              sorted(results["runs"].items(), key=lambda item: (item[1].get("ratio", 0), item[0])) if key != "full"]
        for name, ratio, scores in rows:
            mean = _mean_acc(scores)
            lines.append(f"| {results['model']} | {name} | {ratio:.0%} | {mean:.3f} | {mean / full_mean:.1%} | "
                         + " | ".join(f"{scores[task]['acc_mutual_info']:.3f}" for task in ACC_TASKS) + " | "
                         + " | ".join(f"{scores[task]['bits_per_byte']:.3f}" for task in PPL_TASKS) + " |")
        physical = results.get("physical")
        if physical:
            dense = physical["dense"]
            for name in ("masked", "physical", "pad_to_64", "pad_to_16"):
                entry = physical[name]
                physical_lines.append(
                    f"| {results['model']} | {name} | {physical['ratio']:.0%} | "
                    f"{entry.get('max_abs_logit_difference', 0.0):.2e} | {entry['memory_bytes']:,} "
                    f"({entry['memory_bytes'] / dense['memory_bytes']:.1%}) | {entry['file_bytes']:,} "
                    f"({entry['file_bytes'] / dense['file_bytes']:.1%}) |")
            notes.append(f"{results['model']}: {physical['pruned_share_of_micro_experts']:.1%} of the micro-experts pruned, "
                         f"expected saving {physical['expected_bytes_saved']:,} bytes (pruned x 3 vectors x hidden x 4), "
                         f"measured {dense['memory_bytes'] - physical['physical']['memory_bytes']:,} in memory")
    text = "\n".join(lines)
    if physical_lines:
        text += ("\n\n| model | mode | ratio | max abs logit diff vs masked | memory bytes (of dense) | file bytes (of dense) |"
                 "\n|---|---|---|---|---|---|\n" + "\n".join(physical_lines) + "\n\n" + "; ".join(notes))
    return text


if __name__ == "__main__":
    sys.exit(main())
