"""A packed ``nn.Linear``: attention projections, shared experts and dense MLPs quantised like the routed experts.

State-dict names follow compressed-tensors' pack-quantized module layout: ``weight_packed`` int32
``[out, ceil(in*b/32)]``, ``weight_scale`` ``[out, n_groups]``, ``weight_zero_point`` int8 ``[out, n_groups]``
(asymmetric only; unpacked here, packed only in compressed-tensors exports), and ``bias`` when the layer has one.
"""

from __future__ import annotations

import torch
from torch import nn

from moecompress.kernels.layout import PackedLinearWeight, num_groups, packed_width
from moecompress.kernels.reference import packed_linear_reference
from moecompress.kernels.runtime import triton_available


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` packed (``bits``, ``group_size``, symmetric or not). forward ``[..., in] -> [..., out]``."""

    def __init__(self, weight: PackedLinearWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.packed.dim() != 2:
            raise ValueError("PackedLinear takes one [out, in] packed matrix")
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("weight_packed", weight.packed)
        self.register_buffer("weight_scale", weight.scales)
        if weight.zeros is not None:
            self.register_buffer("weight_zero_point", weight.zeros)
        self.weight_zero_point: torch.Tensor | None = getattr(self, "weight_zero_point", None)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def skeleton(cls, in_features: int, out_features: int, *, bits: int, group_size: int, symmetric: bool,
                 bias: bool, scale_dtype: torch.dtype, device: torch.device | str = "meta") -> "PackedLinear":
        """An empty packed linear of the given shape (on ``meta`` by default), for a loader to fill."""
        groups = num_groups(in_features, group_size)
        weight = PackedLinearWeight(
            torch.empty(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device),
            torch.empty(out_features, groups, dtype=scale_dtype, device=device),
            None if symmetric else torch.empty(out_features, groups, dtype=torch.int8, device=device),
            bits, group_size, (out_features, in_features),
        )
        return cls(weight, torch.empty(out_features, dtype=scale_dtype, device=device) if bias else None)

    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None

    def parameter_counts(self) -> dict[int, int]:
        """``{id(buffer): weights it encodes}``: the packed weight counts ``out x in``, scales and zero points 0."""
        counts = {id(buffer): 0 for buffer in self.buffers(recurse=False)}
        counts[id(self.weight_packed)] = self.out_features * self.in_features
        return counts

    def packed_weight(self) -> PackedLinearWeight:
        return PackedLinearWeight(self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits,
                                  self.group_size, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed_weight()
        if x.is_cuda and triton_available(x.device):
            from moecompress.kernels.triton_gemm import packed_linear_triton  # defines Triton kernels: import on use

            output = packed_linear_triton(x.reshape(-1, self.in_features), weight).reshape(*x.shape[:-1], -1)
        else:
            output = packed_linear_reference(x, weight)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")
