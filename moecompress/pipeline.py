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

import fcntl
import os
import shutil
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
    """Base class of pipeline stages. Subclasses set ``method`` and ``Options`` and implement ``run``.

    Optional: ``statistics`` names what the stage will ask ``context.statistics`` for (the profiling pass then
    collects it too, so a first stage costs no extra pass); ``check(context)`` rejects impossible options once the
    model's config is known, before any work; ``replay(context, result)`` re-applies a finished stage's recorded
    decisions when a stopped run resumes (a structural stage without it runs again; a deciding stage such as a bit
    allocator puts its decision back on the context).
    """

    method: ClassVar[str] = ""
    Options: ClassVar[type[StageOptions]] = StageOptions
    statistics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: StageOptions | dict[str, Any] | None = None) -> None:
        if options is None:
            options = {}
        self.options = options if isinstance(options, StageOptions) else self.Options(**options)

    def run(self, context: "RunContext") -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, context: "RunContext") -> None:
        """Raise :class:`moecompress.errors.RecipeError` for options impossible for this model (default: none)."""

    def replay(self, context: "RunContext", result: StageResult) -> bool:
        """Re-apply ``result``'s decisions to ``context.model``; return False when the stage cannot (default)."""
        return False

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, **self.options.model_dump(mode="json", exclude_none=True)}


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

    def remap_super_experts(self, id_map: dict[tuple[int, int], int]) -> None:
        """Carry the super experts through an expert edit (``(layer, old) -> new`` for the edited layers)."""
        from moecompress.analysis.super_experts import remap_super_experts

        self.super_experts = remap_super_experts(self.super_experts, id_map)

    def statistics(self, names, options: dict[str, dict] | None = None) -> dict:
        """``{layer: LayerStatistics}`` holding at least ``names``: reuses the last pass when it is still valid (no
        structural edit since, same options), else runs one layer-by-layer pass over ``self.model`` collecting the
        union of what was asked before and now (so a later stage asking for the same numbers pays nothing)."""
        from moecompress.calibration import LayerwiseRunner
        from moecompress.errors import CalibrationError

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


# ===== the pipeline ================================================================================================
# Statistics the profiling pass always collects on the original model: super experts need the output maxima, the
# report shows expert usage overall and per calibration domain.
PROFILE_STATISTICS = ("max_abs_expert_output", "expert_token_counts", "expert_token_counts_by_domain")
REPORT_FILE = "report.json"
STATE_FILE = "state.json"
LOCK_FILE = ".moecompress.lock"  # in the partial folder while a run works there: the holder's pid, flock-ed
RUN_FORMAT = "moecompress-run/1"  # marks state.json as a moecompress run (only such folders are ever replaced)
# What makes two runs the same run: a stopped or finished run is reused only when all three match.
IDENTITY_KEYS = {"recipe_sha256": "another recipe", "source_fingerprint": "another source model",
                 "calibration_sha256": "other calibration data"}


class ProgressReporter:
    """Receives progress events; the CLI draws them as rich progress bars. The default does nothing."""

    def start(self, name: str, total: int | None = None) -> None:
        pass

    def update(self, name: str, completed: int, total: int | None = None) -> None:
        pass

    def finish(self, name: str) -> None:
        pass


