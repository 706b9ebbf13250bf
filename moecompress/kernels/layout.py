"""The packed low-bit weight layout (1, 2, 3, 4, 8 bits; group-wise scales; symmetric or asymmetric).

The kernels read it, the quantisers (``moecompress.quantization``) write it and the exports convert it.

The layout is compressed-tensors' ``pack-quantized`` layout, so export can write it unchanged:

* Quantised values ``q`` are **signed** integers in ``[-2^(b-1), 2^(b-1) - 1]`` (int8 in memory).
* A weight is ``w = (q - zero_point) * scale`` per group of ``group_size`` input columns; symmetric schemes have
  ``zero_point = 0`` and store no zero-point tensor; asymmetric zero points are signed integers in the same range.
* Packing adds the offset ``2^(b-1)`` (unsigned code ``u = q + 2^(b-1)`` in ``[0, 2^b)``) and writes each row as a
  dense little-endian bit stream of 32-bit words: element ``k`` of a row occupies bits ``[k*b, k*b + b)``; 3-bit values
  straddle word boundaries. ``weight_packed`` is int32 ``[out, ceil(in * b / 32)]`` (for 2/4/8 bits this is the
  classic "32/b values per word, element j at shift b*j" layout).
* ``weight_scale`` is ``[out, ceil(in / group_size)]``; ``weight_zero_point`` (asymmetric only) is packed along dim 0:
  int32 ``[ceil(out * b / 32), n_groups]``; ``weight_shape`` is int ``[out, in]``.

So a kernel dequantises with ``w = (u - 2^(b-1) - zero_point) * scale``.

**1 bit** is MC-MoE's binary expert: ``w = sign(W) * mean|W|`` per group (the reference code's
``utils/normal_quantizer.py``). Its signed values are ``q in {-1, +1}`` (not ``{-1, 0}``): the code ``u`` is 1 for
``+1`` and 0 for ``-1`` (``q = 2u - 1``), the scale is the group's mean absolute value, and the zero point is always 0
(asymmetric layers store zeros of 0 so that every width of a layer has the same tensors; compressed-tensors export
writes none for 1 bit). A kernel dequantises 1 bit with ``w = (2u - 1 - zero_point) * scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def packed_width(num_values: int, bits: int) -> int:
    """int32 words that hold ``num_values`` values of ``bits`` bits in a dense bit stream."""
    return math.ceil(num_values * bits / 32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dimension into a dense little-endian bit stream of int32 words.

    codes: integer tensor ``[..., K]`` with values in ``[0, 2^bits)``. Returns int32 ``[..., ceil(K*bits/32)]``.
    Each row starts a new word (rows never share a word), like compressed-tensors' ``pack_to_int32``.
    """
    check_bits(bits)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    *lead, num_values = codes.shape
    words = packed_width(num_values, bits)
    rows = codes.reshape(-1, num_values)
    packed = torch.empty(rows.shape[0], words, dtype=torch.int32, device=codes.device)
    for start, stop in _row_chunks(rows.shape[0], num_values * bits):
        packed[start:stop] = _pack_rows(rows[start:stop], bits, words)
    return packed.reshape(*lead, words)


