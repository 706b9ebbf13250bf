"""Dequantising GEMM/GEMV for one packed linear layer: ``y = x @ W^T`` with ``W`` in the packed format.

``x [M, K]`` fp16/bf16/fp32, ``W [N, K]`` packed (2/3/4/8 bits, group scales, optional zero points), fp32
accumulation, ``y [M, N]`` in ``x``'s dtype. Dequantisation happens in registers; the weight is read once from
memory per M block. Small M (decode) uses a broadcast-and-sum GEMV and split-K so that enough programs stream the
weight; M >= 16 uses tensor cores. On a GPU block sizes are autotuned per (M bucket, N, K, bits); under the
interpreter one small fixed configuration is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecompress.kernels.layout import PackedLinearWeight
from moecompress.kernels.runtime import interpreting
from moecompress.kernels.triton_dequant import contract, dequant_tile


@triton.jit
def _packed_linear_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_x_m,
    stride_packed_n,
    stride_scale_n,
    stride_out_m,
    M_BUCKET,  # autotuning key only: next power of two of M, capped
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_x_m
    weight_rows = packed_ptr + offs_n[:, None] * stride_packed_n
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k_start = k_block * BLOCK_K
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        weights, row_scale = dequant_tile(
            weight_rows, offs_n, n_mask, offs_k, k_mask, k_start, scale_ptr, zero_ptr, stride_scale_n,
            BITS, GROUP_SIZE, HAS_ZERO, BLOCK_K,
        )
        accumulator += contract(x, weights, BLOCK_M >= 16, INTERPRET) * row_scale[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_out_m + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, accumulator.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, accumulator, mask=out_mask)


def _gpu_configs() -> list[triton.Config]:
    """Candidate tilings (kept small: each compiles once): GEMV with split-K (BM < 16) and tensor-core GEMM."""
    configs = []
    for block_m in (1, 2, 4, 8):
        for block_n, block_k in ((32, 128), (64, 128), (32, 256), (64, 64)):
            for split_k in (1, 2, 4, 8):
                configs.append(triton.Config(
                    {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                    num_warps=4, num_stages=3,
                ))
    for block_m in (16, 32, 64):
        for block_n, block_k in ((64, 64), (64, 128), (128, 64), (32, 128)):
            for split_k in (1, 2):
                for warps in (4, 8):
                    configs.append(triton.Config(
                        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
                        num_warps=warps, num_stages=3,
                    ))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Keep tilings whose M block fits the M bucket (GEMV tiles for decode, GEMM tiles for batches)."""
    m_bucket = named_args["M_BUCKET"]
    group_size = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    kept = []
    for config in configs:
        block_m = config.kwargs["BLOCK_M"]
        block_k = config.kwargs["BLOCK_K"]
        if block_m != min(m_bucket, 64) and not (m_bucket > 64 and block_m == 64):
            continue
        if group_size % block_k != 0 and block_k > 64:
            continue  # per-element scale gathers: keep tiles small
        kept.append(config)
    return kept or configs[:1]


_autotuned_kernel = None


def _kernel_for_device():
    """The autotuned kernel on a GPU, the plain kernel under the interpreter (fixed small tiles)."""
    global _autotuned_kernel
    if interpreting():
        return _packed_linear_kernel
    if _autotuned_kernel is None:
        _autotuned_kernel = triton.autotune(
            configs=_gpu_configs(),
            key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZERO"],
            prune_configs_by={"early_config_prune": _prune_configs},
            reset_to_zero=["out_ptr"],
        )(_packed_linear_kernel)
    return _autotuned_kernel


def _m_bucket(num_rows: int) -> int:
    return min(triton.next_power_of_2(max(num_rows, 1)), 128)


def _interpreter_config(num_rows: int, group_size: int) -> dict[str, int]:
    block_m = 1 if num_rows == 1 else (16 if num_rows <= 16 else 32)
    block_k = 32 if group_size % 32 == 0 else 16
    # Exercise split-K (atomics) in the interpreter too, on the decode path.
    return {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": block_k, "SPLIT_K": 2 if num_rows == 1 else 1}


def packed_linear_triton(x: torch.Tensor, weight: PackedLinearWeight, config: dict[str, int] | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T -> [..., N]`` on the Triton kernel. ``config`` forces a tiling (tests, benchmarks)."""
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features but the packed weight expects {in_features}")
    if weight.packed.dim() != 2:
        raise ValueError("packed_linear_triton takes one matrix; select an expert of a stack first")
    lead_shape = x.shape[:-1]
    x_2d = x.reshape(-1, in_features).contiguous()
    num_rows = x_2d.shape[0]
    group_size = weight.effective_group_size
    packed = weight.packed.contiguous()
    scales = weight.scales.contiguous()
    zeros = weight.zeros.contiguous() if weight.zeros is not None else scales  # dummy pointer when symmetric

    kernel = _kernel_for_device()
    if interpreting() or config is not None:
        tiling = dict(config or _interpreter_config(num_rows, group_size))
        if interpreting():
            # Sub-16 dot tiles do not exist; the interpreter also honours only the tile sizes, not warps/stages.
            tiling.setdefault("SPLIT_K", 1)
        kernel = _packed_linear_kernel
        split_k = tiling["SPLIT_K"]
    else:
        tiling = {}
        split_k = 2  # any value > 1: the autotuner may pick split-K, so accumulate in fp32
    accumulate_fp32 = split_k > 1 or not interpreting() and config is None
    out = torch.zeros if accumulate_fp32 else torch.empty
    output = out((num_rows, out_features), device=x.device, dtype=torch.float32 if accumulate_fp32 else x.dtype)

    def grid(meta):
        return (
            triton.cdiv(out_features, meta["BLOCK_N"]),
            triton.cdiv(num_rows, meta["BLOCK_M"]),
            meta["SPLIT_K"],
        )

    kernel[grid](
        x_2d, packed, scales, zeros, output,
        num_rows, out_features, in_features,
        x_2d.stride(0), packed.stride(0), scales.stride(0), output.stride(0),
        _m_bucket(num_rows),
        BITS=weight.bits, GROUP_SIZE=group_size, HAS_ZERO=weight.zeros is not None, INTERPRET=interpreting(),
        **tiling,
    )
    return output.to(x.dtype).reshape(*lead_shape, out_features)
