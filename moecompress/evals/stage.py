"""The ``evaluate`` stage: score the original and the compressed model on the same tasks, report the deltas.

Recipe::

    - method: evaluate
      tasks: [tb_code_next, tb_ppl_pycode]   # or a tag: [testbed]
      limit: 100                             # optional, documents per task
      batch_size: 16

The original checkpoint (``context.source``) is loaded read-only in fp32, scored, and freed; its scores are cached in
``<run dir>/eval_cache/`` under a key of everything that changes them (source, tasks, limit, BOS and encoding
options, the task files' contents), so a resumed run does not score it again. The compressed model
(``context.model``) is scored in place: its floating-point tensors are cast to fp32 for the evaluation and cast back
to their own dtypes afterwards (bf16 and fp16 values are exact in fp32, so the round trip changes nothing).

``dtype: bfloat16`` (or ``float16``) scores both in that dtype instead (GPUs); ``device: cuda`` scores on the GPU,
and a model larger than one GPU (or any, with ``device_map: auto``) is spread over the GPUs and the CPU
(:mod:`moecompress.checkpoint.placement`); the compressed model returns to the CPU afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Literal

import pydantic
import torch
from accelerate import dispatch_model
from accelerate.hooks import remove_hook_from_module

from moecompress import progress
from moecompress.checkpoint.placement import DEVICE_MAPS, Placement, plan_placement
from moecompress.errors import RecipeError
from moecompress.evals.loading import EVAL_DTYPES, load_model_for_eval
from moecompress.evals.runner import evaluate_model
from moecompress.evals.taskdefs import resolve_tasks
from moecompress.stages import RunContext, Stage, StageOptions, StageResult, register_stage

CACHE_FOLDER = "eval_cache"


class EvaluateOptions(StageOptions):
    tasks: list[str] = pydantic.Field(min_length=1, description="task names or tags, e.g. [tb_code_next, testbed_ppl]")
    limit: pydantic.PositiveInt | pydantic.confloat(gt=0, lt=1) | None = pydantic.Field(
        None, description="at most this many documents per task (a number below 1: that fraction); None: all")
    batch_size: pydantic.PositiveInt | Literal["auto"] = pydantic.Field(
        16, description="requests per forward pass, or 'auto' (lm-eval finds the largest that fits)")
    include_path: str | None = pydantic.Field(None, description="a folder of your own lm-eval YAML tasks")
    add_bos_token: bool | None = pydantic.Field(
        None, description="condition every request on the tokenizer's BOS (None: when the tokenizer has one)")
    encode_separately: bool = pydantic.Field(
        True, description="tokenize context and choice apart (False: lm-eval's joint encoding)")
    dtype: Literal["float32", "bfloat16", "float16", "keep"] = pydantic.Field(
        "float32", description="score both models in this dtype (bfloat16 / float16 on GPUs), or keep the compressed "
                               "model's dtype")
    device: str = pydantic.Field("cpu", description="torch device both models are scored on")
    device_map: Literal[DEVICE_MAPS] | None = pydantic.Field(
        None, description="spread the models over the GPUs and the CPU this way (accelerate's device_map)")

    @pydantic.field_validator("tasks", mode="before")
    @classmethod
    def _split_comma_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


def score_deltas(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """``after - before`` for every (task, metric) both have."""
    return {
        task: {metric: after[task][metric] - value for metric, value in metrics.items() if metric in after.get(task, {})}
        for task, metrics in before.items()
        if task in after
    }


@contextlib.contextmanager
def evaluated_in_float32(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[torch.nn.Module]:
    """Cast the model's floating-point parameters and buffers to fp32 (or ``dtype``), and each back to its own dtype
    on exit.

    Integer tensors (packed low-bit weights) are left alone.
    """
    original_dtypes: list[tuple[torch.Tensor, torch.dtype]] = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            original_dtypes.append((tensor, tensor.dtype))
            tensor.data = tensor.data.to(dtype)
    try:
        yield model
    finally:
        for tensor, dtype in original_dtypes:
            tensor.data = tensor.data.to(dtype)


@contextlib.contextmanager
def placed(model: torch.nn.Module, placement: Placement) -> Iterator[torch.nn.Module]:
    """``model`` (in memory, on the CPU) on its evaluation device(s) inside the block, back on the CPU after."""
    if placement.device_map is None and placement.device in (None, "cpu"):
        yield model
        return
    if placement.device_map is None:
        model.to(placement.device)
    else:
        dispatch_model(model, placement.device_map)
    try:
        yield model
    finally:
        if placement.device_map is not None:
            remove_hook_from_module(model, recurse=True)
        model.to("cpu")


@register_stage
class EvaluateStage(Stage):
    """Score ``context.source`` (before) and ``context.model`` (after) on the same tasks; metrics before/after/delta."""

    method = "evaluate"
    Options = EvaluateOptions
    modifies_model = False  # a recipe that only evaluates writes no model copy

    def check(self, context: RunContext) -> None:
        """Unknown task names, broken task files, and a task folder that would run code the person running the
        pipeline did not allow (``context.allow_task_code``) fail before the profiling pass, not after the stages."""
        resolve_tasks(self.options.tasks, include_path=self.options.include_path,
                      allow_task_code=context.allow_task_code)

    def run(self, context: RunContext) -> StageResult:
        options: EvaluateOptions = self.options
        self.check(context)  # bad tasks fail before any model work
        if context.tokenizer is None:
            raise RecipeError("the evaluate stage needs the model's tokenizer; the run has none (save it beside the model)")
        before = self._original_scores(context)
        dtype = EVAL_DTYPES.get(options.dtype)
        with evaluated_in_float32(context.model, dtype) if dtype else contextlib.nullcontext(), \
                placed(context.model, plan_placement(context.model, options.device, device_map=options.device_map)), \
                progress.task("evaluate compressed model", unit="request"):
            after = self._score(context.model, context.tokenizer, context.allow_task_code)
        return StageResult(metrics={"before": before, "after": after, "delta": score_deltas(before, after)})

    def _score(self, model: Any, tokenizer: Any, allow_task_code: bool = False) -> dict[str, dict[str, float]]:
        options: EvaluateOptions = self.options
        return evaluate_model(
            model, tokenizer, options.tasks, limit=options.limit, batch_size=options.batch_size,
            include_path=options.include_path, add_bos_token=options.add_bos_token,
            encode_separately=options.encode_separately, allow_task_code=allow_task_code,
        )

    def cache_key(self, source: str, allow_task_code: bool = False) -> str:
        """Hash of everything that changes the original model's scores."""
        options: EvaluateOptions = self.options
        resolved = resolve_tasks(options.tasks, include_path=options.include_path,
                                 allow_task_code=allow_task_code)
        task_contents = [
            json.dumps(spec, sort_keys=True, default=repr) if isinstance(spec, dict) else spec for spec in resolved.specs
        ]
        data_digests = []
        for spec in resolved.specs:
            if isinstance(spec, dict):
                for files in (spec.get("dataset_kwargs") or {}).get("data_files", {}).values():
                    for data_file in [files] if isinstance(files, str) else files:
                        data_digests.append(hashlib.sha256(Path(data_file).read_bytes()).hexdigest())
        identity = {
            "source": str(Path(source).resolve()) if Path(source).exists() else str(source),
            "options": options.model_dump(exclude={"device", "device_map", "batch_size"}),
            "tasks": task_contents,
            "data": data_digests,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def _original_scores(self, context: RunContext) -> dict[str, dict[str, float]]:
        options: EvaluateOptions = self.options
        key = self.cache_key(context.source, context.allow_task_code)
        cache_file = Path(context.output_dir) / CACHE_FOLDER / f"original-{key}.json"
        if cache_file.is_file():
            return json.loads(cache_file.read_text())["scores"]
        dtype = EVAL_DTYPES.get(options.dtype) or next(context.model.parameters()).dtype
        original_model, original_tokenizer = load_model_for_eval(context.source, device=options.device, dtype=dtype,
                                                                 device_map=options.device_map)
        try:
            with progress.task("evaluate original model", unit="request"):
                scores = self._score(original_model, original_tokenizer, context.allow_task_code)
        finally:
            del original_model
            gc.collect()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"source": str(context.source), "scores": scores}, indent=1))
        return scores
