"""Errors that reach the user. Each message names the problem and the fix."""

import reprlib
import sys


class MoECompressError(Exception):
    """Base class: every error moecompress raises on purpose derives from it (the CLI prints it without a traceback)."""


class UnsupportedModelError(MoECompressError):
    """The model is dense, or an MoE family we have no adapter for."""


class CheckpointError(MoECompressError):
    """A checkpoint folder or file is missing, unreadable or corrupt."""


class RecipeError(MoECompressError):
    """A recipe has an unknown method or key, a wrong type, or an impossible value."""


class CalibrationError(MoECompressError):
    """Calibration data is missing, empty or unusable."""


class TaskError(MoECompressError):
    """An evaluation task is missing, or its data file or fields are wrong."""


class RetrievalError(MoECompressError):
    """A pattern store or a retrieval request is unusable (wrong model, unknown task, impossible budget), or a model
    cannot be assembled from part of its checkpoint."""


class UsageError(MoECompressError):
    """A command-line value that cannot work here: a device this machine lacks, a thread count below 1..."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a compression run. A KeyboardInterrupt still (so code that stops on Ctrl-C keeps doing so); its
    message says whether and how the run can be resumed. The CLI prints it on one line and exits with 130."""


class OutOfSpaceError(OSError):
    """The disk filled up while writing an output. An ``OSError`` still (the CLI exits with 1, the machine refused);
    its message names the folder being written and what to do (free space; a stopped compress run resumes)."""

    def __init__(self, message: str) -> None:
        super().__init__(28, message)  # errno.ENOSPC

    def __str__(self) -> str:
        return self.strerror


def is_out_of_space(error: BaseException) -> bool:
    """Did ``error`` come from a full disk (or quota)? ``OSError`` ENOSPC/EDQUOT, or a library that reports it in
    its own exception type (safetensors' ``SafetensorError: ... No space left on device (os error 28)``)."""
    if isinstance(error, OSError):
        return error.errno in (28, 122)  # ENOSPC, EDQUOT
    text = str(error)
    return type(error).__name__ == "SafetensorError" and ("os error 28" in text or "No space left" in text
                                                           or "StorageFull" in text or "os error 122" in text)


# A repr that shows at most a few items of a few levels (see describe_value).
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxtuple, _SHORT_REPR.maxset = 2, 4, 4, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = 60


def describe_value(value, limit: int = 80) -> str:
    """A short ``repr`` of a value from an input file, for error messages: at most about ``limit`` characters, and
    never walks more of ``value`` than it shows (a YAML alias bomb expands to billions of nodes: its full ``repr``
    would never finish)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_interrupt_on_one_line() -> None:
    """Make an interrupt that ends the process print one line instead of a traceback. Installed only when Ctrl-C
    lands while moecompress itself is being imported (the first seconds of ``moecompress ...``, before the command
    line's own handler runs): the exception still ends the process as an interrupt (exit status 130)."""
    previous = sys.excepthook

    def one_line(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("moecompress: interrupted while starting; nothing was done", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = one_line
