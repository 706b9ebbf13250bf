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
  uniform2, uniform3   every expert GPTQ 2-bit (3-bit)
  uniform2_nocold, uniform3_nocold  the same with ``cold_damping: false`` (GPTQ's plain damping for every expert)
  pmq                  mcmoe_pmq avg_bits ``--avg-bits`` over {2, 3, 4} (Hessian proxy ``eps_mode: hessian``), then
                       GPTQ at those widths
  pmq_norm, pmq_block  the same with ``eps_mode: hessian_norm`` (its square root) / ``block_output`` (the reference
                       code's RTN block-output norm)
  random               PMQ's widths per layer, shuffled over the experts (seeded): the same size
  frequency            PMQ's widths per layer, the widest to the most frequently selected experts: the same size
  random@C, frequency@C  the same with the widths of configuration C's row (e.g. frequency@pmq_norm)
  camera_q, camera_q_spec  CAMERA-Q at ``--avg-bits`` over bits {4, 3, 2}, groups of ``--group-size`` (one GPTQ sweep
                       over down_proj, mse scales / ``preset: camera_spec``: each segment alone, minmax scales)
  recipe:PATH          the stages of a recipe YAML (e.g. recipes/recommended_3bit.yaml), on the benchmark's
                       calibration tokens like every other row
  folder:PATH          a model folder as it is (e.g. llm-compressor's output, dequantised to plain HF)
  joint                mcmoe_pmq candidates {0, 2, 3, 4}, target_size ``--target``: pruning and widths in one knapsack
  prune_then_quantize  prune_frequency to ``--keep`` experts per layer, then mcmoe_pmq {2, 3, 4} at the same target
  odp<q>               the full model with mcmoe_odp (thresholds = quantile q of w_r/w_0, 2% protected tokens);
                       reports the fraction of expert calls skipped while scoring
  uniform2_ebss        uniform2 calibrated on an EBSS set (tau 1.2, beam 4: the former default) of the same size
  uniform2_ebss_balanced  the same with tau 0.001 and no_repeat_ngram 4 (the setting where the balance term works
                       on the test bed, benchmarks/ebss_balance.py)
  uniform2_ebss_paper  the same with ``preset: moequant_paper`` (sigma on counts of the child sequence, tau 1.2);
                       ``uniform2_ebss_paper_ng4`` adds no_repeat_ngram 4

Every row also records ``expert_bits_per_parameter``: the bytes its routed experts take in the saved checkpoint
(packed words, scales and zero points at their stored dtype; dropped experts 0) times 8, over the original model's
routed-expert parameters.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from _common import (ACCURACY_TASKS, HELD_OUT_ACCURACY_TASKS, HELD_OUT_PERPLEXITY_TASKS, PERPLEXITY_TASKS,
                     TESTBED_CALIB, add_merge_compare_arguments, add_repo_to_path, add_threads_argument,
                     calibration_bits_per_byte, calibration_pieces, paired_rows, print_merged_or_compared,
                     score_model, set_offline, set_threads, testbed_model)

set_offline()
add_repo_to_path()

import pydantic  # noqa: E402
import torch  # noqa: E402

from moecompress.checkpoint import load_model  # noqa: E402
from moecompress.models import find_moe_blocks  # noqa: E402
from moecompress.models.summary import model_summary  # noqa: E402
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the compression pipeline runs in (bfloat16: the checkpoints' own, scales stored "
                             "in bf16 as a deployment would)")
    parser.add_argument("--ppl-only", action="store_true", help="score bits per byte only (no accuracy tasks: about "
                        "30x cheaper); such rows pair with others on bits per byte only")
    parser.add_argument("--score", default="tasks", choices=["tasks", "held-out", "calibration"],
                        help="what each row is scored on: the benchmark tasks (default); the held-out tasks "
                        "(tb_manpages/pydocs/shakespeare_next, tb_ppl_manpages/pydocs/shakespeare/wordnet: the "
                        "re-check of a claim); or only bits per byte on the calibration text (24,000 characters "
                        "per domain, no lm-eval: what recipes are chosen on)")
    parser.add_argument("--allocations", action="store_true", help="no evaluation: print how far each PMQ error "
                        "form's bit map is from the frequency-only placement of the same widths, and exit")
    parser.add_argument("--pairs", default=None, help="--compare: comma list of A-B pairs instead of the default "
                        "ones (A and B configuration names)")
    add_merge_compare_arguments(parser)
    add_threads_argument(parser, None)
    args = parser.parse_args(argv)
    if args.pairs:
        global PAIRS
        PAIRS = tuple(tuple(pair.split("-", 1)) for pair in args.pairs.split(","))
    if print_merged_or_compared(args, markdown_table, comparison_table):
        return 0
    set_threads(args.threads)
    if args.allocations:
        return allocation_table(args)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.json_out.read_text())["rows"] if args.json_out.exists() else []
    for model_name in args.models.split(","):
        for config in args.configs.split(","):
            pmq_widths = None
            if config.startswith(("random", "frequency")):
                source = config.partition("@")[2] or "pmq"
                pmq_widths = next((row["bit_widths"] for row in rows
                                   if row["model"] == model_name and row["config"] == source), None)
                if pmq_widths is None:
                    raise SystemExit(f"{config} needs the {source} row of {model_name}: run config {source} first")
            row = run_configuration(args, model_name, config, pmq_widths)
            rows = [old for old in rows if (old["model"], old["config"]) != (model_name, row["config"])] + [row]
            args.json_out.write_text(json.dumps({"rows": rows}, indent=1))
            print(markdown_table([row], header=False), file=sys.stderr, flush=True)
    print(markdown_table(rows))
    return 0


def stages_for(args, config: str, pmq_widths, num_experts: int) -> tuple[list, dict]:
    """The pipeline stages of one configuration and its calibration section."""
    from moecompress.pruning.frequency import FrequencyPruning
    from moecompress.quantization.camera_q import CameraQuantization
    from moecompress.quantization.odp import ODPStage
    from moecompress.quantization.pmq import PMQStage
    from moecompress.quantization.stages import GPTQStage
    from moecompress.recipe import load_recipe

    calibration = {"files": [str(TESTBED_CALIB)], "num_samples": args.num_samples, "seq_len": args.seq_len,
                   "seed": 0}
    gptq_options = {"bits": 2, "group_size": args.group_size, "scale_search": args.scale_search}
    gptq = GPTQStage(gptq_options)
    pmq = {"group_size": args.group_size}
    eps_modes = {"pmq": "hessian", "pmq_norm": "hessian_norm", "pmq_block": "block_output"}
    if config == "full" or config.startswith("folder:"):
        return [], calibration
    if config.startswith("recipe:"):  # the recipe's stages on the benchmark's calibration tokens (as every row)
        return load_recipe(config.partition(":")[2]).stages, calibration
    if config in ("uniform2", "uniform3", "uniform2_nocold", "uniform3_nocold"):
        return [GPTQStage({**gptq_options, "bits": int(config[7]),
                           "cold_damping": not config.endswith("_nocold")})], calibration
    if config == "uniform2_ebss":
        return [gptq], {**calibration, "ebss": {"tau": 1.2, "beam": 4, "no_repeat_ngram": 0, "compare_text": True}}
    if config == "uniform2_ebss_balanced":
        return [gptq], {**calibration, "ebss": {"tau": 0.001, "beam": 4, "no_repeat_ngram": 4, "compare_text": True}}
    if config in ("uniform2_ebss_paper", "uniform2_ebss_paper_ng4"):
        ebss = {"preset": "moequant_paper", "beam": 4, "compare_text": True}
        if config.endswith("_ng4"):
            ebss["no_repeat_ngram"] = 4
        return [gptq], {**calibration, "ebss": ebss}
    if config in eps_modes:
        return [PMQStage({**pmq, "avg_bits": args.avg_bits, "candidates": [2, 3, 4], "eps_mode": eps_modes[config]}),
                gptq], calibration
    if config in ("camera_q", "camera_q_spec"):
        options = {"avg_bits": args.avg_bits, "bits": [4, 3, 2], "group_size": args.group_size}
        if config == "camera_q_spec":
            options["preset"] = "camera_spec"
        return [CameraQuantization(options)], calibration
    if config.startswith(("random", "frequency")):
        return [FixedWidthsStage({"widths": pmq_widths, "order": config.partition("@")[0]}), gptq], calibration
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


def frequency_placement(widths: dict[str, list[int]], counts: dict) -> dict[str, list[int]]:
    """``widths`` of each layer re-placed by selection frequency: the widest to the most selected expert (ties: lower
    id), as :class:`FixedWidthsStage` with ``order: frequency`` does."""
    placed = {}
    for layer, values in widths.items():
        ranking = torch.argsort(counts[int(layer)]["expert_token_counts"], descending=True, stable=True).tolist()
        placed[layer] = [0] * len(values)
        for rank, expert in enumerate(ranking):
            placed[layer][expert] = sorted(values, reverse=True)[rank]
    return placed


def allocation_table(args) -> int:
    """For each model and PMQ error form (``eps_mode`` hessian / hessian_norm / block_output, ``--avg-bits`` over
    {2, 3, 4}, groups of ``--group-size``): how many experts' widths differ from the frequency-only placement of the
    same per-layer widths, and from the ``hessian`` form's map. No evaluation: one calibration pass per model (the
    benchmark's calibration), the super experts found as the pipeline finds them."""
    import copy

    from moecompress.analysis.super_experts import find_super_experts
    from moecompress.calibration import LayerwiseRunner, load_calibration
    from moecompress.pipeline import RunContext
    from moecompress.quantization.pmq import PMQStage

    print("| model | eps_mode | experts | differ from frequency-only placement | differ from eps_mode hessian | "
          "layers with other widths than hessian's |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name in args.models.split(","):
        model, tokenizer = load_model(testbed_model(model_name), dtype=torch.float32)
        calibration = load_calibration(tokenizer, files=[TESTBED_CALIB], num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=0)
        profile = LayerwiseRunner(model).run(calibration, ["max_abs_expert_output", "expert_token_counts"])
        super_experts = find_super_experts(profile.layers, profile.num_hidden_layers).routed
        maps = {}
        for form in ("hessian", "hessian_norm", "block_output"):
            context = RunContext(model=copy.deepcopy(model), tokenizer=tokenizer, source=model_name,
                                 output_dir=Path(tempfile.mkdtemp()), calibration=calibration,
                                 super_experts=list(super_experts))
            stage = PMQStage({"avg_bits": args.avg_bits, "candidates": [2, 3, 4], "group_size": args.group_size,
                              "eps_mode": form})
            maps[form] = stage.run(context).decisions["bit_widths"]
        for form, widths in maps.items():
            flat = [bits for values in widths.values() for bits in values]
            placed = frequency_placement(widths, profile.layers)
            differ = sum(a != b for layer in widths for a, b in zip(widths[layer], placed[layer]))
            from_hessian = sum(a != b for layer in widths for a, b in zip(widths[layer], maps["hessian"][layer]))
            other_widths = sum(sorted(widths[layer]) != sorted(maps["hessian"][layer]) for layer in widths)
            print(f"| {model_name} | {form} | {len(flat)} | {differ} | {from_hessian} | {other_widths} |", flush=True)
    return 0


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
    from moecompress.pipeline import Pipeline
    from moecompress.quantization.odp import reset_odp_counters, skipped_fractions

    source = testbed_model(model_name)
    args.current_model = model_name
    original = load_model(source)[0]
    num_experts = find_moe_blocks(original)[0].num_experts
    expert_parameters = model_summary(original)["parameters"]["routed_experts"]
    del original
    stages, calibration = stages_for(args, config, pmq_widths, num_experts)
    with tempfile.TemporaryDirectory(prefix="mcmoe-bench-") as folder:
        report = {"stages": []}
        evaluated = Path(config.partition(":")[2]) if config.startswith("folder:") else source
        if stages:
            evaluated = Path(folder) / "out"
            report = Pipeline(stages, calibration=calibration).run(source, evaluated, dtype=args.dtype)
        stored_expert_bytes = routed_expert_bytes_on_disk(evaluated)
        if (Path(evaluated) / STORED_BYTES_FILE).is_file():  # a dequantised copy: the bytes of its compressed form
            stored_expert_bytes = json.loads((Path(evaluated) / STORED_BYTES_FILE).read_text())["stored_expert_bytes"]
        model, tokenizer = load_model(evaluated, dtype=torch.float32)
        if tokenizer is None:  # a folder saved without its tokenizer: the source model's
            tokenizer = load_model(source)[1]
        reset_odp_counters(model)
        scored = score_configuration(args, model, tokenizer)
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
    mean_bits = sum(bits for widths in allocated.values() for bits in widths) / (num_experts * len(allocated))
    camera = next((stage["metrics"] for stage in report["stages"] if stage.get("method") == "camera_q"), None)
    if camera is not None:
        mean_bits = camera["mean_effective_avg_bits"]
    elif config.startswith("folder:"):
        mean_bits = None  # another tool's output: its widths are not read here
    return {
        "model": model_name, "config": config_label(config), "bit_widths": pmq_decided or bit_widths,
        "mean_expert_bits": mean_bits, "expert_bytes": expert_bytes,
        "stored_expert_bytes": stored_expert_bytes,
        "expert_bits_per_parameter": 8 * stored_expert_bytes / expert_parameters, "dtype": args.dtype,
        "mean_acc_mutual_info": scored["mean_acc_mutual_info"], "mean_bits_per_byte": scored["mean_bits_per_byte"],
        "skipped_fraction": (sum(skipped.values()) / len(skipped)) if skipped else None,
        "skipped_per_layer": {str(layer): value for layer, value in skipped.items()},
        "scores": scored["scores"], "items": scored["items"], "documents": scored["documents"],
        "scale_search": args.scale_search, "limit": None if args.ppl_only else args.limit,
        "ppl_limit": args.ppl_limit, "group_size": args.group_size,
        "target": args.target if config in ("joint", "prune_then_quantize") else None,
        "ebss_usage_std": _ebss_std(report), "score": args.score,
        "calibration_bits_per_byte": scored.get("calibration_bits_per_byte"),
    }


def score_configuration(args, model, tokenizer) -> dict:
    """:func:`score_model`'s result on the tasks ``--score`` names; for ``calibration``, bits per byte on the
    calibration text in its ``mean_bits_per_byte`` (and per domain in ``calibration_bits_per_byte``)."""
    if args.score == "calibration":
        scored = calibration_bits_per_byte(model, tokenizer, calibration_pieces(TESTBED_CALIB))
        return {"scores": {}, "items": {}, "documents": scored["documents"], "mean_acc_mutual_info": None,
                "mean_bits_per_byte": scored["mean"], "calibration_bits_per_byte": scored["per_domain"]}
    accuracy, perplexity = ((HELD_OUT_ACCURACY_TASKS, HELD_OUT_PERPLEXITY_TASKS) if args.score == "held-out"
                            else (ACCURACY_TASKS, PERPLEXITY_TASKS))
    return score_model(model, tokenizer, limit=args.limit, ppl_limit=args.ppl_limit,
                       accuracy_tasks=() if args.ppl_only else accuracy, perplexity_tasks=perplexity)


STORED_BYTES_FILE = "stored_expert_bytes.json"  # written beside a dequantised copy by benchmarks/peer_llmcompressor.py


def config_label(config: str) -> str:
    """The row's name: the configuration, with a folder or recipe shortened to its file or folder name."""
    kind, _, path = config.partition(":")
    if kind not in ("folder", "recipe") or not path:
        return config
    name = Path(path).stem
    return f"{kind}:{Path(path).parent.name if name == 'plain' else name}"  # peer outputs are OUT/plain


def routed_expert_bytes_on_disk(folder: Path) -> int:
    """Bytes the routed experts' tensors take in ``folder``'s safetensors files (from their headers): keys with an
    ``.experts.`` part (shared experts are ``shared_expert(s)``). Works for plain, native and compressed-tensors
    folders."""
    from moecompress.checkpoint.headers import read_safetensors_header

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, entry in read_safetensors_header(path).items():
            if ".experts." in key and isinstance(entry, dict) and "data_offsets" in entry:
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return total


def _ebss_std(report: dict):
    calibration = report.get("calibration") or {}
    return calibration.get("ebss") if isinstance(calibration, dict) else None


PAIRS = (("pmq", "uniform2"), ("pmq", "random"), ("pmq", "frequency"), ("joint", "prune_then_quantize"),
         ("uniform2_ebss", "uniform2"), ("uniform2_ebss_balanced", "uniform2"),
         ("odp0.5", "full"), ("odp0.3", "full"),
         ("pmq_norm", "frequency"), ("pmq_block", "frequency"), ("pmq_norm", "pmq"), ("pmq_block", "pmq"),
         ("uniform2_ebss_paper", "uniform2"), ("uniform2_ebss_paper_ng4", "uniform2"),
         ("uniform2_ebss_paper", "uniform2_ebss_balanced"),
         ("uniform2", "uniform2_nocold"), ("uniform3", "uniform3_nocold"),
         ("camera_q", "camera_q_spec"), ("camera_q", "uniform2"), ("camera_q", "uniform3"), ("camera_q", "pmq"))


def comparison_table(rows: list[dict]) -> str:
    """Paired differences ``a - b`` per model (rows of the same ``--limit`` and scales): mean accuracy on the same
    items and mean bits per byte on the same documents, each with its 95% bootstrap interval (bits per byte without
    one for rows measured before documents were kept)."""
    lines = ["| model | pair | accuracy difference [95% CI] | bits/byte difference [95% CI] |", "|---|---|---|---:|"]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        if "items" in row or "documents" in row:
            by_model.setdefault(row["model"], {})[row["config"]] = row
    for model, configs in by_model.items():
        tasks = sorted(next((row["items"] for row in configs.values() if row.get("items")), {}))
        for first, second, accuracy, bpb in paired_rows(configs, PAIRS, accuracy_tasks=tasks):
            lines.append(f"| {model} | {first} - {second} | {accuracy} | {bpb} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict], header: bool = True) -> str:
    lines = ["| model | configuration | mean expert bits | expert bytes | bits per expert parameter (stored) | "
             "skipped expert calls | mean acc_mutual_info | mean bits/byte |",
             "|---|---|---:|---:|---:|---:|---:|---:|"] if header else []
    for row in rows:
        bits = ("fp32" if row["config"].startswith(("full", "odp")) else "-" if row.get("mean_expert_bits") is None
                else f"{row['mean_expert_bits']:.2f}")
        skipped = "-" if row.get("skipped_fraction") is None else f"{row['skipped_fraction']:.1%}"
        stored = "-" if row.get("expert_bits_per_parameter") is None else f"{row['expert_bits_per_parameter']:.3f}"
        accuracy = "-" if row.get("mean_acc_mutual_info") is None else f"{row['mean_acc_mutual_info']:.3f}"
        lines.append(f"| {row['model']} | {row['config']} | {bits} | {row['expert_bytes']:,} | {stored} | {skipped} | "
                     f"{accuracy} | {row['mean_bits_per_byte']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
