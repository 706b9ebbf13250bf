"""Exports of a native moecompress folder to other formats (compressed-tensors, plain HF).

:func:`export_folder` is the one entry point of ``moecompress export`` / ``compress --export`` / a recipe's
``export:`` key. The exporters import compressed-tensors only when called (``import moecompress`` stays light).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from moecompress.errors import UsageError
from moecompress.evals.model_card import write_model_card
from moecompress.export.hf import export_hf
from moecompress.folders import read_json

EXPORT_FORMATS = ("compressed-tensors", "hf")


def export_folder(source: str | Path, out: str | Path, fmt: str, *, tp: int = 1, widen_to_layer_max: bool = False,
                  dequantize: bool = False, max_shard_bytes: int = 2 << 30) -> dict:
    """Export the native moecompress folder ``source`` as ``fmt`` into ``out`` (new or empty); returns the report
    (also written to ``out/export_report.json``). ``tp`` and ``widen_to_layer_max`` apply to compressed-tensors,
    ``dequantize`` to hf."""
    if fmt == "compressed-tensors":
        # imports compressed-tensors (heavy): only when this format is written
        from moecompress.export.compressed_tensors import export_compressed_tensors

        report = export_compressed_tensors(source, out, tp=tp, widen_to_layer_max=widen_to_layer_max,
                                           max_shard_bytes=max_shard_bytes)
    elif fmt == "hf":
        report = export_hf(source, out, dequantize=dequantize, max_shard_bytes=max_shard_bytes)
    else:
        raise UsageError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    # the model card: the compress run's report when the source is a run's folder, and how to load this export
    run_report = read_json(Path(source) / "report.json") or {"model": {"source": str(source)}}
    base = Path(str((run_report.get("model") or {}).get("source") or ""))
    write_model_card(run_report, out, export_report=report, source_folder=base if base.is_dir() else None)
    return report


class _ExportPackage(types.ModuleType):
    """``moecompress.export`` is this package and, called, the export helper of the facade:
    ``moecompress.export("runs/demo", "compressed-tensors", "runs/demo-ct")`` (a package's name and a function's
    cannot both be ``moecompress.export`` otherwise: importing the package would replace the function)."""

    def __call__(self, folder: str | Path, format: str, out: str | Path, **options) -> dict:  # noqa: A002
        """Write the compress output ``folder`` as ``format`` (``compressed-tensors``, ``hf``) into ``out``;
        returns the export report. Options: ``tp``, ``widen_to_layer_max`` (compressed-tensors), ``dequantize``."""
        return export_folder(folder, out, format, **options)


sys.modules[__name__].__class__ = _ExportPackage
