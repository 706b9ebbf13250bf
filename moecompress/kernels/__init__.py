"""Packed low-bit kernels: Triton GEMM/GEMV and grouped MoE experts, torch reference path, experts backend.

Modules defining ``@triton.jit`` kernels read ``TRITON_INTERPRET`` when they are imported, so this package imports
them lazily: ``from moecompress.kernels import pack_model_experts`` loads the backend on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedExperts": "moecompress.kernels.backend",
    "pack_model_experts": "moecompress.kernels.backend",
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
