"""The uniform view still sees MoE blocks after their experts were packed (quantized)."""

from __future__ import annotations

import torch
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks
from moecompress.quantization.packing import pack_model_experts


def test_view_of_packed_experts_matches_the_packed_block(testbed):
    model, _ = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    float_views = find_moe_blocks(model)
    float_weights = float_views[2].expert_weights(5)
    pack_model_experts(model, bits=8, group_size=64)
    model.set_experts_implementation("eager")  # torch reference path of the packed experts

    views = find_moe_blocks(model)
    assert [view.storage for view in views] == ["packed"] * len(float_views)
    assert [view.num_experts for view in views] == [view.num_experts for view in float_views]
    assert views[2].intermediate_size == float_views[2].intermediate_size

    # Canonical weights are the dequantised packed weights: close to the float ones at 8 bits.
    packed_weights = views[2].expert_weights(5)
    for name in ("gate", "up", "down"):
        original, dequantised = getattr(float_weights, name), getattr(packed_weights, name)
        assert dequantised.shape == original.shape
        assert (dequantised - original).norm() / original.norm() < 0.02

    # Our block forward from the view equals the packed HF block.
    hidden = torch.randn(19, views[2].hidden_size)
    expected = views[2].block(hidden[None])[0]
    assert torch.allclose(views[2].forward(hidden), expected, atol=1e-5, rtol=1e-4)
