"""A recipe's ``export:`` key: which deployment folders a compression run also writes.

    export: compressed-tensors            # a format name, or
    export:                               # one mapping, or a list of them
      - {format: compressed-tensors, tp: 2, widen_to_layer_max: true}
      - {format: hf, dequantize: true, out: /models/plain}
      - {format: gguf, types: "attention=Q6_K", out: /models/model.gguf}

Each export goes to ``out`` (default: ``<compress --out>-<format>``, or the file ``<compress --out>.gguf``, beside
the native folder, which stays as it is)
after the run finished; a folder there that an earlier export of the same native folder wrote is replaced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import pydantic

from moecompress.errors import RecipeError
from moecompress.export import export_folder
from moecompress.export.gguf_types import TypeTable
from moecompress.export.report import REPORT_FILE


class ExportOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    format: Literal["compressed-tensors", "hf", "gguf"]
    tp: int = pydantic.Field(1, ge=1)
    widen_to_layer_max: bool = False
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
                              "compressed-tensors, hf or gguf, or {format, tp, widen_to_layer_max, dequantize, types, "
                              "layer_mean, out})") from None
    return options


def run_exports(native_dir: str | Path, exports: list[ExportOptions]) -> list[dict]:
    """Write each export of the finished native folder; returns their reports."""
    native_dir = Path(native_dir)
    reports = []
    for options in exports:
        out = options.out_dir(native_dir)
        previous = out / REPORT_FILE
        if previous.is_file() and json.loads(previous.read_text()).get("source") == str(native_dir.resolve()):
            shutil.rmtree(out)  # our own earlier export of this folder: replace it
        reports.append(export_folder(native_dir, out, options.format, tp=options.tp,
                                     widen_to_layer_max=options.widen_to_layer_max, dequantize=options.dequantize,
                                     types=options.types, layer_mean=options.layer_mean))
    return reports
