"""Set-up shared by the benchmark scripts: paths, offline mode, ``--threads``, ``--merge`` / ``--compare``.

The scripts run as ``python benchmarks/X.py`` from the repository root, so this folder is ``sys.path[0]`` and
``import _common`` (or ``from _common import ...``) finds this module. Import it before transformers, datasets,
lm_eval or moecompress (torch may come first: it reads neither the offline variables nor ``sys.path`` for them), and
call :func:`set_offline` (scripts that want offline mode) and :func:`add_repo_to_path` (scripts that import
moecompress from this checkout) right after it, before those imports.

A script here must not be named like an installed package: ``benchmarks/`` is first on ``sys.path``, so a
``kernels.py`` here once shadowed the ``kernels`` distribution that transformers imports (hence ``kernel_speed.py``).

Only the standard library is imported here, so importing this module keeps ``--help`` fast and sets nothing up that
the offline variables must precede.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

#: The checkout's root (the folder holding ``moecompress/`` and ``benchmarks/``).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The test bed: ``$MOECOMPRESS_TESTBED``, default ``../shared/testbed`` beside the checkout.
TESTBED = Path(os.environ.get("MOECOMPRESS_TESTBED", REPO_ROOT.parent / "shared" / "testbed"))
#: The test bed's calibration text (one JSONL file per domain).
TESTBED_CALIB = TESTBED / "calib"
#: Environment variables :func:`set_offline` sets to ``1`` (unless already set).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_offline() -> None:
    """Set the Hugging Face offline variables (:data:`OFFLINE_VARIABLES`) to ``1`` where the environment does not
    set them already. Call it before transformers, datasets or lm_eval is imported: they read them on import."""
    for variable in OFFLINE_VARIABLES:
        os.environ.setdefault(variable, "1")


def add_repo_to_path() -> None:
    """Put :data:`REPO_ROOT` first on ``sys.path``, so that ``import moecompress`` imports this checkout's package."""
    if sys.path[:1] != [str(REPO_ROOT)]:
        sys.path.insert(0, str(REPO_ROOT))


def testbed_model(name: str) -> Path:
    """The folder of the test-bed model ``name`` (``moe-ref-q3``, ``moe-ref-mx``, ``moe-ref-ds``)."""
    return TESTBED / "models" / name


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None, help: str | None = None) -> None:
    """Add ``--threads`` (an int, torch's CPU threads) with ``default``; pass the result to :func:`set_threads`."""
    parser.add_argument("--threads", type=int, default=default, help=help)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None or 0 leaves torch's own choice. Imports torch."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_merge_compare_arguments(parser: argparse.ArgumentParser, compare_help: str | None = None) -> None:
    """Add ``--merge JSON...`` and ``--compare JSON...``: result files (``{"rows": [...]}``, a script's
    ``--json-out``) of earlier runs to print one table of, or the paired differences of; see
    :func:`print_merged_or_compared`."""
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="JSON", help=compare_help)


def read_rows(paths: list[Path]) -> list[dict]:
    """The rows of result files written as ``{"rows": [...]}``, file by file, in order."""
    return [row for path in paths for row in json.loads(path.read_text())["rows"]]


def print_merged_or_compared(args: argparse.Namespace, table: Callable[[list[dict]], str],
                             comparison: Callable[[list[dict]], str]) -> bool:
    """With ``--merge``, print ``table`` of those files' rows; else with ``--compare``, print ``comparison`` of
    them. Returns whether either was given (the script then stops, having run nothing)."""
    if args.merge:
        print(table(read_rows(args.merge)))
        return True
    if args.compare:
        print(comparison(read_rows(args.compare)))
        return True
    return False


def stdout_to_stderr() -> contextlib.redirect_stdout:
    """A context manager sending stdout to stderr (lm-eval's progress output), so stdout holds only the tables."""
    return contextlib.redirect_stdout(sys.stderr)
