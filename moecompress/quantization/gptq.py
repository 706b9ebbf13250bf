"""GPTQ on one weight matrix (Frantar et al., 2022), with group-wise scales in the packed format of this package.

GPTQ quantises the columns of ``W [out, in]`` one at a time and spreads each column's rounding error over the
columns not yet quantised, so that the layer output on the calibration inputs, ``W X``, changes as little as
possible. The objective is ``tr((W - Q) H (W - Q)^T)`` with ``H = sum_t x_t x_t^T`` (MoEQuant's AGQ weights each
token by its combine weight: ``H = sum_t c_t x_t x_t^T``; the algorithm is the same, see ``moecompress.quantization``).

Steps (the reference implementation's, restated):
1. damp: ``H += damp * mean(diag H) * I`` (inputs that never fired get ``H_ii = 1``);
2. optional ``act_order``: quantise columns by decreasing ``H_ii`` (group scales are then computed up front from the
   original weights, "static groups", so that every group is still a run of contiguous input columns);
3. ``U`` = upper Cholesky factor of ``H^-1``;
4. for each column ``i``: ``q_i = quant(w_i)``, ``e_i = (w_i - q_i) / U_ii``, ``w_j -= e_i U_ij`` for ``j > i``;
   done in blocks of columns ("lazy batch updates") so that the big update is one matmul per block.
Group scales (without act-order) are computed from the error-updated weights when the sweep reaches the group's
first column, as the reference does; each group lies inside one block, so those weights are current.

Mixed widths (:func:`gptq_quantize_mixed`): each column group may have its own bit width, in ONE sweep over the
whole matrix, so the rounding error of a group is still spread over every later column whatever their width (CAMERA-Q
gives the input channels of ``down_proj`` a width per energy segment; quantising the segments as separate matrices
would only see each segment's diagonal block of ``H``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moecompress.kernels.layout import PackedLinearWeight, num_groups
from moecompress.quantization.packing import fit_group_params, quantize_values

DEFAULT_BLOCK_SIZE = 128


@dataclass
class GPTQResult:
    """packed: the quantised weight(s). relative_error: ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Q`` and the
    undamped ``H`` (the share of the calibration output energy the quantisation loses; 0 = exact), a float for one
    matrix or a list for a stack. damp: the damping actually used, as a fraction of ``mean(diag H)`` (raised when
    ``H`` was not positive definite); a float or a list likewise."""

    packed: PackedLinearWeight
    relative_error: float | list[float]
    damp: float | list[float]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    group_size: int = 128,
    symmetric: bool = True,
    damp: float | torch.Tensor = 0.01,
    act_order: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale_dtype: torch.dtype | None = None,
    scale_search: str = "minmax",
) -> GPTQResult:
    """GPTQ-quantise ``weight [out, in]`` given ``hessian [in, in]`` (``sum x x^T`` over calibration inputs).

    A stack works too: ``weight [B, out, in]``, ``hessian [B, in, in]`` (the experts of a layer at one width,
    quantised together: one column sweep for all of them, each with its own Hessian and damping).
    group_size: input columns per scale (``<= 0``: one scale per row); a last, shorter group is allowed.
    damp: added to the diagonal as a fraction of its mean (a float, or ``[B]``). scale_dtype: storage dtype of the
    scales (default: the weight's). scale_search: ``"minmax"`` or ``"mse"`` (each group's clipping searched on the
    weights its scale is taken from, :func:`moecompress.quantization.packing.fit_group_params`). Runs in fp32 on
    the weight's device.
    """
    single = weight.dim() == 2
    sweep = _gptq_sweep(weight.unsqueeze(0) if single else weight, hessian.unsqueeze(0) if single else hessian,
                        [bits] * num_groups(weight.shape[-1], group_size), group_size=group_size, symmetric=symmetric,
                        damp=damp, act_order=act_order, block_size=block_size, scale_dtype=scale_dtype,
                        scale_search=scale_search)
    packed = PackedLinearWeight.from_codes(sweep.codes, sweep.scales.to(sweep.scale_dtype), sweep.zeros, bits,
                                           group_size)
    errors = sweep.relative_errors(packed.dequantize(torch.float32))
    if single:
        return GPTQResult(packed.select(0), errors[0], sweep.damps[0])
    return GPTQResult(packed, errors, sweep.damps)


@dataclass
class MixedGPTQResult:
    """GPTQ of one matrix ``[out, in]`` with a bit width per column group (:func:`gptq_quantize_mixed`).

    codes: fp32 ``[out, in]`` signed integer values; scales / zeros: ``[out, groups]`` (scales in ``scale_dtype``
    precision, zeros None when symmetric); group_bits: the width of each group; relative_error and damp as in
    :class:`GPTQResult`.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_bits: list[int]
    group_size: int
    relative_error: float
    damp: float

    def packed_columns(self, start: int, stop: int) -> PackedLinearWeight:
        """Columns ``[start, stop)``, a run of whole groups of one width, as one packed weight ``[out, stop-start]``."""
        width = self.codes.shape[1] if self.group_size <= 0 else self.group_size
        if start % width or (stop % width and stop != self.codes.shape[1]) or stop <= start:
            raise ValueError(f"columns [{start}, {stop}) are not whole groups of {width}")
        first, last = start // width, -(-stop // width)
        widths = set(self.group_bits[first:last])
        if len(widths) != 1:
            raise ValueError(f"columns [{start}, {stop}) hold groups of several widths {sorted(widths)}")
        zeros = None if self.zeros is None else self.zeros[:, first:last]
        return PackedLinearWeight.from_codes(self.codes[:, start:stop], self.scales[:, first:last], zeros,
                                             widths.pop(), self.group_size)

    def dequantize(self) -> torch.Tensor:
        """``(codes - zero) * scale``, fp32 ``[out, in]``."""
        width = self.codes.shape[1] if self.group_size <= 0 else self.group_size
        expand = lambda per_group: per_group.float().repeat_interleave(width, dim=-1)[:, :self.codes.shape[1]]  # noqa: E731
        values = self.codes if self.zeros is None else self.codes - expand(self.zeros)
        return values * expand(self.scales)