def _row_chunks(num_rows: int, values_per_row: int) -> list[tuple[int, int]]:
    """Row ranges whose int64 temporaries stay near 16 MB (a stack of experts would otherwise need GBs)."""
    step = max(1, _CHUNK_VALUES // max(values_per_row, 1))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


_CHUNK_VALUES = 1 << 21


def _pack_rows(rows: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    """:func:`pack_codes` of int64 ``[R, K]`` rows -> int32 ``[R, words]``."""
    num_rows, num_values = rows.shape
    bit_positions = torch.arange(bits, device=rows.device)
    # [R, K, bits] bit planes, flattened into one stream per row, padded to whole words.
    bit_stream = ((rows.unsqueeze(-1) >> bit_positions) & 1).reshape(num_rows, num_values * bits)
    bit_stream = torch.nn.functional.pad(bit_stream, (0, words * 32 - num_values * bits))
    word_bits = bit_stream.reshape(num_rows, words, 32)
    word_values = (word_bits << torch.arange(32, device=rows.device)).sum(dim=-1)  # int64 in [0, 2^32)
    # Reinterpret as signed 32-bit (two's complement), which is how safetensors and the kernels store it.
    word_values = torch.where(word_values >= 2**31, word_values - 2**32, word_values)
    return word_values.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, num_values: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., W]`` -> unsigned codes uint8 ``[..., num_values]``."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    if packed.shape[-1] != packed_width(num_values, bits):
        raise ValueError(
            f"packed row has {packed.shape[-1]} words but {num_values} values of {bits} bits need "
            f"{packed_width(num_values, bits)}; check the weight shape and bit-width"
        )
    *lead, words = packed.shape
    rows = packed.reshape(-1, words)
    codes = torch.empty(rows.shape[0], num_values, dtype=torch.uint8, device=packed.device)
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: no code crosses a word; shift each word by every code's offset at once
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        mask = (1 << bits) - 1
        for start, stop in _row_chunks(rows.shape[0], num_values * 4):
            # an arithmetic shift of a negative word fills with ones; the mask keeps only the code's own bits
            unpacked = (rows[start:stop].unsqueeze(-1) >> shifts) & mask  # [R, W, 32 / bits]
            codes[start:stop] = unpacked.reshape(stop - start, -1)[:, :num_values]
        return codes.reshape(*lead, num_values)
    bit_offsets = torch.arange(num_values, device=packed.device) * bits
    word_index, shift = bit_offsets // 32, bit_offsets % 32
    for start, stop in _row_chunks(rows.shape[0], num_values * 4):
        # Element k occupies bits [k*b, k*b + b) of the row's stream: read the (up to two) words holding them as
        # one 64-bit value and shift. Two's-complement wrap of `high << 32` keeps the low 38 bits this reads intact.
        unsigned_words = rows[start:stop].to(torch.int64) & 0xFFFFFFFF
        unsigned_words = torch.nn.functional.pad(unsigned_words, (0, 1))  # a zero word after the last one
        low = unsigned_words[:, word_index]
        high = unsigned_words[:, word_index + 1]
        codes[start:stop] = (((low | (high << 32)) >> shift) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.reshape(*lead, num_values)


def signed_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed value of a ``bits``-bit code: ``[-2^(b-1), 2^(b-1) - 1]``, and ``[-1, 1]`` for
    1 bit (whose two values are -1 and +1)."""
    return (-1, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def pack_signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``q`` in ``[-2^(b-1), 2^(b-1))`` ``[..., K]`` -> int32 ``[..., W]`` (adds the offset ``2^(b-1)``).

    1 bit: ``q`` in ``{-1, +1}``, code ``(q + 1) / 2``."""
    values = values.to(torch.int64)
    if bits == 1:
        if values.numel() and bool((values.abs() != 1).any()):
            raise ValueError("1-bit values must be -1 or +1 (sign times a scale)")
        return pack_codes((values + 1) // 2, 1)
    return pack_codes(values + (1 << (bits - 1)), bits)


def unpack_signed(packed: torch.Tensor, bits: int, num_values: int) -> torch.Tensor:
    """int32 ``[..., W]`` -> signed int8 ``[..., num_values]`` (subtracts the offset ``2^(b-1)``; 1 bit: ``2u - 1``)."""
    codes = unpack_codes(packed, bits, num_values).to(torch.int16)
    if bits == 1:
        return (codes * 2 - 1).to(torch.int8)
    return (codes - (1 << (bits - 1))).to(torch.int8)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; ``group_size <= 0`` means one group per row (per-channel)."""
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


@dataclass
class PackedLinearWeight:
    """One packed linear weight ``W [out, in]`` (``y = x @ W^T``).

    packed: int32 ``[..., out, ceil(in*bits/32)]`` (leading dims allowed: a stack of experts).
    scales: float ``[..., out, n_groups]`` (fp16/bf16/fp32: the compute dtype of the dequantised weight).
    zeros: signed int8 zero points ``[..., out, n_groups]``, or None for symmetric (zero point 0).
    bits: 1, 2, 3, 4 or 8. group_size: input columns per scale (``-1``: one group per row).
    shape: ``(out, in)`` of one matrix.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        check_bits(self.bits)
        out_features, in_features = self.shape
        if self.packed.dtype != torch.int32 or tuple(self.packed.shape[-2:]) != (
            out_features,
            packed_width(in_features, self.bits),
        ):
            raise ValueError(
                f"packed must be int32 [..., {out_features}, {packed_width(in_features, self.bits)}] for shape "
                f"{self.shape} at {self.bits} bits, got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        groups = num_groups(in_features, self.group_size)
        if tuple(self.scales.shape[-2:]) != (out_features, groups):
            raise ValueError(f"scales must be [..., {out_features}, {groups}], got {tuple(self.scales.shape)}")
        if self.zeros is not None and self.zeros.shape != self.scales.shape:
            raise ValueError(f"zeros must match scales {tuple(self.scales.shape)}, got {tuple(self.zeros.shape)}")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int) -> "PackedLinearWeight":
        """Pack signed quantised values ``codes [..., out, in]`` (any integer or float dtype holding integers)
        with their group ``scales`` and ``zeros`` ``[..., out, n_groups]`` (zeros cast to int8, None: symmetric)."""
        return cls(
            packed=pack_signed(codes.to(torch.int64), bits),
            scales=scales,
            zeros=None if zeros is None else zeros.to(torch.int8),
            bits=bits,
            group_size=group_size,
            shape=(codes.shape[-2], codes.shape[-1]),
        )

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def effective_group_size(self) -> int:
        """Columns per group, with per-channel (``group_size <= 0``) resolved to the input width."""
        return self.shape[1] if self.group_size <= 0 else self.group_size

    def codes(self) -> torch.Tensor:
        """Signed quantised values int8 ``[..., out, in]``."""
        return unpack_signed(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Torch reference: ``W = (q - zero) * scale`` ``[..., out, in]`` in ``dtype`` (default: the scales' dtype).

        Computed in fp32 from the unsigned codes (every step exact but the product, as in :meth:`codes`), in place,
        groups broadcast rather than repeated when they divide the row: this runs for every expert of every batch
        that goes through quantised experts on the CPU, so it is kept lean."""
        values = unpack_codes(self.packed, self.bits, self.shape[1]).float()
        values = values.mul_(2).sub_(1) if self.bits == 1 else values.sub_(1 << (self.bits - 1))
        group = self.effective_group_size
        if self.shape[1] % group == 0:
            grouped = values.view(*values.shape[:-1], self.shape[1] // group, group)
            if self.zeros is not None:
                grouped.sub_(self.zeros.float().unsqueeze(-1))
            grouped.mul_(self.scales.float().unsqueeze(-1))
        else:
            if self.zeros is not None:
                values.sub_(self._expand_groups(self.zeros.float()))
            values.mul_(self._expand_groups(self.scales.float()))
        return values.to(dtype or self.scales.dtype)

    def _expand_groups(self, per_group: torch.Tensor) -> torch.Tensor:
        """``[..., out, n_groups]`` -> ``[..., out, in]`` (each group value repeated over its columns)."""
        return per_group.repeat_interleave(self.effective_group_size, dim=-1)[..., : self.shape[1]]

    def select(self, index) -> "PackedLinearWeight":
        """Slice leading (stack) dimensions, e.g. one expert of a stack: ``stack.select(3)``."""
        return PackedLinearWeight(
            self.packed[index],
            self.scales[index],
            None if self.zeros is None else self.zeros[index],
            self.bits,
            self.group_size,
            self.shape,
        )

    def rows(self, start: int, stop: int) -> "PackedLinearWeight":
        """Output rows ``[start, stop)`` (rows are packed independently, so this is a plain slice)."""
        return PackedLinearWeight(
            self.packed[..., start:stop, :],
            self.scales[..., start:stop, :],
            None if self.zeros is None else self.zeros[..., start:stop, :],
            self.bits,
            self.group_size,
            (stop - start, self.shape[1]),
        )

    def to(self, device: torch.device | str) -> "PackedLinearWeight":
        return PackedLinearWeight(
            self.packed.to(device),
            self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device),
            self.bits,
            self.group_size,
            self.shape,
        )

    def nbytes(self) -> int:
        """Bytes a kernel reads to use this weight (packed words, scales, zero points)."""
        total = self.packed.numel() * 4 + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    def to_compressed_tensors(self) -> dict[str, torch.Tensor]:
        """compressed-tensors ``pack-quantized`` tensors for one 2-D weight (names without the module prefix)."""
        if self.packed.dim() != 2:
            raise ValueError("to_compressed_tensors() takes one matrix; use select(i) on a stack first")
        state = {
            "weight_packed": self.packed.contiguous(),
            "weight_scale": self.scales.contiguous(),
            "weight_shape": torch.tensor(list(self.shape), dtype=torch.int32),
        }
        if self.zeros is not None and self.bits > 1:  # 1 bit: the zero point is always 0, none is written
            # compressed-tensors packs group zero points along the output dimension (dim 0).
            state["weight_zero_point"] = pack_signed(self.zeros.t(), self.bits).t().contiguous()
        return state

    @classmethod
    def from_compressed_tensors(
        cls, state: dict[str, torch.Tensor], bits: int, group_size: int
    ) -> "PackedLinearWeight":
        """Inverse of :meth:`to_compressed_tensors`."""
        shape = tuple(int(v) for v in state["weight_shape"].tolist())
        zeros = None
        if "weight_zero_point" in state:
            zeros = unpack_signed(state["weight_zero_point"].t().contiguous(), bits, shape[0]).t().contiguous()
        return cls(state["weight_packed"], state["weight_scale"], zeros, bits, group_size, shape)
