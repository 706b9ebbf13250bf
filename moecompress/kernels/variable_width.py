"""Variable-width experts: routed experts of one MoE block that each keep a different number of channels.

After CAMERA-P's ``physical`` mode expert ``e`` keeps ``I_e`` of its ``I`` intermediate channels; the fused
``[E, 2I, H]`` layout cannot hold different widths, so :class:`VariableWidthExperts` stores every expert's rows in
one packed row buffer with per-expert offsets (no padding, so memory and file size shrink by the pruned share):

    ``gate_up_rows`` ``[2 * sum_e I_e, H]``: expert ``e`` owns rows ``[2 o_e, 2 o_e + 2 I_e)``, its ``I_e`` gate rows
        then its ``I_e`` up rows (``o_e = sum_{e' < e} I_e'``);
    ``down_rows`` ``[sum_e I_e, H]``: the transposed down projection, expert ``e`` owns rows ``[o_e, o_e + I_e)``;
    ``expert_widths`` int32 ``[E]``.

It is a drop-in experts module (``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``) that computes
exactly what the HF eager experts loop computes on the kept channels. For :class:`moecompress.models.MoEBlockView`
it looks like packed experts (``expert_linear(e, name).dequantize()`` returns the expert's dense matrix), so views,
reference forwards and evaluation work unchanged. Widths are Python ints known at construction (the native loader
reads them from ``config.moecompress["variable_width"]``), so the forward never reads sizes from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moecompress.errors import MoECompressError
from moecompress.kernels.backend import BACKEND_NAME, _is_silu
from moecompress.kernels.layout import PackedLinearWeight, num_groups, packed_width
from moecompress.kernels.runtime import triton_available


@dataclass
class DenseSlice:
    """One expert matrix of a :class:`VariableWidthExperts` (a view, not a copy); ``dequantize()`` returns it, so
    code written for packed experts reads it unchanged."""

    weight: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.weight

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


class VariableWidthExperts(nn.Module):
    """Routed experts with per-expert intermediate widths ``widths`` (see the module docstring for the layout)."""

    def __init__(self, widths: list[int], hidden_dim: int, act_fn: Callable[[torch.Tensor], torch.Tensor], *,
                 config=None, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not widths or any(int(width) < 1 for width in widths):
            raise MoECompressError(f"every expert needs at least one channel; got widths {list(widths)}")
        self.widths = [int(width) for width in widths]
        self.offsets = [0]
        for width in self.widths:
            self.offsets.append(self.offsets[-1] + width)
        self.num_experts = len(self.widths)
        self.hidden_dim = int(hidden_dim)
        self.intermediate_dim = max(self.widths)  # the widest expert (what a view reports as ``I``)
        self.act_fn = act_fn
        self.config = config
        total = self.offsets[-1]
        factory = {"dtype": dtype, "device": device}
        self.gate_up_rows = nn.Parameter(torch.empty(2 * total, self.hidden_dim, **factory), requires_grad=False)
        self.down_rows = nn.Parameter(torch.empty(total, self.hidden_dim, **factory), requires_grad=False)
        self.register_buffer("expert_widths", torch.tensor(self.widths, dtype=torch.int32, device=device))

    @classmethod
    def from_dense(cls, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor],
                   act_fn, config=None) -> "VariableWidthExperts":
        """From per-expert canonical matrices: gate/up ``[I_e, H]``, down ``[H, I_e]``."""
        module = cls([g.shape[0] for g in gate], gate[0].shape[1], act_fn, config=config, dtype=gate[0].dtype,
                     device=gate[0].device)
        with torch.no_grad():
            for expert, (g, u, d) in enumerate(zip(gate, up, down)):
                if u.shape != g.shape or d.shape != (g.shape[1], g.shape[0]):
                    raise MoECompressError(f"expert {expert}: gate {tuple(g.shape)}, up {tuple(u.shape)} and down "
                                           f"{tuple(d.shape)} are not one expert's [I_e, H], [I_e, H], [H, I_e]")
                module.gate_up_rows[2 * module.offsets[expert]: 2 * module.offsets[expert + 1]] = torch.cat([g, u])
                module.down_rows[module.offsets[expert]: module.offsets[expert + 1]] = d.t()
        return module

    # ----- one expert -------------------------------------------------------------------------------------------
    def gate_up(self, expert: int) -> torch.Tensor:
        """``[2 I_e, H]``: gate rows then up rows of ``expert`` (a view)."""
        return self.gate_up_rows[2 * self.offsets[expert]: 2 * self.offsets[expert + 1]]

    def down(self, expert: int) -> torch.Tensor:
        """``[I_e, H]``: the transposed down projection of ``expert`` (a view)."""
        return self.down_rows[self.offsets[expert]: self.offsets[expert + 1]]

    def expert_linear(self, expert: int, name: str) -> DenseSlice:
        """``gate_up_proj`` ``[2 I_e, H]`` or ``down_proj`` ``[H, I_e]`` of ``expert`` (packed-experts interface)."""
        if name == "gate_up_proj":
            return DenseSlice(self.gate_up(expert))
        if name == "down_proj":
            return DenseSlice(self.down(expert).t())
        raise MoECompressError(f"unknown expert matrix {name!r}; use 'gate_up_proj' or 'down_proj'")

    # ----- forward ------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states ``[T, H]``, top_k_index ``[T, k]`` (ids outside ``[0, E)`` are skipped), top_k_weights
        ``[T, k]`` -> ``[T, H]``. With ``config._experts_implementation == "moecompress_packed"`` (the packed
        experts' backend switch) and Triton runnable on the device, the grouped Triton kernels
        (:mod:`moecompress.kernels.triton_variable_width`); otherwise the same operations, in the same order, as
        transformers' eager experts loop."""
        if self._use_triton(hidden_states.device):
            # imports triton (the optional kernels extra; seconds to import), and only this path needs it
            from moecompress.kernels.triton_variable_width import variable_width_experts_triton

            device = hidden_states.device
            return variable_width_experts_triton(
                hidden_states, top_k_index, top_k_weights, self.gate_up_rows, self.down_rows,
                torch.tensor(self.offsets[:-1], dtype=torch.int32, device=device),
                self.expert_widths.to(device=device, dtype=torch.int32), self.intermediate_dim)
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index)
        for expert in hit.tolist():
            if not 0 <= expert < self.num_experts:
                continue
            top_k_position, token_index = torch.where(top_k_index.t() == expert)  # HF's order: slot, then token
            current_state = hidden_states[token_index]
            gate, up = nn.functional.linear(current_state, self.gate_up(expert)).chunk(2, dim=-1)
            current = self.act_fn(gate) * up
            current = torch.matmul(current, self.down(expert))  # [n, I_e] @ [I_e, H]
            current = current * top_k_weights[token_index, top_k_position, None]
            final_hidden_states.index_add_(0, token_index, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def parameter_counts(self) -> dict[int, int]:
        """``{id(tensor): weights it holds}`` for summaries: the widths buffer is bookkeeping (0 weights)."""
        return {id(self.expert_widths): 0}

    def _use_triton(self, device: torch.device) -> bool:
        return (getattr(self.config, "_experts_implementation", None) == BACKEND_NAME and _is_silu(self.act_fn)
                and triton_available(device))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, widths {min(self.widths)}.."
                f"{max(self.widths)} (total {self.offsets[-1]})")


