"""The stage interface: what every method module implements and what the recipe and pipeline run.

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

import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pydantic
from pydantic_core import PydanticUndefined

from moecompress.analysis.super_experts import remap_super_experts
from moecompress.calibration import LayerwiseRunner
from moecompress.errors import CalibrationError, RecipeError, describe_value


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


class StageOptionsError(RecipeError, ValueError):
    """A stage built from Python with options its ``Options`` model refuses (the message names each problem). Also a
    ``ValueError``, as pydantic's own error was, so a caller catching that keeps working."""

    def __init__(self, message: str, validation_error: pydantic.ValidationError) -> None:
        super().__init__(message)
        self.validation_error = validation_error


class Stage:
    """Base class of pipeline stages. Subclasses set ``method`` and ``Options`` and implement ``run``.

    Options are keyword arguments, a dict, or an ``Options`` instance: ``GPTQStage(bits=4, group_size=128)``,
    ``GPTQStage({"bits": 4})``; ``help()`` of a stage class lists every option with its type, default and meaning
    (generated from ``Options``). A stage class is named after its recipe ``method`` (:func:`stage_class_name`).

    Optional: ``statistics`` names what the stage will ask ``context.statistics`` for (the profiling pass then
    collects it too, so a first stage costs no extra pass); ``check(context)`` rejects impossible options once the
    model's config is known, before any work; ``replay(context, result)`` re-applies a finished stage's recorded
    decisions when a stopped run resumes (a structural stage without it runs again; a deciding stage such as a bit
    allocator puts its decision back on the context).
    """

    method: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions
    statistics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: StageOptions | dict[str, Any] | None = None, /, **option_values: Any) -> None:
        if isinstance(options, StageOptions) and not option_values:
            self.options = options
            return
        if isinstance(options, StageOptions):
            options = options.model_dump(exclude_unset=True)
        values = {**(options or {}), **option_values}
        try:
            self.options = self.Options(**values)
        except pydantic.ValidationError as error:
            raise StageOptionsError(format_validation_error(type(self).__name__, error, self.Options), error) from None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method and ("method" in vars(cls) or "Options" in vars(cls)):
            cls.__doc__ = (inspect.cleandoc(cls.__doc__ or "") + "\n\n" + options_doc(cls)).strip()
            cls.__signature__ = options_signature(cls)

    def __repr__(self) -> str:
        values = self.options.model_dump(exclude_unset=True)
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in values.items())})"

    def run(self, context: "RunContext") -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, context: "RunContext") -> None:
        """Raise :class:`moecompress.errors.RecipeError` for options impossible for this model (default: none)."""

    def replay(self, context: "RunContext", result: StageResult) -> bool:
        """Re-apply ``result``'s decisions to ``context.model``; return False when the stage cannot (default)."""
        return False

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, **self.options.model_dump(mode="json", exclude_none=True)}


# ----- names, options documentation ---------------------------------------------------------------------------------
ACRONYMS = {"gptq": "GPTQ", "rtn": "RTN"}


def stage_class_name(method: str) -> str:
    """The class name of the stage with recipe ``method``: the method in CamelCase, then ``Stage``
    (``prune_reap`` -> ``PruneReapStage``, ``mcmoe_pmq`` -> ``McmoePmqStage``; ``GPTQStage``, ``RTNStage``)."""
    return "".join(ACRONYMS.get(part, part.capitalize()) for part in method.split("_")) + "Stage"


def format_validation_error(where: str, error: pydantic.ValidationError, model: type[pydantic.BaseModel],
                            most: int = 3) -> str:
    """One line naming the first ``most`` problems pydantic found (a list of a million bad items is one message, not
    a million): the key, what is wrong, what was given (a short excerpt) or what is allowed."""
    problems = []
    errors = error.errors()
    for item in errors[:most]:
        key = (".".join(str(part) for part in item["loc"]) or "(options)")[:100]
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r} (allowed: {', '.join(model.model_fields)})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message[:300]} (got {describe_value(item.get('input'))})")
    if len(errors) > most:
        problems.append(f"and {len(errors) - most} more")
    return f"{where}: " + "; ".join(problems)


def type_name(annotation: Any) -> str:
    """A field's type as a person reads it: ``int``, ``list[str]``, ``int | None``, ``'minmax' | 'mse'``."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(value) for value in arguments)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(argument) for argument in arguments)
    if origin is typing.Annotated:
        return type_name(arguments[0]) + _constraints(arguments[1:])
    if origin is not None:
        inner = ", ".join(type_name(argument) for argument in arguments)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <="}


def _constraints(metadata) -> str:
    """`` (>= 1, < 1)`` from a field's constraint objects (annotated_types ``Ge``, ``Interval``, ``MinLen``...)."""
    bounds = [f"{symbol} {getattr(item, name)}" for item in metadata for name, symbol in _BOUNDS.items()
              if getattr(item, name, None) is not None]
    return f" ({', '.join(bounds)})" if bounds else ""


