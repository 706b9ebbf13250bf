"""llama.cpp's K-quant reference quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in numpy, byte for byte.

The ``gguf`` package writes the 32-element block types (Q4_0 ... Q8_0) but only *reads* the 256-element K-quants, so
the GGUF exporter quantizes them here. What is reproduced is ggml's ``quantize_row_qX_K_ref`` (ggml-quants.c), the
function ``llama-quantize`` and ``ggml_quantize_chunk`` run when no importance matrix is given; the tests compare our
bytes with the ones ``ggml_quantize_chunk`` of an installed llama.cpp writes for the same rows.

Byte-exactness needs the C code's float32 arithmetic, operation by operation:

* every intermediate is float32 (numpy promotes ``float32 * int32`` to float64, so integer levels are cast first);
* sums run left to right in float32, as the C loops do: ``np.cumsum(..., dtype=float32)[..., -1]`` accumulates
  sequentially (``np.sum`` would sum pairwise and differ in the last bit);
* ``nearest_int`` (adding 1.5 * 2^23 in float32) is round-half-to-even, i.e. ``np.rint`` of the float32 value;
* fp16 conversions round to nearest even, as ``astype(np.float16)`` does;
* searches keep the C code's "first strictly better" rule; state carried across iterations (the min of
  ``make_qkx2_quants``, the levels of ``make_q3_quants``' coordinate descent) is carried per row here too.

Every function works on many sub-blocks at once: ``x`` is ``[B, n]`` (B sub-blocks of n values) or ``[N, 256]``
(N super-blocks), and the loops that remain run over the few candidate scales or the n positions of a sub-block.
Block layouts (ggml-common.h), little-endian:

    Q2_K (84 B):  scales[16] (low nibble scale, high nibble min), qs[64], d fp16, dmin fp16
    Q3_K (110 B): hmask[32], qs[64], scales[12] (16 six-bit scales), d fp16
    Q4_K (144 B): d fp16, dmin fp16, scales[12] (8 six-bit scales and mins), qs[128]
    Q5_K (176 B): d fp16, dmin fp16, scales[12], qh[32], qs[128]
    Q6_K (210 B): ql[128], qh[64], scales[16] int8, d fp16
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256
# ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below it is all zeros.
GROUP_MAX_EPS = F32(1e-15)


def _sequential_sum(values: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis (the C loops' order; ``np.sum`` is pairwise)."""
    return np.cumsum(values, axis=-1, dtype=F32)[..., -1]


def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``, bit for bit: add 1.5 * 2^23 in float32 and read the low mantissa bits. For
    ``|v| < 2^22`` this is round-half-to-even; beyond (or for inf / nan) it is the same garbage C computes."""
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = (values.astype(F32, copy=False) + F32(12582912.0)).astype(F32)
    return (shifted.view(np.int32) & 0x007FFFFF) - 0x00400000


def _fp16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half (round to nearest even), as uint16 bits."""
    return values.astype(F32).astype(np.float16).view(np.uint16)


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    """uint16 half bits -> float32 (``GGML_FP16_TO_FP32``)."""
    return bits.view(np.float16).astype(F32)


def _u16_bytes(bits: np.ndarray) -> np.ndarray:
    """uint16 ``[N]`` -> little-endian bytes ``[N, 2]``."""
    return bits.astype("<u2").view(np.uint8).reshape(-1, 2)


