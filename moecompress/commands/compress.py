"""``moecompress compress MODEL --recipe FILE --out DIR``: run a recipe and write the model and ``report.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
from moecompress.export import EXPORT_FORMATS
from moecompress.export.options import ExportOptions, run_exports
from moecompress.export.report import render_report
from moecompress.pipeline import Pipeline, ProgressReporter, check_ranked_stages


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
    parser.add_argument("--export-out", type=Path, default=None, help="where --export writes (new or empty folder)")
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


class RichProgress(ProgressReporter):
    """Progress bars for the profiling pass, every stage and every calibration pass inside a stage.

    The display starts with the first bar, so a run refused before any work prints its one error line alone."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, name: str, total: int | None = None) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        if name in self.tasks:
            self.progress.reset(self.tasks[name], total=total)
        else:
            self.tasks[name] = self.progress.add_task(name, total=total)

    def update(self, name: str, completed: int, total: int | None = None) -> None:
        if name not in self.tasks:
            self.start(name, total)
        self.progress.update(self.tasks[name], completed=completed, total=total)

    def finish(self, name: str) -> None:
        if name in self.tasks:
            task = self.progress.tasks[self.tasks[name]]
            self.progress.update(self.tasks[name], total=task.total or 1, completed=task.total or 1)


class RankLog(ProgressReporter):
    """Progress of a rank other than 0: one line per finished phase (rank 0 draws the bars)."""

    def __init__(self, console: Console, rank: int) -> None:
        self.console, self.rank = console, rank

    def finish(self, name: str) -> None:
        self.console.print(f"rank {self.rank}: {name} done", markup=False, highlight=False)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.nproc > 1 and launched_size() == 1:  # this process starts the ranks and waits for them
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
        print_summary(console, args, report)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = Pipeline.from_recipe(args.recipe)
    rank = int(os.environ.get("RANK", "0"))
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    try:
        report = pipeline.run(args.model, args.out, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
                              execution=args.execution,
                              progress=RichProgress(progress) if rank == 0 else RankLog(console, rank))
    except BaseException as error:
        if launched_size() > 1:
            record_rank_failure(error, rank)  # read by the launcher, which names the rank that failed first
        raise
    finally:
        if progress.live.is_started:
            progress.stop()
        shutdown_world()
    if rank != 0:  # rank 0 reports (and exports)
        return 0
    if args.export:
        options = ExportOptions(format=args.export, tp=args.tp, widen_to_layer_max=args.widen_to_layer_max,
                                dequantize=args.dequantize, out=str(args.export_out) if args.export_out else None)
        report = {**report, "exports": [*report.get("exports", []), *run_exports(args.out, [options])]}
    if os.environ.get(LAUNCHED_BY_US_VARIABLE):  # the launching process prints the summary; the exports are here
        print_exports(console, report)
    else:
        print_summary(console, args, report)
    return 0


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


def print_summary(console: Console, args: argparse.Namespace, report: dict) -> None:
    model = report.get("model", {})
    console.print(f"[bold]done[/bold]: {args.out}/report.json")
    console.print(f"parameters {model.get('parameters_before', 0):,} -> {model.get('parameters_after', 0):,}; "
                  f"super experts {report.get('super_experts')}; calibration sha256 "
                  f"{report.get('calibration', {}).get('sha256', '')[:16]}...")
    for stage in report.get("stages", []):
        console.print(f"  {stage['method']}: {stage['seconds']:.1f} s" + (" (resumed)" if stage.get("resumed") else ""))
    print_exports(console, report)


def print_exports(console: Console, report: dict) -> None:
    if report.get("exports"):
        for export_report in report["exports"]:
            console.print("\n".join(render_report(export_report)), markup=False)
