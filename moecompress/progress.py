"""Progress of a run while it works: tasks (the profiling pass, each stage, an evaluation) advance in steps
(decoder layers, lm-eval requests), and a step may report detail (the experts of a layer GPTQ has done).

Who reports. The pipeline opens one task per phase and advances it from the layer-by-layer runner's callbacks; code
deep inside a step (the GPTQ sweep, the lm-eval wrapper) reports through the module functions :func:`detail`,
:func:`advance` and :func:`add_total`, which reach the reporter of the run in progress (:func:`reporting`) without a
progress object being passed through every call. Outside a run they do nothing.

Who shows. :class:`ProgressReporter` keeps the numbers (rate, time left) and logs every finished step at DEBUG on the
``moecompress.progress`` logger (that is how ``run.log`` gets per-layer timings) but prints nothing;
:class:`TextProgress` writes plain lines at an interval (a log file, CI); :class:`RichProgress` draws bars on a
terminal. :func:`for_stream` picks one of the two for a stream. Output goes to stderr: stdout is for results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

PROGRESS_LOGGER = logging.getLogger("moecompress.progress")
INTERVAL_ENV = "MOECOMPRESS_PROGRESS_INTERVAL"  # seconds between plain progress lines of one task (default 5)
DEFAULT_INTERVAL = 5.0


def format_duration(seconds: float) -> str:
    """``0.42 s``, ``12.3 s``, ``4:05``, ``1:02:03``."""
    if seconds < 10:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_left(seconds: float) -> str:
    """A time-left estimate, no more precise than it is: ``3 s``, ``42 s``, ``4:05``."""
    return f"{max(1, round(seconds))} s" if seconds < 60 else format_duration(seconds)


# Our lines on stderr start with the elapsed time; an error line never does (it is the one line without it).
STATUS_LINE = re.compile(r"^\[\d+:\d\d(:\d\d)?\] ")


def is_status_line(line: str) -> bool:
    """Whether ``line`` is one of our progress or message lines (not an error, not a library's output)."""
    return bool(STATUS_LINE.match(line))


def clock(seconds: float) -> str:
    """The elapsed-time prefix of our lines: ``[0:07]``, ``[12:34]``, ``[1:02:03]``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"[{hours}:{minutes:02d}:{secs:02d}]" if hours else f"[{minutes}:{secs:02d}]"


def plural(count: int | float, unit: str) -> str:
    return unit if count == 1 or unit.endswith("s") else unit + "s"


@dataclass
class TaskState:
    """One task's numbers. ``completed`` counts finished steps of the current pass (a stage may sweep the layers
    more than once: the count going down starts a new pass, and rates and time left restart with it)."""

    name: str
    total: int | None = None
    unit: str = "step"
    completed: int = 0
    started: float = field(default_factory=lambda: time.monotonic())
    pass_started: float = field(default_factory=lambda: time.monotonic())
    pass_completed_at_start: int = 0
    step_started: float = field(default_factory=lambda: time.monotonic())  # when the last step finished
    passes: int = 1
    detail: tuple[int, int, str] | None = None  # (done, total, what) inside the current step
    finished: bool = False

    def seconds_per_step(self) -> float | None:
        """Mean time of the steps finished in this pass."""
        done = self.completed - self.pass_completed_at_start
        return (self.step_started - self.pass_started) / done if done > 0 else None

    def rate(self) -> str:
        """``4.2 s/layer`` for slow steps, ``120 requests/s`` for fast ones; empty before the first step."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return ""
        if per_step >= 1 or per_step == 0:
            return f"{per_step:.1f} s/{self.unit}"
        return f"{1 / per_step:.0f} {plural(2, self.unit)}/s"

    def seconds_left(self) -> float | None:
        """Steps left times the mean step time of this pass, less the time already spent on the current step."""
        per_step = self.seconds_per_step()
        if per_step is None or self.total is None:
            return None
        into_step = time.monotonic() - self.step_started
        return max(0.0, (self.total - self.completed) * per_step - min(into_step, per_step))

    def count(self) -> str:
        if self.total is None:
            return f"{self.completed} {plural(self.completed, self.unit)}" if self.completed else ""
        return f"{self.completed}/{self.total} {plural(self.total, self.unit)}"

    def detail_text(self) -> str:
        if self.detail is None:
            return ""
        done, total, what = self.detail
        return f"{what} {done}/{total}"

    def line(self) -> str:
        """The plain progress line: ``gptq: 3/6 layers · experts 12/24 (down) · 4.2 s/layer · ~13 s left``."""
        parts = [part for part in (self.count(), self.detail_text(), self.rate()) if part]
        left = self.seconds_left()
        if left is not None and self.completed < (self.total or 0):
            parts.append(f"~{format_left(left)} left")
        return f"{self.name}: " + " · ".join(parts) if parts else self.name

    def done_line(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [f"done in {format_duration(elapsed)}"]
        if self.completed:
            count = f"{self.completed} {plural(self.completed, self.unit)}"
            parts.append(f"{count}, {self.rate()}" if self.rate() and self.passes == 1 else count)
        if self.passes > 1:
            parts.append(f"{self.passes} passes")
        return f"{self.name}: " + " · ".join(parts)


class ProgressReporter:
    """Receives progress events and keeps each task's numbers; prints nothing (subclasses show them).

    Events: ``start(name, total, unit)``, ``update(name, completed, total)`` (steps finished so far),
    ``detail(name, done, total, what)`` (inside the current step), ``finish(name)``. A name not started yet is
    started by its first update. Every finished step is logged at DEBUG (``moecompress.progress``) with its time.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.open: list[str] = []  # unfinished tasks, innermost last
        self.started = time.monotonic()

    # ----- events ------------------------------------------------------------------------------------------------
    def start(self, name: str, total: int | None = None, unit: str = "step") -> None:
        task = TaskState(name, total, unit)
        self.tasks[name] = task
        if name in self.open:
            self.open.remove(name)
        self.open.append(name)
        self.on_start(task)

    def update(self, name: str, completed: int, total: int | None = None) -> None:
        task = self.tasks.get(name)
        if task is None or task.finished:
            self.start(name, total)
            task = self.tasks[name]
        if total is not None:
            task.total = total
        now = time.monotonic()
        if completed < task.completed:  # the count went down: a new pass over the layers, timed on its own
            task.passes += 1
            task.pass_started, task.pass_completed_at_start, task.completed = task.step_started, 0, 0
        stepped = completed > task.completed
        if stepped:
            PROGRESS_LOGGER.debug("%s: %s %d/%s in %s", name, task.unit, completed, task.total or "?",
                                  format_duration(now - task.step_started))
            task.step_started = now
            task.detail = None
        task.completed = completed
        self.on_update(task, stepped)

    def detail(self, name: str, done: int, total: int, what: str) -> None:
        task = self.tasks.get(name)
        if task is None or task.finished:
            return
        task.detail = (done, total, what)
        self.on_update(task, False)

    def add_total(self, name: str, count: int) -> None:
        """More steps than announced (lm-eval builds a request type's requests only when it gets to them)."""
        task = self.tasks.get(name)
        if task is not None and not task.finished:
            task.total = (task.total or 0) + count
            self.on_update(task, False)

    def finish(self, name: str) -> None:
        task = self.tasks.get(name)
        if task is None or task.finished:
            return
        task.finished = True
        task.detail = None
        if name in self.open:
            self.open.remove(name)
        PROGRESS_LOGGER.info("%s", task.done_line())
        self.on_finish(task)

    def stop(self, name: str) -> None:
        """The task ends without finishing (an error, Ctrl-C): no "done" line, a DEBUG record."""
        task = self.tasks.get(name)
        if task is None or task.finished:
            return
        task.finished = True
        if name in self.open:
            self.open.remove(name)
        PROGRESS_LOGGER.debug("%s: stopped after %s", name, format_duration(time.monotonic() - task.started))
        self.on_stop(task)

    def close(self) -> None:
        """The run is over (or failed): stop drawing."""

    def innermost(self) -> str | None:
        return self.open[-1] if self.open else None

    # ----- what subclasses draw ----------------------------------------------------------------------------------
    def on_start(self, task: TaskState) -> None:
        pass

    def on_update(self, task: TaskState, stepped: bool) -> None:
        pass

    def on_finish(self, task: TaskState) -> None:
        pass

    def on_stop(self, task: TaskState) -> None:
        pass


class TextProgress(ProgressReporter):
    """Plain lines for logs and CI: one per finished decoder layer (the step a long run is made of, as
    llm-compressor's sequential pipeline reports), otherwise a task's line at most every ``interval`` seconds while
    it works (requests, experts inside a layer), and one line when it finishes. Every line starts with the elapsed
    time (``[0:42] gptq: 3/6 layers · ...``)."""

    EVERY_STEP_UNITS = ("layer",)

    def __init__(self, stream: IO[str] | None = None, *, interval: float | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.interval = progress_interval() if interval is None else interval
        self.last_line: dict[str, float] = {}

    def write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"{clock(time.monotonic() - self.started)} {text}\n")
        stream.flush()

    def on_start(self, task: TaskState) -> None:
        self.last_line[task.name] = time.monotonic()

    def on_update(self, task: TaskState, stepped: bool) -> None:
        now = time.monotonic()
        if stepped and task.total is not None and task.completed >= task.total:
            return  # the last step: its task's "done" line follows
        every_step = stepped and task.unit in self.EVERY_STEP_UNITS
        if every_step or now - self.last_line.get(task.name, self.started) >= self.interval:
            self.last_line[task.name] = now
            self.write(task.line())

    def on_finish(self, task: TaskState) -> None:
        self.write(task.done_line())


class RichProgress(ProgressReporter):
    """Bars on a terminal (rich), one per task, with the count, the detail of the current step, the rate, the
    elapsed time and the time left. The display starts with the first task, so a run refused before any work
    prints its one error line alone. Messages logged meanwhile are printed above the bars (see ``moecompress.logs``)."""

    def __init__(self, console=None) -> None:
        super().__init__()
        self.console = console or Console(stderr=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[count]}"), TextColumn("{task.fields[detail]}"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TextColumn("{task.fields[left]}"), console=self.console, transient=False)
        self.ids: dict[str, int] = {}

    @property
    def live(self) -> bool:
        return self.progress.live.is_started

    def print(self, text: str) -> None:
        """A message line above the bars (never wrapped: a long line is left to the terminal)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _fields(self, task: TaskState) -> dict[str, str]:
        left = task.seconds_left()
        return {"count": task.count(), "detail": task.detail_text(), "rate": task.rate(),
                "left": f"~{format_left(left)} left" if left is not None and not task.finished else ""}

    def on_start(self, task: TaskState) -> None:
        if not self.live:
            self.progress.start()
        if task.name in self.ids:
            self.progress.reset(self.ids[task.name], total=task.total, **self._fields(task))
        else:
            self.ids[task.name] = self.progress.add_task(task.name, total=task.total, **self._fields(task))

    def on_update(self, task: TaskState, stepped: bool) -> None:
        if task.name in self.ids:
            self.progress.update(self.ids[task.name], completed=task.completed, total=task.total, **self._fields(task))

    def on_finish(self, task: TaskState) -> None:
        if task.name in self.ids:
            total = task.total or max(task.completed, 1)
            self.progress.update(self.ids[task.name], total=total, completed=total, **self._fields(task))

    def on_stop(self, task: TaskState) -> None:
        if task.name in self.ids:
            self.progress.update(self.ids[task.name], visible=False)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(stream: IO[str]) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


def for_stream(stream: IO[str] | None = None) -> ProgressReporter:
    """Bars on a terminal, plain lines otherwise (a file, a pipe, CI)."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        return RichProgress(Console(file=stream))
    return TextProgress(stream)


# ----- the run in progress: reached from deep code without passing a reporter around ------------------------------
_ACTIVE: ContextVar[ProgressReporter | None] = ContextVar("moecompress_progress", default=None)


def current() -> ProgressReporter | None:
    """The reporter of the run in progress, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def reporting(reporter: ProgressReporter) -> Iterator[ProgressReporter]:
    """Make ``reporter`` the one :func:`detail`, :func:`advance` and :func:`task` report to."""
    token = _ACTIVE.set(reporter)
    try:
        yield reporter
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def task(name: str, total: int | None = None, unit: str = "step") -> Iterator[None]:
    """A task on the current reporter (nothing without one), finished on exit."""
    reporter = current()
    if reporter is None:
        yield
        return
    reporter.start(name, total, unit)
    try:
        yield
    except BaseException:
        reporter.stop(name)
        raise
    reporter.finish(name)


def detail(done: int, total: int, what: str) -> None:
    """Progress inside the current step of the innermost open task (e.g. ``detail(12, 24, "experts (down)")``)."""
    reporter = current()
    if reporter is not None and reporter.innermost() is not None:
        reporter.detail(reporter.innermost(), done, total, what)


def advance(count: int = 1) -> None:
    """``count`` more steps of the innermost open task are finished."""
    reporter = current()
    name = reporter.innermost() if reporter is not None else None
    if name is not None:
        reporter.update(name, reporter.tasks[name].completed + count)


def add_total(count: int) -> None:
    """The innermost open task has ``count`` more steps than it announced."""
    reporter = current()
    name = reporter.innermost() if reporter is not None else None
    if name is not None:
        reporter.add_total(name, count)