def _first_max_abs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest magnitude and the signed value holding it (the first one, as the C loops' strict ``>``)."""
    index = np.abs(values).argmax(axis=-1)
    signed = np.take_along_axis(values, index[:, None], axis=-1)[:, 0]
    return np.abs(signed), signed


# ----- the scale searches ---------------------------------------------------------------------------------------

def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``: a signed scale per row of ``x [B, n]`` minimising the
    x^2-weighted error over 19 candidate inverse scales. Returns ``(scale [B], L [B, n])`` with ``L`` in
    ``[0, 2 nmax)`` (level + nmax); all-zero rows get scale 0 and L 0."""
    x = x.astype(F32, copy=False)
    amax, signed_max = _first_max_abs(x)
    zero_rows = amax < GROUP_MAX_EPS
    safe_max = np.where(zero_rows, F32(1), signed_max)
    weights = x * x

    def levels_for(inverse_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(_nearest_int(inverse_scale[:, None] * x), -nmax, nmax - 1)
        level_values = levels.astype(F32)
        sum_lx = _sequential_sum(weights * x * level_values)
        sum_l2 = _sequential_sum(weights * level_values * level_values)
        return levels, sum_lx, sum_l2

    levels, sum_lx, sum_l2 = levels_for(F32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, F32(0)).astype(F32)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        inverse_scale = -(F32(nmax) + F32(0.1) * F32(step)) / safe_max
        candidate, sum_lx, sum_l2 = levels_for(inverse_scale)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        levels = np.where(better[:, None], candidate, levels)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = (sum_lx / sum_l2).astype(F32)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sum_lx, best)
    levels = np.where(zero_rows[:, None], 0, levels + nmax)
    return np.where(zero_rows, F32(0), scale).astype(F32), levels.astype(np.int32)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: start from ``round(-nmax x / max)``, then up to 5 passes of
    coordinate descent, each level set to its least-squares best given the others if that lowers the x^2-weighted
    error. Returns ``(scale [B], L [B, n])``, L = level + nmax (0 for all-zero rows, as in C)."""
    x = x.astype(F32, copy=False)
    amax, signed_max = _first_max_abs(x)
    zero_rows = amax < GROUP_MAX_EPS
    safe_max = np.where(zero_rows, F32(1), signed_max)
    inverse_scale = F32(-nmax) / safe_max
    levels = np.clip(_nearest_int(inverse_scale[:, None] * x), -nmax, nmax - 1)
    weights = x * x
    level_values = levels.astype(F32)
    sum_lx = _sequential_sum(weights * x * level_values)
    sum_l2 = _sequential_sum(weights * level_values * level_values)
    # A pass that changes nothing leaves the state as it is, so running all 5 passes on a row that C would have
    # stopped early gives the same result.
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi = x[:, i], weights[:, i]
            li = levels[:, i].astype(F32)
            slx = sum_lx - wi * xi * li
            sl2 = sum_l2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                proposed = np.clip(_nearest_int(np.where(slx > 0, xi * sl2 / slx, F32(0))), -nmax, nmax - 1)
            proposed_values = proposed.astype(F32)
            new_slx = slx + wi * xi * proposed_values
            new_sl2 = sl2 + wi * proposed_values * proposed_values
            accept = ((slx > 0) & (proposed != levels[:, i]) & (new_sl2 > 0)
                      & (new_slx * new_slx * sum_l2 > sum_lx * sum_lx * new_sl2))
            levels[:, i] = np.where(accept, proposed, levels[:, i])
            sum_lx = np.where(accept, new_slx, sum_lx)
            sum_l2 = np.where(accept, new_sl2, sum_l2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, F32(0)).astype(F32)
    levels = np.where(zero_rows[:, None], 0, levels + nmax)
    return np.where(zero_rows, F32(0), scale).astype(F32), levels.astype(np.int32)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants``: an unsigned scale and a min per row of ``x [B, n]`` (x ~ scale * L - min), searched
    over ``nstep + 1`` inverse scales, each refit by weighted least squares. Returns ``(scale [B], min [B] >= 0,
    L [B, n] in [0, nmax])``."""
    x = x.astype(F32, copy=False)
    weights = weights.astype(F32, copy=False)
    low = np.minimum(x.min(axis=1), F32(0))
    high = x.max(axis=1)
    flat = high == low
    sum_w = _sequential_sum(weights)
    sum_x = _sequential_sum(weights * x)

    def error_of(scale, minimum, level_values):
        difference = scale[:, None] * level_values + minimum[:, None] - x
        return _sequential_sum(weights * (np.abs(difference) if use_mad else difference * difference))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse_scale = F32(nmax) / (high - low)
        scale = F32(1) / inverse_scale
        levels = np.clip(_nearest_int(np.where(flat[:, None], F32(0), inverse_scale[:, None] * (x - low[:, None]))),
                         0, nmax)
        best_error = error_of(scale, low, levels.astype(F32))
        for step in range(nstep + 1):
            # `low` is the best min found so far: the C code uses the running min here, not the data's
            inverse_scale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (high - low)
            candidate = np.clip(_nearest_int(np.where(flat[:, None], F32(0),
                                                      inverse_scale[:, None] * (x - low[:, None]))), 0, nmax)
            level_values = candidate.astype(F32)
            sum_l = _sequential_sum(weights * level_values)
            sum_l2 = _sequential_sum(weights * level_values * level_values)
            sum_xl = _sequential_sum(weights * level_values * x)
            determinant = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
            positive_min = this_min > 0
            this_min = np.where(positive_min, F32(0), this_min).astype(F32)
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale).astype(F32)
            current_error = error_of(this_scale, this_min, level_values)
            better = (determinant > 0) & (current_error < best_error) & ~flat
            levels = np.where(better[:, None], candidate, levels)
            best_error = np.where(better, current_error, best_error)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    scale = np.where(flat, F32(0), scale).astype(F32)
    levels = np.where(flat[:, None], 0, levels)
    return scale, (-low).astype(F32), levels.astype(np.int32)


# ----- the block quantizers -------------------------------------------------------------------------------------

def _super_blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F32).reshape(-1, QK_K)
    if not np.isfinite(x).all():
        raise ValueError("K-quantization needs finite values")
    return x


def _pack_2bit_planes(levels: np.ndarray) -> np.ndarray:
    """``[N, 256]`` values 0..3 -> ``[N, 64]``: byte ``32h + l`` holds elements ``128h + l + 32k`` at bits ``2k``."""
    halves = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_ref``: float32 values (a multiple of 256) -> Q2_K blocks ``[N, 84]`` uint8."""
    blocks = _super_blocks(x)
    count = blocks.shape[0]
    sub = blocks.reshape(-1, 16)
    scales, mins, levels = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, levels = scales.reshape(count, 16), mins.reshape(count, 16), levels.reshape(count, 256)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale_codes = np.where(max_scale[:, None] > 0, _nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
        min_codes = np.where(max_min[:, None] > 0, _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    # C stores the int into a uint8 (wrapping) and ORs the min's code shifted by 4 into it
    scale_bytes = ((scale_codes & 0xFF) | ((min_codes << 4) & 0xFF)).astype(np.uint8)
    d_bits = _fp16_bits(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin_bits = _fp16_bits(np.where(max_min > 0, max_min / F32(15), F32(0)))
    step = _fp16_value(d_bits)[:, None] * (scale_bytes & 0xF).astype(F32)
    offset = _fp16_value(dmin_bits)[:, None] * (scale_bytes >> 4).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(_nearest_int((blocks.reshape(count, 16, 16) + offset[:, :, None]) / step[:, :, None]),
                              0, 3)
    # a sub-block whose step is 0 keeps the levels of the search
    levels = np.where((step != 0)[:, :, None], requantized, levels.reshape(count, 16, 16)).reshape(count, 256)
    return np.concatenate([scale_bytes, _pack_2bit_planes(levels), _u16_bytes(d_bits), _u16_bytes(dmin_bits)],
                          axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_ref``: float32 values -> Q3_K blocks ``[N, 110]`` uint8."""
    blocks = _super_blocks(x)
    count = blocks.shape[0]
    scales, levels = make_q3_quants(blocks.reshape(-1, 16), 4)
    scales, levels = scales.reshape(count, 16), levels.reshape(count, 16, 16)
    _, max_scale = _first_max_abs(scales)
    has_scale = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse_scale = np.where(has_scale, F32(-32) / np.where(has_scale, max_scale, F32(1)), F32(0)).astype(F32)
    codes = np.where(has_scale[:, None], np.clip(_nearest_int(inverse_scale[:, None] * scales), -32, 31) + 32, 0)
    packed_scales = np.zeros((count, 12), dtype=np.uint8)
    for j in range(16):
        code = codes[:, j]
        if j < 8:
            packed_scales[:, j] |= (code & 0xF).astype(np.uint8)
        else:
            packed_scales[:, j - 8] |= ((code & 0xF) << 4).astype(np.uint8)
        packed_scales[:, 8 + j % 4] |= ((code >> 4) << (2 * (j // 4))).astype(np.uint8)
    with np.errstate(divide="ignore"):
        d_bits = _fp16_bits(np.where(has_scale, F32(1) / inverse_scale, F32(0)))
    # the decoded 6-bit scales (0 where no scale was set: the memset bytes decode to -32, times d = 0)
    steps = _fp16_value(d_bits)[:, None] * np.where(has_scale[:, None], codes - 32, -32).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(_nearest_int(blocks.reshape(count, 16, 16) / steps[:, :, None]), -4, 3) + 4
    levels = np.where((steps != 0)[:, :, None], requantized, levels).reshape(count, 256)
    high = levels > 3
    # element j's high bit: bit j // 32 of hmask[j % 32]
    hmask = np.zeros((count, 32), dtype=np.uint8)
    for plane in range(8):
        hmask |= (high[:, plane * 32:(plane + 1) * 32].astype(np.uint8) << plane)
    low = np.where(high, levels - 4, levels)
    return np.concatenate([hmask, _pack_2bit_planes(low), packed_scales, _u16_bytes(d_bits)], axis=1)


def _pack_scale_min_k4(scale_codes: np.ndarray, min_codes: np.ndarray) -> np.ndarray:
    """Eight 6-bit (scale, min) pairs per row -> the 12 bytes of Q4_K / Q5_K."""
    packed = np.zeros((scale_codes.shape[0], 12), dtype=np.uint8)
    for j in range(8):
        scale, minimum = scale_codes[:, j].astype(np.uint8), min_codes[:, j].astype(np.uint8)
        if j < 4:
            packed[:, j] = scale
            packed[:, j + 4] = minimum
        else:
            packed[:, j + 4] = (scale & 0xF) | ((minimum & 0xF) << 4)
            packed[:, j - 4] |= (scale >> 4) << 6
            packed[:, j] |= (minimum >> 4) << 6
    return packed


def _unpack_scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: ``(scales [N, 8], mins [N, 8])`` as int32."""
    packed = packed.astype(np.int32)
    scales = np.empty((packed.shape[0], 8), dtype=np.int32)
    mins = np.empty_like(scales)
    for j in range(8):
        if j < 4:
            scales[:, j], mins[:, j] = packed[:, j] & 63, packed[:, j + 4] & 63
        else:
            scales[:, j] = (packed[:, j + 4] & 0xF) | ((packed[:, j - 4] >> 6) << 4)
            mins[:, j] = (packed[:, j + 4] >> 4) | ((packed[:, j] >> 6) << 4)
    return scales, mins


def _quantize_scale_min_k(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The part Q4_K and Q5_K share: per 32-sub-block search, 6-bit scales and mins, fp16 d and dmin, and the
    levels re-quantized with the stored values. Returns ``(d bits, dmin bits, packed scales [N, 12], L [N, 256])``."""
    count = blocks.shape[0]
    sub = blocks.reshape(-1, 32)
    root_mean_square = np.sqrt(_sequential_sum(sub * sub) / F32(32))
    weights = root_mean_square[:, None] + np.abs(sub)
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins, levels = scales.reshape(count, 8), mins.reshape(count, 8), levels.reshape(count, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inverse_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inverse_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    # C: uint8_t ls = nearest_int(...) (wraps), then MIN(63, ls)
    scale_codes = np.minimum(_nearest_int(inverse_scale[:, None] * scales) & 0xFF, 63)
    min_codes = np.minimum(_nearest_int(inverse_min[:, None] * mins) & 0xFF, 63)
    packed = _pack_scale_min_k4(scale_codes, min_codes)
    d_bits = _fp16_bits(max_scale / F32(63))
    dmin_bits = _fp16_bits(max_min / F32(63))
    stored_scales, stored_mins = _unpack_scale_min_k4(packed)
    steps = _fp16_value(d_bits)[:, None] * stored_scales.astype(F32)
    offsets = _fp16_value(dmin_bits)[:, None] * stored_mins.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(_nearest_int((blocks.reshape(count, 8, 32) + offsets[:, :, None]) / steps[:, :, None]),
                              0, nmax)
    levels = np.where((steps != 0)[:, :, None], requantized, levels).reshape(count, 256)
    return d_bits, dmin_bits, packed, levels


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_ref``: float32 values -> Q4_K blocks ``[N, 144]`` uint8."""
    blocks = _super_blocks(x)
    d_bits, dmin_bits, packed, levels = _quantize_scale_min_k(blocks, 15, -1.0, 20)
    # four chunks of 64 values: byte l of chunk c = L[64c + l] | L[64c + 32 + l] << 4
    chunks = levels.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_u16_bytes(d_bits), _u16_bytes(dmin_bits), packed, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_K_ref``: float32 values -> Q5_K blocks ``[N, 176]`` uint8."""
    blocks = _super_blocks(x)
    d_bits, dmin_bits, packed, levels = _quantize_scale_min_k(blocks, 31, -0.5, 15)
    chunks = levels.reshape(-1, 4, 2, 32)
    low = (chunks & 0xF).astype(np.uint8)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (chunks >> 4).astype(np.uint8)  # [N, chunk c, half h, l]: bit 2c + h of qh[l]
    qh = np.zeros((levels.shape[0], 32), dtype=np.uint8)
    for chunk in range(4):
        qh |= (high[:, chunk, 0] << (2 * chunk)) | (high[:, chunk, 1] << (2 * chunk + 1))
    return np.concatenate([_u16_bytes(d_bits), _u16_bytes(dmin_bits), packed, qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref``: float32 values -> Q6_K blocks ``[N, 210]`` uint8."""
    blocks = _super_blocks(x)
    count = blocks.shape[0]
    scales, levels = make_qx_quants(blocks.reshape(-1, 16), 32)
    scales, levels = scales.reshape(count, 16), levels.reshape(count, 16, 16)
    max_abs_scale, max_scale = _first_max_abs(scales)
    zero_blocks = max_abs_scale < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse_scale = np.where(zero_blocks, F32(0), F32(-128) / np.where(zero_blocks, F32(1), max_scale))
        d_bits = _fp16_bits(np.where(zero_blocks, F32(0), F32(1) / inverse_scale))
    scale_codes = np.where(zero_blocks[:, None], 0, np.minimum(127, _nearest_int(inverse_scale[:, None] * scales)))
    scale_codes = scale_codes.astype(np.int8)
    steps = _fp16_value(d_bits)[:, None] * scale_codes.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(_nearest_int(blocks.reshape(count, 16, 16) / steps[:, :, None]), -32, 31) + 32
    levels = np.where((steps != 0)[:, :, None], requantized, levels)
    levels = np.where(zero_blocks[:, None, None], 0, levels).reshape(count, 2, 4, 32)  # [N, half, quarter, l]
    low, high = (levels & 0xF).astype(np.uint8), (levels >> 4).astype(np.uint8)
    # per half: ql[l] = q[l] | q[l+64] << 4, ql[l+32] = q[l+32] | q[l+96] << 4, qh[l] = the four high pairs
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(count, 128), qh.reshape(count, 64), scale_codes.view(np.uint8),
                           _u16_bytes(d_bits)], axis=1)


QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
              "Q6_K": quantize_q6_k}
