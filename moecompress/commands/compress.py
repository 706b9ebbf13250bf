"""``moecompress compress MODEL --recipe FILE --out DIR``: run a recipe and write the model and ``report.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from moecompress.commands.arguments import device_name, positive_int
from moecompress.commands.export import add_export_options
from moecompress.evals.report_md import applied_bits, human_bytes, quality_table
from moecompress.export import EXPORT_FORMATS
from moecompress.export.options import ExportOptions
from moecompress.export.report import render_report
from moecompress.pipeline import Pipeline


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="compress an MoE model with a recipe",
        description="Profile MODEL on calibration data (super experts, expert usage), run the recipe's stages, and "
                    "write the compressed model plus report.json into --out. A recipe with `stages: []` only "
                    "profiles. A stopped run (Ctrl-C, a crash) resumes when the same command is run again; a run is "
                    "reused only for the same recipe, source model and calibration data.",
    )
    parser.add_argument("model", help="model folder or Hugging Face hub id")
    parser.add_argument("--recipe", required=True, type=Path, help="recipe YAML (see recipes/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (never inside MODEL)")
    parser.add_argument("--device", default=None, type=device_name,
                        help="compute device for calibration and stages: cpu, cuda, cuda:N, mps (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run of another recipe, model or calibration data in --out (or its stopped "
                             "run); never replaces a folder that is not a moecompress run")
    parser.add_argument("--execution", default="auto", choices=["auto", "streamed", "in_memory"],
                        help="streamed: load, edit and write one decoder layer at a time, never the whole model "
                             "(possible for one statistics-based pruning stage, then rtn/gptq, then evaluate); "
                             "auto (default): streamed when the recipe allows it")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine)")
    parser.add_argument("--export", choices=EXPORT_FORMATS, default=None,
                        help="also write a deployment folder in this format (default place: <--out>-<format>, beside "
                             "the native output); a recipe can ask for it with `export: FORMAT`")
    parser.add_argument("--export-out", type=Path, default=None,
                        help="where --export writes (new or empty folder; for gguf a .gguf file)")
    parser.add_argument("--allow-task-code", action="store_true",
                        help="let an evaluate stage's task folder (include_path) run Python: lm-eval `!function` "
                             "modules and templates that reach Python objects. Refused without it, since recipes and "
                             "task folders are shared files: read the code first")
    add_export_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pipeline = Pipeline.from_recipe(args.recipe)
    exports = []
    if args.export:  # built before the run: a bad export option fails now, not after the compression
        exports.append(ExportOptions(format=args.export, tp=args.tp, widen_to_layer_max=args.widen_to_layer_max,
                                     widen_to_model_max=args.widen_to_model_max, consumer=args.consumer,
                                     dequantize=args.dequantize, types=args.types, layer_mean=args.layer_mean,
                                     out=str(args.export_out) if args.export_out else None))
    # progress and messages on stderr (bars on a terminal, plain lines otherwise), everything in <out>/run.log;
    # the exports are checked against the recipe before any work, and written after the run
    report = pipeline.run(args.model, args.out, device=args.device, dtype=args.dtype, threads=args.threads,
                          overwrite=args.overwrite, execution=args.execution, verbose=getattr(args, "verbose", None),
                          allow_task_code=args.allow_task_code, exports=exports)
    # the results on stdout, plain: a command to copy is never wrapped into two lines
    print("\n".join(summary_lines(report, args.out)), flush=True)
    return 0


def summary_lines(report: dict, out: Path) -> list[str]:
    """What ``compress`` prints on stdout when it is done: where the result is, size, quality, time per stage,
    and for each export how to load it."""
    model = report.get("model", {})
    lines = [f"done: {out} (report.md, README.md, run.log)"]
    before, after = model.get("bytes_before"), model.get("bytes_after")
    size = (f"; in memory {human_bytes(before)} -> {human_bytes(after)} ({before / after:.2f}x smaller), "
            f"{model.get('bits_per_parameter', 0):.2f} bits per parameter"
            if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after else "")
    lines.append(f"parameters {model.get('parameters_before', 0):,} -> {model.get('parameters_after', 0):,}{size}")
    calibration = report.get("calibration", {})
    super_experts = ", ".join(f"layer {layer} expert {expert}" for layer, expert in report.get("super_experts") or [])
    lines.append(f"super experts: {super_experts or 'none'}; calibration {calibration.get('num_samples')} x "
                 f"{calibration.get('seq_len')} tokens, sha256 {calibration.get('sha256', '')[:16]}...")
    for stage in report.get("stages", []):
        applied = applied_bits(stage)
        lines.append(f"  {stage['method']}: {stage['seconds']:.1f} s" + (" (resumed)" if stage.get("resumed") else "")
                     + (f"; applied {applied}" if applied else ""))
        metrics = stage.get("metrics") or {}
        if stage["method"] == "evaluate" and metrics.get("before"):
            for row in quality_table(metrics)[2:]:
                task, metric, value_before, value_after, delta = (cell.strip() for cell in row.strip("|").split("|"))
                lines.append(f"    {task} {metric}: {value_before} -> {value_after}, {delta}")
    for export_report in report.get("exports") or []:
        lines += render_report(export_report)
    return lines
