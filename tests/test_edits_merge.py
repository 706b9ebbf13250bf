"""merge_experts: remap (R1) equals the unmerged HF model whose experts are each replaced by their cluster's
weighted average; collapse (R2) equals keeping one representative per cluster after averaging experts and router
rows; both survive save/reload."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_family_params

from moecompress.checkpoint import load_model
from moecompress.models import (
    EditError,
    find_moe_blocks,
    keep_experts,
    materialize_expert_id_map,
    merge_experts,
    merged_expert_ids,
)
from moecompress.models.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CLUSTERS = [[0, 5], [1], [2, 3, 7], [4, 6]]
WEIGHTS = [[3.0, 1.0], [1.0], [1.0, 2.0, 1.0], [0.5, 0.5]]
EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _normalised(weights):
    return [[w / sum(ws) for w in ws] for ws in weights]


def _overwrite_members_with_cluster_average(model, clusters, weights):
    """The R1 reference, by hand: every member's fused tensors := its cluster's weighted average."""
    with torch.no_grad():
        for view in find_moe_blocks(model):
            for name in EXPERT_TENSORS:
                tensor = getattr(view.experts, name, None)
                if not isinstance(tensor, torch.Tensor):
                    continue
                original = tensor.detach().clone()
                for members, member_weights in zip(clusters, _normalised(weights)):
                    average = sum(w * original[e] for e, w in zip(members, member_weights))
                    for e in members:
                        tensor[e] = average


@pytest.mark.parametrize("model_type", tiny_family_params(exclude=("llama4_text",)))
def test_remap_merge_equals_member_averaged_model_and_round_trips(model_type, tmp_path):
    model = tiny_model(model_type)
    layers = [view.layer_index for view in find_moe_blocks(model)]
    reference_model = copy.deepcopy(model)
    _overwrite_members_with_cluster_average(reference_model, CLUSTERS, WEIGHTS)
    reference = _logits(reference_model)

    merge_experts(model, {layer: CLUSTERS for layer in layers}, member_weights={layer: WEIGHTS for layer in layers})
    views = find_moe_blocks(model)
    assert all(view.num_experts == 4 and view.num_router_outputs == 8 for view in views)
    merged = _logits(model)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    # our own forward from the view agrees too (it maps router outputs through expert_id_map)
    hidden = torch.randn(9, views[0].hidden_size)
    with torch.no_grad():
        block_out = views[0].block(hidden[None])
        block_out = (block_out[0] if isinstance(block_out, tuple) else block_out)[0]
        torch.testing.assert_close(views[0].forward(hidden), block_out, rtol=1e-5, atol=1e-5)

    # save: plain HF checkpoint with merged experts repeated per router output; plain from_pretrained works
    materialize_expert_id_map(model)
    torch.testing.assert_close(_logits(model), reference, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager")
    torch.testing.assert_close(_logits(plain.eval()), reference, rtol=1e-5, atol=1e-5)
    # load_model compacts it back to 4 stored experts behind the full router
    compact, _ = load_model(tmp_path, dtype=torch.float32)
    assert all(view.num_experts == 4 and view.num_router_outputs == 8 for view in find_moe_blocks(compact))
    torch.testing.assert_close(_logits(compact), reference, rtol=1e-5, atol=1e-5)


def test_remap_checkpoint_saved_without_materializing_fails_loudly(tmp_path):
    model = tiny_model("qwen3_moe")
    merge_experts(model, {0: CLUSTERS, 1: CLUSTERS})
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", tiny_family_params())
def test_collapse_merge_equals_averaged_representatives(model_type, tmp_path):
    model = tiny_model(model_type)
    layers = [view.layer_index for view in find_moe_blocks(model)]
    # reference: average experts and router rows into each cluster's first member, then keep the first members
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        for view in find_moe_blocks(reference_model):
            tensors = [getattr(view.experts, n, None) for n in EXPERT_TENSORS]
            tensors += [view.router_weight, view.router_bias]
            tensors.append(view.selection_bias)  # a [E] view wherever the family keeps it (router, block, statics)
            for tensor in (t for t in tensors if isinstance(t, torch.Tensor)):
                original = tensor.detach().clone()
                for members, member_weights in zip(CLUSTERS, _normalised(WEIGHTS)):
                    tensor[members[0]] = sum(w * original[e] for e, w in zip(members, member_weights))
    keep_experts(reference_model, {layer: [members[0] for members in CLUSTERS] for layer in layers})
    reference = _logits(reference_model)

    merge_experts(
        model, {layer: CLUSTERS for layer in layers}, member_weights={layer: WEIGHTS for layer in layers}, router_rule="collapse"
    )
    assert all(view.num_experts == 4 and view.num_router_outputs == 4 for view in find_moe_blocks(model))
    assert all(view.expert_id_map is None for view in find_moe_blocks(model))
    torch.testing.assert_close(_logits(model), reference, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager")
    torch.testing.assert_close(_logits(plain.eval()), reference, rtol=1e-5, atol=1e-5)


def test_merged_expert_weights_follow_the_formula():
    model = tiny_model("gpt_oss")  # transposed, interleaved, with biases
    before = find_moe_blocks(model)[0]
    expected = {name: getattr(before.experts, name).detach().clone() for name in EXPERT_TENSORS}
    merge_experts(model, {0: CLUSTERS}, member_weights={0: WEIGHTS})
    after = find_moe_blocks(model)[0]
    for name, original in expected.items():
        torch.testing.assert_close(getattr(after.experts, name)[0], 0.75 * original[0] + 0.25 * original[5])
        torch.testing.assert_close(getattr(after.experts, name)[2], (original[2] + 2 * original[3] + original[7]) / 4)
    assert merged_expert_ids({0: CLUSTERS})[(0, 7)] == 2


@pytest.mark.parametrize(
    "clusters, weights, rule, message",
    [
        ([[0, 1], [2, 3, 4, 5, 6]], None, "remap", "partition"),
        ([[0, 1], [1, 2, 3, 4, 5, 6, 7]], None, "remap", "partition"),
        (CLUSTERS, [[1.0], [1.0], [1.0], [1.0]], "remap", "one weight per cluster member"),
        (CLUSTERS, [[-1.0, 1.0], [1.0], [1.0, 1.0, 1.0], [1.0, 1.0]], "remap", ">= 0"),
        (CLUSTERS, None, "average", "router_rule"),
    ],
)
def test_bad_merge_requests_are_refused(clusters, weights, rule, message):
    model = tiny_model("mixtral")
    with pytest.raises(EditError, match=message):
        merge_experts(model, {0: clusters}, member_weights={0: weights} if weights else None, router_rule=rule)


def test_keep_after_remap_is_refused():
    model = tiny_model("mixtral")
    merge_experts(model, {0: CLUSTERS})
    with pytest.raises(EditError, match="remap"):
        keep_experts(model, {0: [0, 1]})


def test_remap_is_refused_where_experts_run_without_ids():
    model = tiny_model("llama4_text")
    before = find_moe_blocks(model)[0].experts.gate_up_proj.detach().clone()
    with pytest.raises(EditError, match="collapse"):
        merge_experts(model, {0: CLUSTERS})
    assert torch.equal(find_moe_blocks(model)[0].experts.gate_up_proj, before)  # nothing half-done
