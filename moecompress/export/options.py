"""A recipe's ``export:`` key: which deployment folders a compression run also writes.

    export: compressed-tensors            # a format name, or
    export:                               # one mapping, or a list of them
      - {format: compressed-tensors, tp: 2, widen_to_layer_max: true}
      - {format: hf, dequantize: true, out: /models/plain}

Each export goes to ``out`` (default: ``<compress --out>-<format>``, beside the native folder, which stays as it is)
after the run finished; a folder there that an earlier export of the same native folder wrote is replaced in one
rename, when it holds nothing but that export's files (anything else there, a damaged ``export_report.json`` included,
is refused, never deleted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic

from moecompress.errors import RecipeError
from moecompress.export import export_folder


class ExportOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    format: Literal["compressed-tensors", "hf"]
    tp: int = pydantic.Field(1, ge=1)
    widen_to_layer_max: bool = False
    dequantize: bool = False
    out: str | None = None

    def out_dir(self, native_dir: Path) -> Path:
        return Path(self.out) if self.out else native_dir.parent / f"{native_dir.name}-{self.format}"


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
                              "compressed-tensors or hf, or {format, tp, widen_to_layer_max, dequantize, out})") from None
    return options


def run_exports(native_dir: str | Path, exports: list[ExportOptions]) -> list[dict]:
    """Write each export of the finished native folder; returns their reports."""
    native_dir = Path(native_dir)
    reports = []
    for options in exports:
        reports.append(export_folder(native_dir, options.out_dir(native_dir), options.format, tp=options.tp,
                                     widen_to_layer_max=options.widen_to_layer_max, dequantize=options.dequantize,
                                     replace_own=True))  # our own earlier export of this folder is replaced
    return reports
