"""``moecompress compress MODEL --recipe FILE --out DIR``: run a recipe and write the model and ``report.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from moecompress.commands.arguments import device_name, positive_int
from moecompress.commands.export import add_export_options
from moecompress.export import EXPORT_FORMATS
from moecompress.export.options import ExportOptions
from moecompress.export.report import render_report
from moecompress.pipeline import Pipeline, ProgressReporter


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


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = Pipeline.from_recipe(args.recipe)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    exports = []
    if args.export:  # built before the run: a bad export option fails now, not after the compression
        exports.append(ExportOptions(format=args.export, tp=args.tp, widen_to_layer_max=args.widen_to_layer_max,
                                     widen_to_model_max=args.widen_to_model_max, consumer=args.consumer,
                                     dequantize=args.dequantize, types=args.types, layer_mean=args.layer_mean,
                                     out=str(args.export_out) if args.export_out else None))
    try:  # the exports are checked against the recipe before any work, and written after the run
        report = pipeline.run(args.model, args.out, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
                              execution=args.execution, allow_task_code=args.allow_task_code,
                              progress=RichProgress(progress), exports=exports)
    finally:
        if progress.live.is_started:
            progress.stop()
    model = report.get("model", {})
    console.print(f"[bold]done[/bold]: {args.out}/report.json")
    console.print(f"parameters {model.get('parameters_before', 0):,} -> {model.get('parameters_after', 0):,}; "
                  f"super experts {report.get('super_experts')}; calibration sha256 "
                  f"{report.get('calibration', {}).get('sha256', '')[:16]}...")
    for stage in report.get("stages", []):
        console.print(f"  {stage['method']}: {stage['seconds']:.1f} s" + (" (resumed)" if stage.get("resumed") else ""))
    if report.get("exports"):
        for export_report in report["exports"]:
            console.print("\n".join(render_report(export_report)), markup=False)
    return 0
