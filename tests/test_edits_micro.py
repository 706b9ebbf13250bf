"""Micro-expert edits: zeroing a channel removes exactly that channel's term from the expert output; slicing a
layer's channels equals zeroing the complement in every expert; uniform slices save and reload."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_family_params

from moecompress.models import EditError, adapter_for, find_moe_blocks, slice_micro_experts, zero_micro_experts
from moecompress.models.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
KEPT_CHANNELS = [0, 2, 3, 7, 8, 11, 12, 15]


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("model_type", tiny_family_params())
def test_zeroed_channels_drop_their_down_projection_terms(model_type):
    model = tiny_model(model_type)
    view = find_moe_blocks(model)[0]
    hidden = torch.randn(10, view.hidden_size, generator=torch.Generator().manual_seed(1))
    zeroed = {1: [0, 5, 9], 6: [15]}
    expected = {}
    with torch.no_grad():
        for expert, channels in zeroed.items():
            intermediate = view.expert_intermediate(expert, hidden)  # [n, I] before the edit
            intermediate[:, channels] = 0.0
            weights = view.expert_weights(expert)
            expected[expert] = torch.nn.functional.linear(intermediate, weights.down, weights.down_bias)
        untouched = view.expert_forward(2, hidden)
    zero_micro_experts(model, {view.layer_index: zeroed})
    view = find_moe_blocks(model)[0]
    with torch.no_grad():
        for expert, reference in expected.items():
            torch.testing.assert_close(view.expert_forward(expert, hidden), reference, rtol=1e-5, atol=1e-5)
            assert torch.all(view.expert_weights(expert).gate[zeroed[expert]] == 0)
            assert torch.all(view.expert_weights(expert).down[:, zeroed[expert]] == 0)
        torch.testing.assert_close(view.expert_forward(2, hidden), untouched)


@pytest.mark.parametrize("model_type", tiny_family_params())
def test_slicing_equals_zeroing_the_complement(model_type, tmp_path):
    model = tiny_model(model_type)
    layers = [view.layer_index for view in find_moe_blocks(model)]
    dropped = [c for c in range(16) if c not in KEPT_CHANNELS]
    zero_micro_experts(model, {layer: {e: dropped for e in range(8)} for layer in layers})
    reference = _logits(model)
    model = tiny_model(model_type)
    slice_micro_experts(model, {layer: KEPT_CHANNELS for layer in layers})
    assert all(view.intermediate_size == len(KEPT_CHANNELS) for view in find_moe_blocks(model))
    sliced = _logits(model)
    torch.testing.assert_close(sliced, reference, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    if adapter_for(model.config).intermediate_field_shared:
        # moe_intermediate_size also sizes DeepSeek's (and its copies') shared experts, so the config cannot say "8": recorded, and
        # a plain reload refuses the checkpoint instead of loading wrong shapes.
        assert model.config.moecompress["expert_intermediate_size_per_layer"] == {str(l): 8 for l in layers}
        with pytest.raises(RuntimeError, match="mismatch"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    else:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float32, experts_implementation="eager"
        )
        torch.testing.assert_close(_logits(reloaded.eval()), sliced, rtol=1e-5, atol=1e-5)


def test_bad_micro_requests_are_refused():
    model = tiny_model("qwen3_moe")
    with pytest.raises(EditError, match="0..15"):
        slice_micro_experts(model, {0: [0, 16]})
    with pytest.raises(EditError, match="zero channels"):
        slice_micro_experts(model, {0: []})
    with pytest.raises(EditError, match="expert 9"):
        zero_micro_experts(model, {0: {9: [0]}})