class Pipeline:
    """Runs stages over a model and records every decision in ``report.json``.

    The same pipeline in code as in a recipe::

        from moecompress.pipeline import Pipeline
        from moecompress.pruning.frequency import FrequencyPruning
        pipeline = Pipeline([FrequencyPruning({"num_experts_to_keep": 24})],
                            calibration={"files": ["calib/"], "num_samples": 32, "seq_len": 256})
        report = pipeline.run("path/to/model", "out/")

    ``run`` profiles the original model once (layer by layer, lazily from its safetensors: super experts, expert
    usage per domain, and what the first stage asks for), then loads the model and runs the stages in order.
    Output is built in ``<out>.partial-<recipe hash>`` and moved to ``<out>`` when complete; a stopped run resumes
    from there (finished stages are replayed from their recorded decisions, not recomputed). A run's identity is
    its recipe, its source model (:func:`moecompress.models.loading.checkpoint_fingerprint`) and its calibration
    tokens; a stopped or finished run is reused only when all three match, otherwise it is an error unless
    ``overwrite`` (which never replaces a folder that is not a moecompress run).
    """

    def __init__(self, stages: list[Stage] | None = None, calibration: Any = None) -> None:
        from moecompress.recipe import CalibrationConfig, Recipe, check_stage_order

        if calibration is None:
            calibration = CalibrationConfig()
        elif isinstance(calibration, dict):
            calibration = CalibrationConfig(**calibration)
        stages = list(stages or [])
        check_stage_order(stages)
        self.recipe = Recipe(calibration=calibration, stages=stages)

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Pipeline":
        """From a :class:`moecompress.recipe.Recipe`, a recipe dict, or the path of a YAML recipe."""
        from moecompress.recipe import Recipe, load_recipe, parse_recipe

        if isinstance(recipe, (str, Path)):
            recipe = load_recipe(recipe)
        elif isinstance(recipe, dict):
            recipe = parse_recipe(recipe)
        if not isinstance(recipe, Recipe):
            raise TypeError(f"expected a Recipe, dict or path, got {type(recipe).__name__}")
        pipeline = cls.__new__(cls)
        pipeline.recipe = recipe
        return pipeline

    @property
    def stages(self) -> list[Stage]:
        return self.recipe.stages

    def run(self, source: str | Path, output_dir: str | Path, *, device: str | None = None, dtype: Any = "auto",
            overwrite: bool = False, progress: ProgressReporter | None = None,
            execution: str = "auto") -> dict[str, Any]:
        """``execution``: ``streamed`` (never hold the whole model, see ``moecompress.streaming``), ``in_memory``,
        or ``auto`` (streamed when the recipe's stages allow it)."""
        report = _PipelineRun(self, source, output_dir, device=device, dtype=dtype, overwrite=overwrite,
                              progress=progress or ProgressReporter(), execution=execution).execute()
        if self.recipe.exports:  # the recipe's `export:` key: deployment folders beside the native output
            from moecompress.export.options import run_exports

            report = {**report, "exports": run_exports(output_dir, self.recipe.exports)}
        return report


