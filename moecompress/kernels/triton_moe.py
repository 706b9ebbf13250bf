"""Grouped MoE experts on packed weights: every routed (token, expert) pair of a layer in one launch per projection.

Steps (the vLLM fused-MoE scheme, on our packed format):
1. Alignment (:func:`align_pairs_by_expert`): the ``T*k`` (token, slot) pairs are sorted by expert and each expert's
   run is padded to a multiple of ``BLOCK_M`` with a sentinel, so every M block of the grid belongs to one expert.
   For decode (few pairs) each pair is its own block (``BLOCK_M = 1``): no sorting at all.
2. gate/up kernel: for each block, ``x[token] @ [gate; up]^T`` with in-kernel dequantisation; with the SiLU-GLU
   fused, both halves are accumulated side by side and only ``silu(gate) * up [pairs, I]`` is written.
3. down kernel: ``intermediate @ down^T`` times the pair's routing weight, written per pair ``[pairs, H]`` (fp32);
   the ``k`` pairs of each token are summed in torch.

Per-expert bit-widths: experts are stored in one stack per bit-width; each stack is launched once over the common
alignment and its programs skip blocks whose expert lives in another stack (``expert_slot[e] == -1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moecompress.kernels.layout import PackedLinearWeight
from moecompress.kernels.runtime import interpreting
from moecompress.kernels.triton_dequant import contract, dequant_tile


@dataclass
class PairAlignment:
    """Pairs sorted by expert, padded per expert to whole blocks.

    sorted_pair_ids: int32 ``[capacity]``: pair ids ``token * k + slot``; padding holds ``num_pairs`` (sentinel).
    block_expert: int32 ``[capacity // block_m]``: the expert of each block, -1 for unused blocks.
    """

    sorted_pair_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_pairs: int


def align_pairs_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> PairAlignment:
    """Sort the pairs of ``top_k_index [T, k]`` by expert and pad each expert's run to a multiple of ``block_m``.

    Static shapes only (no host synchronisation): capacity is ``T*k + E*(block_m - 1)`` rounded up to blocks.
    Expert ids outside ``[0, E)`` (expert-parallel sentinels) are dropped.
    """
    device = top_k_index.device
    expert_of_pair = top_k_index.reshape(-1).to(torch.int64)
    num_pairs = expert_of_pair.numel()
    if block_m == 1:
        valid = (expert_of_pair >= 0) & (expert_of_pair < num_experts)
        return PairAlignment(
            sorted_pair_ids=torch.arange(num_pairs, device=device, dtype=torch.int32),
            block_expert=torch.where(valid, expert_of_pair, -1).to(torch.int32),
            block_m=1,
            num_pairs=num_pairs,
        )
    valid = (expert_of_pair >= 0) & (expert_of_pair < num_experts)
    bucket = torch.where(valid, expert_of_pair, num_experts)  # invalid pairs go to a trailing bucket, never launched
    # scatter_add, not bincount: bincount reads the maximum on the host, which breaks CUDA-graph capture.
    pair_counts = torch.zeros(num_experts + 1, device=device, dtype=torch.int64)
    pair_counts = pair_counts.scatter_add_(0, bucket, torch.ones_like(bucket))[:num_experts]
    padded_counts = (pair_counts + block_m - 1) // block_m * block_m
    expert_start = torch.cumsum(padded_counts, 0) - padded_counts  # [E] first slot of each expert's run
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    first_of_bucket = torch.searchsorted(sorted_bucket, sorted_bucket, right=False)
    rank_in_expert = torch.arange(num_pairs, device=device) - first_of_bucket
    capacity_blocks = triton.cdiv(num_pairs, block_m) + num_experts
    capacity = capacity_blocks * block_m
    sorted_pair_ids = torch.full((capacity + 1,), num_pairs, device=device, dtype=torch.int32)
    destination = torch.where(
        sorted_bucket < num_experts, expert_start[sorted_bucket.clamp(max=num_experts - 1)] + rank_in_expert, capacity
    )
    sorted_pair_ids[destination] = order.to(torch.int32)  # invalid pairs land on the extra trailing slot
    block_start = torch.arange(capacity_blocks, device=device) * block_m
    expert_end = torch.cumsum(padded_counts, 0)
    block_expert = torch.searchsorted(expert_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return PairAlignment(sorted_pair_ids[:capacity], block_expert, block_m, num_pairs)


@triton.jit
def _grouped_packed_kernel(
    a_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    sorted_pair_ids_ptr,
    block_expert_ptr,
    expert_slot_ptr,
    routing_weight_ptr,
    num_pairs,
    N,
    K,
    stride_a_row,
    stride_packed_e,
    stride_packed_n,
    stride_scale_e,
    stride_scale_n,
    stride_out_row,
    PAIRS_PER_A_ROW: tl.constexpr,  # top_k when A is the token activations, 1 when A holds one row per pair
    FUSE_SILU_GLU: tl.constexpr,  # N is I: rows n (gate) and n + I (up) of the weight, output silu(gate) * up
    MUL_ROUTING_WEIGHT: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    slot = tl.load(expert_slot_ptr + expert)  # index in this bit-width's stack, -1 if the expert is in another
    if slot < 0:
        return
    pair_ids = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_mask = pair_ids < num_pairs
    a_rows = a_ptr + (pair_ids // PAIRS_PER_A_ROW).to(tl.int64)[:, None] * stride_a_row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    expert_packed = packed_ptr + slot.to(tl.int64) * stride_packed_e
    expert_scale = scale_ptr + slot.to(tl.int64) * stride_scale_e
    expert_zero = zero_ptr + slot.to(tl.int64) * stride_scale_e
    gate_rows = expert_packed + offs_n[:, None] * stride_packed_n
    gate_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SILU_GLU:
        up_offs_n = offs_n + N
        up_rows = expert_packed + up_offs_n[:, None] * stride_packed_n
        up_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        weights, row_scale = dequant_tile(
            gate_rows, offs_n, n_mask, offs_k, k_mask, k_start, expert_scale, expert_zero, stride_scale_n,
            BITS, GROUP_SIZE, HAS_ZERO, BLOCK_K,
        )
        gate_acc += contract(a, weights, BLOCK_M >= 16, INTERPRET) * row_scale[None, :]
        if FUSE_SILU_GLU:
            up_weights, up_scale = dequant_tile(
                up_rows, up_offs_n, n_mask, offs_k, k_mask, k_start, expert_scale, expert_zero, stride_scale_n,
                BITS, GROUP_SIZE, HAS_ZERO, BLOCK_K,
            )
            up_acc += contract(a, up_weights, BLOCK_M >= 16, INTERPRET) * up_scale[None, :]
    if FUSE_SILU_GLU:
        result = gate_acc * tl.sigmoid(gate_acc) * up_acc
    else:
        result = gate_acc
    if MUL_ROUTING_WEIGHT:
        routing_weight = tl.load(routing_weight_ptr + pair_ids, mask=pair_mask, other=0.0).to(tl.float32)
        result = result * routing_weight[:, None]
    out_ptrs = out_ptr + pair_ids.to(tl.int64)[:, None] * stride_out_row + offs_n[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


def _gpu_configs() -> list[triton.Config]:
    configs = []
    for block_n, block_k in ((32, 64), (32, 128), (64, 64), (64, 128), (16, 256), (32, 256)):
        for warps, stages in ((4, 3), (8, 3)):
            configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    group_size = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    kept = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] <= 64]
    return kept or configs[:1]


_autotuned_kernel = None


def _launcher(config: dict[str, int] | None):
    global _autotuned_kernel
    if interpreting() or config is not None:
        tiling = config or {"BLOCK_N": 64, "BLOCK_K": 64}
        return _grouped_packed_kernel, tiling
    if _autotuned_kernel is None:
        _autotuned_kernel = triton.autotune(
            configs=_gpu_configs(),
            key=["N", "K", "BITS", "GROUP_SIZE", "HAS_ZERO", "BLOCK_M", "FUSE_SILU_GLU"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_grouped_packed_kernel)
    return _autotuned_kernel, {}


@dataclass
class PackedExpertStack:
    """The experts of one layer that share a bit-width, stacked.

    weight: packed ``[E_b, N, K]`` (stack leading dim); expert_slot: int32 ``[E]``: slot of expert ``e`` in this
    stack, -1 when it is stored in another stack.
    """

    weight: PackedLinearWeight
    expert_slot: torch.Tensor


def grouped_packed_matmul(
    activations: torch.Tensor,
    stacks: list[PackedExpertStack],
    alignment: PairAlignment,
    output: torch.Tensor,
    pairs_per_activation_row: int,
    fuse_silu_glu: bool,
    routing_weights: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """One launch per stack: ``output[pair] = f(activations[pair // pairs_per_row] @ W[expert(pair)]^T)``.

    activations ``[rows, K]``; output ``[num_pairs, N_out]`` (``N_out = I`` with the fused GLU, the weight's rows
    otherwise); routing_weights ``[num_pairs]`` multiplies each pair's row when given.
    """
    activations = activations.contiguous()
    kernel, tiling = _launcher(config)
    for stack in stacks:
        weight = stack.weight
        packed, scales = weight.packed, weight.scales
        zeros = weight.zeros if weight.zeros is not None else scales
        out_features = weight.shape[0] // 2 if fuse_silu_glu else weight.shape[0]
        in_features = weight.shape[1]

        def grid(meta, out_features=out_features):
            return (alignment.block_expert.numel(), triton.cdiv(out_features, meta["BLOCK_N"]))

        kernel[grid](
            activations, packed, scales, zeros, output,
            alignment.sorted_pair_ids, alignment.block_expert, stack.expert_slot,
            routing_weights if routing_weights is not None else scales,
            alignment.num_pairs, out_features, in_features,
            activations.stride(0), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
            output.stride(0),
            PAIRS_PER_A_ROW=pairs_per_activation_row,
            FUSE_SILU_GLU=fuse_silu_glu,
            MUL_ROUTING_WEIGHT=routing_weights is not None,
            BITS=weight.bits,
            GROUP_SIZE=weight.effective_group_size,
            HAS_ZERO=weight.zeros is not None,
            INTERPRET=interpreting(),
            BLOCK_M=alignment.block_m,
            **tiling,
        )
    return output


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Decode (few pairs per expert): one pair per block, no sorting. Batches: tensor-core blocks of 16-64 pairs."""
    if num_pairs * 4 <= num_experts or num_pairs <= 8:
        return 1
    pairs_per_expert = num_pairs / num_experts
    return 16 if pairs_per_expert <= 16 else (32 if pairs_per_expert <= 64 else 64)


def moe_experts_triton(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_stacks: list[PackedExpertStack],
    down_stacks: list[PackedExpertStack],
    num_experts: int,
    intermediate_size: int,
    fuse_silu_glu: bool = True,
    apply_gate=None,
    block_m: int | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Routed experts of one layer on the packed kernels. hidden_states ``[T, H]``, routing ``[T, k]`` -> ``[T, H]``.

    ``fuse_silu_glu=False`` writes ``[pairs, 2I]`` and applies ``apply_gate`` (any activation) in torch.
    """
    num_tokens, hidden_size = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_pairs = num_tokens * top_k
    block_m = block_m or choose_block_m(num_pairs, num_experts)
    alignment = align_pairs_by_expert(top_k_index, num_experts, block_m)
    device, dtype = hidden_states.device, hidden_states.dtype
    if fuse_silu_glu:
        intermediate = torch.empty((num_pairs, intermediate_size), device=device, dtype=dtype)
        grouped_packed_matmul(hidden_states, gate_up_stacks, alignment, intermediate, top_k, True, config=config)
    else:
        gate_up = torch.empty((num_pairs, 2 * intermediate_size), device=device, dtype=dtype)
        grouped_packed_matmul(hidden_states, gate_up_stacks, alignment, gate_up, top_k, False, config=config)
        intermediate = apply_gate(gate_up).to(dtype)
    # Pairs routed to no local expert are never written: start from zeros.
    pair_outputs = torch.zeros((num_pairs, hidden_size), device=device, dtype=torch.float32)
    grouped_packed_matmul(
        intermediate, down_stacks, alignment, pair_outputs, 1, False,
        routing_weights=top_k_weights.reshape(-1).contiguous(), config=config,
    )
    return pair_outputs.view(num_tokens, top_k, hidden_size).sum(dim=1).to(dtype)
