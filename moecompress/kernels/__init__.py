"""Packed low-bit kernels: the packed weight layout, Triton GEMM/GEMV and grouped MoE experts, the torch reference
path, the experts backend, and MC-MoE's online dynamic pruning hooks.

Modules defining ``@triton.jit`` kernels read ``TRITON_INTERPRET`` when they are imported, so this package imports
them lazily: ``from moecompress.kernels import packed_linear_triton`` loads the Triton module on first use.
Quantising a model's experts into this layout is :func:`moecompress.quantization.packing.pack_model_experts`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedExperts": "moecompress.kernels.backend",
    "PackedLinearWeight": "moecompress.kernels.layout",
    "register_packed_experts_backend": "moecompress.kernels.backend",
    "BACKEND_NAME": "moecompress.kernels.backend",
    "packed_linear_triton": "moecompress.kernels.triton_gemm",
    "moe_experts_triton": "moecompress.kernels.triton_moe",
    "packed_linear_reference": "moecompress.kernels.reference",
    "moe_experts_reference": "moecompress.kernels.reference",
    "triton_available": "moecompress.kernels.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moecompress.kernels' has no attribute {name!r}")
