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
    solve_channel_bits,
)

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
