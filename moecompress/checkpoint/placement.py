"""Where a whole model sits while it is evaluated: one device when it fits, else a device map (accelerate) that
spreads its modules over the GPUs and, past their memory, the CPU.

Compression itself never needs this: its passes hold one decoder layer on the compute device at a time
(:mod:`moecompress.calibration.runner`). Evaluation runs the whole model, so a model larger than one GPU needs its
layers spread. :func:`plan_placement` decides from shapes alone (a meta skeleton), so the decision is testable
without a GPU: pass ``free_memory`` (bytes per GPU) and ``cpu_memory`` for a pretend machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn

from moecompress.errors import UsageError

# accelerate's names for the ways of spreading a model over devices (``from_pretrained(device_map=...)``)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Share of a GPU's free memory the weights may take on one device: the rest is for activations, lm-eval's batches.
HEADROOM = 0.85


@dataclass(frozen=True)
class Placement:
    """``device``: the one device holding the whole model; or ``device_map``: module path -> device (GPU index,
    ``"cpu"``), the model spread by accelerate (then ``device`` is None)."""

    device: str | None
    device_map: dict[str, int | str] | None = None

    @property
    def spread(self) -> bool:
        return self.device_map is not None


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers at their dtypes (a meta skeleton works: shapes only)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def gpu_free_memory() -> list[int]:
    """Free bytes of every visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(index)[0]) for index in range(torch.cuda.device_count())]


def plan_placement(model: nn.Module, device: str | None, *, device_map: str | None = None,
                   free_memory: list[int] | None = None, cpu_memory: int | None = None) -> Placement:
    """Where ``model`` (a skeleton at the evaluation dtype) goes for ``device``.

    * ``cpu`` / ``mps`` / ``cuda:N``: that one device (a given GPU index is the user's choice);
    * ``cuda``: GPU 0 when the weights fit in :data:`HEADROOM` of its free memory, else a device map over every GPU,
      with the CPU taking what the GPUs cannot (accelerate's offload);
    * ``device_map`` (one of :data:`DEVICE_MAPS`): spread the model that way over the GPUs and CPU in any case.

    ``free_memory`` (bytes per GPU) and ``cpu_memory`` default to this machine's.
    """
    device = device or "cpu"
    kind = torch.device(device).type
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise UsageError(f"device_map {device_map!r} is not known; use one of {list(DEVICE_MAPS)}")
    if kind != "cuda":
        if device_map is not None:
            raise UsageError(f"device_map {device_map} spreads a model over GPUs; it needs --device cuda, not {device}")
        return Placement(device)
    free = gpu_free_memory() if free_memory is None else list(free_memory)
    if not free:
        raise UsageError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if torch.device(device).index is not None and device_map is None:
        return Placement(device)
    if device_map is None and model_bytes(model) <= HEADROOM * free[0]:
        return Placement("cuda:0")
    return Placement(None, _device_map(model, device_map or "auto", free, cpu_memory))


def _device_map(model: nn.Module, strategy: str, free: list[int], cpu_memory: int | None) -> dict[str, int | str]:
    """accelerate's device map of ``model`` over GPUs with ``free`` bytes and the CPU."""
    max_memory: dict[int | str, int] = {index: int(HEADROOM * bytes_free) for index, bytes_free in enumerate(free)}
    max_memory["cpu"] = cpu_memory if cpu_memory is not None else _cpu_available()
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if strategy in ("balanced", "balanced_low_0"):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=strategy == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if any(target == "disk" for target in device_map.values()):
        raise UsageError("the model does not fit in the GPUs' and the CPU's memory together; use a machine with more "
                         "memory, or evaluate a smaller (more compressed) model")
    return device_map


def _cpu_available() -> int:
    return int(psutil.virtual_memory().available * HEADROOM)