def slice_linear_rows_and_columns(module: nn.Module, kept_channels: torch.Tensor) -> None:
    """Keep ``kept_channels`` of a dense gated MLP (``gate_proj``/``up_proj`` rows, ``down_proj`` columns) in place."""
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            linear = getattr(module, name)
            linear.weight = nn.Parameter(linear.weight.index_select(0, kept_channels.to(linear.weight.device)).contiguous(),
                                         requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.index_select(0, kept_channels.to(linear.bias.device)).contiguous())
            linear.out_features = int(kept_channels.numel())
        down = module.down_proj
        down.weight = nn.Parameter(down.weight.index_select(1, kept_channels.to(down.weight.device)).contiguous(),
                                   requires_grad=down.weight.requires_grad)
        down.in_features = int(kept_channels.numel())
    for attr in ("intermediate_size", "intermediate_dim"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, int(kept_channels.numel()))




class SegmentedPackedExperts(nn.Module):
    """Routed experts whose channels are split into up to three contiguous segments, each packed at its own width
    (CAMERA-Q, ``moecompress.quantization.camera_q``): expert ``e`` is the sum of its sub-FFNs
    ``E_e(x) = sum_s W_down[:, S_s] (act(W_gate[S_s] x) * W_up[S_s] x)``.

    Buffers per expert ``e`` and segment ``s`` of width ``w > 0`` at ``bits[s]`` (symmetric, group-wise; compressed-
    tensors rows as in :class:`moecompress.kernels.layout.PackedLinearWeight`):
    ``e{e}_s{s}_gate_up_packed`` int32 ``[2w, ceil(H b / 32)]`` (gate rows then up rows), ``e{e}_s{s}_gate_up_scale``
    ``[2w, G_H]``, ``e{e}_s{s}_down_packed`` int32 ``[H, ceil(w b / 32)]``, ``e{e}_s{s}_down_scale`` ``[H, G_w]``;
    ``segment_widths`` int32 ``[E, 3]``. The torch path dequantises each segment per forward.
    """

    def __init__(self, segment_widths: list[list[int]], bits: list[int], hidden_dim: int, group_size: int, act_fn,
                 *, config=None, scale_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.widths = [[int(w) for w in widths] for widths in segment_widths]
        self.bits = [int(b) for b in bits]
        self.num_experts = len(self.widths)
        self.hidden_dim = int(hidden_dim)
        self.group_size = int(group_size)
        self.intermediate_dim = max(sum(widths) for widths in self.widths)
        self.act_fn = act_fn
        self.config = config
        self.register_buffer("segment_widths", torch.tensor(self.widths, dtype=torch.int32, device=device))
        for expert, widths in enumerate(self.widths):
            for segment, (width, b) in enumerate(zip(widths, self.bits)):
                if width == 0:
                    continue
                prefix = f"e{expert}_s{segment}"
                self.register_buffer(f"{prefix}_gate_up_packed", torch.zeros(2 * width, packed_width(hidden_dim, b),
                                                                             dtype=torch.int32, device=device))
                self.register_buffer(f"{prefix}_gate_up_scale", torch.zeros(2 * width, num_groups(hidden_dim, group_size),
                                                                            dtype=scale_dtype, device=device))
                self.register_buffer(f"{prefix}_down_packed", torch.zeros(hidden_dim, packed_width(width, b),
                                                                          dtype=torch.int32, device=device))
                self.register_buffer(f"{prefix}_down_scale", torch.zeros(hidden_dim, num_groups(width, group_size),
                                                                         dtype=scale_dtype, device=device))

    @classmethod
    def from_packed(cls, segments: list[list], bits: list[int], act_fn, config=None) -> "SegmentedPackedExperts":
        """segments: per expert, per segment ``(gate_up PackedLinearWeight [2w, H], down [H, w])`` or None."""
        first = next(pair for expert in segments for pair in expert if pair is not None)
        widths = [[0 if pair is None else pair[0].shape[0] // 2 for pair in expert] for expert in segments]
        module = cls(widths, bits, first[0].shape[1], first[0].group_size, act_fn, config=config,
                     scale_dtype=first[0].scales.dtype, device=first[0].packed.device)
        for expert, pairs in enumerate(segments):
            for segment, pair in enumerate(pairs):
                if pair is None:
                    continue
                if not pair[0].symmetric or not pair[1].symmetric:
                    raise MoECompressError("SegmentedPackedExperts stores symmetric segments only")
                prefix = f"e{expert}_s{segment}"
                for name, weight in (("gate_up", pair[0]), ("down", pair[1])):
                    getattr(module, f"{prefix}_{name}_packed").copy_(weight.packed)
                    getattr(module, f"{prefix}_{name}_scale").copy_(weight.scales)
        return module

    def segment(self, expert: int, segment: int):
        """``(gate_up, down)`` PackedLinearWeight of one segment, or None when it is empty."""
        width = self.widths[expert][segment]
        if width == 0:
            return None
        prefix, b = f"e{expert}_s{segment}", self.bits[segment]
        gate_up = PackedLinearWeight(getattr(self, f"{prefix}_gate_up_packed"), getattr(self, f"{prefix}_gate_up_scale"),
                                     None, b, self.group_size, (2 * width, self.hidden_dim))
        down = PackedLinearWeight(getattr(self, f"{prefix}_down_packed"), getattr(self, f"{prefix}_down_scale"),
                                  None, b, self.group_size, (self.hidden_dim, width))
        return gate_up, down

    def expert_linear(self, expert: int, name: str) -> DenseSlice:
        """Dequantised ``gate_up_proj`` ``[2 I_e, H]`` (all gate rows, then all up rows) or ``down_proj`` ``[H, I_e]``."""
        pairs = [pair for pair in (self.segment(expert, s) for s in range(len(self.bits))) if pair is not None]
        if name == "gate_up_proj":
            halves = [pair[0].dequantize().chunk(2, dim=0) for pair in pairs]
            return DenseSlice(torch.cat([h[0] for h in halves] + [h[1] for h in halves]))
        if name == "down_proj":
            return DenseSlice(torch.cat([pair[1].dequantize() for pair in pairs], dim=1))
        raise MoECompressError(f"unknown expert matrix {name!r}; use 'gate_up_proj' or 'down_proj'")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states ``[T, H]``, top_k_index / top_k_weights ``[T, k]`` -> ``[T, H]`` (sum of segment sub-FFNs)."""
        final_hidden_states = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:
                continue
            top_k_position, token_index = torch.where(top_k_index.t() == expert)
            current_state = hidden_states[token_index]
            current = None
            for segment in range(len(self.bits)):
                pair = self.segment(expert, segment)
                if pair is None:
                    continue
                gate, up = nn.functional.linear(current_state, pair[0].dequantize(hidden_states.dtype)).chunk(2, dim=-1)
                part = nn.functional.linear(self.act_fn(gate) * up, pair[1].dequantize(hidden_states.dtype))
                current = part if current is None else current + part
            current = current * top_k_weights[token_index, top_k_position, None]
            final_hidden_states.index_add_(0, token_index, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def parameter_counts(self) -> dict[int, int]:
        """``{id(buffer): weights it encodes}``: packed buffers count their matrix's weights, scales 0."""
        counts = {id(buffer): 0 for buffer in self.buffers(recurse=False)}
        for expert in range(self.num_experts):
            for segment in range(len(self.bits)):
                pair = self.segment(expert, segment)
                if pair is not None:
                    for weight in pair:
                        counts[id(weight.packed)] = weight.shape[0] * weight.shape[1]
        return counts


__all__ = ["DenseSlice", "SegmentedPackedExperts", "VariableWidthExperts", "slice_linear_rows_and_columns"]
