"""Family special cases the parametrised tiny-model tests do not single out: a selection bias kept outside the
router (MiniMax-M2's block, Ernie-4.5's ``moe_statics``, LFM2's block), Ernie's clamped normaliser and
Cohere2-MoE's ``average`` shared-expert combination, a router weight inside a wrapped Linear (Hunyuan, AfMoE)."""

from __future__ import annotations

import pytest
import torch
import transformers

from moecompress.models import find_moe_blocks, keep_experts, merge_experts
from moecompress.models.tiny import tiny_config, tiny_model, tiny_model_from_config


@pytest.mark.parametrize(
    "model_type, bias_path, shape_after",
    [
        ("minimax_m2", "e_score_correction_bias", (6,)),
        ("ernie4_5_moe", "gate.moe_statics.e_score_correction_bias", (1, 6)),
        ("lfm2_moe", "expert_bias", (6,)),
        ("afmoe", "expert_bias", (6,)),
        ("hy_v3", "e_score_correction_bias", (6,)),
    ],
)
def test_selection_bias_outside_the_router_is_viewed_and_sliced(model_type, bias_path, shape_after):
    model = tiny_model(model_type)
    kept = [0, 2, 3, 5, 6, 7]
    originals = {}
    for view in find_moe_blocks(model):
        owner_path, _, name = bias_path.rpartition(".")
        stored = getattr(view.block.get_submodule(owner_path) if owner_path else view.block, name)
        assert view.selection_bias is not None and view.selection_bias.data_ptr() == stored.data_ptr()
        originals[view.layer_index] = stored.detach().reshape(-1).clone()
    keep_experts(model, {layer: kept for layer in originals})
    for view in find_moe_blocks(model):
        owner_path, _, name = bias_path.rpartition(".")
        owner = view.block.get_submodule(owner_path) if owner_path else view.block
        assert tuple(getattr(owner, name).shape) == shape_after
        torch.testing.assert_close(view.selection_bias, originals[view.layer_index][kept])


def test_collapse_merge_averages_an_outside_selection_bias():
    model = tiny_model("minimax_m2")
    before = {view.layer_index: view.selection_bias.clone() for view in find_moe_blocks(model)}
    clusters = [[0, 1], [2, 3], [4, 5], [6, 7]]
    merge_experts(model, {layer: clusters for layer in before}, router_rule="collapse")
    for view in find_moe_blocks(model):
        expected = before[view.layer_index].view(4, 2).mean(dim=1)
        torch.testing.assert_close(view.selection_bias, expected)


def test_ernie_normaliser_is_clamped_at_moe_norm_min():
    model = tiny_model("ernie4_5_moe")
    view = find_moe_blocks(model)[0]
    assert view.routing.renormalize_min == pytest.approx(0.9)
    hidden_states = torch.randn(64, view.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routed = view.route(hidden_states)
        _, hf_weights, _ = view.router(hidden_states)
    totals = routed.top_k_weights.sum(dim=-1)
    picked = torch.softmax(routed.logits, dim=-1).gather(1, routed.top_k_index).sum(dim=-1)
    # both branches occur: tokens whose top-k mass is below moe_norm_min keep sum/0.9 < 1, the others sum to 1
    clamped = picked < 0.9
    assert clamped.any() and (~clamped).any()
    torch.testing.assert_close(totals[clamped], picked[clamped] / 0.9)
    torch.testing.assert_close(totals[~clamped], torch.ones(int((~clamped).sum())))
    torch.testing.assert_close(totals, hf_weights.float().sum(dim=-1))


def test_cohere2_average_combination_halves_routed_and_shared():
    config = tiny_config("cohere2_moe")
    config.shared_expert_combination_strategy = "average"
    model = tiny_model_from_config(config)
    for view in find_moe_blocks(model):
        assert view.routing.routed_scaling_factor == 0.5 and view.shared_experts[0].scale == 0.5
        assert view.scaling_outside_router == 0.5
        hidden_states = torch.randn(2, 9, view.hidden_size, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            reference = view.block(hidden_states)
            ours = view.forward(hidden_states.reshape(-1, view.hidden_size)).reshape(reference.shape)
            _, hf_weights, hf_index = view.router(hidden_states.reshape(-1, view.hidden_size))
            routed = view.route(hidden_states.reshape(-1, view.hidden_size))
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        dense_hf = torch.zeros(18, 8).scatter_add_(1, hf_index, hf_weights.float())
        dense_ours = torch.zeros(18, 8).scatter_add_(1, routed.top_k_index, routed.top_k_weights)
        torch.testing.assert_close(dense_ours, 0.5 * dense_hf)


@pytest.mark.parametrize("model_type, linear_path", [("hunyuan_v1_moe", "gate.wg"), ("afmoe", "router.gate")])
def test_router_weight_in_a_wrapped_linear_is_viewed_sliced_and_merged(model_type, linear_path):
    model = tiny_model(model_type)
    originals = {}
    for view in find_moe_blocks(model):
        linear = view.block.get_submodule(linear_path)
        assert view.router_linear is linear and view.router_weight is linear.weight
        originals[view.layer_index] = linear.weight.detach().clone()
    kept = [1, 2, 4, 5, 6, 7]
    keep_experts(model, {layer: kept for layer in originals})
    for view in find_moe_blocks(model):
        linear = view.block.get_submodule(linear_path)
        assert linear.out_features == 6 and view.router.num_experts == 6
        torch.testing.assert_close(linear.weight, originals[view.layer_index][kept])
    merge_experts(model, {layer: [[0, 1], [2, 3], [4, 5]] for layer in originals}, router_rule="collapse")
    for view in find_moe_blocks(model):
        expected = originals[view.layer_index][kept].view(3, 2, -1).mean(dim=1)
        torch.testing.assert_close(view.block.get_submodule(linear_path).weight, expected)


def test_selection_bias_on_logits_differs_from_bias_on_scores():
    """Kolibri1 picks on ``logits + bias``; the default (DeepSeek-V3 and the rest) on ``sigmoid(logits) + bias``."""
    from moecompress.models import RoutingSpec, route_from_logits

    logits, bias = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0.0, 1.5, 0.0])
    on_scores = RoutingSpec(scoring="sigmoid", top_k=1, renormalize=False, has_selection_bias=True)
    on_logits = RoutingSpec(scoring="sigmoid", top_k=1, renormalize=False, has_selection_bias=True, bias_on_logits=True)
    assert route_from_logits(logits, on_scores, bias).top_k_index.item() == 1
    picked = route_from_logits(logits, on_logits, bias)
    assert picked.top_k_index.item() == 0
    torch.testing.assert_close(picked.top_k_weights, torch.sigmoid(torch.tensor([[2.0]])))


