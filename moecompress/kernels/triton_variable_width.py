"""Grouped Triton kernels for variable-width experts (:class:`moecompress.kernels.variable_width.VariableWidthExperts`).

The routed (token, expert) pairs are aligned by expert as for the packed kernels
(:func:`moecompress.kernels.triton_moe.align_pairs_by_expert`); every M block belongs to one expert, whose rows start
at its offset in the packed row buffer and whose width ``I_e`` masks the tiles:

1. gate/up: ``h[pair, n] = silu(x @ gate_e[n]) * (x @ up_e[n])`` for ``n < I_e`` (gate row ``2 o_e + n``, up row
   ``2 o_e + I_e + n`` of ``gate_up_rows``); written into ``[pairs, max I_e]`` (columns ``>= I_e`` stay zero);
2. down: ``out[pair] = weight * sum_{c < I_e} h[pair, c] down_rows[o_e + c]`` (fp32 ``[pairs, H]``), and the ``k``
   pairs of a token are summed in torch.

Only the SiLU GLU is fused (every family whose physical CAMERA-P layout is supported uses it); others use the torch
path. Runs on a CUDA GPU, or on CPU tensors with ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecompress.kernels.runtime import interpreting
from moecompress.kernels.triton_dequant import contract
from moecompress.kernels.triton_moe import align_pairs_by_expert, choose_block_m


@triton.jit
def _gate_up_kernel(a_ptr, w_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ptr, offset_ptr, width_ptr, num_pairs, K,
                    stride_a_row, stride_w_row, stride_out_row, PAIRS_PER_A_ROW: tl.constexpr,
                    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    width = tl.load(width_ptr + expert)
    if pid_n * BLOCK_N >= width:
        return
    first_row = 2 * tl.load(offset_ptr + expert).to(tl.int64)
    pair_ids = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_mask = pair_ids < num_pairs
    a_rows = a_ptr + (pair_ids // PAIRS_PER_A_ROW).to(tl.int64)[:, None] * stride_a_row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    gate_rows = w_ptr + (first_row + offs_n)[:, None] * stride_w_row
    up_rows = w_ptr + (first_row + width + offs_n)[:, None] * stride_w_row
    gate_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        gate = tl.load(gate_rows + offs_k[None, :], mask=w_mask, other=0.0).to(tl.float32)
        up = tl.load(up_rows + offs_k[None, :], mask=w_mask, other=0.0).to(tl.float32)
        gate_acc += contract(a, gate, BLOCK_M >= 16, INTERPRET)
        up_acc += contract(a, up, BLOCK_M >= 16, INTERPRET)
    result = gate_acc * tl.sigmoid(gate_acc) * up_acc
    out_ptrs = out_ptr + pair_ids.to(tl.int64)[:, None] * stride_out_row + offs_n[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ptr, offset_ptr, width_ptr,
                 routing_weight_ptr, num_pairs, N, stride_h_row, stride_w_row, stride_out_row,
                 INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    width = tl.load(width_ptr + expert)
    first_row = tl.load(offset_ptr + expert).to(tl.int64)
    pair_ids = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_mask = pair_ids < num_pairs
    h_rows = h_ptr + pair_ids.to(tl.int64)[:, None] * stride_h_row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, width, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < width
        h = tl.load(h_rows + offs_k[None, :], mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        # down_rows[o_e + c, n] read as a [BLOCK_N, BLOCK_K] tile (contract takes weights [N, K])
        w = tl.load(w_ptr + (first_row + offs_k)[None, :] * stride_w_row + offs_n[:, None],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += contract(h, w, BLOCK_M >= 16, INTERPRET)
    routing_weight = tl.load(routing_weight_ptr + pair_ids, mask=pair_mask, other=0.0).to(tl.float32)
    acc = acc * routing_weight[:, None]
    out_ptrs = out_ptr + pair_ids.to(tl.int64)[:, None] * stride_out_row + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=pair_mask[:, None] & n_mask[None, :])


def variable_width_experts_triton(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                                  gate_up_rows: torch.Tensor, down_rows: torch.Tensor, offsets: torch.Tensor,
                                  widths: torch.Tensor, max_width: int, block_m: int | None = None,
                                  block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """Routed experts of one layer (SiLU GLU). hidden_states ``[T, H]``, top_k_index / top_k_weights ``[T, k]``,
    gate_up_rows ``[2 sum I_e, H]``, down_rows ``[sum I_e, H]``, offsets / widths int32 ``[E]`` -> ``[T, H]``."""
    hidden_states = hidden_states.contiguous()
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_pairs = num_tokens * top_k
    num_experts = widths.numel()
    block_m = block_m or choose_block_m(num_pairs, num_experts)
    alignment = align_pairs_by_expert(top_k_index, num_experts, block_m)
    blocks = alignment.block_expert.numel()
    intermediate = torch.zeros((num_pairs, max_width), device=hidden_states.device, dtype=hidden_states.dtype)
    _gate_up_kernel[(blocks, triton.cdiv(max_width, block_n))](
        hidden_states, gate_up_rows, intermediate, alignment.sorted_pair_ids, alignment.block_expert, offsets, widths,
        num_pairs, hidden_size, hidden_states.stride(0), gate_up_rows.stride(0), intermediate.stride(0),
        PAIRS_PER_A_ROW=top_k, INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    pair_outputs = torch.zeros((num_pairs, hidden_size), device=hidden_states.device, dtype=torch.float32)
    _down_kernel[(blocks, triton.cdiv(hidden_size, block_n))](
        intermediate, down_rows, pair_outputs, alignment.sorted_pair_ids, alignment.block_expert, offsets, widths,
        top_k_weights.reshape(-1).contiguous(), num_pairs, hidden_size, intermediate.stride(0), down_rows.stride(0),
        pair_outputs.stride(0), INTERPRET=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return pair_outputs.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden_states.dtype)


__all__ = ["variable_width_experts_triton"]
