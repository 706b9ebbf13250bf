"""CAMERA-Q: the solved group shares meet the average and favour high energies, the channel permutation keeps the
function, segments lie on group boundaries, and the stage quantises each segment at its width into segment-packed
experts that compute what the written-back weights compute and save/reload in the native format."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.checkpoint import save_model
from moecompress.kernels.variable_width import SegmentedPackedExperts
from moecompress.models import find_moe_blocks
from moecompress.models.tiny import tiny_config, tiny_model_from_config
from moecompress.pipeline import RunContext
from moecompress.quantization.camera_q import (
    CameraQuantization,
    expert_segments,
    permute_expert_channels,
    quantize_layer_segments,
    solve_channel_bits,
)
from moecompress.quantization.gptq import gptq_quantize, gptq_quantize_mixed

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))


def _wide_mixtral(width=64):
    config = tiny_config("mixtral")
    config.intermediate_size = width
    return tiny_model_from_config(config)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_solved_widths_meet_the_average_and_give_more_bits_to_more_energy():
    energies = torch.rand(400, generator=torch.Generator().manual_seed(0)) ** 4
    pinned = torch.zeros(400, dtype=torch.bool)
    pinned[:10] = True
    for average in (2.25, 2.5, 3.0):
        bits = solve_channel_bits(energies, [4, 3, 2], average, pinned=pinned, buckets=20)
        assert float(bits.float().mean()) <= average + 1e-9
        assert float(bits.float().mean()) > average - 0.1  # the budget is used
        assert torch.all(bits[:10] == 4)
        free = torch.arange(10, 400)
        order = free[torch.argsort(energies[free], descending=True)]
        assert torch.all(bits[order][1:] <= bits[order][:-1])  # non-increasing with energy
    capped = solve_channel_bits(energies, [4, 3, 2], 3.0, buckets=20, max_lo_share=0.1)
    assert int((capped == 2).sum()) <= 40


def test_segments_lie_on_group_boundaries_and_cover_the_expert():
    channel_bits = torch.tensor([4] * 20 + [3] * 30 + [2] * 14)
    energies = torch.linspace(1, 0, 64)
    order, widths = expert_segments(channel_bits, energies, [4, 3, 2], group_size=16)
    assert widths == [16, 32, 16] and torch.equal(order, torch.arange(64))


def test_permuting_an_experts_channels_keeps_the_function():
    model = _wide_mixtral()
    reference = _logits(model)
    for view in find_moe_blocks(model):
        for expert in range(view.num_experts):
            permute_expert_channels(view, expert, torch.randperm(64, generator=torch.Generator().manual_seed(expert)))
    torch.testing.assert_close(_logits(model), reference, rtol=1e-5, atol=1e-5)


def test_stage_quantises_each_segment_at_its_width_and_reloads(tmp_path):
    model = _wide_mixtral()
    stage = CameraQuantization({"avg_bits": 3.0, "bits": [4, 3, 2], "group_size": 16})
    context = RunContext(model=model, tokenizer=None, source="tiny", output_dir=tmp_path, calibration=CALIBRATION,
                         batch_size=4)
    result = stage.run(context)
    assert 2.5 <= result.metrics["mean_effective_avg_bits"] <= 3.5
    views = find_moe_blocks(model)
    assert all(isinstance(view.experts, SegmentedPackedExperts) for view in views)
    used = set()
    for view in views:
        for expert in range(view.num_experts):
            widths = view.experts.widths[expert]
            assert sum(widths) == 64 and all(w % 16 == 0 for w in widths[:2])
            for segment, bits in enumerate([4, 3, 2]):
                pair = view.experts.segment(expert, segment)
                if pair is None:
                    continue
                used.add(bits)
                codes = pair[0].codes()
                assert int(codes.max()) <= 2 ** (bits - 1) - 1 and int(codes.min()) >= -(2 ** (bits - 1))
    assert len(used) >= 2  # the layer really mixes widths
    # the packed module computes the view's (dequantised) reference forward
    hidden = torch.randn(10, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(views[0].experts(hidden, torch.tensor([[0, 3]] * 10), torch.full((10, 2), 0.5)),
                                   0.5 * (views[0].expert_forward(0, hidden) + views[0].expert_forward(3, hidden)),
                                   rtol=1e-4, atol=1e-5)
    expected = _logits(model)
    folder = tmp_path / "saved"
    folder.mkdir()
    save_model(model, None, folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(find_moe_blocks(reloaded)[0].experts, SegmentedPackedExperts)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_bad_options_fail_with_a_fix():
    with pytest.raises(ValueError, match="highest first"):
        CameraQuantization({"avg_bits": 2.5, "bits": [2, 3, 4]})
    with pytest.raises(ValueError, match="cannot be packed"):
        CameraQuantization({"avg_bits": 2.25, "bits": [5, 3, 2]})
    with pytest.raises(ValueError, match="between"):
        CameraQuantization({"avg_bits": 5, "bits": [4, 3, 2]})


class _FixedStatistics:
    """A stand-in for the layer replay: returns fixed per-expert Hessians and token counts for one layer."""

    def __init__(self, layer, statistics):
        self.layer, self.statistics = layer, statistics

    def collect(self, names, options=None):
        return {self.layer: {name: self.statistics[name] for name in names}}


def _hessians(count, size, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 4 * size, size, generator=generator) @ torch.randn(size, size, generator=generator)
    return inputs.transpose(1, 2) @ inputs


@pytest.mark.parametrize("down_sweep", ["joint", "segments"])
def test_down_projection_is_one_mixed_sweep_or_one_gptq_per_segment(down_sweep):
    """joint: each expert's W_down is exactly gptq_quantize_mixed over the whole matrix with its segments' widths;
    segments (preset camera_spec): each segment is gptq_quantize of its columns on its diagonal Hessian block."""
    model = _wide_mixtral()
    view = find_moe_blocks(model)[0]
    original_down = view.experts.down_proj.data.clone()
    statistics = {"expert_input_hessian": _hessians(view.num_experts, 32, 0),
                  "down_proj_hessian": _hessians(view.num_experts, 64, 1),
                  "expert_token_counts": torch.full((view.num_experts,), 100)}
    segments = {expert: [16, 32, 16] for expert in range(view.num_experts)}
    packed = quantize_layer_segments(view, _FixedStatistics(view.layer_index, statistics), segments, [4, 3, 2], 16,
                                     0.01, down_sweep=down_sweep, scale_search="mse")
    for expert in (0, 3):
        weight, hessian = original_down[expert].float(), statistics["down_proj_hessian"][expert]
        if down_sweep == "joint":
            expected = gptq_quantize_mixed(weight, hessian, [4, 3, 3, 2], group_size=16, scale_search="mse",
                                           scale_dtype=torch.float32).dequantize()
        else:
            expected = torch.cat([gptq_quantize(weight[:, a:b], hessian[a:b, a:b], bits, group_size=16,
                                                scale_search="mse").packed.dequantize(torch.float32)
                                  for a, b, bits in ((0, 16, 4), (16, 48, 3), (48, 64, 2))], dim=1)
        got = torch.cat([pair[1].dequantize(torch.float32) for pair in packed[expert]], dim=1)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(view.experts.down_proj.data[expert].float(), expected)
        assert [pair[1].bits for pair in packed[expert]] == [4, 3, 2]


def test_camera_spec_preset_fixes_the_spec_recipe():
    stage = CameraQuantization({"avg_bits": 2.5, "preset": "camera_spec"})
    assert (stage.options.down_sweep, stage.options.scale_search) == ("segments", "minmax")
    default = CameraQuantization({"avg_bits": 2.5})
    assert (default.options.down_sweep, default.options.scale_search) == ("joint", "mse")
    with pytest.raises(ValueError, match="preset 'camera_spec' fixes"):
        CameraQuantization({"avg_bits": 2.5, "preset": "camera_spec", "down_sweep": "joint"})