def gptq_quantize_mixed(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_bits: Sequence[int],
    *,
    group_size: int = 128,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale_dtype: torch.dtype | None = None,
    scale_search: str = "minmax",
) -> MixedGPTQResult:
    """GPTQ of ``weight [out, in]`` on ``hessian [in, in]`` where column group ``g`` is quantised at
    ``group_bits[g]`` bits, in one column sweep (every group's error compensated in all later columns). With one
    width for every group this is exactly :func:`gptq_quantize`. No act-order: groups must stay runs of columns
    in sweep order for their widths to mean anything.
    """
    groups = num_groups(weight.shape[-1], group_size)
    if weight.dim() != 2 or len(group_bits) != groups:
        raise ValueError(f"group_bits must give one width per column group ({groups} for {tuple(weight.shape)} and "
                         f"group_size {group_size}), got {len(group_bits)}")
    sweep = _gptq_sweep(weight.unsqueeze(0), hessian.unsqueeze(0), list(group_bits), group_size=group_size,
                        symmetric=symmetric, damp=damp, act_order=False, block_size=block_size,
                        scale_dtype=scale_dtype, scale_search=scale_search)
    scales = sweep.scales[0].to(sweep.scale_dtype).float()
    zeros = None if sweep.zeros is None else sweep.zeros[0]
    result = MixedGPTQResult(sweep.codes[0], scales, zeros, [int(b) for b in group_bits], group_size, 0.0,
                             sweep.damps[0])
    result.relative_error = sweep.relative_errors(result.dequantize().unsqueeze(0))[0]
    return result


