"""Round-to-nearest quantisation into the packed layout (:mod:`moecompress.kernels.layout`): group scales and
zero points (min/max or the ``mse`` clipping search), values, and :func:`pack_model_experts`, which quantises every
routed expert of a model and swaps in :class:`moecompress.kernels.backend.PackedExperts`."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from moecompress.errors import MoECompressError, UnsupportedModelError
from moecompress.kernels.backend import BACKEND_NAME, PackedExperts, register_packed_experts_backend
from moecompress.kernels.layout import SUPPORTED_BITS, PackedLinearWeight, check_bits, num_groups, signed_range
from moecompress.models import find_moe_blocks


def quantization_params(
    min_vals: torch.Tensor,
    max_vals: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    mean_abs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of groups with the given minima and maxima (compressed-tensors' rules).

    1 bit instead takes ``mean_abs [...]``, each group's mean absolute value, as its scale (MC-MoE's
    ``sign(W) * mean|W|``); its zero points (asymmetric) are 0.

    min_vals / max_vals ``[...]`` fp32 (each group's min and max). Symmetric: ``scale = absmax / ((2^b - 1) / 2)``,
    zero None. Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(qmin - min / scale)``; min/max are
    widened to include 0 so that zero is representable. A zero scale (an all-zero group) becomes 1.
    Returns ``(scales, zeros)`` as fp32 ``[...]``; scales are rounded to ``scale_dtype`` first, so quantising with
    them uses exactly the scale a kernel will read back.
    """
    check_bits(bits)
    if bits == 1:
        if mean_abs is None:
            raise ValueError("1-bit scales are each group's mean |w|: pass mean_abs")
        scales = mean_abs.float()
        scales = torch.where(scales == 0, torch.ones_like(scales), scales).to(scale_dtype).float()
        return scales, None if symmetric else torch.zeros_like(scales)
    min_vals = min_vals.float().clamp(max=0.0)
    max_vals = max_vals.float().clamp(min=0.0)
    qmin, qmax = signed_range(bits)
    if symmetric:
        scales = torch.maximum(min_vals.abs(), max_vals) / ((qmax - qmin) / 2)
    else:
        scales = (max_vals - min_vals) / (qmax - qmin)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    scales = scales.to(scale_dtype).float()
    zeros = None if symmetric else torch.round(qmin - min_vals / scales).clamp(qmin, qmax)
    return scales, zeros


# How a group's scale is chosen. "minmax": from the group's min and max (compressed-tensors' rule, no search).
# "mse": the GPTQ reference's clipping search (its ``Quantizer(mse=True)``, and MoEQuant's ``--w_clip``): the range
# [min, max] is shrunk by p = 1, 0.99, ..., 0.21 and each group keeps the p whose rounding error
# sum |w - q(w)|^2.4 is smallest. At 2 and 3 bits clipping the few large weights of a group costs less than the
# coarser steps an unclipped range forces on all the others.
SCALE_SEARCHES = ("minmax", "mse")
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def fit_group_params(
    groups: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    mean_abs: torch.Tensor | None = None,
    scale_search: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points ``[...]`` (fp32) of the groups ``groups [..., columns]`` (one group per last-dim row).

    scale_search: ``"minmax"`` (:func:`quantization_params` of each group's min and max) or ``"mse"`` (the clipping
    search described at :data:`SCALE_SEARCHES`; never a larger error than ``"minmax"``, whose range is the first
    candidate). 1 bit takes ``mean_abs`` (``[...]``) and no search: ``mean|w|`` already minimises the squared error of
    ``sign(w) * s``. Zero-padded columns change neither the range nor the error (0 is always exactly representable).
    """
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search={scale_search!r} is not known; use one of {list(SCALE_SEARCHES)}")
    groups = groups.float()
    min_vals, max_vals = groups.amin(-1), groups.amax(-1)
    scales, zeros = quantization_params(min_vals, max_vals, bits, symmetric, scale_dtype, mean_abs)
    if scale_search == "minmax" or bits == 1:
        return scales, zeros
    work = torch.empty_like(groups)  # one buffer for every candidate: no temporaries per step
    best_error = _rounding_error(groups, scales, zeros, bits, work)
    for step in range(1, int(MSE_MAX_SHRINK * MSE_GRID)):
        shrink = 1.0 - step / MSE_GRID
        candidate_scales, candidate_zeros = quantization_params(min_vals * shrink, max_vals * shrink, bits,
                                                                symmetric, scale_dtype)
        error = _rounding_error(groups, candidate_scales, candidate_zeros, bits, work)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        scales = torch.where(better, candidate_scales, scales)
        if zeros is not None:
            zeros = torch.where(better, candidate_zeros, zeros)
    return scales, zeros


def _rounding_error(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                    work: torch.Tensor | None = None) -> torch.Tensor:
    """``sum |w - q(w)|^MSE_NORM`` per group: ``groups [..., columns]``, scales / zeros ``[...]`` -> ``[...]``.

    The same arithmetic as :func:`quantize_values` and a dequantisation, done in place in ``work`` (a buffer shaped
    like ``groups``): the search runs it 80 times per group, and fresh temporaries for every operation made it
    several times slower than the arithmetic itself (allocation and first-touch page faults of large tensors)."""
    qmin, qmax = signed_range(bits)
    work = torch.empty_like(groups) if work is None else work
    scales = scales.unsqueeze(-1)
    torch.div(groups, scales, out=work)
    if zeros is not None:
        work.add_(zeros.unsqueeze(-1))
    work.round_().clamp_(qmin, qmax)
    if zeros is not None:
        work.sub_(zeros.unsqueeze(-1))
    work.mul_(scales)
    torch.sub(groups, work, out=work)
    return work.abs_().pow_(MSE_NORM).sum(-1)


def quantize_values(
    values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Signed codes ``round(values / scale + zero)`` clamped to the ``bits`` range; broadcasting shapes, fp32.

    1 bit: the sign, ``+1`` for ``values >= 0`` and ``-1`` below (zero points are 0)."""
    if bits == 1:
        return torch.where(values.float() >= 0, 1.0, -1.0)
    qmin, qmax = signed_range(bits)
    shifted = values.float() / scales
    if zeros is not None:
        shifted = shifted + zeros
    return torch.round(shifted).clamp(qmin, qmax)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    scale_search: str = "minmax",
) -> PackedLinearWeight:
    """Round-to-nearest quantisation of ``weight [..., out, in]`` with compressed-tensors' scale/zero-point rules
    (:func:`quantization_params`), or clipped scales (``scale_search="mse"``, :func:`fit_group_params`).
    ``group_size <= 0``: per-channel. The last group may be shorter than ``group_size`` when it does not divide
    ``in``. scale_dtype defaults to the weight's dtype (fp16/bf16 checkpoints keep their dtype; fp32 stays fp32).
    """
    check_bits(bits)
    if weight.dim() < 2:
        raise ValueError(f"weight must be [..., out, in], got shape {tuple(weight.shape)}")
    *lead, out_features, in_features = weight.shape
    groups = num_groups(in_features, group_size)
    width = in_features if group_size <= 0 else group_size
    padded = torch.nn.functional.pad(weight.float(), (0, groups * width - in_features))
    grouped = padded.reshape(*lead, out_features, groups, width)
    # Padding columns are zeros, which never change min/max once 0 is included.
    scale_dtype = scale_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
    mean_abs = None
    if bits == 1:  # over the group's real columns: the last group may be padded
        columns = (in_features - torch.arange(groups, device=weight.device) * width).clamp(max=width)
        mean_abs = grouped.abs().sum(dim=-1) / columns
    scales, zeros = fit_group_params(grouped, bits, symmetric, scale_dtype, mean_abs, scale_search)
    values = quantize_values(grouped, scales.unsqueeze(-1), None if zeros is None else zeros.unsqueeze(-1), bits)
    values = values.reshape(*lead, out_features, groups * width)[..., :in_features]
    return PackedLinearWeight.from_codes(values, scales.to(scale_dtype), zeros, bits, group_size)