class _PipelineRun:
    """One execution of a pipeline: output folder handling, profiling, stages, resume state, report.

    Order, so that every mistake the inputs can hold fails before the profiling pass and before anything is written:
    checkpoint validation, output-folder rules, checks against the model's config (stage options, calibration
    length, tokenizer), the identity of a run already in ``--out``, calibration data, and only then the partial
    folder (locked), the profiling pass and the stages.
    """

    def __init__(self, pipeline: Pipeline, source, output_dir, *, device, dtype, overwrite, progress,
                 execution: str = "auto") -> None:
        from moecompress.streaming import choose_execution

        self.stream_plan = choose_execution(execution, pipeline.recipe.stages)  # a bad mode fails first
        self.pipeline = pipeline
        self.recipe = pipeline.recipe
        self.source = str(source)
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.device = device
        self.dtype = dtype
        self.overwrite = overwrite
        self.progress = progress
        self.timings: dict[str, float] = {}

    # ----- output folder ---------------------------------------------------------------------------------------
    def _check_output_folder(self, checkpoint_folder: Path) -> None:
        """``--out`` is not the input, inside it or around it, not a file, and not a folder of other content."""
        from moecompress.errors import MoECompressError

        source = checkpoint_folder.resolve()
        out = self.output_dir
        if out == source or source in out.parents:
            raise MoECompressError(f"--out {out} is inside the input model folder {source}; moecompress never writes "
                                   "into its input. Choose an output folder outside it.")
        if out in source.parents:
            raise MoECompressError(f"--out {out} contains the input model folder {source}; choose a separate folder")
        blocking = next((path for path in (out, *out.parents) if path.exists()), None)
        if blocking is not None and not blocking.is_dir():
            where = "is a file" if blocking == out else f"is inside {blocking}, which is a file"
            raise MoECompressError(f"--out {out} {where}; give the path of a folder (new or a previous run's)")
        if _folder_has_content(out) and _run_state(out) is None:
            raise MoECompressError(
                f"--out {out} exists and is not a moecompress run folder (it holds {_listing(out)}); moecompress "
                "never replaces it, even with --overwrite. Choose another --out, or empty that folder yourself."
            )

    @property
    def partial_dir(self) -> Path:
        return self.output_dir.parent / f"{self.output_dir.name}.partial-{self.recipe.sha256[:12]}"

    def _check_before_work(self, checkpoint_folder: Path) -> None:
        """Everything the model's config can refute, on a meta skeleton (no weights read): the family is supported,
        calibration sequences fit its context, it has a tokenizer, and every stage's options are possible."""
        from moecompress.calibration.checkpoint import build_skeleton
        from moecompress.errors import CheckpointError, RecipeError
        from moecompress.models.families import adapter_for
        from moecompress.models.loading import has_tokenizer_files

        model, config = build_skeleton(checkpoint_folder)
        adapter_for(config)  # a dense or unsupported model fails here, naming the supported families
        context_length = getattr(config.get_text_config(), "max_position_embeddings", None)
        seq_len = self.recipe.calibration.seq_len
        if isinstance(context_length, int) and seq_len > context_length:
            raise RecipeError(f"calibration: seq_len={seq_len} exceeds the model's context (max_position_embeddings="
                              f"{context_length}); choose seq_len <= {context_length}")
        if not has_tokenizer_files(checkpoint_folder):
            raise CheckpointError(f"{checkpoint_folder} has no tokenizer files; calibration needs the model's "
                                  "tokenizer. Save it into the folder (tokenizer.save_pretrained(folder)).")
        context = RunContext(model=model, tokenizer=None, source=self.source, output_dir=self.output_dir,
                             config=config, device=self.device, batch_size=self.recipe.calibration.batch_size)
        for stage in self.recipe.stages:
            stage.check(context)  # expert counts, top-k, task names: before the profiling pass

    def _finished_run(self, identity: dict[str, str]) -> dict | None:
        """The state of the run in ``--out`` when it may be this run (its recipe and source model match, the
        calibration is compared once loaded); None when ``--out`` is free or ``overwrite`` replaces it."""
        state = _run_state(self.output_dir)
        if state is None:
            return None
        differences = _identity_differences(state, identity)
        if differences and not self.overwrite:
            raise _other_run_error(self.output_dir, "holds a finished moecompress run", differences,
                                   "pass --overwrite to replace it, or choose another --out")
        return None if differences or self.overwrite else state

    def _reusable_report(self, state: dict, identity: dict[str, str]) -> dict | None:
        """The report of the finished run in ``--out`` when it is this run and its files are intact, else None
        (a damaged finished run is redone; one with other calibration data is an error)."""
        differences = _identity_differences(state, identity)
        if differences:
            raise _other_run_error(self.output_dir, "holds a finished moecompress run", differences,
                                   "pass --overwrite to replace it, or choose another --out")
        if not state.get("finished") or _damaged_files(self.output_dir, state):
            return None  # not done: the run is made again and replaces it
        return _read_json(self.output_dir / REPORT_FILE)

    def _check_replaceable(self, state: dict | None) -> None:
        """This run will replace the run in ``--out`` when it finishes: refuse if that folder also holds files the
        run did not write (the user's), which replacing would delete."""
        from moecompress.errors import MoECompressError

        recorded = (state or {}).get("files")
        if not isinstance(recorded, dict):
            return  # no run there, or one by an older version that did not record its files
        foreign = sorted(set(_file_sizes(self.output_dir, exclude={STATE_FILE, LOCK_FILE})) - set(recorded))
        if foreign:
            raise MoECompressError(
                f"--out {self.output_dir} holds a moecompress run and files it did not write ({', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}); replacing the run would delete them. Move them elsewhere "
                "first, or choose another --out."
            )

    def _open_partial(self, identity: dict[str, str]) -> tuple[dict, bool]:
        """Lock the partial folder and read its state: ``(state, created)``, created when this run made (or emptied)
        the folder. A stopped run of another identity is an error, or with ``overwrite`` its work is discarded."""
        partial = self.partial_dir
        created = not partial.exists()
        partial.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(partial)
        try:
            self.lock.acquire()
            state = _read_json(partial / STATE_FILE) or {}
            differences = _identity_differences(state, identity) if state else []
            if differences and not self.overwrite:
                raise _other_run_error(partial, "holds a stopped moecompress run", differences,
                                       "pass --overwrite to discard it and start over, or choose another --out")
        except BaseException:
            self.lock.release()
            if created:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if differences:  # --overwrite: the stopped run of another identity is discarded
            _empty_folder(partial, keep={LOCK_FILE})
            state, created = {}, True
        if not state:
            state = {"format": RUN_FORMAT, **identity, "source": self.source, "stages": {}, "finished": False}
        return state, created

    # ----- the run ---------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        import time

        from moecompress.calibration.checkpoint import resolve_checkpoint
        from moecompress.errors import RunInterrupted
        from moecompress.models.loading import checkpoint_fingerprint

        started = time.perf_counter()
        checkpoint_folder = resolve_checkpoint(self.source)  # the one checkpoint validation
        self._check_output_folder(checkpoint_folder)
        self._check_before_work(checkpoint_folder)
        identity = {"recipe_sha256": self.recipe.sha256, "source_fingerprint": checkpoint_fingerprint(checkpoint_folder)}
        finished = self._finished_run(identity)
        tokenizer, calibration = self._calibration(checkpoint_folder)  # bad data fails before anything is written
        identity["calibration_sha256"] = calibration.sha256
        if finished is not None:
            report = self._reusable_report(finished, identity)
            if report is not None:  # the same run already finished here
                return report
        output_seen = _run_state(self.output_dir)
        self._check_replaceable(output_seen)
        state, created = self._open_partial(identity)
        partial = self.partial_dir
        try:
            state["finished"] = False
            profile = state.get("profile") or self._profile(checkpoint_folder, calibration)
            state["profile"] = {key: value for key, value in profile.items() if key != "statistics"}
            _write_json_atomic(partial / STATE_FILE, state)

            stage_records, model_summary_after, model = self._run_stages(checkpoint_folder, tokenizer, calibration,
                                                                         profile, state, partial)
            report = self._report(calibration, profile, stage_records, model_summary_after)
            report["timings"] = {**self.timings, "total": time.perf_counter() - started}
            _write_json_atomic(partial / REPORT_FILE, report)
            self._write_markdown(report, partial)
            state["files"] = _file_sizes(partial, exclude={STATE_FILE, LOCK_FILE})
            state["finished"] = True
            _write_json_atomic(partial / STATE_FILE, state)
            if _run_state(self.output_dir) != output_seen:
                raise _other_run_error(self.output_dir, "was written by another run while this one worked", [],
                                       f"this run's result is kept in {partial}; compare the two, then re-run with "
                                       "--overwrite to publish it")
            move_into_place(partial, self.output_dir)
            (self.output_dir / LOCK_FILE).unlink(missing_ok=True)
        except BaseException as error:
            kept = "profile" in state
            if created and not kept:  # nothing worth resuming: leave no empty partial folder behind
                shutil.rmtree(partial, ignore_errors=True)
            if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
                raise RunInterrupted(
                    f"the run can be resumed: re-run the same command (finished work is kept in {partial})" if kept
                    else "stopped before any work was saved; re-run the same command to start again"
                ) from None
            raise
        finally:
            self.lock.release()
        return report

    def _calibration(self, checkpoint_folder: Path):
        import time

        from transformers import AutoTokenizer

        from moecompress.calibration import load_calibration

        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_folder))
        config = self.recipe.calibration
        if config.ebss is not None:  # the model writes its own calibration set (MoEQuant EBSS)
            from moecompress.calibration.ebss import ebss_calibration

            calibration = ebss_calibration(checkpoint_folder, tokenizer, config, device=self.device,
                                           dtype=self._torch_dtype() or _checkpoint_dtype(checkpoint_folder),
                                           progress=self.progress)
        else:
            calibration = load_calibration(tokenizer, files=config.files, dataset=config.dataset,
                                           dataset_config=config.dataset_config, dataset_split=config.dataset_split,
                                           num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed)
        self.timings["calibration_data"] = time.perf_counter() - started
        return tokenizer, calibration

    def _torch_dtype(self):
        import torch

        if self.dtype in (None, "auto"):
            return None
        return getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype

    def _profile(self, checkpoint_folder: Path, calibration) -> dict[str, Any]:
        """One lazy layer-by-layer pass over the original checkpoint."""
        from moecompress.analysis.super_experts import find_super_experts
        from moecompress.calibration import LayerwiseRunner
        from moecompress.models.summary import model_summary

        names = list(PROFILE_STATISTICS)
        if self.recipe.stages:
            names += [name for name in self.recipe.stages[0].statistics if name not in names]
        # the first stage's statistic options (PreMoe's TCESS form, NAEE's token sample) so it needs no second pass
        options = _stage_statistics_options(self.recipe.stages[0]) if self.recipe.stages else {}
        runner = LayerwiseRunner.from_source(checkpoint_folder, device=self.device, dtype=self._torch_dtype())
        summary = model_summary(runner.model)
        self.progress.start("profile", len(runner.layers))
        run = runner.run(calibration, names, options=options or None, batch_size=self.recipe.calibration.batch_size,
                         on_layer=lambda done, total: self.progress.update("profile", done, total))
        self.progress.finish("profile")
        self.timings["profile"] = run.seconds
        super_experts = find_super_experts(run.layers, run.num_hidden_layers)
        moe_layers = sorted(run.layers)
        usage_by_domain = {
            domain: [run.layers[layer]["expert_token_counts_by_domain"][index].tolist() for layer in moe_layers]
            for index, domain in enumerate(run.domain_names)
        }
        return {
            "statistics": run.layers,
            "statistic_names": names,
            "statistic_options": options,
            "super_experts": [list(pair) for pair in super_experts.routed],
            "super_experts_detail": super_experts.to_dict(),
            "moe_layers": moe_layers,
            "expert_token_counts": [run.layers[layer]["expert_token_counts"].tolist() for layer in moe_layers],
            "expert_usage_by_domain": usage_by_domain,
            "summary_before": summary,
        }

    def _run_stages(self, checkpoint_folder, tokenizer, calibration, profile, state, partial):
        import time

        from moecompress.models.loading import load_model
        from moecompress.models.summary import model_summary

        stages = self.recipe.stages
        if not stages:
            return [], None, None
        if self.stream_plan is not None:
            return self._run_stages_streamed(checkpoint_folder, tokenizer, calibration, profile, state, partial)
        started = time.perf_counter()
        dtype = self._torch_dtype() or _checkpoint_dtype(checkpoint_folder)
        model, loaded_tokenizer = load_model(str(checkpoint_folder), dtype=dtype, device=self.device or "cpu")
        self.timings["load_model"] = time.perf_counter() - started
        context = RunContext(
            model=model, tokenizer=loaded_tokenizer or tokenizer, source=self.source, output_dir=partial,
            calibration=calibration, super_experts=[tuple(pair) for pair in profile["super_experts"]],
            config=model.config, device=self.device, batch_size=self.recipe.calibration.batch_size,
            on_layer=lambda done, total: self.progress.update("calibration", done, total),
        )
        if "statistics" in profile:  # the profiling pass ran in this process: its numbers serve the first stage
            context.statistics_cache = profile["statistics"]
            context.statistics_names = set(profile["statistic_names"])
            context.statistics_options = dict(profile.get("statistic_options") or {})
        for stage in stages:
            stage.check(context)  # impossible options fail before any stage works
        records = [self._stage(index, stage, context, state, partial)[1] for index, stage in enumerate(stages)]
        self.timings["calibration passes in stages"] = context.timings.get("calibration_passes", 0.0)
        summary_after = model_summary(model)
        if any(getattr(stage, "modifies_model", True) for stage in stages):
            started = time.perf_counter()
            self.progress.start("save model", None)
            _save_model_atomic(model, context.tokenizer, partial)
            self.progress.finish("save model")
            self.timings["save_model"] = time.perf_counter() - started
        return records, summary_after, model

    def _run_stages_streamed(self, checkpoint_folder, tokenizer, calibration, profile, state, partial):
        """The streamed run (``moecompress.streaming``): decide on a meta skeleton, sweep the layers from disk into
        the output checkpoint, then load the written model for the stages that read it (evaluate)."""
        import time

        from moecompress.export.native import build_meta_model
        from moecompress.models.loading import load_model
        from moecompress.models.summary import model_summary
        from moecompress.streaming import StreamedStages

        plan = self.stream_plan
        dtype = self._torch_dtype() or _checkpoint_dtype(checkpoint_folder)
        streamed = StreamedStages(plan, checkpoint_folder, dtype, device=self.device)
        context = RunContext(
            model=streamed.skeleton(), tokenizer=tokenizer, source=self.source, output_dir=partial,
            calibration=calibration, super_experts=[tuple(pair) for pair in profile["super_experts"]],
            device=self.device, batch_size=self.recipe.calibration.batch_size,
            on_layer=lambda done, total: self.progress.update("calibration", done, total),
        )
        context.config = context.model.config
        # the skeleton has no weights: a stage that needs a calibration pass (a resumed run, whose profile
        # statistics are not kept) reads the unedited source checkpoint lazily
        context.statistics_source, context.statistics_dtype = checkpoint_folder, dtype
        if "statistics" in profile:
            context.statistics_cache = profile["statistics"]
            context.statistics_names = set(profile["statistic_names"])
            context.statistics_options = dict(profile.get("statistic_options") or {})
        for stage in plan.stages:
            stage.check(context)
        records = []
        pruning_result = None
        if plan.pruning is not None:  # decides on the meta skeleton from the profiling statistics
            pruning_result, record = self._stage(0, plan.pruning, context, state, partial)
            records.append(record)
        index = 1 if plan.pruning is not None else 0
        key = f"{index}:{plan.quantization.method}" if plan.quantization is not None else "stream"
        done = state["stages"].get(key) if state.get("streamed_model_written") else None
        if done is None:
            started = time.perf_counter()
            name = "stream layers" + (f": {plan.quantization.method}" if plan.quantization else "")
            self.progress.start(name, None)
            quantization_result, _ = streamed.write_model(context, pruning_result, partial)
            self.progress.finish(name)
            seconds = time.perf_counter() - started
            self.timings["stream layers"] = seconds
            if plan.quantization is not None:
                result = plan.quantization.stage_result(quantization_result)
                record = self._record(plan.quantization, result, seconds, context)
                state["stages"][key] = {"record": record, "result": {
                    "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
                    "changed_structure": result.changed_structure}}
                records.append(record)
            state["streamed_model_written"] = True
            _write_json_atomic(partial / STATE_FILE, state)
        elif plan.quantization is not None:
            records.append({**done["record"], "resumed": True})
        started = time.perf_counter()
        model = None
        if plan.after:  # stages that read the whole model load the written result
            model, loaded_tokenizer = load_model(str(partial), dtype=dtype, device=self.device or "cpu")
            context.model, context.config = model, model.config
            context.statistics_source = None
            context.tokenizer = loaded_tokenizer or tokenizer
            context.statistics_cache, context.statistics_stale = None, True
            self.timings["load_model"] = time.perf_counter() - started
        first_after = len(plan.stages) - len(plan.after)
        for offset, stage in enumerate(plan.after):
            _, record = self._stage(first_after + offset, stage, context, state, partial)
            records.append(record)
        self.timings["calibration passes in stages"] = context.timings.get("calibration_passes", 0.0)
        from transformers import AutoConfig

        summary_after = model_summary(model if model is not None else
                                      build_meta_model(AutoConfig.from_pretrained(str(partial)), dtype=dtype))
        return records, summary_after, model

    def _stage(self, index: int, stage: Stage, context: RunContext, state: dict, partial: Path):
        """Run (or, when a stopped run finished it, replay) one stage; returns ``(result, report record)``."""
        import time

        key = f"{index}:{stage.method}"
        name = f"stage {index + 1}/{len(self.recipe.stages)}: {stage.method}"
        done = state["stages"].get(key)
        self.progress.start(name, None)
        started = time.perf_counter()
        if done is not None:
            # every finished stage replays its decisions: a structural edit, or one a later stage reads (a bit map);
            # a structural edit that cannot be replayed runs again
            result = StageResult(**done["result"])
            if stage.replay(context, result) or not result.changed_structure:
                if result.changed_structure:
                    context.mark_statistics_stale()
                self.progress.finish(name)
                return result, {**done["record"], "resumed": True}
        result = stage.run(context)
        if result.changed_structure:
            context.mark_statistics_stale()
        seconds = time.perf_counter() - started
        record = self._record(stage, result, seconds, context)
        state["stages"][key] = {"record": record, "result": {
            "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
            "changed_structure": result.changed_structure}}
        _write_json_atomic(partial / STATE_FILE, state)
        self.timings[f"stage {index}: {stage.method}"] = seconds
        self.progress.finish(name)
        return result, record

    @staticmethod
    def _record(stage: Stage, result: StageResult, seconds: float, context: RunContext) -> dict:
        return {"method": stage.method, "options": stage.options.model_dump(mode="json", exclude_none=True),
                "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
                "seconds": seconds, "super_experts_after": [list(p) for p in context.super_experts]}

    def _report(self, calibration, profile, stage_records, summary_after) -> dict[str, Any]:
        from moecompress.calibration import peak_memory_bytes

        before = profile["summary_before"]
        after = summary_after or before
        parameters_after = after["parameters"]["total"]
        bytes_after = after["bytes"]["total"]
        calibration_record = calibration.describe()
        calibration_record["expert_usage_by_domain"] = profile["expert_usage_by_domain"]
        calibration_record["moe_layers"] = profile["moe_layers"]
        calibration_record["expert_token_counts"] = profile["expert_token_counts"]
        final_super = stage_records[-1]["super_experts_after"] if stage_records else profile["super_experts"]
        return {
            "recipe": self.recipe.to_dict(),
            "versions": collect_versions(),
            "calibration": calibration_record,
            "super_experts": profile["super_experts"],
            "super_experts_after": final_super,
            "super_experts_detail": profile["super_experts_detail"],
            "model": {
                "source": self.source,
                "family": before.get("family"),
                "parameters_before": before["parameters"]["total"],
                "parameters_after": parameters_after,
                "bytes_before": before["bytes"]["total"],
                "bytes_after": bytes_after,
                "bits_per_parameter": 8.0 * bytes_after / max(parameters_after, 1),
                "bits_per_parameter_before": 8.0 * before["bytes"]["total"] / max(before["parameters"]["total"], 1),
                "summary_before": before,
                "summary_after": after,
            },
            "stages": stage_records,
            "timings": {},
            "peak_memory_bytes": peak_memory_bytes(),
        }

    def _write_markdown(self, report: dict, folder: Path) -> None:
        try:
            from moecompress.evals.report_md import write_report_markdown
        except ImportError:
            return
        write_report_markdown(report, folder)


