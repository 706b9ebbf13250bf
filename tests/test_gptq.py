"""GPTQ on one matrix against a direct, unblocked reference (the OBS update with an explicit inverse Hessian), and
GPTQ with a bit width per column group (one sweep) against the same reference and against plain GPTQ."""

from __future__ import annotations

import pytest
import torch

from moecompress.quantization.gptq import gptq_quantize, gptq_quantize_mixed, hessian_weighted_error
from moecompress.quantization.packing import quantization_params, quantize_rtn, quantize_values


def _correlated_problem(out_features: int, in_features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features ** 0.5
    inputs = torch.randn(4 * in_features, in_features, generator=generator) @ mixing  # correlated features
    weight = torch.randn(out_features, in_features, generator=generator)
    return weight, inputs.T @ inputs


def _reference_gptq(weight, hessian, bits, group_size, symmetric, damp=0.01):
    """Column by column: quantise, then ``w_j -= (w_i - q_i) / Hinv_ii * Hinv_ij`` and remove column i from the inverse
    Hessian (the Schur complement), all in float64, no blocks, no Cholesky. Group scales are taken from the current
    (error-updated) weights at each group's first column. ``bits``: one width, or a list with one per group."""
    weight = weight.double().clone()
    hessian = hessian.double().clone()
    in_features = weight.shape[1]
    hessian += damp * hessian.diagonal().mean() * torch.eye(in_features, dtype=torch.float64)
    inverse = torch.linalg.inv(hessian)
    width = in_features if group_size <= 0 else group_size
    quantised = torch.zeros_like(weight)
    scales = zeros = None
    for column in range(in_features):
        column_bits = bits[column // width] if isinstance(bits, list) else bits
        if column % width == 0:
            group = weight[:, column:column + width]
            scales, zeros = quantization_params(group.amin(-1), group.amax(-1), column_bits, symmetric, torch.float32)
            scales = scales.double()
            zeros = None if zeros is None else zeros.double()
        codes = quantize_values(weight[:, column], scales, zeros, column_bits).double()
        quantised[:, column] = (codes - (0 if zeros is None else zeros)) * scales
        error = (weight[:, column] - quantised[:, column]) / inverse[column, column]
        weight[:, column:] -= error[:, None] * inverse[column, column:][None, :]
        inverse = inverse - inverse[:, column:column + 1] @ inverse[column:column + 1, :] / inverse[column, column]
    return quantised


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1, 48])  # 48 does not divide 100: a ragged last group
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_matches_the_unblocked_reference(bits, group_size, symmetric):
    weight, hessian = _correlated_problem(12, 100, seed=bits + group_size)
    ours = gptq_quantize(weight, hessian, bits, group_size=group_size, symmetric=symmetric, block_size=64)
    reference = _reference_gptq(weight, hessian, bits, group_size, symmetric)
    dequantised = ours.packed.dequantize(torch.float32).double()
    same = (dequantised - reference).abs() < 1e-4
    # fp32 against fp64: a value sitting on a rounding boundary may round the other way (then the rest of the row
    # follows a different but equally valid path); nearly every weight must agree
    assert same.float().mean() > 0.9
    reference_error = hessian_weighted_error(weight, reference.float(), hessian)
    assert ours.relative_error == pytest.approx(reference_error, rel=0.05)


def test_a_diagonal_hessian_gives_round_to_nearest():
    """No correlation between inputs means no error to propagate: GPTQ is then exactly RTN."""
    weight, _ = _correlated_problem(8, 64, seed=1)
    hessian = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.1)
    for group_size in (32, -1):
        ours = gptq_quantize(weight, hessian, 3, group_size=group_size)
        assert torch.equal(ours.packed.packed, quantize_rtn(weight, 3, group_size).packed)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_loses_much_less_output_energy_than_rtn(bits, act_order):
    weight, hessian = _correlated_problem(32, 128, seed=bits)
    ours = gptq_quantize(weight, hessian, bits, group_size=32, act_order=act_order)
    rtn_error = hessian_weighted_error(weight, quantize_rtn(weight, bits, 32).dequantize(torch.float32), hessian)
    assert ours.relative_error < 0.75 * rtn_error


def test_act_order_keeps_each_group_a_run_of_contiguous_columns():
    """With act-order the sweep visits columns out of order, but every group's scale must still describe the
    contiguous columns it covers in the saved format: dequantising reproduces what the sweep used."""
    weight, hessian = _correlated_problem(16, 96, seed=7)
    ours = gptq_quantize(weight, hessian, 4, group_size=32, act_order=True)
    recomputed = hessian_weighted_error(weight, ours.packed.dequantize(torch.float32), hessian)
    assert recomputed == pytest.approx(ours.relative_error)
    # static groups: the scales are RTN's scales of the original weight
    assert torch.equal(ours.packed.scales, quantize_rtn(weight, 4, 32).scales)