BitsSpec = int | Mapping[tuple[int, int], int] | Callable[[int, int], int]


def _bits_for(bits: BitsSpec, layer: int, expert: int) -> int:
    if isinstance(bits, int):
        width = bits
    elif callable(bits):
        width = bits(layer, expert)
    else:
        if (layer, expert) not in bits:
            raise MoECompressError(
                f"no bit-width for layer {layer}, expert {expert}: the bits map must cover every (layer, expert) "
                "pair, or pass an int for a uniform width"
            )
        width = bits[(layer, expert)]
    if width not in SUPPORTED_BITS:
        raise MoECompressError(f"layer {layer}, expert {expert}: {width} bits is not supported; use {SUPPORTED_BITS}")
    return int(width)


@torch.no_grad()
def pack_model_experts(
    model: nn.Module,
    bits: BitsSpec,
    group_size: int = 128,
    symmetric: bool = True,
    set_implementation: bool = True,
) -> list[PackedExperts]:
    """Quantise (RTN) the routed experts of every MoE block and swap in :class:`PackedExperts`.

    bits: one width for all, a ``{(layer_index, expert): bits}`` map, or ``fn(layer_index, expert) -> bits``.
    group_size: input columns per scale (``-1`` per channel). Scales keep the experts' dtype.
    set_implementation: register the backend and ``model.set_experts_implementation("moecompress_packed")``.
    Returns the new modules in layer order. Families whose experts are transposed or biased (GPT-OSS) are refused.
    """
    packed_modules = []
    for view in find_moe_blocks(model):
        if view.storage != "concatenated" or getattr(view.experts, "has_bias", False):
            raise UnsupportedModelError(
                f"{view.family}: packed experts support concatenated, bias-free experts (gate_up [E, 2I, H]); "
                "keep this family's experts unquantized"
            )
        gate_up, down = [], []
        for expert in range(view.num_experts):
            width = _bits_for(bits, view.layer_index, expert)
            weights = view.expert_weights(expert)
            gate_up.append(quantize_rtn(torch.cat([weights.gate, weights.up]), width, group_size, symmetric))
            down.append(quantize_rtn(weights.down, width, group_size, symmetric))
        packed = PackedExperts(gate_up, down, view.experts.act_fn, getattr(view.experts, "config", None))
        packed.to(view.experts.gate_up_proj.device)
        attribute = next(name for name, child in view.block.named_children() if child is view.experts)
        setattr(view.block, attribute, packed)
        packed_modules.append(packed)
    if not packed_modules:
        raise UnsupportedModelError("the model has no MoE blocks to pack")
    if set_implementation:
        register_packed_experts_backend()
        model.set_experts_implementation(BACKEND_NAME)
    return packed_modules
