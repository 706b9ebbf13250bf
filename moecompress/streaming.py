"""Streamed compress runs: the model is never held whole.

A recipe streams when its stages are, in order: at most one expert-pruning stage that decides from the profiling
pass alone (``prune_frequency``, ``prune_reap``, ``prune_ean``, ``prune_premoe``: scores from statistics, not
weights), at most one quantisation stage (``rtn`` or ``gptq``), and then only stages that do not modify the model
(``evaluate``). The run then goes:

1. the pruning stage decides on a meta skeleton of the model (shapes only) from the profiling statistics, as it
   would in memory: same scores, same kept sets, same report entry;
2. a second skeleton gets the pruned structure (shapes only); one layer-by-layer sweep loads each decoder layer from
   the source safetensors, reading only the kept experts' tensors (router rows sliced to them), quantises it on calibration inputs that went through the already-quantised layers
   (:func:`moecompress.quantization.sequential.quantize_model` with a lazy runner), stages it on disk
   (:class:`moecompress.checkpoint.shards.LayerFiles`) and releases it;
3. the staged layers become the output checkpoint shard by shard (:func:`moecompress.checkpoint.shards.write_checkpoint`);
4. stages that need the whole model (``evaluate``) load the written result.

Over several ranks (:mod:`moecompress.distributed`) the sweep is shared: each rank runs its calibration batches
through every layer, solves the experts it owns and gets the others' (``quantize_model``); rank ``layer % size``
stages the layer, and each rank writes its shards of the output checkpoint (rank 0 the index).

Peak memory is one decoder layer, the calibration activations and one chunk of per-expert Hessians
(``benchmarks/calibration_memory.py --stages prune+gptq`` measures it). A stopped run resumes at the first layer not
yet staged. Merging, NAEE (its search runs the experts), progressive pruning and bit allocation (PMQ reads the
weights) run in memory instead; ``execution: streamed`` then names the stage that prevents streaming.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecompress.calibration import LayerwiseRunner
from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton
from moecompress.checkpoint.native import MoECompressQuantizationConfig, needs_native_format
from moecompress.checkpoint.shards import write_checkpoint
from moecompress.errors import RecipeError
from moecompress.models.edits import keep_experts
from moecompress.pruning.base import ExpertPruningStage
from moecompress.quantization.sequential import open_layer_files, quantize_model
from moecompress.quantization.stages import QuantizeStage

STREAM_LAYERS_FOLDER = ".stream-layers"
EXECUTION_MODES = ("auto", "streamed", "in_memory")


@dataclass
class StreamPlan:
    """How a recipe's stages split for a streamed run (``pruning`` and ``quantization`` may be None)."""

    pruning: Any = None
    quantization: Any = None
    after: list = field(default_factory=list)  # stages that read the written model (evaluate)

    @property
    def stages(self) -> list:
        return [stage for stage in (self.pruning, self.quantization) if stage is not None] + self.after


def stream_plan(stages: list) -> tuple[StreamPlan | None, str]:
    """``(plan, "")`` when ``stages`` can stream, else ``(None, reason)`` naming the stage that prevents it."""
    plan = StreamPlan()
    for index, stage in enumerate(stages):
        modifies = getattr(stage, "modifies_model", True)
        if not modifies:
            plan.after.append(stage)
            continue
        if plan.after:
            return None, f"stage {stage.method} edits the model after {plan.after[0].method} read it"
        if isinstance(stage, ExpertPruningStage) and plan.pruning is None and plan.quantization is None and index == 0:
            if not getattr(stage, "decides_from_statistics", True) or getattr(stage.options, "progressive", False):
                what = "progressive mode" if getattr(stage.options, "progressive", False) else "its search"
                return None, f"{stage.method}: {what} runs the experts' weights while deciding"
            plan.pruning = stage
        elif isinstance(stage, QuantizeStage) and plan.quantization is None:
            plan.quantization = stage
        else:
            return None, f"stage {stage.method} needs the whole model in memory (only one pruning stage that " \
                         "decides from statistics, then rtn/gptq, then evaluate, stream)"
    if plan.pruning is None and plan.quantization is None:
        return None, "the recipe does not edit the model"
    return plan, ""


