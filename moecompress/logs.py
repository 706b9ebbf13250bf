"""What a run says and where it goes: our messages on stderr, the libraries' own output kept off the terminal (unless
verbose), and ``<out>/run.log`` holding all of it plus debug detail (versions, device, per-layer timings, warnings).

* :func:`quiet_libraries_before_import` sets the switches libraries read once, when they are imported (tqdm's and
  the Hugging Face progress bars). The CLI calls it before anything imports transformers.
* :func:`run_output` is the context of one run (CLI or Python API): a console handler for the ``moecompress``
  logger, the libraries' loggers and Python warnings sent to the run log instead of the terminal, their progress
  bars off; everything is put back on exit.
* :class:`RunLog` buffers a run's records until its folder exists, then writes ``run.log`` there.

``MOECOMPRESS_VERBOSE=1`` (or ``-v``) keeps the libraries' own output on the terminal as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Iterator

from moecompress.progress import PROGRESS_LOGGER, RichProgress, clock

LOGGER = logging.getLogger("moecompress")
RUN_LOG = "run.log"
VERBOSE_ENV = "MOECOMPRESS_VERBOSE"
# Libraries whose loggers carry their own terminal handlers, or log to the root logger; during a quiet run their
# records go to run.log only.
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate", "lm_eval", "lm-eval", "torch",
                   "compressed_tensors", "optimum", "filelock", "urllib3", "fsspec")
# Read by tqdm (TQDM_*), huggingface_hub and datasets when they are imported.
QUIET_ENVIRONMENT = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def verbose_from_environment() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def quiet_libraries_before_import() -> None:
    """Switch off tqdm and the Hugging Face progress bars for this process; must run before they are imported."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


class ConsoleHandler(logging.Handler):
    """Our messages on the terminal: ``[0:42] message`` (warnings: ``[0:42] warning: message``), printed above the
    progress bars when a :class:`RichProgress` draws them. Progress records are left to the progress reporter."""

    def __init__(self, stream: IO[str] | None = None, *, started: float | None = None, reporter=None,
                 level: int = logging.INFO) -> None:
        super().__init__(level)
        self.stream = stream
        self.started = time.monotonic() if started is None else started
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == PROGRESS_LOGGER.name:
            return
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            line = f"{clock(time.monotonic() - self.started)} {message}"
            if isinstance(self.reporter, RichProgress) and self.reporter.live:
                self.reporter.print(line)
            else:
                stream = self.stream or sys.stderr
                stream.write(line + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


class RunLog(logging.Handler):
    """A run's ``run.log``: records are kept in memory until :meth:`open` names the run's folder (the checks before
    any work run before the folder exists), then written there, appended to what an earlier, stopped attempt of the
    same run wrote."""

    FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(self.FORMAT))
        self.buffer: list[str] = []
        self.stream: IO[str] | None = None
        self.path: Path | None = None

    def open(self, folder: Path) -> Path:
        self.path = Path(folder) / RUN_LOG
        self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.stream.write("".join(self.buffer))
        self.stream.flush()
        self.buffer = []
        return self.path

    def moved_to(self, folder: Path) -> None:
        """The run's folder was renamed (published): the open file moved with it."""
        self.path = Path(folder) / RUN_LOG

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            if self.stream is None:
                self.buffer.append(text)
            else:
                self.stream.write(text)
                self.stream.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


# ----- one run ----------------------------------------------------------------------------------------------------
_ACTIVE_RUNS: list["_RunOutput"] = []


def libraries_quiet() -> bool:
    """True while a quiet run is in progress (the lm-eval wrapper then replaces lm-eval's bars by our progress)."""
    return bool(_ACTIVE_RUNS) and not _ACTIVE_RUNS[-1].verbose


def adopt_library_loggers() -> None:
    """Route the loggers of libraries imported since the run started (lm-eval, datasets) like the others."""
    if _ACTIVE_RUNS:
        _ACTIVE_RUNS[-1].route_library_loggers()


