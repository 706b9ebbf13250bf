"""Triton device functions shared by the packed kernels: read a tile of packed codes and dequantise it.

Packed rows are dense little-endian bit streams of int32 words (compressed-tensors ``pack-quantized``): element ``k``
of a row sits at bit ``k * BITS``. For 2/4/8 bits a value never crosses a word; for 3 bits it may, and the high
part is read from the next word. ``w = (code - 2^(BITS-1) - zero_point) * scale``; 1 bit (sign times a scale) reads
``w = (2 * code - 1 - zero_point) * scale`` (its zero points are 0).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(row_ptrs, offs_k, mask, BITS: tl.constexpr):
    """Unsigned codes ``[BN, BK]`` (int32) of rows ``row_ptrs [BN, 1]`` (int32 word pointers), columns ``offs_k [1, BK]``."""
    bit_pos = offs_k * BITS
    word = bit_pos // 32
    shift = (bit_pos % 32).to(tl.uint32)
    low_word = tl.load(row_ptrs + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = low_word >> shift
    if 32 % BITS != 0:
        # Values that straddle a word boundary: their top bits are the lowest bits of the next word.
        straddles = (shift + BITS) > 32
        high_word = tl.load(row_ptrs + word + 1, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        high_shift = tl.where(straddles, 32 - shift, 0).to(tl.uint32)
        codes = codes | tl.where(straddles, high_word << high_shift, 0).to(tl.uint32)
    return (codes & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def dequant_tile(
    row_ptrs,
    offs_n,
    n_mask,
    offs_k,
    k_mask,
    k_start,
    scale_ptr,
    zero_ptr,
    stride_scale_n,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weights of one ``[BN, BK]`` tile and a per-row factor ``[BN]`` still to apply to the contraction.

    When a whole K block lies in one quantisation group (``GROUP_SIZE % BK == 0``) the scale is constant along K, so it
    is returned separately and applied once to the ``[BM, BN]`` partial product (fewer multiplies); otherwise the
    tile is fully scaled and the factor is 1. ``scale_ptr``/``zero_ptr`` point at this matrix's ``[N, n_groups]``.
    """
    tile_mask = n_mask[:, None] & k_mask[None, :]
    codes = load_codes(row_ptrs, offs_k[None, :], tile_mask, BITS).to(tl.float32)
    offset: tl.constexpr = 1 << (BITS - 1)
    if BITS == 1:  # codes {0, 1} stand for -1 and +1: 2u - 1 = (2u) - offset
        codes = codes * 2
    if GROUP_SIZE % BLOCK_K == 0:
        group = k_start // GROUP_SIZE
        scale_row = tl.load(scale_ptr + offs_n * stride_scale_n + group, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero_row = tl.load(zero_ptr + offs_n * stride_scale_n + group, mask=n_mask, other=0).to(tl.float32)
            weights = codes - (zero_row[:, None] + offset)
        else:
            weights = codes - offset
        return weights, scale_row
    else:
        group_ptrs = offs_n[:, None] * stride_scale_n + offs_k[None, :] // GROUP_SIZE
        scales = tl.load(scale_ptr + group_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zeros = tl.load(zero_ptr + group_ptrs, mask=tile_mask, other=0).to(tl.float32)
            weights = (codes - (zeros + offset)) * scales
        else:
            weights = (codes - offset) * scales
        return weights, tl.full(offs_n.shape, 1.0, tl.float32)


@triton.jit
def contract(x, weights, USE_DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``x [BM, BK] @ weights[BN, BK]^T -> [BM, BN]`` in fp32.

    Tensor cores (``tl.dot``) need ``BM >= 16``; below that (decode) a broadcast multiply-and-sum is the GEMV.
    The interpreter's ``tl.dot`` returned inf on bf16 inputs, so it contracts in fp32 there.
    """
    if USE_DOT:
        if INTERPRET:
            return tl.dot(x.to(tl.float32), tl.trans(weights.to(tl.float32)))
        else:
            return tl.dot(x, tl.trans(weights.to(x.dtype)))
    else:
        return tl.sum(x.to(tl.float32)[:, None, :] * weights[None, :, :], axis=2)