@dataclass
class _Sweep:
    """What one GPTQ column sweep produced for a stack ``[B, out, in]``: codes (fp32), scales / zeros
    ``[B, out, groups]`` (fp32; scales already rounded to ``scale_dtype``), the damping used per matrix, and the
    inputs needed to measure the error."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    damps: list[float]
    scale_dtype: torch.dtype
    original: torch.Tensor
    undamped: torch.Tensor

    def relative_errors(self, dequantised: torch.Tensor) -> list[float]:
        return [hessian_weighted_error(self.original[b], dequantised[b], self.undamped[b])
                for b in range(self.original.shape[0])]


def _gptq_sweep(weights: torch.Tensor, hessians: torch.Tensor, group_bits: list[int], *, group_size: int,
                symmetric: bool, damp, act_order: bool, block_size: int, scale_dtype, scale_search: str) -> _Sweep:
    """The column sweep behind :func:`gptq_quantize` and :func:`gptq_quantize_mixed` (module docstring, steps 1-4),
    on a stack ``weights [B, out, in]``, ``hessians [B, in, in]``; column group ``g`` at ``group_bits[g]`` bits."""
    stack, out_features, in_features = weights.shape
    if tuple(hessians.shape) != (stack, in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}] per matrix for weight "
                         f"{tuple(weights.shape[1:])}, got {tuple(hessians.shape)}")
    if act_order and len(set(group_bits)) > 1:
        raise ValueError("act_order reorders columns across groups; it needs one width for every group")
    device = weights.device
    scale_dtype = scale_dtype or (weights.dtype if weights.dtype.is_floating_point else torch.float32)
    original = weights.float()
    undamped = hessians.to(device=device, dtype=torch.float32)
    damps = torch.as_tensor(damp, dtype=torch.float32, device=device).expand(stack).clone()
    group_width = in_features if group_size <= 0 else group_size
    groups = num_groups(in_features, group_size)
    rows = torch.arange(stack, device=device)[:, None]

    if act_order:
        order = torch.argsort(torch.diagonal(undamped, dim1=1, dim2=2), dim=1, descending=True)  # [B, in]
        upper, damps = _inverse_cholesky_upper(undamped[rows[:, :, None], order[:, :, None], order[:, None, :]], damps)
    else:  # identity order: no permuted copy of the Hessians
        order = torch.arange(in_features, device=device).expand(stack, in_features)
        upper, damps = _inverse_cholesky_upper(undamped, damps)
    work = original.gather(2, order[:, None, :].expand(stack, out_features, in_features)).clone()

    scales = torch.zeros(stack, out_features, groups, device=device)
    zeros = None if symmetric else torch.zeros(stack, out_features, groups, device=device)
    if act_order or group_size <= 0:  # static groups (one width): every group's scale from the original weights
        padded = torch.nn.functional.pad(original, (0, groups * group_width - in_features))
        grouped = padded.reshape(stack, out_features, groups, group_width)
        columns = (in_features - torch.arange(groups, device=device) * group_width).clamp(max=group_width)
        static_scales, static_zeros = fit_group_params(grouped, group_bits[0], symmetric, scale_dtype,
                                                       grouped.abs().sum(-1) / columns, scale_search)
        scales.copy_(static_scales)
        if zeros is not None:
            zeros.copy_(static_zeros)

    codes = torch.zeros(stack, out_features, in_features, device=device)
    column_group = order // group_width  # [B, in]: group of each column, in quantisation order
    # Without act-order, blocks hold whole groups, so a group's first column sees the current weights of all its
    # columns when its scale is computed.
    block = block_size if act_order else max(group_width, (block_size // group_width) * group_width)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        block_weights = work[:, :, start:stop].clone()
        block_errors = torch.zeros_like(block_weights)
        block_upper = upper[:, start:stop, start:stop]
        for offset in range(stop - start):
            column = start + offset
            # the column's group (the same for the whole stack: mixed widths exclude act-order)
            bits = group_bits[int(column_group[0, column])]
            if not act_order and group_size > 0 and column % group_width == 0:
                group_stop = min(offset + group_width, stop - start)
                values = block_weights[:, :, offset:group_stop]
                group_scales, group_zeros = fit_group_params(values, bits, symmetric, scale_dtype,
                                                             values.abs().mean(-1), scale_search)
                scales[:, :, column // group_width] = group_scales
                if zeros is not None:
                    zeros[:, :, column // group_width] = group_zeros
            group_index = column_group[:, column][:, None, None].expand(stack, out_features, 1)
            column_scales = scales.gather(2, group_index).squeeze(2)  # [B, out]
            column_zeros = None if zeros is None else zeros.gather(2, group_index).squeeze(2)
            column_weights = block_weights[:, :, offset]
            column_codes = quantize_values(column_weights, column_scales, column_zeros, bits)
            dequantised = (column_codes - (0 if column_zeros is None else column_zeros)) * column_scales
            error = (column_weights - dequantised) / block_upper[:, offset, offset][:, None]
            block_weights[:, :, offset:] -= error[:, :, None] * block_upper[:, offset, offset:][:, None, :]
            block_errors[:, :, offset] = error
            codes.scatter_(2, order[:, column][:, None, None].expand(stack, out_features, 1), column_codes[:, :, None])
        work[:, :, stop:] -= block_errors @ upper[:, start:stop, stop:]

    return _Sweep(codes, scales, zeros, [float(value) for value in damps], scale_dtype, original, undamped)


def hessian_weighted_error(weight: torch.Tensor, quantised: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` with ``D = weight - quantised`` (``[out, in]``, ``hessian [in, in]``)."""
    delta = (weight.float() - quantised.float())
    hessian = hessian.to(weight.device, torch.float32)
    lost = float(((delta @ hessian) * delta).sum())
    total = float(((weight.float() @ hessian) * weight.float()).sum())
    return lost / total if total > 0 else 0.0


def _inverse_cholesky_upper(hessians: torch.Tensor, damps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of the damped ``H^-1`` (``[B, n, n]``, already in quantisation order).

    Inputs that never fired (``H_ii = 0``) get ``H_ii = 1``: their columns then round plainly (no other column
    depends on them). A matrix that does not factorise gets ten times the damping (at least 1e-4), up to five times.
    One matrix at a time, so the temporaries of the factorisation cost ``n^2``, not ``B n^2`` (a chunk of experts'
    Hessians is most of a streamed run's memory). Returns ``(U [B, n, n], damping used [B])``.
    """
    upper = torch.empty_like(hessians, dtype=torch.float32)
    damps = damps.clone()
    for index in range(hessians.shape[0]):
        upper[index], damps[index] = _inverse_cholesky_upper_one(hessians[index], float(damps[index]))
    return upper, damps


def _inverse_cholesky_upper_one(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """:func:`_inverse_cholesky_upper` for one ``[n, n]`` Hessian: ``(U [n, n], damping used)``."""
    damped = hessian.float().clone()
    diagonal = torch.diagonal(damped)
    diagonal[diagonal == 0] = 1.0
    base_diagonal = diagonal.clone()
    mean_diagonal = float(base_diagonal.mean())
    for _ in range(6):
        diagonal.copy_(base_diagonal + damp * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            factor_upper, info_upper = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info_upper) == 0 and bool(torch.isfinite(factor_upper).all()):
                return factor_upper, damp
        damp = max(damp * 10, 1e-4)  # a zero damping cannot grow by factors
    raise ValueError(f"a Hessian could not be factorised even with damping {damp:g} x mean(diag); it "
                     "may hold NaN or inf (check the calibration data)")