class _RunOutput:
    """Saves what it changes in the logging setup and the progress-bar switches, and puts it back on exit."""

    def __init__(self, run_log: RunLog | None, console: logging.Handler | None, verbose: bool) -> None:
        self.run_log, self.console, self.verbose = run_log, console, verbose
        self.undo: list = []
        self.routed: set[str] = set()

    def enter(self) -> None:
        level, propagate = LOGGER.level, LOGGER.propagate
        LOGGER.setLevel(logging.DEBUG)
        LOGGER.propagate = False  # our lines are printed by our console handler, not also by the root's
        self.undo.append(lambda: (LOGGER.setLevel(level), setattr(LOGGER, "propagate", propagate)))
        for handler in (self.console, self.run_log):
            if handler is not None:
                self._add_handler(LOGGER, handler)
        root = logging.getLogger()
        if self.run_log is not None:  # also keeps logging's last-resort handler from printing library warnings
            self._add_handler(root, self._warnings_only(self.run_log))
        elif not self.verbose:  # no log to keep them in: a library logging to the root prints nothing
            self._add_handler(root, logging.NullHandler())
        self._capture_warnings()
        if not self.verbose:
            self._progress_bars_off()
        self.route_library_loggers()

    def exit(self) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo = []

    def _add_handler(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self.undo.append(lambda: logger.removeHandler(handler))

    @staticmethod
    def _warnings_only(handler: logging.Handler) -> logging.Handler:
        forward = _Forward(handler)
        forward.setLevel(logging.WARNING)
        return forward

    def _capture_warnings(self) -> None:
        """Python warnings (``UserWarning`` with its source line) become log records of ``py.warnings``."""
        was_captured = logging._warnings_showwarning is not None  # noqa: SLF001 - logging keeps no public flag
        logging.captureWarnings(True)
        self.undo.append(lambda: logging.captureWarnings(was_captured))
        warnings_logger = logging.getLogger("py.warnings")
        saved = (list(warnings_logger.handlers), warnings_logger.propagate)
        handlers = [self.run_log] if self.run_log is not None else []
        if self.verbose:
            handlers.append(logging.StreamHandler(sys.stderr))
        warnings_logger.handlers = list(handlers) or [logging.NullHandler()]
        warnings_logger.propagate = False
        self.undo.append(lambda: (setattr(warnings_logger, "handlers", saved[0]),
                                  setattr(warnings_logger, "propagate", saved[1])))

    def route_library_loggers(self) -> None:
        """Quiet: a library logger's own handlers are set aside and its records go to the run log; verbose: the
        run log is added beside them."""
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            if name in self.routed or not logger.handlers:
                continue
            self.routed.add(name)
            saved = (list(logger.handlers), logger.propagate)
            kept = saved[0] if self.verbose else []
            logger.handlers = kept + ([self.run_log] if self.run_log is not None else [])
            if not logger.handlers:
                logger.handlers = [logging.NullHandler()]
            logger.propagate = False  # its records are handled here; the root's run-log handler would repeat them
            self.undo.append(lambda logger=logger, saved=saved: (setattr(logger, "handlers", saved[0]),
                                                                  setattr(logger, "propagate", saved[1])))

    def _progress_bars_off(self) -> None:
        """The libraries' own bars: environment switches for libraries imported later in the run, their functions
        for those already imported (transformers' loading bars, huggingface_hub, datasets)."""
        for name, value in QUIET_ENVIRONMENT.items():
            previous = os.environ.get(name)
            os.environ[name] = value
            self.undo.append(lambda name=name, previous=previous: (
                os.environ.pop(name, None) if previous is None else os.environ.__setitem__(name, previous)))
        for module_name, bars_on, off, on in PROGRESS_BAR_SWITCHES:
            module = sys.modules.get(module_name)
            functions = [getattr(module, name, None) for name in (bars_on.lstrip("!"), off, on)]
            if module is None or not all(callable(function) for function in functions):
                continue  # not imported (the environment switch covers it), or another version's names
            check, turn_off, turn_on = functions
            if check() != bars_on.startswith("!"):  # "!name": the function says whether the bars are *off*
                turn_off()
                self.undo.append(turn_on)


# (module, function saying whether its bars are on ("!": off), turn them off, turn them on), for libraries already
# imported when a run starts.
PROGRESS_BAR_SWITCHES = (
    ("huggingface_hub.utils.tqdm", "!are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
    ("datasets.utils.tqdm", "!are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
    ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
)


class _Forward(logging.Handler):
    """Passes records on to another handler (so one handler can sit on two loggers at two levels)."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


@contextlib.contextmanager
def run_output(run_log: RunLog | None = None, *, console: logging.Handler | None = None,
               verbose: bool | None = None) -> Iterator[None]:
    """The output of one run: our console handler, libraries and warnings into ``run_log`` (and, verbose, also on
    the terminal as they would be). Nested runs (the API inside a script that already set this up) nest cleanly."""
    verbose = verbose_from_environment() if verbose is None else verbose
    state = _RunOutput(run_log, console, verbose)
    _ACTIVE_RUNS.append(state)
    try:
        state.enter()
        yield
    finally:
        state.exit()
        _ACTIVE_RUNS.remove(state)


def log_exception(error: BaseException, message: str) -> None:
    """``message`` and the traceback of ``error`` into the run log (not on the terminal: the CLI prints the
    error's one line, a bug its traceback)."""
    LOGGER.debug("%s: %s\n%s", message, error, "".join(traceback.format_exception(error)).rstrip())
