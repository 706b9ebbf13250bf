"""The ``moecompress`` command line: thin. It parses arguments and hands over to one module per subcommand.

Each module in ``moecompress.commands`` exposes ``register(subparsers)``, which adds its parser and sets
``func=run`` on it. Nothing a user can cause ends in a traceback; each failure is one line on stderr:

* a bad argument (unknown option, ``--threads 0``, ``--device cuda`` on a machine without CUDA) and every
  :class:`moecompress.errors.MoECompressError` (bad recipe, damaged checkpoint, output folder rules): exit 2;
* Ctrl-C: exit 130, saying whether the run can be resumed (also during the first seconds, while the libraries
  import: see :func:`moecompress.errors.report_interrupt_on_one_line`);
* the machine refusing (out of memory, including torch's allocation failures, a full disk, no permission): exit 1,
  naming the output folder for a full disk;
* a library's own error about a file that slipped past moecompress's checks (``SafetensorError``): exit 2.

Each command checks its inputs and says which file is wrong and how to fix it; this handler is the last line of
defence, so that no input ends in a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moecompress.errors import report_interrupt_on_one_line
from moecompress.logs import quiet_libraries_before_import, run_output, verbose_from_environment

# Before torch (it imports tqdm, which reads TQDM_DISABLE once, when imported) and everything that imports transformers.
if not (verbose_from_environment() or {"-v", "--verbose"} & set(sys.argv[1:])):
    quiet_libraries_before_import()

try:  # torch takes seconds to import: Ctrl-C then must not print a traceback
    import torch  # noqa: E402
    from safetensors import SafetensorError  # noqa: E402
except KeyboardInterrupt:
    report_interrupt_on_one_line()
    raise

from moecompress.errors import MoECompressError, OutOfSpaceError, is_out_of_space  # noqa: E402
from moecompress.version import __version__  # noqa: E402

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ("inspect", "compress", "eval", "export", "retrieve", "store")


# Exit codes: a bad argument or input, the machine refusing (memory, disk, permissions), Ctrl-C.
EXIT_USAGE, EXIT_MACHINE, EXIT_INTERRUPTED = 2, 1, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``moecompress compress: error: ...``) rather than the usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moecompress",
        description="Compress Mixture-of-Experts language models and report what it cost in quality.",
    )
    parser.add_argument("--version", action="version", version=f"moecompress {__version__}")
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"moecompress.commands.{name}")
        except ModuleNotFoundError as error:  # a subcommand still being written must not break the others
            if error.name == f"moecompress.commands.{name}":
                continue
            raise
        module.register(subparsers)
    for subparser in subparsers.choices.values():  # `moecompress compress -v ...` as well as `moecompress -v ...`
        subparser.add_argument(*VERBOSE_FLAGS, action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


VERBOSE_FLAGS = ("-v", "--verbose")
VERBOSE_HELP = "also show the libraries' own output (progress bars, warnings); or set MOECOMPRESS_VERBOSE=1"


def quiet_third_party_output(argv: list[str]) -> bool:
    """Keep the terminal for our own progress and results: the libraries' bars and warnings go to the run's log
    (``run.log``) instead. Returns whether the run is verbose (``-v`` or ``MOECOMPRESS_VERBOSE=1``: keep everything).

    The switches that libraries read when imported are set here too, for a ``main`` called from Python; the
    console script has set them already, when this module was imported (before torch)."""
    verbose = verbose_from_environment() or bool(set(VERBOSE_FLAGS) & set(argv))
    if not verbose:
        quiet_libraries_before_import()
    return verbose


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = "moecompress"
    args = None
    try:
        verbose = quiet_third_party_output(argv)
        parser = build_parser()  # imports every command's module: seconds, during which Ctrl-C must be one line
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help, --version, or a bad argument (already printed on one line)
            return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else EXIT_USAGE)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        name = f"moecompress {args.command}"
        args.verbose = verbose
        with run_output(verbose=verbose):  # libraries' loggers and warnings off the terminal (compress: run.log)
            return int(args.func(args) or 0)
    except MoECompressError as error:
        return _fail(f"{name}: error: {error}", EXIT_USAGE)
    except KeyboardInterrupt as interrupt:  # RunInterrupted says whether the run can be resumed
        if args is None:  # still importing the commands' libraries
            return _fail(f"{name}: interrupted while starting; nothing was done", EXIT_INTERRUPTED)
        return _fail(f"{name}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""), EXIT_INTERRUPTED)
    except (MemoryError, torch.OutOfMemoryError) as error:
        return _fail(_out_of_memory(name, error), EXIT_MACHINE)
    except RuntimeError as error:
        if not _is_allocation_failure(error):
            raise  # a bug: keep its traceback
        return _fail(_out_of_memory(name, error), EXIT_MACHINE)
    except SafetensorError as error:
        if is_out_of_space(error):
            return _fail(_out_of_space(name, args), EXIT_MACHINE)
        return _fail(f"{name}: error: a safetensors file could not be read ({_first_line(error)}); the checkpoint or "
                     "output folder given is damaged: re-download or re-create it", EXIT_USAGE)
    except BrokenPipeError:  # output piped into a program that stopped reading (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented recipe
        return EXIT_MACHINE
    except OSError as error:  # the machine refused: disk full, no permission, a path that vanished
        if is_out_of_space(error) and not isinstance(error, OutOfSpaceError):
            return _fail(_out_of_space(name, args), EXIT_MACHINE)  # a plain ENOSPC: say where and what to do
        return _fail(f"{name}: error: {error}", EXIT_MACHINE)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300] or type(error).__name__


def _is_allocation_failure(error: RuntimeError) -> bool:
    """torch reports a failed CPU allocation as a RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    text = str(error)
    return any(marker in text for marker in ("can't allocate memory", "Cannot allocate memory", "out of memory",
                                             "not enough memory"))


def _out_of_memory(name: str, error: BaseException) -> str:
    return (f"{name}: error: out of memory ({_first_line(error)}); use a smaller batch size (calibration.batch_size, "
            "--batch-size) or shorter/fewer calibration sequences, or a machine with more memory")


def _out_of_space(name: str, args) -> str:
    out = getattr(args, "out", None)
    where = f" while writing {out}" if out else ""
    return (f"{name}: error: no space left on the device{where}; free some space (or write to another disk), then "
            "re-run the same command")


def _fail(message: str, code: int) -> int:
    print(" ".join(message.split("\n")), file=sys.stderr)  # one line, whatever the message holds
    return code


if __name__ == "__main__":
    sys.exit(main())
