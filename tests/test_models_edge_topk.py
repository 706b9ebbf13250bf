"""A lowered top-k is written to every top-k field of the family's config, so a plain ``from_pretrained`` routes
with it (Aria spells the field ``moe_topk``, Hunyuan ``moe_topk``, Ernie ``moe_k``, Kimi-Linear and Bailing
``num_experts_per_token``): checked on the saved config.json and on the reloaded model, for every family."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_family_params

from moecompress.models import adapter_for, find_moe_blocks, keep_experts, merge_experts
from moecompress.models.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _saved_text_config(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return config.get("text_config", config)


def _reload(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


@pytest.mark.parametrize("model_type", tiny_family_params())
def test_lowered_top_k_survives_save_and_plain_reload(model_type, tmp_path):
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    layers = [view.layer_index for view in find_moe_blocks(model)]
    new_top_k = 2 if model_type == "phimoe" else 1  # PhiMoE's sparsemixer always picks 2 (refused otherwise)
    keep_experts(model, {layer: [0, 1, 2, 3, 4, 5] for layer in layers}, top_k=new_top_k)
    with torch.no_grad():
        logits = model(TOKENS).logits
    model.save_pretrained(tmp_path)

    saved = _saved_text_config(tmp_path)
    written = [field for field in adapter.top_k_fields if field in saved]
    assert written, f"none of {adapter.top_k_fields} is in the saved config"
    assert all(saved[field] == new_top_k for field in written), {field: saved[field] for field in written}
    reloaded = _reload(tmp_path)
    assert [view.routing.top_k for view in find_moe_blocks(reloaded)] == [new_top_k] * len(layers)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, logits, rtol=1e-5, atol=1e-5)


def test_aria_top_k_field_moe_topk_is_written(tmp_path):
    """The issue's case: Aria's router reads ``moe_topk``; before the fix a reload routed with the old top-k."""
    model = tiny_model("aria_text")
    keep_experts(model, {layer: [0, 1, 2, 3] for layer in (0, 1)}, top_k=1)
    model.save_pretrained(tmp_path)
    assert _saved_text_config(tmp_path)["moe_topk"] == 1
    assert {view.router.top_k for view in find_moe_blocks(_reload(tmp_path))} == {1}


def test_collapse_merge_below_top_k_writes_the_clamped_top_k(tmp_path):
    model = tiny_model("aria_text")  # top-k 2; one cluster per layer is left -> top-k 1
    merge_experts(model, {layer: [list(range(8))] for layer in (0, 1)}, router_rule="collapse")
    model.save_pretrained(tmp_path)
    assert _saved_text_config(tmp_path)["moe_topk"] == 1
    assert {view.routing.top_k for view in find_moe_blocks(_reload(tmp_path))} == {1}
