"""Quality benchmark: score the test-bed models on the bundled tasks and print one table.

    python benchmarks/quality.py                                    # 3 models x all 16 bundled tasks
    python benchmarks/quality.py --models moe-ref-mx --tasks tb_code_next,tb_arith --limit 50
    python benchmarks/quality.py --models /path/to/compressed-checkpoint --json-out scores.json

A model is a test-bed name (looked up in ``$MOECOMPRESS_TESTBED/models``, default ``../shared/testbed`` beside the
checkout) or any checkpoint folder. Models are evaluated in fp32 on CPU (or ``--device``), one at a time. Method
issues use this script to show their numbers next to the uncompressed references.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import add_threads_argument, set_offline, set_threads, stdout_to_stderr, testbed_model

set_offline()

TESTBED_MODELS = ("moe-ref-q3", "moe-ref-mx", "moe-ref-ds")


def model_path(name: str) -> Path:
    """A test-bed model name or a folder."""
    candidate = Path(name)
    if candidate.is_dir():
        return candidate
    return testbed_model(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(TESTBED_MODELS), help="comma-separated test-bed names or folders")
    parser.add_argument("--tasks", default="testbed", help="comma-separated tasks or tags (default: all bundled)")
    parser.add_argument("--limit", type=float, default=None, help="at most N documents per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", type=Path, default=None, help="write {model: {task: {metric: value}}} here")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown instead of rich")
    add_threads_argument(parser, None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, metavar="JSON",
        help="evaluate nothing: print one table from --json-out files of earlier runs (e.g. one run per model)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        scores_by_model: dict[str, dict[str, dict[str, float]]] = {}
        for json_file in args.merge:
            scores_by_model.update(json.loads(json_file.read_text())["scores"])
        _print_table(scores_by_model, markdown=args.markdown)
        return 0

    from moecompress.evals import evaluate_model
    from moecompress.evals.loading import load_model_for_eval

    set_threads(args.threads)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    task_names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    scores_by_model: dict[str, dict[str, dict[str, float]]] = {}
    seconds_by_model: dict[str, float] = {}
    for name in [name.strip() for name in args.models.split(",") if name.strip()]:
        started = time.perf_counter()
        model, tokenizer = load_model_for_eval(model_path(name), device=args.device)
        with stdout_to_stderr():
            scores_by_model[name] = evaluate_model(model, tokenizer, task_names, limit=limit, batch_size=args.batch_size)
        seconds_by_model[name] = time.perf_counter() - started
        print(f"{name}: {seconds_by_model[name]:.0f} s", file=sys.stderr)
        del model
        if args.json_out:  # written after every model, so a long run leaves what it has
            args.json_out.write_text(json.dumps({"scores": scores_by_model, "seconds": seconds_by_model}, indent=1))

    _print_table(scores_by_model, markdown=args.markdown)
    return 0


def _print_table(scores_by_model: dict[str, dict[str, dict[str, float]]], *, markdown: bool) -> None:
    from rich.console import Console

    from moecompress.evals.tables import scores_markdown, scores_table

    if markdown:
        print(scores_markdown(scores_by_model))
    else:
        Console(width=160).print(scores_table(scores_by_model, title="moecompress quality benchmark (fp32)"))


if __name__ == "__main__":
    sys.exit(main())