# ----- helpers ---------------------------------------------------------------------------------------------------
def _stage_statistics_options(stage: Stage) -> dict[str, dict]:
    """``{statistic: options}`` a stage passes to ``context.statistics`` (stages that have a
    ``statistics_options()`` method; none for the others)."""
    method = getattr(stage, "statistics_options", None)
    return dict(method()) if callable(method) else {}


def collect_versions() -> dict[str, str]:
    """Versions of moecompress, Python and the libraries a result depends on."""
    import platform
    from importlib import metadata

    import moecompress

    versions = {"moecompress": moecompress.__version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "accelerate", "lm_eval", "compressed-tensors", "triton",
                    "scipy", "pulp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _checkpoint_dtype(folder: Path):
    import json

    import torch

    config = json.loads((Path(folder) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


def _read_json(path: Path) -> dict | None:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """``LOCK_FILE`` in a run's partial folder: an exclusive ``flock`` plus the holder's pid, so that two runs aimed
    at the same ``--out`` cannot write into one folder. The kernel drops the lock when its holder dies, so the lock
    file of a killed run (a dead pid) is simply taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        import socket
        import time

        from moecompress.errors import MoECompressError

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise MoECompressError(
                f"another moecompress run ({holder}) is writing {self.path.parent}; wait for it to finish or stop it "
                "(a stopped run resumes), then re-run"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None


def _run_state(folder: Path) -> dict | None:
    """``state.json`` of ``folder`` when it is a moecompress run folder (this version's or an older one's), else None."""
    state = _read_json(Path(folder) / STATE_FILE)
    if state is not None and (state.get("format") == RUN_FORMAT or {"recipe_sha256", "stages"} <= set(state)):
        return state
    return None


def _identity_differences(state: dict, identity: dict[str, str]) -> list[str]:
    """What makes the run recorded in ``state`` another run than ``identity`` (keys compared where both have them;
    a state without a model fingerprint was made by an older version and can not be confirmed)."""
    if "source_fingerprint" not in state:
        return ["a run by an older moecompress version, which did not record the source model"]
    return [label for key, label in IDENTITY_KEYS.items() if key in identity and state.get(key) != identity[key]]


def _other_run_error(folder: Path, what: str, differences: list[str], fix: str):
    from moecompress.errors import MoECompressError

    detail = f" ({', '.join(differences)})" if differences else ""
    return MoECompressError(f"{folder} {what}{detail}; {fix}")


def _folder_has_content(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _listing(folder: Path, count: int = 3) -> str:
    names = sorted(path.name for path in folder.iterdir())
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def _empty_folder(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _file_sizes(folder: Path, exclude: set[str]) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``folder`` (what a finished run is checked against)."""
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in exclude and not path.name.startswith(".")}


def _damaged_files(folder: Path, state: dict) -> list[str]:
    """Files of a finished run that are missing or changed size, or safetensors files with a broken header or index
    (files only: a model whose layers differ after an edit is valid output that plain transformers cannot build)."""
    from moecompress.errors import CheckpointError
    from moecompress.models.loading import validate_checkpoint

    recorded = state.get("files")
    if not isinstance(recorded, dict) or REPORT_FILE not in recorded:
        return [REPORT_FILE]
    damaged = [name for name, size in recorded.items()
               if not (folder / name).is_file() or (folder / name).stat().st_size != size]
    if not damaged and "config.json" in recorded:
        try:
            validate_checkpoint(folder, weights_vs_config=False)
        except CheckpointError as error:
            damaged.append(str(error))
    return damaged


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same folder, then ``os.replace`` (a reader never sees a half-written file)."""
    import json
    import tempfile

    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, default=_json_default)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _json_default(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _save_model_atomic(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a temp folder beside ``folder``, then move each file in with ``os.replace``.

    A model a plain transformers config cannot describe (packed experts, MoE layers with different expert counts)
    gets the native format's ``quantization_config`` first, so plain ``from_pretrained`` (after ``import
    moecompress``) rebuilds it."""
    import os
    import shutil
    import tempfile

    from moecompress.export.native import MoECompressQuantizationConfig, needs_native_format
    from moecompress.models import find_moe_blocks
    from moecompress.models.edits import materialize_expert_id_map, restore_expert_id_map

    temp = Path(tempfile.mkdtemp(prefix=".model-", dir=folder))
    # A remap merge (router rule R1) saves as a plain HF checkpoint with each merged expert repeated per router
    # output; the in-memory model is compacted again right after (load_model compacts on load too).
    remapped = any(view.expert_id_map is not None for view in find_moe_blocks(model))
    try:
        if remapped:
            materialize_expert_id_map(model)
        if needs_native_format(model):
            model.config.quantization_config = MoECompressQuantizationConfig.from_model(model)
        model.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        for file in temp.iterdir():
            os.replace(file, folder / file.name)
    finally:
        if remapped:
            restore_expert_id_map(model)
        shutil.rmtree(temp, ignore_errors=True)


def move_into_place(partial: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by the finished ``partial`` folder (old content is removed only after the move)."""
    if output_dir.exists():
        aside = output_dir.parent / f"{output_dir.name}.old-{os.getpid()}"
        os.replace(output_dir, aside)
        os.replace(partial, output_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(partial, output_dir)
