"""Packed low-bit format: exact round trips and byte-identity with compressed-tensors' pack-quantized layout."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from moecompress.kernels.layout import PackedLinearWeight, pack_codes, pack_signed, unpack_codes, unpack_signed
from moecompress.quantization.packing import quantize_rtn

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [1, 7, 32, 33, 100, 256])
def test_pack_unpack_round_trip_exact(bits: int, cols: int) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, cols).long(), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [7, 32, 96, 130])
def test_packing_is_byte_identical_to_compressed_tensors(bits: int, cols: int) -> None:
    generator = torch.Generator().manual_seed(bits + cols)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), generator=generator, dtype=torch.int64)
    ours = pack_signed(values, bits)
    theirs = pack_to_int32(values.to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    # ...and each side unpacks what the other packed.
    assert torch.equal(unpack_signed(theirs, bits, cols), values.to(torch.int8))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size((6, cols))), values.to(torch.int8))


def test_stacked_packing_matches_per_matrix() -> None:
    values = torch.randint(-4, 4, (3, 4, 50))
    stacked = pack_signed(values, 3)
    for expert in range(3):
        assert torch.equal(stacked[expert], pack_signed(values[expert], 3))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_quantize_rtn_matches_compressed_tensors_fake_quant(bits: int, symmetric: bool, group_size: int) -> None:
    """Our RTN codes, scales and zeros dequantise to what compressed-tensors' own fake-quantiser computes."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(bits))
    packed = quantize_rtn(weight, bits, group_size, symmetric)
    strategy = "channel" if group_size <= 0 else "group"
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=None if group_size <= 0 else group_size
    )
    width = 128 if group_size <= 0 else group_size
    grouped = weight.reshape(8, -1, width)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    expected = fake_quantize(weight, scale, torch.round(zero).to(torch.int8), args)
    torch.testing.assert_close(packed.dequantize(torch.float32), expected, rtol=0, atol=1e-6)
    assert (packed.zeros is None) == symmetric


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_error_bounded_by_half_step(bits: int) -> None:
    weight = torch.randn(16, 70)  # 70 = two full groups of 32 and a short one
    packed = quantize_rtn(weight, bits, group_size=32, symmetric=False)
    error = (packed.dequantize(torch.float32) - weight).abs()
    step = packed._expand_groups(packed.scales.float())
    assert torch.all(error <= step / 2 + 1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_state_round_trip(symmetric: bool) -> None:
    weight = torch.randn(40, 64, dtype=torch.bfloat16)
    packed = quantize_rtn(weight, 4, 32, symmetric)
    state = packed.to_compressed_tensors()
    assert set(state) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if symmetric else {"weight_zero_point"})
    if not symmetric:
        # compressed-tensors packs zero points along the output dimension.
        assert torch.equal(state["weight_zero_point"], pack_to_int32(packed.zeros, 4, packed_dim=0))
    restored = PackedLinearWeight.from_compressed_tensors(state, bits=4, group_size=32)
    assert torch.equal(restored.dequantize(), packed.dequantize())


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="bits=5"):
        pack_codes(torch.zeros(2, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        pack_codes(torch.full((2, 4), 16), 4)
    with pytest.raises(ValueError, match="packed must be int32"):
        PackedLinearWeight(torch.zeros(4, 3, dtype=torch.int32), torch.ones(4, 1), None, 4, -1, (4, 32))