def test_a_stack_is_quantised_like_each_matrix_alone():
    stack = [_correlated_problem(8, 64, seed=seed) for seed in range(3)]
    weights = torch.stack([w for w, _ in stack])
    hessians = torch.stack([h for _, h in stack])
    damps = torch.tensor([0.01, 0.1, 0.5])
    together = gptq_quantize(weights, hessians, 3, group_size=32, damp=damps)
    for index in range(3):
        alone = gptq_quantize(weights[index], hessians[index], 3, group_size=32, damp=float(damps[index]))
        assert torch.equal(together.packed.packed[index], alone.packed.packed)
        assert torch.equal(together.packed.scales[index], alone.packed.scales)


def test_dead_inputs_and_a_singular_hessian_stay_finite():
    weight, _ = _correlated_problem(8, 64, seed=3)
    inputs = torch.randn(5, 64)  # 5 tokens: rank 5 of 64
    inputs[:, :10] = 0  # ten inputs never fire
    ours = gptq_quantize(weight, inputs.T @ inputs, 2, group_size=32, damp=0.0)
    assert torch.isfinite(ours.packed.scales).all()
    assert torch.isfinite(ours.packed.dequantize(torch.float32)).all()
    assert ours.damp > 0  # a singular Hessian needs damping: it was raised


def test_a_hessian_with_nan_is_an_error():
    weight, hessian = _correlated_problem(4, 32, seed=5)
    hessian[3, 3] = float("nan")
    with pytest.raises(ValueError, match="could not be factorised"):
        gptq_quantize(weight, hessian, 4, group_size=32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale_search", ["minmax", "mse"])
def test_one_width_for_every_group_is_plain_gptq(bits, scale_search):
    weight, hessian = _correlated_problem(12, 96, seed=bits)
    plain = gptq_quantize(weight, hessian, bits, group_size=16, scale_search=scale_search)
    mixed = gptq_quantize_mixed(weight, hessian, [bits] * 6, group_size=16, scale_search=scale_search)
    assert torch.equal(mixed.packed_columns(0, 96).packed, plain.packed.packed)
    assert torch.equal(mixed.packed_columns(0, 96).scales, plain.packed.scales)
    assert mixed.relative_error == pytest.approx(plain.relative_error)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mixed_widths_match_the_unblocked_reference(symmetric):
    """Groups of 16 at 4, 4, 3, 3, 2, 2 (+ a ragged last group at 2): the blocked sweep against the float64 OBS
    reference run with the same width per group."""
    weight, hessian = _correlated_problem(12, 100, seed=11)
    group_bits = [4, 4, 3, 3, 2, 2, 2]
    mixed = gptq_quantize_mixed(weight, hessian, group_bits, group_size=16, symmetric=symmetric, block_size=32)
    reference = _reference_gptq(weight, hessian, group_bits, 16, symmetric)
    same = (mixed.dequantize().double() - reference).abs() < 1e-4
    assert same.float().mean() > 0.9
    reference_error = hessian_weighted_error(weight, reference.float(), hessian)
    assert mixed.relative_error == pytest.approx(reference_error, rel=0.05)
    codes = mixed.codes
    for group, bits in enumerate(group_bits):  # every group's codes lie in its own width's range
        columns = codes[:, 16 * group:16 * (group + 1)]
        assert int(columns.max()) <= 2 ** (bits - 1) - 1 and int(columns.min()) >= -(2 ** (bits - 1))


def test_packed_segments_reassemble_the_matrix_and_refuse_mixed_runs():
    weight, hessian = _correlated_problem(8, 80, seed=4)
    mixed = gptq_quantize_mixed(weight, hessian, [4, 3, 3, 2, 2], group_size=16)
    parts = [mixed.packed_columns(0, 16), mixed.packed_columns(16, 48), mixed.packed_columns(48, 80)]
    assert [part.bits for part in parts] == [4, 3, 2]
    assert torch.equal(torch.cat([part.dequantize(torch.float32) for part in parts], dim=1), mixed.dequantize())
    with pytest.raises(ValueError, match="several widths"):
        mixed.packed_columns(0, 32)
    with pytest.raises(ValueError, match="whole groups"):
        mixed.packed_columns(8, 32)


def test_one_sweep_loses_less_than_quantising_segments_apart():
    """The CAMERA-Q case: a matrix whose input columns are cut into segments of different widths. Quantising each
    segment alone (its diagonal block of H) never compensates one segment's error in the others; one sweep does."""
    segments = [(0, 32, 4), (32, 64, 3), (64, 96, 2)]
    joint_total = apart_total = 0.0
    for seed in range(5):
        weight, hessian = _correlated_problem(32, 96, seed=seed)
        joint = gptq_quantize_mixed(weight, hessian, [4, 4, 3, 3, 2, 2], group_size=16).relative_error
        apart = torch.cat([gptq_quantize(weight[:, a:b], hessian[a:b, a:b], bits, group_size=16).packed.dequantize(
            torch.float32) for a, b, bits in segments], dim=1)
        apart = hessian_weighted_error(weight, apart, hessian)
        assert joint < apart
        joint_total, apart_total = joint_total + joint, apart_total + apart
    assert joint_total < 0.97 * apart_total