def test_laguna_soft_capped_logits_and_block_scaling():
    model = tiny_model("laguna")
    for view in find_moe_blocks(model):
        assert view.router_logits_fn is not None and view.scaling_outside_router == 1.5
        hidden_states = torch.randn(50, view.hidden_size, generator=torch.Generator().manual_seed(5)) * 10
        with torch.no_grad():
            logits = view.router_logits(hidden_states)
            hf_logits, _, _ = view.router(hidden_states)
        raw = torch.nn.functional.linear(hidden_states, view.router_weight)
        assert raw.abs().max() > 2.0 and logits.abs().max() <= 2.0  # moe_router_logit_softcapping of the tiny config
        torch.testing.assert_close(logits, hf_logits.float())


def test_hy_v4_experts_use_a_clamped_swiglu():
    model = tiny_model("hy_v4")
    view = find_moe_blocks(model)[0]
    limit = float(view.experts.swiglu_limit)
    gate_out, up_out = torch.tensor([5.0, -0.5]), torch.tensor([-5.0, 0.5])
    expected = torch.nn.functional.silu(torch.tensor([limit, -0.5])) * torch.tensor([-limit, 0.5])
    torch.testing.assert_close(view.glu(gate_out, up_out), expected)
    # the HF experts module agrees (its own gate helper on a fused [gate | up] row)
    torch.testing.assert_close(view.experts._apply_gate(torch.cat([gate_out, up_out])), expected)


def test_group_mask_value_zero_lets_masked_experts_beat_negative_scores():
    """A.X-K2 fills experts outside the chosen groups with 0: an allowed expert whose biased score is negative loses."""
    from moecompress.models import RoutingSpec, route_from_logits

    # 2 groups of 2; group 0 wins (top-2 sum); its second expert has a negative biased score.
    logits = torch.tensor([[3.0, -4.0, -3.0, -3.0]])
    bias = torch.tensor([0.0, -0.5, 0.0, 0.0])
    spec = dict(scoring="sigmoid", top_k=2, renormalize=False, n_group=2, topk_group=1, group_score="top2_sum",
                has_selection_bias=True)
    default = route_from_logits(logits, RoutingSpec(**spec), bias)
    zero_filled = route_from_logits(logits, RoutingSpec(**spec, group_mask_value=0.0), bias)
    assert sorted(default.top_k_index[0].tolist()) == [0, 1]
    assert zero_filled.top_k_index[0, 0].item() == 0 and zero_filled.top_k_index[0, 1].item() in (2, 3)


def test_axk2_without_groups_matches_hf_and_prunes(tmp_path):
    config = tiny_config("axk2")
    config.n_group, config.topk_group = None, None
    model = tiny_model_from_config(config)
    views = find_moe_blocks(model)
    assert all(view.routing.n_group == 1 for view in views)
    hidden_states = torch.randn(2, 9, views[0].hidden_size, generator=torch.Generator().manual_seed(6))
    for view in views:
        with torch.no_grad():
            reference = view.block(hidden_states)
            ours = view.forward(hidden_states.reshape(-1, view.hidden_size)).reshape(reference.shape)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    keep_experts(model, {view.layer_index: [0, 1, 2, 3, 4, 5] for view in views})
    assert model.config.n_group is None and all(view.router.num_group is None for view in find_moe_blocks(model))
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert [view.num_experts for view in find_moe_blocks(reloaded)] == [6, 6]
