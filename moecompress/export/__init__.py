"""Exports of a native moecompress folder to other formats (compressed-tensors, plain HF, GGUF for llama.cpp).

:func:`export_folder` is the one entry point of ``moecompress export`` / ``compress --export`` / a recipe's
``export:`` key. The exporters import compressed-tensors only when called (``import moecompress`` stays light).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from moecompress.errors import UsageError
from moecompress.export.gguf import export_gguf
from moecompress.export.hf import export_hf

EXPORT_FORMATS = ("compressed-tensors", "hf", "gguf")


def export_folder(source: str | Path, out: str | Path, fmt: str, *, tp: int = 1, widen_to_layer_max: bool = False,
                  widen_to_model_max: bool = False, consumer: str | None = None, dequantize: bool = False,
                  max_shard_bytes: int = 2 << 30, replace_own: bool = False, types: str | None = None,
                  layer_mean: bool = False) -> dict:
    """Export the native moecompress folder ``source`` as ``fmt`` into ``out`` (new or empty, for gguf a file;
    ``replace_own``: or holding only an earlier export of ``source``, replaced in one rename; a gguf file replaces
    only an earlier export of ``source``); returns the report (also written to ``out/export_report.json``, for gguf
    beside the file). ``tp``, ``widen_to_layer_max``, ``widen_to_model_max`` and ``consumer`` (``--for``: None =
    every consumer, or ``"vllm"``) apply to compressed-tensors, ``dequantize`` to hf, ``types`` and ``layer_mean`` to
    gguf."""
    if fmt == "compressed-tensors":
        # imports compressed-tensors (heavy): only when this format is written
        from moecompress.export.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(source, out, tp=tp, widen_to_layer_max=widen_to_layer_max,
                                         widen_to_model_max=widen_to_model_max, consumer=consumer,
                                         max_shard_bytes=max_shard_bytes, replace_own=replace_own)
    if fmt == "hf":
        return export_hf(source, out, dequantize=dequantize, max_shard_bytes=max_shard_bytes, replace_own=replace_own)
    if fmt == "gguf":
        return export_gguf(source, out, types=types, layer_mean=layer_mean)
    raise UsageError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")


class _ExportPackage(types.ModuleType):
    """``moecompress.export`` is this package and, called, the export helper of the facade:
    ``moecompress.export("runs/demo", "compressed-tensors", "runs/demo-ct")`` (a package's name and a function's
    cannot both be ``moecompress.export`` otherwise: importing the package would replace the function)."""

    def __call__(self, folder: str | Path, format: str, out: str | Path, **options) -> dict:  # noqa: A002
        """Write the compress output ``folder`` as ``format`` (``compressed-tensors``, ``hf``, ``gguf``) into ``out``;
        returns the export report. Options: ``tp``, ``widen_to_layer_max``, ``widen_to_model_max``, ``consumer``
        (compressed-tensors), ``dequantize`` (hf), ``types``, ``layer_mean`` (gguf)."""
        return export_folder(folder, out, format, **options)


sys.modules[__name__].__class__ = _ExportPackage
