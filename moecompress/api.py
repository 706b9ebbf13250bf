"""The Python API in one call: :func:`compress` (a path, a hub id, or a loaded model, the way llm-compressor's
``oneshot`` takes one), with :func:`load` beside it; ``import moecompress`` exposes both, and ``moecompress.export``
(the export package, callable) writes a compress output in another format.

    import moecompress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("demo/models/moe-ref-q3")
    tokenizer = AutoTokenizer.from_pretrained("demo/models/moe-ref-q3")
    report = moecompress.compress(model, "recipes/demo.yaml", "runs/api", tokenizer=tokenizer, threads=1)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from moecompress.checkpoint.loading import load_model
from moecompress.checkpoint.native import save_model
from moecompress.errors import CheckpointError, RecipeError
from moecompress.export.options import ExportOptions
from moecompress.pipeline import Pipeline
from moecompress.progress import ProgressReporter
from moecompress.recipe import CalibrationConfig, Recipe, known_methods, parse_recipe
from moecompress.stages import STAGE_REGISTRY, Stage


def compress(model_or_path: Any, recipe: Any, out: str | Path, calibration: Any = None, *, tokenizer: Any = None,
             device: str | None = None, dtype: Any = "auto", threads: int | None = None, overwrite: bool = False,
             execution: str = "auto", progress: ProgressReporter | bool | None = None,
             verbose: bool | None = None, allow_task_code: bool = False,
             exports: list[ExportOptions] | None = None) -> dict[str, Any]:
    """Compress a model with a recipe and write the result into ``out``; return the report (``report.json``).

    model_or_path: a checkpoint folder, a Hugging Face hub id, or a loaded ``PreTrainedModel`` (then pass its
        ``tokenizer`` too). A loaded model is saved once into a temporary folder beside ``out`` (removed when the
        run ends), so the run is the same as from a folder: checked, profiled layer by layer, resumable.
    recipe: the path of a YAML recipe, a recipe dict, a :class:`~moecompress.recipe.Recipe`, or a list of stages
        (``[PruneReapStage(num_experts_to_keep=24), GPTQStage(bits=4)]``).
    out: the output folder (see :meth:`moecompress.pipeline.Pipeline.run` for what it holds).
    calibration: replaces the recipe's ``calibration:`` section: a dict of its keys (``files``, ``dataset``,
        ``text_field``, ``num_samples``, ``seq_len``...), ``"bundled"``, a file or folder path (or a list of them),
        or a dataset name (a hub id, or a local folder in the datasets layout).
    tokenizer: the tokenizer of a loaded model (default: loaded from the model's ``name_or_path``).
    device, dtype, threads, overwrite, execution, progress, verbose, allow_task_code, exports: as
        :meth:`Pipeline.run`.
    """
    pipeline = _pipeline(recipe, calibration)
    if isinstance(model_or_path, (str, Path)):
        return pipeline.run(model_or_path, out, device=device, dtype=dtype, threads=threads, overwrite=overwrite,
                            execution=execution, progress=progress, verbose=verbose, allow_task_code=allow_task_code,
                            exports=exports)
    if not hasattr(model_or_path, "save_pretrained"):
        raise CheckpointError(f"compress takes a checkpoint folder, a hub id or a loaded transformers model, got "
                              f"{type(model_or_path).__name__}")
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model_or_path)
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.input-", dir=out.parent))
    try:
        save_model(model_or_path, tokenizer, staging)
        return pipeline.run(staging, out, device=device, dtype=dtype, threads=threads, overwrite=overwrite,
                            execution=execution, progress=progress, verbose=verbose,
                            source_name=_model_name(model_or_path), allow_task_code=allow_task_code, exports=exports)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(path: str | Path, *, dtype: Any = None, device: str = "cpu", device_map: dict | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a checkpoint folder or hub id, compressed (native format, compressed-tensors) or
    not; the checkpoint is validated first and never written to. ``device_map``: spread the model over devices
    (accelerate; see :func:`moecompress.checkpoint.placement.plan_placement`). See
    :func:`moecompress.checkpoint.load_model`."""
    return load_model(str(path), dtype=dtype, device=device, device_map=device_map)


def stage_classes() -> dict[str, type[Stage]]:
    """``{recipe method: stage class}`` of every stage recipes can use."""
    known_methods()  # imports every module that registers stages
    return dict(sorted(STAGE_REGISTRY.items()))


def _pipeline(recipe: Any, calibration: Any) -> Pipeline:
    if isinstance(recipe, Stage):
        recipe = [recipe]
    if isinstance(recipe, (list, tuple)):
        if not all(isinstance(stage, Stage) for stage in recipe):
            raise RecipeError("a recipe given as a list holds stage objects, e.g. [PruneReapStage(num_experts_to_keep="
                              "24), GPTQStage(bits=4)]; for a dict or YAML recipe pass the dict or the file's path")
        return Pipeline(list(recipe), calibration=_calibration(calibration))
    pipeline = Pipeline.from_recipe(recipe)
    if calibration is not None:
        base = pipeline.recipe
        pipeline.recipe = Recipe(calibration=_calibration(calibration), stages=base.stages, source=base.source,
                                 path=base.path, exports=base.exports)
    return pipeline


def _calibration(calibration: Any) -> CalibrationConfig | None:
    """A calibration section from what :func:`compress` accepts (see its docstring)."""
    if calibration is None or isinstance(calibration, CalibrationConfig):
        return calibration
    if isinstance(calibration, dict):
        return parse_recipe({"calibration": calibration, "stages": []}).calibration
    entries = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    texts = [str(entry) for entry in entries]
    if texts == ["bundled"] or all(Path(text).expanduser().is_file() for text in texts) or (
            all(Path(text).expanduser().is_dir() for text in texts) and not _is_dataset_folder(texts[0])):
        return CalibrationConfig(files=texts)
    if len(texts) == 1:
        return CalibrationConfig(dataset=texts[0])
    raise RecipeError(f"calibration {texts!r}: give files or folders that exist, 'bundled', one dataset name, or a "
                      "dict of the recipe's calibration keys")


def _is_dataset_folder(text: str) -> bool:
    """A folder in the datasets layout (``load_dataset`` reads it) rather than a folder of .jsonl/.txt files."""
    folder = Path(text).expanduser()
    return (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file() or any(
        folder.glob("*.parquet")) or (folder / "data").is_dir()


def _tokenizer_of(model: Any) -> Any:
    name = getattr(model, "name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - any failure: the user must pass the tokenizer
        raise CheckpointError(f"no tokenizer for the loaded model ({name!r}: {type(error).__name__}); pass "
                              "compress(model, ..., tokenizer=tokenizer)") from None


def _model_name(model: Any) -> str:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else f"a loaded {type(model).__name__}"
