"""``moecompress eval MODEL --tasks T1,T2``: score a checkpoint on bundled, user or lm-eval tasks."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from rich.console import Console

from moecompress import progress
from moecompress.commands.arguments import device_name, positive_int
from moecompress.evals import evaluate_model, resolve_tasks
from moecompress.checkpoint.placement import DEVICE_MAPS
from moecompress.evals.loading import EVAL_DTYPES, load_model_for_eval
from moecompress.evals.tables import scores_table
from moecompress.logs import ConsoleHandler, run_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a model on evaluation tasks (bundled offline tasks, your own, or lm-eval's)",
        description=(
            "Score MODEL (a checkpoint folder or hub id) with lm-eval, in fp32 (--dtype). Bundled offline tasks: "
            "tb_code_next, tb_manpages_next, tb_pydocs_next, tb_shakespeare_next, tb_austen_next, tb_kjv_next, "
            "tb_wordnet_gloss, tb_arith (multiple choice: acc, acc_norm, acc_mutual_info) and tb_ppl_<domain> "
            "(word_perplexity, byte_perplexity, bits_per_byte); tags testbed, testbed_mc, testbed_ppl."
        ),
    )
    parser.add_argument("model", help="checkpoint folder or hub id")
    parser.add_argument("--tasks", required=True, help="comma-separated task names or tags, e.g. tb_code_next,tb_arith")
    parser.add_argument("--limit", type=_limit, default=None, help="at most N documents per task (or a fraction < 1)")
    parser.add_argument("--batch-size", default=16, type=_batch_size,
                        help="requests per forward pass, or 'auto' (default 16)")
    parser.add_argument("--device", default="cpu", type=device_name,
                        help="torch device to run on (default cpu); cuda spreads a model larger than one GPU over the "
                             "GPUs and the CPU")
    parser.add_argument("--dtype", default="float32", choices=sorted(EVAL_DTYPES),
                        help="dtype the model is scored in (default float32; bfloat16 on GPUs)")
    parser.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                        help="with --device cuda: spread the model over the GPUs (and the CPU) this way even when it "
                             "fits on one (accelerate's device_map)")
    parser.add_argument("--include-path", default=None, help="folder with your own lm-eval YAML tasks")
    parser.add_argument("--allow-task-code", action="store_true",
                        help="let the --include-path tasks run Python (lm-eval `!function` modules, templates that "
                             "reach Python objects); refused without it: read a shared task folder's code first")
    parser.add_argument(
        "--no-bos", dest="add_bos_token", action="store_false", default=None,
        help="do not start every request with the tokenizer's BOS token (default: start with it when it exists)",
    )
    parser.add_argument(
        "--joint-encoding", action="store_true",
        help="tokenize context+choice together (lm-eval's default) instead of each on its own",
    )
    parser.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    parser.set_defaults(func=run)


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of documents or a fraction < 1, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--limit must be positive and finite, got {text}")
    return int(value) if value >= 1 else value


def _batch_size(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def run(args: argparse.Namespace) -> int:
    task_names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    batch_size: int | str = args.batch_size
    # bad task names or data, and task code not allowed, fail before the model loads
    resolve_tasks(task_names, include_path=args.include_path, allow_task_code=args.allow_task_code)
    # progress on stderr (bars on a terminal, plain lines otherwise); stdout carries only the scores
    reporter = progress.for_stream(sys.stderr)
    console = ConsoleHandler(sys.stderr, started=reporter.started, reporter=reporter)
    try:
        with run_output(console=console, verbose=getattr(args, "verbose", None)), progress.reporting(reporter):
            model, tokenizer = load_model_for_eval(args.model, device=args.device, dtype=EVAL_DTYPES[args.dtype],
                                                   device_map=args.device_map)
            started = time.perf_counter()
            # With --json, stdout carries only the JSON: anything lm-eval prints goes to stderr.
            with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext(), \
                    progress.task(f"evaluate {args.model}", unit="request"):
                scores = evaluate_model(
                    model, tokenizer, task_names, limit=args.limit, batch_size=batch_size,
                    include_path=args.include_path, add_bos_token=args.add_bos_token,
                    encode_separately=not args.joint_encoding, allow_task_code=args.allow_task_code,
                )
            seconds = time.perf_counter() - started
    finally:
        reporter.close()
    if args.json:
        print(json.dumps(scores, indent=2, sort_keys=True))
    else:
        Console().print(scores_table({str(args.model): scores}, title=f"moecompress eval ({seconds:.0f} s)"))
    return 0
