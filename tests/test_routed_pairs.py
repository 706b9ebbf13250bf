"""The calibration backend's sorted-picks forward against a per-expert ``torch.where`` loop (the pre-vectorised code).

Checks on one MoE layer: the returned forward output is bit-identical (also with expert-parallel sentinels -1 and E
among the picks when no statistic is collected), the ``RoutedPairs`` event holds every valid pick sorted by expert (tokens ascending within one), and
per-expert ``ExpertSlice`` events still arrive in ascending expert order with ``torch.where``'s token order.
"""

from __future__ import annotations

import torch
from conftest import testbed_model_path as model_folder
from torch import nn

from moecompress.calibration.backend import LayerCollector
from moecompress.calibration.statistics import Statistic
from moecompress.models import find_moe_blocks


class _Recorder(Statistic):
    name = "_test_recorder"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.pairs = []
        self.slices = []

    def on_routed_pairs(self, pairs):
        self.pairs.append(pairs)

    def on_expert(self, expert_slice):
        self.slices.append(expert_slice)

    def result(self):
        return None


def _loop_forward(view, hidden_states, top_k_index, top_k_weights):
    output = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        if expert < 0 or expert >= view.num_experts:
            continue
        token_index, slot = torch.where(top_k_index == expert)
        weights = view.expert_weights(expert)
        intermediate = view.expert_intermediate(expert, hidden_states[token_index])
        expert_output = nn.functional.linear(intermediate, weights.down, weights.down_bias)
        output.index_put_((token_index,), expert_output * top_k_weights[token_index, slot][:, None], accumulate=True)
    return output


def test_sorted_picks_match_the_per_expert_loop():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder("moe-ref-q3"), dtype=torch.float32,
                                                 experts_implementation="eager")
    view = find_moe_blocks(model)[0]
    num_experts, top_k = view.num_experts, view.routing.top_k
    generator = torch.Generator().manual_seed(0)
    num_tokens = 37
    hidden_states = torch.randn(num_tokens, view.hidden_size, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    top_k_weights = torch.rand(num_tokens, top_k, generator=generator)

    # no statistics: the plain path, where expert-parallel sentinels may appear among the picks
    with_sentinels = top_k_index.clone()
    with_sentinels[3, 0] = -1
    with_sentinels[5, top_k - 1] = num_experts
    with torch.no_grad():
        output = LayerCollector(view, []).routed_forward(hidden_states, with_sentinels, top_k_weights)
    assert torch.equal(output, _loop_forward(view, hidden_states, with_sentinels, top_k_weights))

    collector = LayerCollector(view, ["camera_energy_l2"])
    recorder = _Recorder(view)
    collector.statistics[recorder.name] = recorder
    collector._uses_pairs = collector._uses_experts = True
    with torch.no_grad():
        output = collector.routed_forward(hidden_states, top_k_index, top_k_weights)
        expected = _loop_forward(view, hidden_states, top_k_index, top_k_weights)
    assert torch.equal(output, expected)

    (pairs,) = recorder.pairs
    valid = (top_k_index >= 0) & (top_k_index < num_experts)
    assert pairs.expert_ids.numel() == int(valid.sum())
    assert torch.equal(pairs.expert_counts, torch.bincount(top_k_index[valid], minlength=num_experts))
    assert torch.equal(top_k_index[pairs.token_index, pairs.slot], pairs.expert_ids)
    order_key = pairs.expert_ids * num_tokens + pairs.token_index
    assert bool((order_key[1:] > order_key[:-1]).all())  # sorted by expert, tokens ascending within an expert
    assert torch.equal(pairs.combine_weights, top_k_weights[pairs.token_index, pairs.slot])

    assert [s.expert for s in recorder.slices] == sorted(set(top_k_index[valid].tolist()))
    start = 0
    for expert_slice in recorder.slices:
        token_index, slot = torch.where(top_k_index == expert_slice.expert)
        assert torch.equal(expert_slice.token_index, token_index)
        assert torch.equal(expert_slice.combine_weights, top_k_weights[token_index, slot])
        end = start + token_index.numel()
        assert torch.equal(pairs.outputs[start:end], expert_slice.outputs)
        assert torch.equal(pairs.intermediate[start:end], expert_slice.intermediate)
        start = end
