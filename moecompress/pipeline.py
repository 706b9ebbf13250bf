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
    """Base class of pipeline stages. Subclasses set ``method`` and ``Options`` and implement ``run``.

    Optional: ``statistics`` names what the stage will ask ``context.statistics`` for (the profiling pass then
    collects it too, so a first stage costs no extra pass); ``check(context)`` rejects impossible options once the
    model's config is known, before any work; ``replay(context, result)`` re-applies a finished structural
    stage's recorded decisions when a stopped run resumes (without it, the stage runs again).
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
        runner = LayerwiseRunner.from_source(self.model, device=self.device)
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
    from there (finished stages are replayed from their recorded decisions, not recomputed).
    """

    def __init__(self, stages: list[Stage] | None = None, calibration: Any = None) -> None:
        from moecompress.recipe import CalibrationConfig, Recipe

        if calibration is None:
            calibration = CalibrationConfig()
        elif isinstance(calibration, dict):
            calibration = CalibrationConfig(**calibration)
        self.recipe = Recipe(calibration=calibration, stages=list(stages or []))

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
            overwrite: bool = False, progress: ProgressReporter | None = None) -> dict[str, Any]:
        return _PipelineRun(self, source, output_dir, device=device, dtype=dtype, overwrite=overwrite,
                            progress=progress or ProgressReporter()).execute()


class _PipelineRun:
    """One execution of a pipeline: output folder handling, profiling, stages, resume state, report."""

    def __init__(self, pipeline: Pipeline, source, output_dir, *, device, dtype, overwrite, progress) -> None:
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
        from moecompress.errors import MoECompressError

        source = checkpoint_folder.resolve()
        out = self.output_dir
        if out == source or source in out.parents:
            raise MoECompressError(f"--out {out} is inside the input model folder {source}; moecompress never writes "
                                   "into its input. Choose an output folder outside it.")
        if out in source.parents:
            raise MoECompressError(f"--out {out} contains the input model folder {source}; choose a separate folder")

    @property
    def partial_dir(self) -> Path:
        return self.output_dir.parent / f"{self.output_dir.name}.partial-{self.recipe.sha256[:12]}"

    # ----- the run ---------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        import time

        from moecompress.calibration.checkpoint import resolve_checkpoint
        from moecompress.errors import MoECompressError

        started = time.perf_counter()
        checkpoint_folder = resolve_checkpoint(self.source)
        self._check_output_folder(checkpoint_folder)
        finished = _read_json(self.output_dir / STATE_FILE)
        if finished and finished.get("recipe_sha256") == self.recipe.sha256 and finished.get("finished"):
            if not self.overwrite:  # the same recipe already ran to completion here
                return _read_json(self.output_dir / REPORT_FILE) or {}
        elif self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.overwrite:
            raise MoECompressError(f"output folder {self.output_dir} exists and holds another run; pass --overwrite "
                                   "to replace it, or choose another --out")
        tokenizer, calibration = self._calibration(checkpoint_folder)  # bad data fails before anything is written
        partial = self.partial_dir
        partial.mkdir(parents=True, exist_ok=True)
        state = _read_json(partial / STATE_FILE) or {}
        if state.get("recipe_sha256") != self.recipe.sha256:
            state = {"recipe_sha256": self.recipe.sha256, "stages": {}, "finished": False}
        state["finished"] = False

        if state.get("calibration_sha256") not in (None, calibration.sha256):
            state = {"recipe_sha256": self.recipe.sha256, "stages": {}, "finished": False}  # other data: start over
        state["calibration_sha256"] = calibration.sha256
        profile = state.get("profile") or self._profile(checkpoint_folder, calibration)
        state["profile"] = {key: value for key, value in profile.items() if key != "statistics"}
        _write_json_atomic(partial / STATE_FILE, state)

        stage_records, model_summary_after, model = self._run_stages(checkpoint_folder, tokenizer, calibration,
                                                                     profile, state, partial)
        report = self._report(calibration, profile, stage_records, model_summary_after)
        report["timings"] = {**self.timings, "total": time.perf_counter() - started}
        _write_json_atomic(partial / REPORT_FILE, report)
        self._write_markdown(report, partial)
        state["finished"] = True
        _write_json_atomic(partial / STATE_FILE, state)
        _move_into_place(partial, self.output_dir)
        return report

    def _calibration(self, checkpoint_folder: Path):
        import time

        from transformers import AutoTokenizer

        from moecompress.calibration import load_calibration

        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_folder))
        config = self.recipe.calibration
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
        records = []
        for index, stage in enumerate(stages):
            key = f"{index}:{stage.method}"
            name = f"stage {index + 1}/{len(stages)}: {stage.method}"
            done = state["stages"].get(key)
            started = time.perf_counter()
            self.progress.start(name, None)
            if done is not None:
                result = StageResult(**done["result"])
                if result.changed_structure and not stage.replay(context, result):
                    done = None  # cannot replay: run it again
                else:
                    if result.changed_structure:
                        context.mark_statistics_stale()
                    records.append({**done["record"], "resumed": True})
            if done is None:
                result = stage.run(context)
                if result.changed_structure:
                    context.mark_statistics_stale()
                seconds = time.perf_counter() - started
                record = {"method": stage.method, "options": stage.options.model_dump(mode="json", exclude_none=True),
                          "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
                          "seconds": seconds, "super_experts_after": [list(p) for p in context.super_experts]}
                records.append(record)
                state["stages"][key] = {"record": record, "result": {
                    "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
                    "changed_structure": result.changed_structure}}
                _write_json_atomic(partial / STATE_FILE, state)
                self.timings[f"stage {index}: {stage.method}"] = seconds
            self.progress.finish(name)
        self.timings["calibration passes in stages"] = context.timings.get("calibration_passes", 0.0)
        summary_after = model_summary(model)
        if any(getattr(stage, "modifies_model", True) for stage in stages):
            started = time.perf_counter()
            self.progress.start("save model", None)
            _save_model_atomic(model, context.tokenizer, partial)
            self.progress.finish("save model")
            self.timings["save_model"] = time.perf_counter() - started
        return records, summary_after, model

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
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same folder, then ``os.replace`` (a reader never sees a half-written file)."""
    import json
    import os
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
    """``save_pretrained`` into a temp folder beside ``folder``, then move each file in with ``os.replace``."""
    import os
    import shutil
    import tempfile

    from moecompress.models import find_moe_blocks
    from moecompress.models.edits import materialize_expert_id_map, restore_expert_id_map

    temp = Path(tempfile.mkdtemp(prefix=".model-", dir=folder))
    # A remap merge (router rule R1) saves as a plain HF checkpoint with each merged expert repeated per router
    # output; the in-memory model is compacted again right after (load_model compacts on load too).
    remapped = any(view.expert_id_map is not None for view in find_moe_blocks(model))
    try:
        if remapped:
            materialize_expert_id_map(model)
        model.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        for file in temp.iterdir():
            os.replace(file, folder / file.name)
    finally:
        if remapped:
            restore_expert_id_map(model)
        shutil.rmtree(temp, ignore_errors=True)


def _move_into_place(partial: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by the finished ``partial`` folder (old content is removed only after the move)."""
    import os
    import shutil

    if output_dir.exists():
        aside = output_dir.parent / f"{output_dir.name}.old-{os.getpid()}"
        os.replace(output_dir, aside)
        os.replace(partial, output_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(partial, output_dir)
