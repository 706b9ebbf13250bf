"""Where the Triton kernels can run, decided once per call site, never assumed.

Triton launches need a CUDA GPU, or ``TRITON_INTERPRET=1`` set *before* the kernel modules are imported (then the
kernels run on CPU tensors through Triton's interpreter: slow, for tests). Without either a launch fails with
``RuntimeError: 0 active drivers``; callers use :func:`triton_available` first and :func:`is_missing_driver_error`
to turn a late failure into the torch path.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but a broken install must not break the torch path
        return False
    return True


def triton_available(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors that live on ``device``?"""
    device = torch.device(device)
    if not triton_importable():
        return False
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


def is_missing_driver_error(error: BaseException) -> bool:
    """The launch failed because Triton found no GPU driver (``0 active drivers``) and no interpreter."""
    return isinstance(error, RuntimeError) and "active drivers" in str(error)