def _default(field_info) -> Any:
    if field_info.default is not PydanticUndefined:
        return field_info.default
    if field_info.default_factory is not None:
        return field_info.default_factory()
    return PydanticUndefined


def options_doc(stage_class: type[Stage]) -> str:
    """The options section of a stage's docstring, from its pydantic ``Options``: every option's type (with its
    bounds), default and description."""
    lines = [f"Options (keyword arguments, or the keys of ``method: {stage_class.method}`` in a recipe):", ""]
    for name, field_info in stage_class.Options.model_fields.items():
        default = _default(field_info)
        shown_type = type_name(field_info.annotation) + _constraints(field_info.metadata)
        lines.append(f"    {name}: {shown_type}, " + ("required" if default is PydanticUndefined
                                                        else f"default {default!r}"))
        if field_info.description:
            lines.append(f"        {field_info.description}")
    return "\n".join(lines)


def options_signature(stage_class: type[Stage]) -> inspect.Signature:
    """``(options=None, /, *, bits: int = 4, ...)``: what ``help()`` and editors show for the constructor."""
    parameters = [inspect.Parameter("options", inspect.Parameter.POSITIONAL_ONLY, default=None)]
    for name, field_info in stage_class.Options.model_fields.items():
        default = _default(field_info)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=field_info.annotation,
                                            default=inspect.Parameter.empty if default is PydanticUndefined else default))
    return inspect.Signature(parameters)


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
    device / batch_size: where and how calibration passes run.
    statistics_*: the last calibration pass (see :meth:`statistics`); ``timings``: seconds per phase.
    bit_map: per-expert bit-widths an allocation stage decided, read by the ``rtn`` / ``gptq`` stages.
    allow_task_code: the person running the pipeline lets evaluation task folders run Python (``compress
    --allow-task-code``); never set by a recipe, which is a shared file.
    """

    model: Any
    tokenizer: Any
    source: str
    output_dir: Path
    calibration: Any = None
    super_experts: list[tuple[int, int]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    config: Any = None
    device: Any = None
    batch_size: int = 8
    on_layer: Any = None
    statistics_cache: dict[int, Any] | None = None
    statistics_names: set[str] = field(default_factory=set)
    statistics_options: dict[str, dict] = field(default_factory=dict)
    statistics_stale: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    calibration_passes: int = 0
    # Bit-width per routed expert ``{(layer, expert): bits}`` decided by an allocation stage (PMQ, CAMERA-Q) for the
    # quantiser that follows; None = the quantiser's own ``bits``.
    bit_map: dict[tuple[int, int], int] | None = None
    # Where calibration passes read the model from when ``model`` is a meta skeleton (a streamed run's decisions):
    # the source checkpoint folder, loaded lazily layer by layer, at ``statistics_dtype``.
    statistics_source: Any = None
    statistics_dtype: Any = None
    allow_task_code: bool = False

    def remap_super_experts(self, id_map: dict[tuple[int, int], int]) -> None:
        """Carry the super experts through an expert edit (``(layer, old) -> new`` for the edited layers)."""
        self.super_experts = remap_super_experts(self.super_experts, id_map)

    def statistics(self, names, options: dict[str, dict] | None = None) -> dict:
        """``{layer: LayerStatistics}`` holding at least ``names``: reuses the last pass when it is still valid (no
        structural edit since, same options), else runs one layer-by-layer pass over ``self.model`` collecting the
        union of what was asked before and now (so a later stage asking for the same numbers pays nothing)."""
        if self.calibration is None:
            raise CalibrationError("this stage needs calibration statistics, but the run has no calibration data; "
                                   "add a `calibration:` section to the recipe")
        names = list(dict.fromkeys(names))
        options = options or {}
        if (self.statistics_cache is not None and not self.statistics_stale and set(names) <= self.statistics_names
                and all(self.statistics_options.get(key) == value for key, value in options.items())):
            return self.statistics_cache
        keep_previous = not self.statistics_stale
        wanted = list(dict.fromkeys([*(self.statistics_names if keep_previous else ()), *names]))
        merged_options = {**(self.statistics_options if keep_previous else {}), **options}
        source = self.model if self.statistics_source is None else self.statistics_source
        runner = LayerwiseRunner.from_source(source, device=self.device, dtype=self.statistics_dtype)
        run = runner.run(self.calibration, wanted, options=merged_options, batch_size=self.batch_size,
                         on_layer=self.on_layer)
        self.statistics_cache, self.statistics_names = run.layers, set(wanted)
        self.statistics_options, self.statistics_stale = merged_options, False
        self.timings["calibration_passes"] = self.timings.get("calibration_passes", 0.0) + run.seconds
        self.calibration_passes += 1
        return run.layers

    def mark_statistics_stale(self) -> None:
        """A stage changed the model's structure: the next :meth:`statistics` call runs a fresh pass."""
        self.statistics_stale = True
