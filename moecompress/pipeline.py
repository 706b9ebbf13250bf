"""The pipeline: runs a recipe's stages over a model and records every decision in ``report.json``.

Two executions of the same stages: in memory (the model loaded whole, stages edit it in place, then it is saved) and
streamed (:mod:`moecompress.streaming`: decisions on a meta skeleton, then one sweep over the decoder layers from
disk). Around both: the checks that run before any work, the profiling pass over the original model, resume from
``state.json``, the report, and the output folder's rules (:mod:`moecompress.run_folder`). The stage interface lives
in :mod:`moecompress.stages` and is re-exported here (``from moecompress.pipeline import Stage`` keeps working).

Over several ranks (``torchrun ... -m moecompress compress``, :mod:`moecompress.distributed`) every rank runs the
same checks, profiling pass and stages on its share of the calibration batches, with statistics combined so that
every rank decides the same; rank 0 alone holds the output folder's lock and writes ``state.json``, the report and
the model files that are not sharded by rank, and runs the stages that only read the model (``evaluate``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from moecompress.analysis.super_experts import find_super_experts
from moecompress.calibration import LayerwiseRunner, load_calibration, peak_memory_bytes
from moecompress.calibration.ebss import ebss_calibration
from moecompress.checkpoint.fingerprint import source_identity
from moecompress.checkpoint.lazy import build_skeleton
from moecompress.checkpoint.loading import load_model
from moecompress.checkpoint.native import build_meta_model, save_model
from moecompress.checkpoint.validation import has_tokenizer_files, resolve_checkpoint
from moecompress.distributed import World, current_world, init_world, rank_device
from moecompress.errors import (
    CheckpointError,
    MoECompressError,
    OutOfSpaceError,
    RecipeError,
    RunInterrupted,
    UsageError,
    is_out_of_space,
)
from moecompress.evals.model_card import write_model_card
from moecompress.evals.report_md import write_report_markdown
from moecompress.export.options import ExportOptions, check_exports, run_exports
from moecompress.folders import write_json_atomic
from moecompress.logs import LOGGER, RUN_LOG, ConsoleHandler, RunLog, log_exception, run_output
from moecompress.models.families import adapter_for, decoder_layers
from moecompress.models.summary import model_summary
from moecompress.progress import ProgressReporter, for_stream, reporting
from moecompress.recipe import CalibrationConfig, Recipe, check_stage_order, load_recipe, parse_recipe
from moecompress.run_folder import LOCK_FILE, REPORT_FILE, STATE_FILE, RunFolder, RunLock, file_sizes, run_state
from moecompress.stages import STAGE_REGISTRY, RunContext, Stage, StageOptions, StageResult, register_stage
from moecompress.streaming import StreamedStages, choose_execution
from moecompress.version import __version__

# Statistics the profiling pass always collects on the original model: super experts need the output maxima, the
# report shows expert usage overall and per calibration domain.
PROFILE_STATISTICS = ("max_abs_expert_output", "expert_token_counts", "expert_token_counts_by_domain")

# Stages that run over several ranks: those that decide from the combined statistics alone (every statistic is
# combined bit for bit, tests/test_distributed.py), GPTQ/RTN with experts owned by ranks, evaluation on rank 0.
# CAMERA and ODP run passes of their own that are not split yet: a recipe with them runs in one process.
RANKED_METHODS = ("prune_frequency", "prune_reap", "prune_ean", "prune_premoe", "prune_naee", "merge_msmoe",
                  "merge_uncurl", "merge_hcsmoe", "mcmoe_pmq", "rtn", "gptq", "evaluate")


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
    its recipe, its source model (the full content hash of :func:`moecompress.checkpoint.fingerprint.source_identity`,
    cached in ``state.json``) and its calibration tokens; a stopped or finished run is reused only when all three
    match, otherwise it is an error unless ``overwrite`` (which never replaces a folder that is not a moecompress run).
    """

    def __init__(self, stages: list[Stage] | None = None, calibration: Any = None) -> None:
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
            threads: int | None = None, overwrite: bool = False, execution: str = "auto",
            progress: ProgressReporter | bool | None = None, verbose: bool | None = None,
            source_name: str | None = None, allow_task_code: bool = False,
            exports: list[ExportOptions] | None = None) -> dict[str, Any]:
        """Run the stages on ``source`` and write the result into ``output_dir``; return the report.

        source: a checkpoint folder or a Hugging Face hub id; only read, never written.
        output_dir: the run's folder: the model (unless no stage changes it), ``report.json``, ``report.md`` with
            its plots, ``README.md`` (a model card), ``run.log``. Built in ``<output_dir>.partial-<hash>`` and moved
            into place when the run finishes; a stopped run resumes there (see the class docstring).
        device: compute device of the calibration passes and the stages: ``cpu`` (default), ``cuda``, ``cuda:N``,
            ``mps``.
        dtype: compute dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"``, ``"float32"``, or a
            ``torch.dtype``.
        threads: CPU threads torch uses during the run (default: torch's own choice); restored afterwards.
        overwrite: replace a run of another recipe, model or calibration data in ``output_dir`` (or its stopped
            run); a folder that is not a moecompress run is never replaced.
        execution: ``streamed`` (never hold the whole model, see ``moecompress.streaming``), ``in_memory``, or
            ``auto`` (streamed when the recipe's stages allow it).
        progress: None (default): progress and messages on stderr as the CLI shows them (bars on a terminal,
            plain lines otherwise); False: nothing on the terminal; or a :class:`ProgressReporter` of your own.
        verbose: also show the libraries' own output (progress bars, warnings); default: ``MOECOMPRESS_VERBOSE``.
            Either way it goes to ``run.log``.
        source_name: how the report and the model card name the source (default ``source``; ``moecompress.compress``
            passes a loaded model's name, since it runs on a temporary copy).
        allow_task_code: let an ``evaluate`` stage's task folder run Python (lm-eval ``!function``; see
            :mod:`moecompress.evals.taskdefs`): the caller's decision, never the recipe's.
        exports: deployment folders to write after the run besides the recipe's ``export:`` ones (``compress
            --export``).

        Every export is checked before any work and written after the run, beside ``output_dir``. Returns the report
        (``report.json``'s content, plus ``exports``).
        """
        exports = [*self.recipe.exports, *(exports or [])]
        reporter, console = _display(progress)
        run_log = RunLog()
        try:
            with run_output(run_log, console=console, verbose=verbose), reporting(reporter), torch_threads(threads):
                report = _PipelineRun(self, source, output_dir, device=device, dtype=dtype, overwrite=overwrite,
                                      progress=reporter, execution=execution, run_log=run_log,
                                      threads=threads, source_name=source_name, allow_task_code=allow_task_code,
                                      exports=exports).execute()
                if exports and current_world().is_main:  # deployment folders beside the native output
                    report = {**report, "exports": run_exports(output_dir, exports)}
        finally:
            reporter.close()
            run_log.close()
        return report


