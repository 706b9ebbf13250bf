"""Qwen3-VL-MoE's text decoder (a vision-language model, layers at ``model.language_model.layers``): the view
reproduces the HF MoE block and router, and a pruned model with a lowered top-k saves and reloads with plain
``AutoModelForImageTextToText.from_pretrained`` with the same logits."""

from __future__ import annotations

import torch
import transformers

from moecompress.models import find_moe_blocks, keep_experts
from moecompress.models.tiny import tiny_qwen3_vl_moe

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_view_matches_the_hf_block_and_router():
    model = tiny_qwen3_vl_moe()
    views = find_moe_blocks(model)
    assert [view.path for view in views] == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
    generator = torch.Generator().manual_seed(1)
    for view in views:
        assert (view.family, view.num_experts, view.routing.top_k, view.routing.renormalize) == ("qwen3_vl_moe_text", 8, 2, True)
        hidden_states = torch.randn(2, 29, view.hidden_size, generator=generator)
        with torch.no_grad():
            reference = view.block(hidden_states)
            ours = view.forward(hidden_states.reshape(-1, view.hidden_size)).reshape(reference.shape)
            _, hf_weights, hf_index = view.router(hidden_states.reshape(-1, view.hidden_size))
            routed = view.route(hidden_states.reshape(-1, view.hidden_size))
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        dense_hf = torch.zeros(58, 8).scatter_add_(1, hf_index, hf_weights.float())
        dense_ours = torch.zeros(58, 8).scatter_add_(1, routed.top_k_index, routed.top_k_weights)
        torch.testing.assert_close(dense_ours, dense_hf, rtol=1e-5, atol=1e-6)


def test_pruned_model_reloads_with_plain_transformers(tmp_path):
    model = tiny_qwen3_vl_moe()
    keep_experts(model, {0: [1, 2, 4, 7], 1: [0, 3, 5, 6]}, top_k=1)
    text = model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok) == (4, 1)
    logits = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    assert [(view.num_experts, view.routing.top_k) for view in find_moe_blocks(reloaded)] == [(4, 1), (4, 1)]
    torch.testing.assert_close(_logits(reloaded), logits, rtol=1e-5, atol=1e-5)
