"""Proof of semantics: for every supported family, our routing + expert computation (written from the uniform
view) reproduces the HF MoE block's output on a tiny random model, fp32, shared experts included."""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import UnsupportedModelError
from moecompress.models import find_moe_blocks, supported_families
from moecompress.models.tiny import tiny_families, tiny_model


def _hf_block_output(view, hidden_states: torch.Tensor) -> torch.Tensor:
    output = view.block(hidden_states)
    return output[0] if isinstance(output, tuple) else output  # GPT-OSS also returns its router scores


@pytest.mark.parametrize("model_type", tiny_families())
def test_view_forward_matches_hf_block(model_type):
    model = tiny_model(model_type)
    views = find_moe_blocks(model)
    assert views, model_type
    generator = torch.Generator().manual_seed(1)
    for view in views:
        hidden_states = torch.randn(2, 29, view.hidden_size, generator=generator)
        with torch.no_grad():
            reference = _hf_block_output(view, hidden_states)
            ours = view.forward(hidden_states.reshape(-1, view.hidden_size)).reshape(reference.shape)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", tiny_families())
def test_route_matches_hf_router_choices(model_type):
    """The uniform routing picks the same experts with the same weights as the family's router module."""
    model = tiny_model(model_type)
    view = find_moe_blocks(model)[0]
    hidden_states = torch.randn(41, view.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if view.family == "afmoe":  # takes [B, S, d] and the block's expert_bias
            router_output = view.router(hidden_states[None], getattr(view.block, view.selection_bias_name))
        elif view.selection_bias_owner is view.block:  # MiniMax-M2 / LFM2-MoE pass the block's bias into the router
            router_output = view.router(hidden_states, getattr(view.block, view.selection_bias_name))
        else:
            router_output = view.router(hidden_states)
        ours = view.route(hidden_states)
    # HF may return the k picks unsorted: compare as per-token dense [T, E] weight maps.
    if len(router_output) == 2:  # Llama4: (dense scores [T, E] with zeros off the top-k, logits)
        dense_hf = router_output[0].float()
    else:
        _, hf_weights, hf_index = router_output
        dense_hf = torch.zeros(41, view.num_experts).scatter_add_(1, hf_index.long(), hf_weights.float())
    dense_ours = torch.zeros(41, view.num_experts).scatter_add_(1, ours.top_k_index, ours.top_k_weights)
    dense_ours = dense_ours / view.scaling_outside_router  # Laguna / Beam scale the routed sum in the block
    torch.testing.assert_close(dense_ours, dense_hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", tiny_families())
def test_view_reports_shared_experts_and_sizes(model_type):
    model = tiny_model(model_type)
    for view in find_moe_blocks(model):
        assert view.num_experts == 8
        assert view.intermediate_size == 16
        assert view.routing.top_k == 2
        # tiny configs: DeepSeek-V2 and dots1 fuse 2 shared experts into one MLP, the others have 1 or none
        expected_shared = {
            "qwen2_moe": 1, "qwen3_5_moe_text": 1, "qwen3_next": 1, "deepseek_v2": 2, "deepseek_v3": 1,
            "glm4_moe": 1, "dots1": 2, "solar_open": 1, "llama4_text": 1, "ernie4_5_moe": 2,
            "glm4_moe_lite": 1, "deepseek_v32": 1, "exaone_moe": 1, "cohere2_moe": 1, "kimi_linear": 1,
            "hunyuan_v1_moe": 1, "afmoe": 2, "flint": 1, "hy_v3": 1, "glm_moe_dsa": 1,
            "laguna": 1, "kolibri1": 1, "axk1": 1, "hy_v4": 1, "bailing_hybrid": 1, "axk2": 1, "aria_text": 2, "minimax_m3_vl_text": 1,
        }.get(model_type, 0)
        assert view.num_shared_experts == expected_shared
        # every expert's canonical weights have the documented shapes
        weights = view.expert_weights(3)
        assert weights.gate.shape == (16, 32) and weights.up.shape == (16, 32) and weights.down.shape == (32, 16)


def test_deepseek_dense_first_layers_are_skipped():
    model = tiny_model("deepseek_v3")
    assert [view.layer_index for view in find_moe_blocks(model)] == [1, 2]


def test_dense_model_is_rejected_with_supported_families():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError) as error:
        find_moe_blocks(model)
    message = str(error.value)
    for family in ("Mixtral", "DeepSeek-V3", "Qwen3-MoE", "GPT-OSS"):
        assert family in message
    assert set(supported_families()) >= {
        "Mixtral", "Qwen2-MoE", "Qwen3-MoE", "Qwen3.5-MoE", "Qwen3-Next", "OLMoE",
        "DeepSeek-V2", "DeepSeek-V3", "GPT-OSS", "PhiMoE", "GraniteMoE",
    }