def _display(progress: ProgressReporter | bool | None) -> tuple[ProgressReporter, logging.Handler | None]:
    """The reporter and the console handler of a run: the CLI's display on stderr by default, nothing when
    ``progress`` is False, a caller's reporter (with our messages beside it) otherwise."""
    if progress is False:
        return ProgressReporter(), None
    reporter = for_stream(sys.stderr) if progress is None or progress is True else progress
    return reporter, ConsoleHandler(sys.stderr, started=reporter.started, reporter=reporter)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for the duration of a run (nothing when None)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise RecipeError(f"threads must be at least 1 (got {threads})")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _PipelineRun:
    """One execution of a pipeline: output folder handling, profiling, stages, resume state, report.

    Order, so that every mistake the inputs can hold fails before the profiling pass and before anything is written:
    checkpoint validation, output-folder rules, checks against the model's config (stage options, calibration
    length, tokenizer), the identity of a run already in ``--out``, calibration data, and only then the partial
    folder (locked), the profiling pass and the stages.
    """

    def __init__(self, pipeline: Pipeline, source, output_dir, *, device, dtype, overwrite, progress,
                 execution: str = "auto", run_log: RunLog | None = None, threads: int | None = None,
                 source_name: str | None = None, allow_task_code: bool = False,
                 exports: list[ExportOptions] | None = None) -> None:
        self.exports = list(exports or [])
        self.stream_plan = choose_execution(execution, pipeline.recipe.stages)  # a bad mode fails first
        self.pipeline = pipeline
        self.recipe = pipeline.recipe
        self.world = init_world(device)  # a world of one unless a launcher started several ranks
        check_ranked_stages(self.recipe.stages, self.world.size)
        self.source = str(source)
        self.source_name = source_name or self.source
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.device = _rank_device(self.world, device)
        self.dtype = dtype
        self.overwrite = overwrite
        self.folder = RunFolder(self.output_dir, recipe_sha256=self.recipe.sha256, source=self.source,
                                overwrite=overwrite)
        self.progress = progress
        self.allow_task_code = allow_task_code
        self.run_log = run_log or RunLog()
        self.threads = threads
        self.timings: dict[str, float] = {}
        self.task = "calibration"  # the progress task the layer-by-layer passes of a stage advance

    @property
    def partial_dir(self) -> Path:
        return self.folder.partial_dir

    def _save_state(self, state: dict) -> None:
        """``state.json`` (rank 0 writes it; every rank holds the same state)."""
        if self.world.is_main:
            write_json_atomic(self.partial_dir / STATE_FILE, state)

    def _check_before_work(self, checkpoint_folder: Path) -> None:
        """Everything the model's config can refute, on a meta skeleton (no weights read): the family is supported,
        calibration sequences fit its context, it has a tokenizer, and every stage's options are possible."""
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
                             config=config, device=self.device, batch_size=self.recipe.calibration.batch_size,
                             allow_task_code=self.allow_task_code)
        for stage in self.recipe.stages:
            stage.check(context)  # expert counts, top-k, task names: before the profiling pass
        check_exports(model, self.recipe.stages, self.exports, self.output_dir)  # what the run's output can become

    # ----- the run ---------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        started = time.perf_counter()
        checkpoint_folder = resolve_checkpoint(self.source)  # the one checkpoint validation
        self.folder.check_placement(checkpoint_folder)
        self._check_before_work(checkpoint_folder)
        started_identity = time.perf_counter()
        # the full content hash of the source (cached beside the run); NaN/inf in a source tensor fails here
        source = source_identity(checkpoint_folder, self.folder.cached_source_files())
        self.timings["source_identity"] = time.perf_counter() - started_identity
        identity = {"recipe_sha256": self.recipe.sha256, "source_fingerprint": source.fingerprint}
        finished = self.folder.finished_state(identity)
        tokenizer, calibration = self._calibration(checkpoint_folder)  # bad data fails before anything is written
        identity["calibration_sha256"] = calibration.sha256
        if finished is not None:
            report = self.folder.reusable_report(finished, identity)
            if report is not None:  # the same run already finished here
                LOGGER.info("%s already holds this run (same recipe, model and calibration): its report; "
                            "--overwrite runs it again", self.output_dir)
                return report
        output_seen = run_state(self.output_dir)
        self.folder.check_replaceable(output_seen)
        state, created = self.folder.open_partial(identity) if self.world.is_main else ({}, False)
        state = self.world.broadcast_object(state)  # the other ranks wait for rank 0's lock, then share its state
        partial = self.partial_dir
        try:
            if self.world.is_main:  # one run.log, rank 0's (the other ranks' lines stay in memory)
                self.run_log.open(partial)
            self._log_start(checkpoint_folder, calibration, state)
            state["finished"] = False
            state["source_files"] = source.files
            profile = state.get("profile") or (self._profile_in_sweep(checkpoint_folder) if self._sweep_profiles()
                                               else self._profile(checkpoint_folder, calibration))
            state["profile"] = {key: value for key, value in profile.items() if key != "statistics"}
            self._save_state(state)

            stage_records, model_summary_after, model = self._run_stages(checkpoint_folder, tokenizer, calibration,
                                                                         profile, state, partial)
            if not self.world.is_main:  # its part of the model is written; rank 0 reports
                return {"rank": self.world.rank, "world_size": self.world.size}
            report = self._report(calibration, profile, stage_records, model_summary_after)
            report["timings"] = {**self.timings, "total": time.perf_counter() - started}
            write_json_atomic(partial / REPORT_FILE, report)
            write_report_markdown(report, partial)
            write_model_card(report, partial, source_folder=checkpoint_folder, load_path=self.output_dir)
            state["files"] = file_sizes(partial, exclude={STATE_FILE, LOCK_FILE, RUN_LOG})
            state["finished"] = True
            write_json_atomic(partial / STATE_FILE, state)
            self.folder.publish(output_seen)
            self.run_log.moved_to(self.output_dir)
            LOGGER.info("done: %s (report.md, README.md, run.log) in %.0f s", self.output_dir,
                        report["timings"]["total"])
        except BaseException as error:
            kept = "profile" in state
            log_exception(error, "the run stopped")
            if created and not kept and self.world.is_main:  # nothing worth resuming: leave no empty partial folder
                shutil.rmtree(partial, ignore_errors=True)
            log = partial / RUN_LOG if partial.is_dir() else None
            if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
                raise RunInterrupted(
                    f"the run can be resumed: re-run the same command (finished work is kept in {partial}; log: "
                    f"{log})" if kept else "stopped before any work was saved; re-run the same command to start again"
                ) from None
            if is_out_of_space(error):
                raise OutOfSpaceError(
                    f"no space left on the device while writing {partial}; free some space (or choose an --out on "
                    "another disk), then re-run the same command" + (": the run resumes from the work saved there"
                                                                     if kept else "")
                    + (f" (log: {log})" if log is not None else "")) from error
            if log is not None:
                _name_the_log(error, log)
            raise
        finally:
            self.folder.release()
        return report

    def _log_start(self, checkpoint_folder: Path, calibration, state: dict) -> None:
        """The run's first lines: one on the terminal, the detail (versions, device, recipe) in run.log."""
        stages = self.recipe.stages
        resumed = " (resuming a stopped run)" if state.get("profile") else ""
        LOGGER.info("compress %s -> %s: %s%s", self.source_name, self.output_dir,
                    f"{len(stages)} stage(s) ({', '.join(stage.method for stage in stages)})" if stages
                    else "profile only", resumed)
        LOGGER.debug("checkpoint folder: %s", checkpoint_folder)
        LOGGER.debug("versions: %s", ", ".join(f"{name} {version}" for name, version in collect_versions().items()))
        LOGGER.debug("device %s, dtype %s, torch threads %d%s; platform %s", self.device or "cpu", self.dtype,
                     torch.get_num_threads(), "" if self.threads is None else " (set for this run)",
                     platform.platform())
        LOGGER.debug("command: %s", " ".join(sys.argv))
        LOGGER.debug("recipe (sha256 %s): %s", self.recipe.sha256, json.dumps(self.recipe.to_dict()))
        LOGGER.debug("calibration: %d x %d tokens, sha256 %s, from %s", calibration.num_samples, calibration.seq_len,
                     calibration.sha256, ", ".join(map(str, getattr(calibration, "sources", []) or [])) or "-")

    def _calibration(self, checkpoint_folder: Path):
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_folder))
        config = self.recipe.calibration
        if config.ebss is not None:  # the model writes its own calibration set (MoEQuant EBSS)
            calibration = None
            if self.world.is_main:  # generated once, by rank 0, for every rank
                calibration = ebss_calibration(checkpoint_folder, tokenizer, config, device=self.device,
                                               dtype=self._torch_dtype() or _checkpoint_dtype(checkpoint_folder),
                                               progress=self.progress)
            calibration = self.world.broadcast_object(calibration)
        else:
            calibration = load_calibration(tokenizer, files=config.files, dataset=config.dataset,
                                           dataset_config=config.dataset_config, dataset_split=config.dataset_split,
                                           num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed,
                                           text_field=config.text_field, chat_template=config.chat_template)
        self.timings["calibration_data"] = time.perf_counter() - started
        return tokenizer, calibration

    def _torch_dtype(self):
        if self.dtype in (None, "auto"):
            return None
        return getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype

    def _profile(self, checkpoint_folder: Path, calibration) -> dict[str, Any]:
        """One lazy layer-by-layer pass over the original checkpoint."""
        names = list(PROFILE_STATISTICS)
        if self.recipe.stages:
            names += [name for name in self.recipe.stages[0].statistics if name not in names]
        # the first stage's statistic options (PreMoe's TCESS form, NAEE's token sample) so it needs no second pass
        options = _stage_statistics_options(self.recipe.stages[0]) if self.recipe.stages else {}
        runner = LayerwiseRunner.from_source(checkpoint_folder, device=self.device, dtype=self._torch_dtype())
        summary = model_summary(runner.model)
        self.progress.start("profile", len(runner.layers), unit="layer")
        run = runner.run(calibration, names, options=options or None, batch_size=self.recipe.calibration.batch_size,
                         on_layer=lambda done, total: self.progress.update("profile", done, total))
        self.progress.finish("profile")
        self.timings["profile"] = run.seconds
        return {"statistics": run.layers, "statistic_names": names, "statistic_options": options,
                **_profile_record(run.layers, run.num_hidden_layers, run.domain_names, summary)}

    def _sweep_profiles(self) -> bool:
        """Whether the profiling pass is folded into the GPTQ sweep: a streamed recipe whose only editing stage is
        ``gptq`` reads no statistics before the sweep and no super experts at all, so the report's profile (super
        experts, expert usage) is collected in each layer's first pass of the sweep instead of a pass of its own."""
        plan = self.stream_plan
        return plan is not None and plan.pruning is None and getattr(plan.quantization, "method", None) == "gptq"

    def _profile_in_sweep(self, checkpoint_folder: Path) -> dict[str, Any]:
        """The profile of a run whose GPTQ sweep measures it (:meth:`_sweep_profiles`): the model summary now (a
        meta skeleton, no pass), the statistics once the sweep ran (:meth:`_profile_from_sweep`)."""
        model, _ = build_skeleton(checkpoint_folder, dtype=self._torch_dtype())
        return {"statistic_names": [], "statistic_options": {}, "measured_in": "gptq sweep",
                **_profile_record({}, 0, [], model_summary(model))}

    def _profile_from_sweep(self, profile: dict, sweep_statistics: dict, calibration, num_hidden_layers: int) -> dict:
        """``profile`` completed with what the GPTQ sweep collected (``QuantizationResult.sweep_statistics``)."""
        record = _profile_record(sweep_statistics, num_hidden_layers, calibration.domain_names,
                                 profile["summary_before"])
        # said in the report: the inputs of layer l went through the quantised layers before it
        record["super_experts_detail"]["measured_in"] = "gptq sweep: each layer before its quantisation, on the " \
                                                        "outputs of the quantised layers before it"
        return {**profile, **record}

    def _run_stages(self, checkpoint_folder, tokenizer, calibration, profile, state, partial):
        stages = self.recipe.stages
        if not stages:
            return [], None, None
        if self.stream_plan is not None:
            return self._run_stages_streamed(checkpoint_folder, tokenizer, calibration, profile, state, partial)
        started = time.perf_counter()
        dtype = self._torch_dtype() or _checkpoint_dtype(checkpoint_folder)
        # the model stays on the CPU: calibration passes and quantisation move one decoder layer at a time to
        # the compute device (moecompress.calibration.runner)
        model, loaded_tokenizer = load_model(str(checkpoint_folder), dtype=dtype, device="cpu")
        self.timings["load_model"] = time.perf_counter() - started
        context = RunContext(
            model=model, tokenizer=loaded_tokenizer or tokenizer, source=self.source, output_dir=partial,
            calibration=calibration, super_experts=[tuple(pair) for pair in profile["super_experts"]],
            config=model.config, device=self.device, batch_size=self.recipe.calibration.batch_size,
            on_layer=lambda done, total: self.progress.update(self.task, done, total),
            allow_task_code=self.allow_task_code,
        )
        if "statistics" in profile:  # the profiling pass ran in this process: its numbers serve the first stage
            context.statistics_cache = profile["statistics"]
            context.statistics_names = set(profile["statistic_names"])
            context.statistics_options = dict(profile.get("statistic_options") or {})
        for stage in stages:
            stage.check(context)  # impossible options fail before any stage works
        last_edit = max((index for index, stage in enumerate(stages) if getattr(stage, "modifies_model", True)),
                        default=-1)
        records = []
        for index, stage in enumerate(stages):
            if index > last_edit and not self.world.is_main:
                break  # the model is final: stages that only read it (evaluate) run on rank 0
            records.append(self._stage(index, stage, context, state, partial)[1])
            if index == last_edit:
                self._gather_rank_memory()
        self.timings["calibration passes in stages"] = context.timings.get("calibration_passes", 0.0)
        summary_after = model_summary(model)
        if any(getattr(stage, "modifies_model", True) for stage in stages) and self.world.is_main:
            started = time.perf_counter()
            self.progress.start("save model", None)
            save_model(model, context.tokenizer, partial)
            self.progress.finish("save model")
            self.timings["save_model"] = time.perf_counter() - started
        return records, summary_after, model

    def _run_stages_streamed(self, checkpoint_folder, tokenizer, calibration, profile, state, partial):
        """The streamed run (``moecompress.streaming``): decide on a meta skeleton, sweep the layers from disk into
        the output checkpoint, then load the written model for the stages that read it (evaluate)."""
        plan = self.stream_plan
        dtype = self._torch_dtype() or _checkpoint_dtype(checkpoint_folder)
        sweep_statistics = PROFILE_STATISTICS if profile.get("measured_in") == "gptq sweep" else ()
        streamed = StreamedStages(plan, checkpoint_folder, dtype, device=self.device, sweep_statistics=sweep_statistics)
        context = RunContext(
            model=streamed.skeleton(), tokenizer=tokenizer, source=self.source, output_dir=partial,
            calibration=calibration, super_experts=[tuple(pair) for pair in profile["super_experts"]],
            device=self.device, batch_size=self.recipe.calibration.batch_size,
            on_layer=lambda done, total: self.progress.update(self.task, done, total),
            allow_task_code=self.allow_task_code,
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
            name = (f"stage {index + 1}/{len(self.recipe.stages)} {plan.quantization.method}, streamed"
                    if plan.quantization else "write the pruned model, streamed")
            self.progress.start(name, None, unit="layer")
            self.task = name
            quantization_result, written = streamed.write_model(context, pruning_result, partial)
            self.progress.finish(name)
            seconds = time.perf_counter() - started
            self.timings["stream layers"] = seconds
            if sweep_statistics:  # the profile this run measured in the sweep
                profile.update(self._profile_from_sweep(profile, quantization_result.sweep_statistics, calibration,
                                                        len(decoder_layers(written))))
                state["profile"] = {key: value for key, value in profile.items() if key != "statistics"}
            if plan.quantization is not None:
                result = plan.quantization.stage_result(quantization_result)
                record = self._record(plan.quantization, result, seconds, context)
                state["stages"][key] = {"record": record, "result": {
                    "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
                    "changed_structure": result.changed_structure}}
                records.append(record)
            state["streamed_model_written"] = True
            self._save_state(state)
        elif plan.quantization is not None:
            records.append({**done["record"], "resumed": True})
        self._gather_rank_memory()
        if not self.world.is_main:  # the model is written: stages that only read it (evaluate) run on rank 0
            return records, None, None
        started = time.perf_counter()
        model = None
        if plan.after:  # stages that read the whole model load the written result
            model, loaded_tokenizer = load_model(str(partial), dtype=dtype, device="cpu")
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
        summary_after = model_summary(model if model is not None else
                                      build_meta_model(AutoConfig.from_pretrained(str(partial)), dtype=dtype))
        return records, summary_after, model

    def _stage(self, index: int, stage: Stage, context: RunContext, state: dict, partial: Path):
        """Run (or, when a stopped run finished it, replay) one stage; returns ``(result, report record)``."""
        key = f"{index}:{stage.method}"
        name = f"stage {index + 1}/{len(self.recipe.stages)} {stage.method}"
        done = state["stages"].get(key)
        self.progress.start(name, None, unit="layer")
        self.task = name
        started = time.perf_counter()
        if done is not None:
            # every finished stage replays its decisions: a structural edit, or one a later stage reads (a bit map);
            # a structural edit that cannot be replayed runs again
            result = StageResult(**done["result"])
            if stage.replay(context, result) or not result.changed_structure:
                if result.changed_structure:
                    context.mark_statistics_stale()
                self.progress.stop(name)
                LOGGER.info("%s: replayed from the stopped run's decisions", name)
                return result, {**done["record"], "resumed": True}
        result = stage.run(context)
        if result.changed_structure:
            context.mark_statistics_stale()
        seconds = time.perf_counter() - started
        record = self._record(stage, result, seconds, context)
        state["stages"][key] = {"record": record, "result": {
            "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
            "changed_structure": result.changed_structure}}
        self._save_state(state)
        self.timings[f"stage {index}: {stage.method}"] = seconds
        self.progress.finish(name)
        return result, record

    def _gather_rank_memory(self) -> None:
        """Every rank's peak memory so far, for the report (a collective: every rank calls it once, after the
        model's last edit)."""
        self.rank_peak_memory = self.world.all_gather_objects(peak_memory_bytes())

    @staticmethod
    def _record(stage: Stage, result: StageResult, seconds: float, context: RunContext) -> dict:
        return {"method": stage.method, "options": stage.options.model_dump(mode="json", exclude_none=True),
                "decisions": result.decisions, "metrics": result.metrics, "plots": result.plots,
                "seconds": seconds, "super_experts_after": [list(p) for p in context.super_experts]}

    def _report(self, calibration, profile, stage_records, summary_after) -> dict[str, Any]:
        before = profile["summary_before"]
        after = summary_after or before
        parameters_after = after["parameters"]["total"]
        bytes_after = after["bytes"]["total"]
        calibration_record = calibration.describe()
        calibration_record["expert_usage_by_domain"] = profile["expert_usage_by_domain"]
        calibration_record["moe_layers"] = profile["moe_layers"]
        calibration_record["expert_token_counts"] = profile["expert_token_counts"]
        final_super = stage_records[-1]["super_experts_after"] if stage_records else profile["super_experts"]
        if profile.get("measured_in") == "gptq sweep":  # found after the stage ran; GPTQ keeps every expert's id
            final_super = profile["super_experts"]
        return {
            "recipe": self.recipe.to_dict(),
            "versions": collect_versions(),
            "calibration": calibration_record,
            "super_experts": profile["super_experts"],
            "super_experts_after": final_super,
            "super_experts_detail": profile["super_experts_detail"],
            "model": {
                "source": self.source_name,
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
            "ranks": {"world_size": self.world.size,
                      "peak_memory_bytes": getattr(self, "rank_peak_memory", None) or [peak_memory_bytes()]},
        }


# ----- helpers ---------------------------------------------------------------------------------------------------
def _profile_record(layers: dict, num_hidden_layers: int, domain_names: list[str], summary: dict) -> dict[str, Any]:
    """The report's profile (super experts, expert usage overall and per domain, the model summary) from the
    :data:`PROFILE_STATISTICS` of every MoE layer ``{layer: LayerStatistics}``."""
    super_experts = find_super_experts(layers, num_hidden_layers)
    moe_layers = sorted(layers)
    usage_by_domain = {
        domain: [layers[layer]["expert_token_counts_by_domain"][index].tolist() for layer in moe_layers]
        for index, domain in enumerate(domain_names)
    }
    return {
        "super_experts": [list(pair) for pair in super_experts.routed],
        "super_experts_detail": super_experts.to_dict(),
        "moe_layers": moe_layers,
        "expert_token_counts": [layers[layer]["expert_token_counts"].tolist() for layer in moe_layers],
        "expert_usage_by_domain": usage_by_domain,
        "summary_before": summary,
    }


def check_ranked_stages(stages: list[Stage], world_size: int) -> None:
    """Over several ranks, only stages whose ranked run is known to equal one process's (:data:`RANKED_METHODS`)."""
    if world_size == 1:
        return
    other = [stage.method for stage in stages if stage.method not in RANKED_METHODS]
    if other:
        raise RecipeError(f"stage(s) {other} cannot run over several ranks yet (supported: {list(RANKED_METHODS)}); "
                          "run this recipe in one process (without torchrun / --nproc)")


def _rank_device(world: World, device):
    """The compute device of this rank: ``cuda`` becomes the rank's own GPU (``cuda:LOCAL_RANK``)."""
    if world.size == 1:
        return device
    try:
        resolved = rank_device(device, world.local_rank)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return None if resolved is None else str(resolved)


def _stage_statistics_options(stage: Stage) -> dict[str, dict]:
    """``{statistic: options}`` a stage passes to ``context.statistics`` (stages that have a
    ``statistics_options()`` method; none for the others)."""
    method = getattr(stage, "statistics_options", None)
    return dict(method()) if callable(method) else {}


def collect_versions() -> dict[str, str]:
    """Versions of moecompress, Python and the libraries a result depends on."""
    versions = {"moecompress": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "accelerate", "lm_eval", "compressed-tensors", "triton",
                    "scipy", "pulp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _checkpoint_dtype(folder: Path):
    config = json.loads((Path(folder) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)


# The stage interface and the run-folder lock are defined below the pipeline; these names stay importable from here.
def _name_the_log(error: BaseException, log: Path) -> None:
    """Say where the failed run's log is: in the one-line message of our errors, as a note under a traceback."""
    if isinstance(error, MoECompressError) and len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} (log: {log})",)
    elif hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"run log: {log}")


__all__ = ["LOCK_FILE", "PROFILE_STATISTICS", "STAGE_REGISTRY", "Pipeline", "ProgressReporter", "RunContext", "RunLock",
           "Stage", "StageOptions", "StageResult", "collect_versions", "register_stage"]
