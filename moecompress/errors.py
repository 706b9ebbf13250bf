"""Errors that reach the user. Each message names the problem and the fix."""


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
