"""Keeping fewer experts than a family's transformers code can run is refused with the minimum stated, and the
minimum itself is checked against transformers: with one expert fewer, DeepSeek-V3-style routers (top-2 group
scores, 15 families) fail on the first forward and Jamba reloads as a dense model. Keeping exactly the minimum
runs and reloads with plain ``from_pretrained`` (same logits, same MoE layers), for every family."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_family_params

import moecompress.models.edits as edits
from moecompress.models import EditError, adapter_for, find_moe_blocks, keep_experts, merge_experts
from moecompress.models.families import minimum_experts
from moecompress.models.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

# Families whose HF router takes the top-2 experts of every group (also with n_group = 1): the 15.
TOP2_GROUP_FAMILIES = {
    "deepseek_v3", "glm4_moe", "dots1", "solar_open", "glm4_moe_lite", "deepseek_v32", "exaone_moe",
    "mimo_v2_flash", "kimi_linear", "glm_moe_dsa", "beam", "axk1", "hy_v4", "bailing_hybrid", "axk2",
}


def _minimum(model) -> int:
    return minimum_experts(find_moe_blocks(model)[0], adapter_for(model.config))[0]


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("model_type", tiny_family_params())
def test_keeping_the_minimum_runs_and_reloads_and_one_fewer_is_refused(model_type, tmp_path):
    model = tiny_model(model_type)
    layers = [view.layer_index for view in find_moe_blocks(model)]
    minimum = _minimum(model)
    expected = 2 if model_type in TOP2_GROUP_FAMILIES | {"jamba", "phimoe"} else 1
    assert minimum == expected
    if minimum > 1:
        with pytest.raises(EditError, match=f"keep at least {minimum} experts"):
            keep_experts(copy.deepcopy(model), {layer: list(range(minimum - 1)) for layer in layers})
        with pytest.raises(EditError, match=f"keep at least {minimum} experts"):
            merge_experts(copy.deepcopy(model), {layer: [list(range(8))] for layer in layers}, router_rule="collapse")
    keep_experts(model, {layer: list(range(8 - minimum, 8)) for layer in layers})
    logits = _logits(model)
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager")
    assert [view.num_experts for view in find_moe_blocks(reloaded)] == [minimum] * len(layers)
    torch.testing.assert_close(_logits(reloaded.eval()), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(TOP2_GROUP_FAMILIES))
def test_one_expert_really_breaks_the_top2_group_router(model_type, monkeypatch):
    """Without our check, one kept expert makes the family's own router fail (topk(2) over a group of one)."""
    monkeypatch.setattr(edits, "minimum_experts", lambda view, adapter: (1, ""))
    model = tiny_model(model_type)
    keep_experts(model, {view.layer_index: [3] for view in find_moe_blocks(model)})
    with pytest.raises(RuntimeError, match="out of range"):
        _logits(model)


def test_one_expert_really_makes_jamba_reload_dense(monkeypatch, tmp_path):
    monkeypatch.setattr(edits, "minimum_experts", lambda view, adapter: (1, ""))
    model = tiny_model("jamba")
    keep_experts(model, {view.layer_index: [3] for view in find_moe_blocks(model)})
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(adapter_for(reloaded.config).is_moe_block(layer.feed_forward) for layer in reloaded.model.layers)


def test_groups_stay_on_only_with_two_experts_per_group():
    """DeepSeek-V3 (4 groups of 2): keeping one per group turns group routing off (and 4 experts still run)."""
    model = tiny_model("deepseek_v3")
    keep_experts(model, {1: [0, 2, 4, 6], 2: [0, 2, 4, 6]})
    assert {(view.routing.n_group, view.routing.topk_group) for view in find_moe_blocks(model)} == {(1, 1)}
    assert torch.isfinite(_logits(model)).all()
