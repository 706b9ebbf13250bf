"""MSE scale search (``scale_search: mse``): each group's clipping against a per-group brute force, never worse than
min/max scales, the same in RTN and in GPTQ where GPTQ has nothing to propagate, and on a test-bed model."""

from __future__ import annotations

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.calibration import load_calibration
from moecompress.checkpoint import load_model
from moecompress.errors import RecipeError
from moecompress.quantization.gptq import gptq_quantize, hessian_weighted_error
from moecompress.quantization.packing import (
    MSE_GRID,
    MSE_MAX_SHRINK,
    MSE_NORM,
    quantization_params,
    quantize_rtn,
    quantize_values,
)
from moecompress.quantization.sequential import QuantizationSettings, quantize_model


def _heavy_tailed(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Student-t weights: a few large values per group, as trained weights have."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(out_features, in_features, generator=generator)
    chi = torch.randn(out_features, in_features, 4, generator=generator).pow(2).mean(-1)
    return normal / chi.sqrt()


def _group_errors(weight: torch.Tensor, packed, group_size: int) -> torch.Tensor:
    """``sum |w - q|^MSE_NORM`` per (row, group) ``[out, groups]``."""
    delta = (weight - packed.dequantize(torch.float32)).abs().pow(MSE_NORM)
    return delta.reshape(weight.shape[0], -1, group_size).sum(-1)


def _brute_force_scales(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Each group on its own, every shrink of the grid tried in turn, the first smallest error kept."""
    scales = torch.zeros(weight.shape[0], weight.shape[1] // group_size)
    for row in range(weight.shape[0]):
        for group in range(scales.shape[1]):
            values = weight[row, group * group_size:(group + 1) * group_size]
            best = None
            for step in range(int(MSE_MAX_SHRINK * MSE_GRID)):
                shrink = 1.0 - step / MSE_GRID
                scale, zero = quantization_params(values.min() * shrink, values.max() * shrink, bits, symmetric,
                                                  torch.float32)
                codes = quantize_values(values, scale, zero, bits)
                error = float((values - (codes - (0 if zero is None else zero)) * scale).abs().pow(MSE_NORM).sum())
                if best is None or error < best[0]:
                    best = (error, float(scale))
            scales[row, group] = best[1]
    return scales


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_scales_equal_a_per_group_brute_force(bits, symmetric):
    weight = _heavy_tailed(6, 64, seed=bits)
    packed = quantize_rtn(weight, bits, group_size=32, symmetric=symmetric, scale_search="mse")
    assert torch.equal(packed.scales, _brute_force_scales(weight, bits, 32, symmetric))


@pytest.mark.parametrize("bits, least_gain", [(2, 0.25), (3, 0.15), (4, 0.05)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_scales_never_lose_to_minmax_and_gain_most_at_low_bits(bits, least_gain, symmetric):
    weight = _heavy_tailed(64, 256, seed=10 + bits)
    minmax = _group_errors(weight, quantize_rtn(weight, bits, 128, symmetric), 128)
    searched = _group_errors(weight, quantize_rtn(weight, bits, 128, symmetric, scale_search="mse"), 128)
    assert bool((searched <= minmax).all())  # min/max is the first candidate of the search
    assert float(searched.sum()) < (1 - least_gain) * float(minmax.sum())


def test_minmax_is_the_default_and_one_bit_has_nothing_to_search():
    weight = _heavy_tailed(8, 64, seed=3)
    assert torch.equal(quantize_rtn(weight, 3, 32).packed, quantize_rtn(weight, 3, 32, scale_search="minmax").packed)
    one_bit = quantize_rtn(weight, 1, 32, scale_search="mse")  # mean|w| already minimises the squared error
    assert torch.equal(one_bit.scales, quantize_rtn(weight, 1, 32).scales)
    with pytest.raises(ValueError, match="scale_search='l1' is not known"):
        quantize_rtn(weight, 3, 32, scale_search="l1")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_mse_rtn(act_order):
    """Nothing to propagate: GPTQ's group scales come from the original weights, so they equal RTN's searched ones."""
    weight = _heavy_tailed(8, 96, seed=5)
    hessian = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(6)) + 0.1)
    ours = gptq_quantize(weight, hessian, 2, group_size=32, act_order=act_order, scale_search="mse")
    rtn = quantize_rtn(weight, 2, 32, scale_search="mse")
    assert torch.equal(ours.packed.scales, rtn.scales)
    assert torch.equal(ours.packed.packed, rtn.packed)


def test_gptq_with_mse_scales_loses_less_output_energy_at_two_bits():
    generator = torch.Generator().manual_seed(7)
    mixing = torch.randn(128, 128, generator=generator) / 128 ** 0.5
    inputs = torch.randn(512, 128, generator=generator) @ mixing
    hessian = inputs.T @ inputs
    weight = _heavy_tailed(32, 128, seed=8)
    minmax = gptq_quantize(weight, hessian, 2, group_size=32)
    searched = gptq_quantize(weight, hessian, 2, group_size=32, scale_search="mse")
    assert searched.relative_error < 0.9 * minmax.relative_error
    recomputed = hessian_weighted_error(weight, searched.packed.dequantize(torch.float32), hessian)
    assert recomputed == pytest.approx(searched.relative_error)


def test_mse_gptq_on_a_testbed_model_is_closer_to_the_full_model(testbed, one_thread):
    def quantised(scale_search):
        model, tokenizer = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
        calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=64, seed=0)
        quantize_model(model, QuantizationSettings(method="gptq", bits=2, group_size=32, scale_search=scale_search),
                       calibration)
        return model, calibration

    full, tokenizer = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    held_out = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=64, seed=1).input_ids
    with torch.no_grad():
        reference = torch.log_softmax(full(held_out).logits, -1)

        def divergence(model):
            return float(torch.nn.functional.kl_div(torch.log_softmax(model(held_out).logits, -1), reference,
                                                    log_target=True, reduction="batchmean"))

        minmax, _ = quantised("minmax")
        searched, _ = quantised("mse")
        assert divergence(searched) < divergence(minmax)


def test_an_unknown_scale_search_is_a_one_line_recipe_error():
    from moecompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match="scale_search") as raised:
        parse_recipe({"stages": [{"method": "gptq", "scale_search": "l1"}]})
    assert "\n" not in str(raised.value)
    recipe = parse_recipe({"stages": [{"method": "rtn", "bits": 2, "scale_search": "mse"}]})
    assert recipe.stages[0].options.scale_search == "mse"
