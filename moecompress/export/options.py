"""A recipe's ``export:`` key: which deployment folders a compression run also writes.

    export: compressed-tensors            # a format name, or
    export:                               # one mapping, or a list of them
      - {format: compressed-tensors, tp: 2, widen_to_layer_max: true}
      - {format: compressed-tensors, for: vllm}          # per-layer widths: vLLM only
      - {format: compressed-tensors, widen_to_model_max: true}   # one scheme: plain transformers too
      - {format: hf, dequantize: true, out: /models/plain}
      - {format: gguf, types: "attention=Q6_K", out: /models/model.gguf}

Each export goes to ``out`` (default: ``<compress --out>-<format>``, or the file ``<compress --out>.gguf``, beside
the native folder, which stays as it is) after the run finished; a folder there that an earlier export of the same
native folder wrote is replaced in one rename, when it holds nothing but that export's files (anything else there, a
damaged ``export_report.json`` included, is refused, never deleted). :func:`check_exports` runs before the run
starts: it plans what the recipe's stages will produce on the model's meta skeleton and refuses, with the export's
own one-line message, an export that could not be written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic

from moecompress.errors import RecipeError, UsageError
from moecompress.export import export_folder
from moecompress.export.deployability import (
    CONSUMERS,
    NotDeployableError,
    plan_of_recipe,
    plan_problems,
    raise_problems,
)
from moecompress.export.gguf_arch import architecture_of, check_config
from moecompress.export.gguf_types import TypeTable


class ExportOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True)

    format: Literal["compressed-tensors", "hf", "gguf"]
    tp: int = pydantic.Field(1, ge=1)
    widen_to_layer_max: bool = False
    widen_to_model_max: bool = False
    consumer: Literal["vllm"] | None = pydantic.Field(None, alias="for")  # `for: vllm`: that consumer only
    dequantize: bool = False
    types: str | None = None
    layer_mean: bool = False
    out: str | None = None

    @pydantic.field_validator("types")
    @classmethod
    def _types_parse(cls, value: str | None) -> str | None:
        TypeTable.parse(value)  # a UsageError naming the bad entry
        return value

    def out_dir(self, native_dir: Path) -> Path:
        if self.out:
            return Path(self.out)
        if self.format == "gguf":
            return native_dir.parent / f"{native_dir.name}.gguf"
        return native_dir.parent / f"{native_dir.name}-{self.format}"


def parse_export(value: Any) -> list[ExportOptions]:
    """The ``export:`` value (a format name, a mapping, or a list of either) as options; a RecipeError otherwise."""
    entries = value if isinstance(value, list) else [value]
    options = []
    for index, entry in enumerate(entries):
        try:
            options.append(ExportOptions(format=entry) if isinstance(entry, str) else ExportOptions.model_validate(entry))
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise RecipeError(f"export[{index}]: {where}: {problem['msg']} (an export entry is a format name, "
                              "compressed-tensors, hf or gguf, or {format, tp, widen_to_layer_max, widen_to_model_max, "
                              "for, dequantize, types, layer_mean, out})") from None
    return options


def run_exports(native_dir: str | Path, exports: list[ExportOptions]) -> list[dict]:
    """Write each export of the finished native folder; returns their reports."""
    native_dir = Path(native_dir)
    reports = []
    for options in exports:
        reports.append(export_folder(native_dir, options.out_dir(native_dir), options.format, tp=options.tp,
                                     widen_to_layer_max=options.widen_to_layer_max,
                                     widen_to_model_max=options.widen_to_model_max, consumer=options.consumer,
                                     dequantize=options.dequantize, types=options.types, layer_mean=options.layer_mean,
                                     replace_own=True))  # our own earlier export of this folder is replaced
    return reports


def check_exports(model, stages, exports: list[ExportOptions], native_dir: str | Path) -> None:
    """Refuse, before any work, an export the run's output could not be written as: the stages' plan
    (:func:`moecompress.export.deployability.plan_of_recipe`, on ``model``'s meta skeleton) against the format's
    rules, with the same one-line messages the export itself gives."""
    if not exports:
        return
    plan = plan_of_recipe(model, stages, source=str(native_dir))
    quantized = bool(plan.expert_layers or plan.linears)
    for options in exports:
        if options.format == "compressed-tensors":
            if not quantized:
                raise UsageError("export compressed-tensors: the recipe quantizes nothing (no `rtn` / `gptq` stage), "
                                 "and compressed-tensors stores quantized weights; add a quantization stage, or export "
                                 "--format hf")
            consumers = CONSUMERS if options.consumer is None else (options.consumer,)
            raise_problems(str(native_dir), plan_problems(
                plan, tp=options.tp, widen_to_layer_max=options.widen_to_layer_max,
                widen_to_model_max=options.widen_to_model_max, consumers=consumers))
        elif options.format == "hf":
            if plan.problems:
                raise NotDeployableError(f"cannot export {native_dir} as a plain HF checkpoint: "
                                         f"{plan.problems[0].message()}")
            if quantized and not options.dequantize:
                raise UsageError("export hf: the recipe quantizes the model, which a plain HF checkpoint cannot "
                                 "store; export --format compressed-tensors, or add --dequantize (full-size weights)")
        elif options.format == "gguf":  # the family and the config llama.cpp would compute differently
            text_config = model.config.get_text_config().to_dict()
            check_config(architecture_of(text_config.get("model_type", model.config.model_type)), text_config)
