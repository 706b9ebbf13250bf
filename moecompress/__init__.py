"""moecompress: make Mixture-of-Experts language models small enough to deploy while keeping them good.

    import moecompress
    report = moecompress.compress("path/or/hub-id", "recipes/demo.yaml", "runs/demo")   # or a loaded model
    model, tokenizer = moecompress.load("runs/demo")
    moecompress.export("runs/demo", "compressed-tensors", "runs/demo-ct")

    pipeline = moecompress.Pipeline([moecompress.PruneReapStage(num_experts_to_keep=24),
                                     moecompress.GPTQStage(bits=4, group_size=128)],
                                    calibration={"files": "bundled", "num_samples": 32, "seq_len": 256})
    report = pipeline.run("path/or/hub-id", "runs/x", threads=4)

Stage classes are named after their recipe ``method`` (``prune_reap`` -> ``PruneReapStage``, see
:func:`moecompress.stages.stage_class_name`); ``help(moecompress.GPTQStage)`` lists every option.

Layers (data flows one way, DESIGN.md): ``models`` (a uniform view of every MoE family) -> ``kernels`` (packed
low-bit experts) -> ``checkpoint`` (files) -> ``calibration`` (statistics) -> ``analysis`` (scores) -> ``stages`` ->
``pruning`` / ``quantization`` (decisions via ``solvers``, edits via ``models``) -> ``export`` / ``evals`` ->
``recipe`` -> ``pipeline`` / ``api`` -> ``commands`` / ``cli``. This module is the facade above them all.

`import moecompress` is light (no torch, no transformers): every name below is imported on first use. It also lets
plain ``AutoModelForCausalLM.from_pretrained`` load moecompress's native (packed) checkpoints: their config names
quant_method "moecompress", which is registered with transformers as soon as transformers' quantizers load.
"""

import importlib

from moecompress.checkpoint.native_registration import register_native_format_lazily
from moecompress.version import __version__

register_native_format_lazily()

# name -> module that defines it; imported on first use (`moecompress.compress` imports torch and transformers).
_EXPORTS = {
    # the one-call API
    "compress": "moecompress.api",
    "load": "moecompress.api",
    "export": "moecompress.export",  # the export package itself: calling it exports (see its _ExportPackage)
    "stage_classes": "moecompress.api",
    # pipelines, recipes, stages
    "Pipeline": "moecompress.pipeline",
    "Recipe": "moecompress.recipe",
    "CalibrationConfig": "moecompress.recipe",
    "load_recipe": "moecompress.recipe",
    "Stage": "moecompress.stages",
    "StageOptions": "moecompress.stages",
    "StageResult": "moecompress.stages",
    "RunContext": "moecompress.stages",
    "register_stage": "moecompress.stages",
    "stage_class_name": "moecompress.stages",
    # the stage classes (old names stay importable from their modules)
    "PruneFrequencyStage": "moecompress.pruning.frequency",
    "PruneReapStage": "moecompress.pruning.reap",
    "PruneEanStage": "moecompress.pruning.ean",
    "PruneNaeeStage": "moecompress.pruning.naee",
    "PrunePremoeStage": "moecompress.pruning.premoe",
    "PruneCameraStage": "moecompress.pruning.camera_p",
    "CameraPStage": "moecompress.pruning.camera_p",
    "MergeHcsmoeStage": "moecompress.pruning.hcsmoe",
    "MergeMsmoeStage": "moecompress.pruning.msmoe",
    "MergeUncurlStage": "moecompress.pruning.uncurl",
    "RTNStage": "moecompress.quantization.stages",
    "GPTQStage": "moecompress.quantization.stages",
    "McmoePmqStage": "moecompress.quantization.pmq",
    "McmoeOdpStage": "moecompress.quantization.odp",
    "CameraQStage": "moecompress.quantization.camera_q",
    "EvaluateStage": "moecompress.evals.stage",
    # progress display
    "ProgressReporter": "moecompress.progress",
    "TextProgress": "moecompress.progress",
    "RichProgress": "moecompress.progress",
    # models, checkpoints, evaluation, exports
    "load_model": "moecompress.checkpoint.loading",
    "save_model": "moecompress.checkpoint.native",
    "export_folder": "moecompress.export",
    "evaluate_model": "moecompress.evals.runner",
    "find_moe_blocks": "moecompress.models",
    "model_summary": "moecompress.models.summary",
    # errors
    "MoECompressError": "moecompress.errors",
    "CheckpointError": "moecompress.errors",
    "RecipeError": "moecompress.errors",
    "CalibrationError": "moecompress.errors",
    "TaskError": "moecompress.errors",
    "UsageError": "moecompress.errors",
    "UnsupportedModelError": "moecompress.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if module.__name__ == f"moecompress.{name}" else getattr(module, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'moecompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
