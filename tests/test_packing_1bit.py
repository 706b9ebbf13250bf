"""1-bit packed weights (MC-MoE's binary experts: sign times each group's mean |w|): the format, RTN and GPTQ, the
torch path and the Triton kernels (interpreter on CPU) against a direct computation, and a packed 1-bit layer."""

from __future__ import annotations

import pytest
import torch

from moecompress.kernels.layout import PackedLinearWeight, pack_signed, unpack_signed
from moecompress.kernels.reference import moe_experts_reference, packed_linear_reference
from moecompress.kernels.triton_gemm import packed_linear_triton
from moecompress.kernels.triton_moe import PackedExpertStack, moe_experts_triton
from moecompress.quantization.gptq import gptq_quantize
from moecompress.quantization.packing import quantize_rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sign_times_mean_abs(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reference code's binary quantiser, written directly: per row-group ``sign(W) * mean|W|`` (sign(0) = +1)."""
    signs = torch.where(weight >= 0, 1.0, -1.0)
    scales = torch.cat([chunk.abs().mean(dim=1, keepdim=True).expand_as(chunk)
                        for chunk in weight.split(group_size, dim=1)], dim=1)
    return signs * scales


def test_signed_values_are_plus_and_minus_one_and_round_trip():
    values = torch.where(torch.rand(5, 77) > 0.5, 1, -1)
    packed = pack_signed(values, 1)
    assert packed.shape == (5, 3)  # 77 bits in three 32-bit words
    assert torch.equal(unpack_signed(packed, 1, 77).long(), values)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack_signed(torch.zeros(2, 4, dtype=torch.long), 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_is_sign_times_group_mean_abs(symmetric, group_size):
    weight = torch.randn(6, 70, generator=torch.Generator().manual_seed(1))  # 70: two groups of 32 and a short one
    packed = quantize_rtn(weight, 1, group_size, symmetric)
    expected = sign_times_mean_abs(weight, 70 if group_size <= 0 else group_size)
    torch.testing.assert_close(packed.dequantize(torch.float32), expected, rtol=0, atol=1e-6)
    assert packed.symmetric == symmetric
    if not symmetric:
        assert bool((packed.zeros == 0).all())
    state = packed.to_compressed_tensors()
    assert "weight_zero_point" not in state  # 1 bit: the zero point is always 0
    again = PackedLinearWeight.from_compressed_tensors(state, 1, group_size)
    torch.testing.assert_close(again.dequantize(torch.float32), expected, rtol=0, atol=1e-6)


def test_gptq_at_one_bit_beats_rtn_on_its_hessian():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 64, generator=generator)
    inputs = torch.randn(256, 64, generator=generator) @ torch.randn(64, 64, generator=generator)  # correlated
    hessian = inputs.T @ inputs
    result = gptq_quantize(weight, hessian, 1, group_size=32)
    assert set(result.packed.codes().unique().tolist()) == {-1, 1}

    def output_error(dequantised):
        delta = weight - dequantised
        return float(torch.trace(delta @ hessian @ delta.T))

    rtn = quantize_rtn(weight, 1, 32).dequantize(torch.float32)
    assert output_error(result.packed.dequantize(torch.float32)) < output_error(rtn)


@pytest.mark.parametrize("rows,group_size,symmetric", [(1, 32, True), (5, 24, False), (16, 64, True)])
def test_triton_linear_at_one_bit_matches_the_torch_path(rows, group_size, symmetric):
    generator = torch.Generator().manual_seed(rows)
    weight = quantize_rtn(torch.randn(40, 96, generator=generator), 1, group_size, symmetric).to(DEVICE)
    x = torch.randn(rows, 96, generator=generator).to(DEVICE)
    torch.testing.assert_close(packed_linear_triton(x, weight), packed_linear_reference(x, weight), atol=1e-4, rtol=1e-4)


def test_grouped_moe_with_one_bit_experts_matches_the_torch_path():
    num_experts, hidden, intermediate, group_size = 4, 64, 48, 32
    bits_per_expert = [1, 2, 1, 4]
    generator = torch.Generator().manual_seed(3)
    gate_up = [torch.randn(2 * intermediate, hidden, generator=generator) * 0.2 for _ in range(num_experts)]
    down = [torch.randn(hidden, intermediate, generator=generator) * 0.2 for _ in range(num_experts)]

    def stacks(weights):
        result = []
        for width in sorted(set(bits_per_expert)):
            members = [e for e, b in enumerate(bits_per_expert) if b == width]
            slot = torch.full((num_experts,), -1, dtype=torch.int32)
            slot[members] = torch.arange(len(members), dtype=torch.int32)
            stacked = quantize_rtn(torch.stack([weights[e] for e in members]), width, group_size)
            result.append(PackedExpertStack(stacked.to(DEVICE), slot.to(DEVICE)))
        return result

    hidden_states = torch.randn(6, hidden, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:2] for _ in range(6)])
    top_k_weights = torch.rand(6, 2, generator=generator)
    out = moe_experts_triton(hidden_states.to(DEVICE), top_k_index.to(DEVICE), top_k_weights.to(DEVICE),
                             stacks(gate_up), stacks(down), num_experts, intermediate)
    expected = moe_experts_reference(
        hidden_states, top_k_index, top_k_weights,
        [quantize_rtn(w, b, group_size) for w, b in zip(gate_up, bits_per_expert)],
        [quantize_rtn(w, b, group_size) for w, b in zip(down, bits_per_expert)])
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
