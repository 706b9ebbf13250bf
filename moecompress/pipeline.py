"""Stages, the pipeline that runs them, and the record each run leaves.

A *stage* is one step of a compression recipe (``{method: NAME, ...}`` in YAML). Each stage class:

* has a unique ``method`` name (the recipe's ``method:`` value) and registers itself with :func:`register_stage`;
* declares its options as a pydantic model ``Options`` (``extra="forbid"``), so a recipe with an unknown key, a
  wrong type or an impossible value fails before any work starts;
* implements ``run(context) -> StageResult``: it may edit ``context.model`` in place (through ``moecompress.models``)
  and returns the decisions it took (kept experts, bit map, scores...) and any metrics, which go into the report.

Stages read calibration statistics through ``context.statistics(...)``, which runs (or reuses) one layer-by-layer
calibration pass that collects only what the asking stages need; a structural edit marks the statistics stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pydantic


class StageOptions(pydantic.BaseModel):
    """Base for every stage's options: unknown keys are errors."""

    model_config = pydantic.ConfigDict(extra="forbid")


@dataclass
class StageResult:
    """What a stage decided and measured; it all goes into ``report.json`` under ``stages``.

    ``decisions``: JSON-serialisable record of choices (e.g. ``{"kept_experts": {layer: [ids]}}``).
    ``metrics``: JSON-serialisable numbers (e.g. evaluation scores).
    ``plots``: PNG files written into the run's output folder, relative paths.
    ``changed_structure``: True when the stage edited the model so that cached statistics are stale.
    """

    decisions: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    changed_structure: bool = False


class Stage:
    """Base class of pipeline stages. Subclasses set ``method`` and ``Options`` and implement ``run``."""

    method: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions

    def __init__(self, options: StageOptions | dict[str, Any] | None = None) -> None:
        if options is None:
            options = {}
        self.options = options if isinstance(options, StageOptions) else self.Options(**options)

    def run(self, context: "RunContext") -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError


STAGE_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(stage_class: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to recipes under ``stage_class.method``."""
    if not stage_class.method:
        raise ValueError(f"{stage_class.__name__} has no `method` name")
    STAGE_REGISTRY[stage_class.method] = stage_class
    return stage_class


@dataclass
class RunContext:
    """Everything a stage sees while a pipeline runs.

    model: the model being compressed, in memory (stages edit it in place).
    tokenizer: its tokenizer.
    source: folder or hub id of the *original* checkpoint (read-only: nothing is ever written there).
    output_dir: the run's output folder (report, plots, model).
    calibration: the calibration token ids and their description (``moecompress.calibration``), or None.
    super_experts: ``[(layer, expert)]`` found on the original model; stages keep them and remap them on edits.
    record: the report being built (``report.json``); stages add to it only through their ``StageResult``.
    """

    model: Any
    tokenizer: Any
    source: str
    output_dir: Path
    calibration: Any = None
    super_experts: list[tuple[int, int]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