def choose_execution(mode: str, stages: list) -> StreamPlan | None:
    """The plan to stream with, or None to run in memory; ``mode`` is one of :data:`EXECUTION_MODES`."""
    if mode not in EXECUTION_MODES:
        raise RecipeError(f"execution must be one of {list(EXECUTION_MODES)}, got {mode!r}")
    if mode == "in_memory":
        return None
    plan, reason = stream_plan(stages)
    if plan is None and mode == "streamed":
        raise RecipeError(f"this recipe cannot run streamed: {reason}; run it with --execution in_memory (or auto)")
    return plan


class StreamedStages:
    """Runs a :class:`StreamPlan` for one pipeline run (see the module docstring)."""

    def __init__(self, plan: StreamPlan, checkpoint_folder: Path, dtype: torch.dtype, device=None,
                 sweep_statistics: tuple[str, ...] = ()) -> None:
        self.plan = plan
        self.checkpoint_folder = Path(checkpoint_folder)
        self.dtype = dtype
        self.device = device
        # statistics the quantiser collects in each layer's first pass (a run that skipped the profiling pass)
        self.sweep_statistics = tuple(sweep_statistics)

    def skeleton(self):
        model, _ = build_skeleton(self.checkpoint_folder, dtype=self.dtype)
        return model

    def decisions_key(self, pruning_result) -> str:
        """What the staged layers depend on besides the quantisation settings: the kept experts."""
        kept = pruning_result.decisions.get("kept_experts") if pruning_result is not None else None
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()

    def write_model(self, context, pruning_result, output_folder: Path):
        """Sweep the layers (load the kept experts, quantise, stage) and write the checkpoint into
        ``output_folder``. Returns ``(quantization result or None, the written model's meta skeleton)``."""
        model = self.skeleton()
        # keys are mapped once, here, while the skeleton still has the source's structure (before keep_experts)
        checkpoint = LazyCheckpoint(self.checkpoint_folder, model)
        kept_experts = {int(layer): list(kept) for layer, kept in
                        ((pruning_result.decisions.get("kept_experts") or {}) if pruning_result else {}).items()}
        if kept_experts:
            # prune the skeleton's structure up front (shapes only); each layer then reads only its kept experts
            keep_experts(model, kept_experts, top_k=getattr(self.plan.pruning.options, "top_k", None))
        runner = LayerwiseRunner(model, checkpoint=checkpoint, device=self.device, dtype=self.dtype,
                                 expert_selection={layer: sorted(kept) for layer, kept in kept_experts.items()})

        staging = Path(output_folder) / STREAM_LAYERS_FOLDER
        world = runner.world
        quantization_result = None
        if self.plan.quantization is not None:
            settings = self.plan.quantization.settings(context)
            settings.progress_dir = staging
            settings.fingerprint = settings.fingerprint + ":" + self.decisions_key(pruning_result)
            if self.sweep_statistics:  # staged layers then hold them too
                settings.sweep_statistics = self.sweep_statistics
                settings.fingerprint += ":" + ",".join(self.sweep_statistics)
            quantization_result = quantize_model(model, settings, context.calibration, batch_size=context.batch_size,
                                                 on_layer=context.on_layer, runner=runner)
            layer_files = open_layer_files(staging, settings.fingerprint, world)
        else:
            layer_files = open_layer_files(staging, "prune:" + self.decisions_key(pruning_result), world)

            def stage_layer(layer_index: int, layer) -> None:
                # rank layer % size stages it, unless an earlier, stopped run did
                if layer_index % world.size == world.rank and layer_files.metadata(layer_index) is None:
                    layer_files.save(layer_index, layer, {})

            runner.each_layer(stage_layer, on_layer=context.on_layer)
            world.barrier()
        if quantization_result is None and needs_native_format(model):  # layers with different expert counts
            model.config.quantization_config = MoECompressQuantizationConfig()
        write_checkpoint(model, layer_files, checkpoint, Path(output_folder), dtype=self.dtype,
                         tokenizer=context.tokenizer, source_folder=self.checkpoint_folder, world=world)
        world.barrier()  # every rank's shards are written
        if world.is_main:
            shutil.rmtree(layer_files.folder, ignore_errors=True)  # every staged layer is in its shard now
        return quantization_result, model

