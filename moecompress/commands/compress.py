"""``moecompress compress MODEL --recipe FILE --out DIR``: run a recipe and write the model and ``report.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moecompress.commands.arguments import device_name, positive_int
from moecompress.commands.export import add_export_options
from moecompress.commands.launch import (
    LAUNCHED_BY_US_VARIABLE,
    RankFailed,
    default_log_dir,
    launch_ranks,
    record_rank_failure,
)
from moecompress.distributed import launched_size, rank_device, shutdown_world
from moecompress.errors import UsageError
from moecompress.evals.report_md import applied_bits, human_bytes, quality_table
from moecompress.export import EXPORT_FORMATS
from moecompress.export.options import ExportOptions
from moecompress.export.report import render_report
from moecompress.pipeline import Pipeline, check_ranked_stages
from moecompress.progress import ProgressReporter


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
                        help="also write a deployment folder in this format (default place: <--out>-<format>, or the file "
                             "<--out>.gguf, beside the native output); a recipe can ask for it with `export: FORMAT`")
    parser.add_argument("--export-out", type=Path, default=None,
                        help="where --export writes (new or empty folder; for gguf a .gguf file)")
    parser.add_argument("--allow-task-code", action="store_true",
                        help="let an evaluate stage's task folder (include_path) run Python: lm-eval `!function` "
                             "modules and templates that reach Python objects. Refused without it, since recipes and "
                             "task folders are shared files: read the code first")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="run over N processes (ranks) on this machine through torch's elastic launcher, as "
                             "`torchrun --nproc-per-node N -m moecompress compress ...` does: calibration batches "
                             "split across ranks, experts quantised by their owning rank; gloo on CPU, NCCL on CUDA "
                             "(one GPU per rank); default 1")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="with --nproc: where each rank's log goes (default: a new temporary folder, printed)")
    add_export_options(parser)
    parser.set_defaults(func=run)
    global _PARSER
    _PARSER = parser


_PARSER: argparse.ArgumentParser | None = None
# Options of the launching process that its ranks do not take.
LAUNCHER_ONLY = ("nproc", "log_dir", "help")


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1 and launched_size() == 1:  # this process starts the ranks and waits for them
        return launch(args)
    pipeline = Pipeline.from_recipe(args.recipe)
    exports = []
    if args.export:  # built before the run: a bad export option fails now, not after the compression
        exports.append(ExportOptions(format=args.export, tp=args.tp, widen_to_layer_max=args.widen_to_layer_max,
                                     widen_to_model_max=args.widen_to_model_max, consumer=args.consumer,
                                     dequantize=args.dequantize, types=args.types, layer_mean=args.layer_mean,
                                     out=str(args.export_out) if args.export_out else None))
    rank = int(os.environ.get("RANK", "0"))
    try:
        # progress and messages on stderr (bars on a terminal, plain lines otherwise; rank 0 only), everything in
        # <out>/run.log; the exports are checked against the recipe before any work, and written after the run
        report = pipeline.run(args.model, args.out, device=args.device, dtype=args.dtype, threads=args.threads,
                              overwrite=args.overwrite, execution=args.execution,
                              verbose=getattr(args, "verbose", None), progress=None if rank == 0 else RankLog(rank),
                              allow_task_code=args.allow_task_code, exports=exports)
    except BaseException as error:
        if launched_size() > 1:
            record_rank_failure(error, rank)  # read by the launcher, which names the rank that failed first
        raise
    finally:
        shutdown_world()
    if rank != 0:  # rank 0 reports (and exports)
        return 0
    # the results on stdout, plain: a command to copy is never wrapped into two lines
    if os.environ.get(LAUNCHED_BY_US_VARIABLE):  # the launching process prints the summary; the exports are here
        for export_report in report.get("exports") or []:
            print("\n".join(render_report(export_report)), flush=True)
    else:
        print("\n".join(summary_lines(report, args.out)), flush=True)
    return 0


class RankLog(ProgressReporter):
    """Progress of a rank other than 0: one line per finished phase on stderr (rank 0 draws the progress)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def on_finish(self, task) -> None:
        print(f"rank {self.rank}: {task.name} done", file=sys.stderr, flush=True)


def launch(args: argparse.Namespace) -> int:
    """``--nproc N``: start N ranks of this command, wait for them, print the summary of rank 0's report."""
    check_ranked_stages(Pipeline.from_recipe(args.recipe).stages, args.nproc)  # before any rank starts
    try:
        rank_device(args.device, args.nproc - 1)  # enough GPUs for one a rank
    except ValueError as error:
        raise UsageError(f"--nproc {args.nproc} --device {args.device}: {error}") from None
    threads = None if args.threads else max(1, (os.cpu_count() or 1) // args.nproc)
    try:
        launch_ranks(args.nproc, rank_arguments(args), args.log_dir or default_log_dir(), threads_per_rank=threads)
    except RankFailed as failed:  # one line, with the failed rank's own exit code
        print(f"moecompress compress: error: {failed}", file=sys.stderr)
        return failed.exit_code
    report = json.loads((args.out / "report.json").read_text())
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


def rank_arguments(args: argparse.Namespace) -> list[str]:
    """The command line each rank runs: ``compress`` with this command's options, less the launcher's own."""
    arguments = ["compress"]
    for action in _PARSER._actions:
        if action.dest in LAUNCHER_ONLY:
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:  # positional
            arguments.append(str(value))
        elif isinstance(action, argparse._StoreTrueAction):
            arguments += [action.option_strings[0]] if value else []
        elif value is not None and value != action.default:
            arguments += [action.option_strings[0], str(value)]
    return arguments
