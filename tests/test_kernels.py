"""Packed Triton kernels (interpreter mode on CPU) against the torch reference path, and the experts backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecompress.kernels.reference import moe_experts_reference, packed_linear_reference
from moecompress.kernels.runtime import is_missing_driver_error, triton_available
from moecompress.kernels.triton_gemm import packed_linear_triton
from moecompress.kernels.triton_moe import PackedExpertStack, align_pairs_by_expert, moe_experts_triton
from moecompress.quantization.packing import quantize_rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _kernels_can_run():
    # A failure, not a skip: conftest sets TRITON_INTERPRET=1 without a GPU, so kernels must run everywhere tests do.
    if not triton_available(DEVICE):
        pytest.fail("Triton kernels cannot run here: need a GPU, or TRITON_INTERPRET=1 set before kernel imports")


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=1.5e-1, rtol=2e-2)}[dtype]


# bits x M (1..64) with group sizes and symmetry cycling: the per-block-scale path (group multiple of the K block),
# the per-element-scale path (group 24, per-channel on K = 70) and odd N/K all meet every bit-width.
GEMM_CASES = [
    (bits, rows, *shape)
    for bits in (2, 3, 4, 8)
    for rows, shape in zip(
        (1, 5, 16, 64),
        ((45, 96, 32, True), (33, 72, 24, False), (64, 70, -1, False), (50, 128, 64, True)),
    )
]


@pytest.mark.parametrize("bits,rows,out_features,in_features,group_size,symmetric", GEMM_CASES)
def test_packed_linear_matches_reference(bits, rows, out_features, in_features, group_size, symmetric) -> None:
    generator = torch.Generator().manual_seed(bits * 100 + rows)
    weight = quantize_rtn(torch.randn(out_features, in_features, generator=generator), bits, group_size, symmetric)
    x = torch.randn(rows, in_features, generator=generator)
    weight, x = weight.to(DEVICE), x.to(DEVICE)
    torch.testing.assert_close(packed_linear_triton(x, weight), packed_linear_reference(x, weight), **_tolerance(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16])
def test_packed_linear_half_precision_activations(dtype, rows) -> None:
    generator = torch.Generator().manual_seed(7)
    weight = quantize_rtn(torch.randn(40, 128, generator=generator).to(dtype), 4, 64, symmetric=False).to(DEVICE)
    x = torch.randn(rows, 128, generator=generator).to(dtype).to(DEVICE)
    out = packed_linear_triton(x, weight)
    assert out.dtype == dtype and out.shape == (rows, 40)
    torch.testing.assert_close(out.float(), packed_linear_reference(x, weight).float(), **_tolerance(dtype))


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4},
    {"BLOCK_M": 4, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3},
])
def test_packed_linear_tilings_agree(config) -> None:
    """Split-K (atomics), GEMV and tensor-core tiles, with K blocks smaller than a group: same numbers."""
    generator = torch.Generator().manual_seed(3)
    weight = quantize_rtn(torch.randn(37, 200, generator=generator), 3, 64, symmetric=True).to(DEVICE)
    x = torch.randn(3, 200, generator=generator).to(DEVICE)
    torch.testing.assert_close(packed_linear_triton(x, weight, config), packed_linear_reference(x, weight),
                               atol=1e-4, rtol=1e-4)


def test_packed_linear_rejects_wrong_width() -> None:
    weight = quantize_rtn(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError, match="input features"):
        packed_linear_triton(torch.randn(2, 32), weight)


def test_alignment_groups_every_pair_once_by_expert() -> None:
    top_k_index = torch.tensor([[0, 3], [3, 1], [0, 3], [5, -1], [9, 3]])  # -1 and 9: not local experts (E=6)
    alignment = align_pairs_by_expert(top_k_index, num_experts=6, block_m=4)
    flat = top_k_index.reshape(-1)
    ids = alignment.sorted_pair_ids.view(-1, 4)
    seen = []
    for block, expert in enumerate(alignment.block_expert.tolist()):
        real = [p for p in ids[block].tolist() if p < alignment.num_pairs]
        if expert < 0:
            assert real == []
            continue
        assert all(int(flat[p]) == expert for p in real)
        seen += real
    expected = [p for p in range(flat.numel()) if 0 <= int(flat[p]) < 6]
    assert sorted(seen) == expected


def _expert_weights(num_experts, hidden, intermediate, seed):
    generator = torch.Generator().manual_seed(seed)
    gate_up = [torch.randn(2 * intermediate, hidden, generator=generator) * 0.2 for _ in range(num_experts)]
    down = [torch.randn(hidden, intermediate, generator=generator) * 0.2 for _ in range(num_experts)]
    return gate_up, down


def _stacks(weights, bits_per_expert, group_size, symmetric):
    stacks = []
    for width in sorted(set(bits_per_expert)):
        members = [e for e, b in enumerate(bits_per_expert) if b == width]
        slot = torch.full((len(bits_per_expert),), -1, dtype=torch.int32)
        slot[members] = torch.arange(len(members), dtype=torch.int32)
        stacked = quantize_rtn(torch.stack([weights[e] for e in members]), width, group_size, symmetric)
        stacks.append(PackedExpertStack(stacked.to(DEVICE), slot.to(DEVICE)))
    return stacks


@pytest.mark.parametrize("tokens,block_m,symmetric", [(1, None, True), (3, None, False), (12, 16, True), (20, 16, False)])
def test_grouped_moe_mixed_bits_matches_reference(tokens, block_m, symmetric) -> None:
    """One layer whose experts have 2, 3, 4 and 8 bits; decode (one pair per block) and aligned tensor-core blocks."""
    num_experts, hidden, intermediate, top_k, group_size = 6, 64, 48, 2, 32
    bits_per_expert = [4, 3, 2, 8, 4, 3]
    gate_up, down = _expert_weights(num_experts, hidden, intermediate, seed=tokens)
    generator = torch.Generator().manual_seed(tokens)
    hidden_states = torch.randn(tokens, hidden, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, top_k, generator=generator)
    out = moe_experts_triton(
        hidden_states.to(DEVICE), top_k_index.to(DEVICE), top_k_weights.to(DEVICE),
        _stacks(gate_up, bits_per_expert, group_size, symmetric), _stacks(down, bits_per_expert, group_size, symmetric),
        num_experts, intermediate, block_m=block_m,
    )
    per_expert_gate_up = [quantize_rtn(w, b, group_size, symmetric) for w, b in zip(gate_up, bits_per_expert)]
    per_expert_down = [quantize_rtn(w, b, group_size, symmetric) for w, b in zip(down, bits_per_expert)]
    expected = moe_experts_reference(hidden_states, top_k_index, top_k_weights, per_expert_gate_up, per_expert_down)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_grouped_moe_unfused_activation_and_sentinels() -> None:
    """A non-SiLU activation runs unfused; expert ids outside [0, E) (expert parallel) contribute nothing."""
    num_experts, hidden, intermediate = 4, 32, 40
    gate_up, down = _expert_weights(num_experts, hidden, intermediate, seed=11)
    hidden_states = torch.randn(3, hidden)
    top_k_index = torch.tensor([[0, 4], [2, 1], [-1, 3]])
    top_k_weights = torch.rand(3, 2)

    def gelu_glu(gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return F.gelu(gate) * up

    bits_per_expert = [4] * num_experts
    out = moe_experts_triton(
        hidden_states.to(DEVICE), top_k_index.to(DEVICE), top_k_weights.to(DEVICE),
        _stacks(gate_up, bits_per_expert, 16, True), _stacks(down, bits_per_expert, 16, True),
        num_experts, intermediate, fuse_silu_glu=False, apply_gate=gelu_glu,
    )
    expected = moe_experts_reference(
        hidden_states, top_k_index, top_k_weights,
        [quantize_rtn(w, 4, 16) for w in gate_up], [quantize_rtn(w, 4, 16) for w in down], gelu_glu,
    )
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_missing_driver_error_is_recognised() -> None:
    assert is_missing_driver_error(RuntimeError("0 active drivers ([]). There should only be one."))
    assert not is_missing_driver_error(RuntimeError("shape mismatch"))
    assert not triton_available("meta")
