"""The ``moecompress`` command line: thin. It parses arguments and hands over to one module per subcommand.

Each module in ``moecompress.commands`` exposes ``register(subparsers)``, which adds its parser and sets
``func=run`` on it. Errors derived from :class:`moecompress.errors.MoECompressError` are printed as one clear
message (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from moecompress import __version__
from moecompress.errors import MoECompressError

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ("inspect", "compress", "eval", "retrieve", "store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moecompress",
        description="Compress Mixture-of-Experts language models and report what it cost in quality.",
    )
    parser.add_argument("--version", action="version", version=f"moecompress {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"moecompress.commands.{name}")
        except ModuleNotFoundError as error:  # a subcommand still being written must not break the others
            if error.name == f"moecompress.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def quiet_third_party_output() -> None:
    """Keep the terminal for our own progress bars and report: no per-file loading bars or library warnings.

    ``MOECOMPRESS_VERBOSE=1`` keeps everything. TQDM_DISABLE must be set before tqdm is imported (it reads its
    defaults from the environment when its class is defined), hence at the top of ``main``.
    """
    if os.environ.get("MOECOMPRESS_VERBOSE"):
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("LMEVAL_LOG_LEVEL", "ERROR")  # lm-eval resets its logger level when imported
    for name in ("lm_eval", "lm-eval", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except MoECompressError as error:
        print(f"moecompress {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
