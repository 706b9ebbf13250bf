"""Merging: Hungarian alignment on experts with a known permutation, clusterings on constructed data where the
answer is known, the merged block against a hand-computed R1 / R2 reference, super experts kept alone."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.analysis.alignment import align_cluster, alignment_permutation, permute_expert_neurons
from moecompress.analysis.clustering import (
    average_linkage_clusters,
    frequency_seeded_clusters,
    dominant_expert_groups,
    router_logit_affinity,
    spectral_clusters,
)
from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks
from moecompress.models.view import ExpertWeights, route_from_logits
from moecompress.pipeline import RunContext
from moecompress.pruning.hcsmoe import HcSmoeMerging
from moecompress.pruning.msmoe import MSmoeMerging
from moecompress.pruning.uncurl import UncurlMerging

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixtral(testbed):
    return load_model(str(model_folder("moe-ref-mx")), dtype=torch.float32)[0]


def test_hungarian_alignment_recovers_a_known_neuron_permutation():
    generator = torch.Generator().manual_seed(0)
    anchor = ExpertWeights(gate=torch.randn(12, 6, generator=generator), up=torch.randn(12, 6, generator=generator),
                           down=torch.randn(6, 12, generator=generator))
    shuffle = torch.randperm(12, generator=generator)
    noise = lambda t: t + 0.01 * torch.randn(t.shape, generator=generator)  # noqa: E731
    member = ExpertWeights(gate=noise(anchor.gate[shuffle]), up=noise(anchor.up[shuffle]),
                           down=noise(anchor.down[:, shuffle]))
    perm = alignment_permutation(anchor, member)
    # member neuron perm[i] is anchor neuron i: shuffle[perm[i]] == i
    assert torch.equal(shuffle[perm], torch.arange(12))


def test_permuting_neurons_keeps_the_expert_function_and_aligning_a_shuffled_copy_restores_it(mixtral):
    model = copy.deepcopy(mixtral)
    view = find_moe_blocks(model)[0]
    inputs = torch.randn(10, view.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = view.expert_forward(3, inputs)
        permute_expert_neurons(view, 3, torch.randperm(view.intermediate_size, generator=torch.Generator().manual_seed(2)))
        torch.testing.assert_close(view.expert_forward(3, inputs), before, rtol=1e-5, atol=1e-5)
        # expert 5 := a neuron-shuffled copy of expert 0; aligning it to expert 0 makes the tensors identical
        view.experts.gate_up_proj[5].copy_(view.experts.gate_up_proj[0])
        view.experts.down_proj[5].copy_(view.experts.down_proj[0])
        permute_expert_neurons(view, 5, torch.randperm(view.intermediate_size, generator=torch.Generator().manual_seed(3)))
        assert not torch.equal(view.experts.gate_up_proj[5], view.experts.gate_up_proj[0])
        align_cluster(view, 0, [0, 5])
        assert torch.equal(view.experts.gate_up_proj[5], view.experts.gate_up_proj[0])
        assert torch.equal(view.experts.down_proj[5], view.experts.down_proj[0])


def test_router_logit_affinity_is_the_mapped_cosine_of_logit_columns():
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    affinity = router_logit_affinity(logits.T @ logits)
    cosine = torch.nn.functional.cosine_similarity(logits.T[:, None, :], logits.T[None, :, :], dim=-1)
    torch.testing.assert_close(affinity, (1 + cosine) / 2)


def test_spectral_and_average_linkage_clusterings_find_constructed_groups_and_keep_super_experts_alone():
    # three groups of experts with near-identical logit columns / mean outputs
    generator = torch.Generator().manual_seed(5)
    groups = [[0, 3, 6], [1, 4, 7], [2, 5]]
    centers = torch.randn(3, 200, generator=generator, dtype=torch.float64)
    columns = torch.empty(8, 200, dtype=torch.float64)
    for group_id, members in enumerate(groups):
        for expert in members:
            columns[expert] = centers[group_id] + 0.05 * torch.randn(200, generator=generator, dtype=torch.float64)
    affinity = router_logit_affinity(columns @ columns.T)
    assert spectral_clusters(affinity, 3) == sorted(groups)
    assert average_linkage_clusters(columns, 3) == sorted(groups)
    # a super expert is a cluster of its own and the rest still clusters into the remaining count
    with_super = spectral_clusters(affinity, 4, singletons=[4])
    assert [4] in with_super and len(with_super) == 4 and [1, 7] in with_super
    assert [7] in average_linkage_clusters(columns, 4, singletons=[7])


def test_frequency_seeds_keep_busy_experts_apart_and_merge_dead_ones_into_them():
    """Average linkage on mean outputs keeps far-away experts alone; here the far ones are dead (0 tokens), as on
    moe-ref-mx. Frequency seeds make the busiest experts the clusters and send every other to its nearest seed."""
    generator = torch.Generator().manual_seed(1)
    near = torch.randn(1, 64, generator=generator, dtype=torch.float64)
    outputs = torch.cat([near + 0.1 * torch.randn(5, 64, generator=generator, dtype=torch.float64),  # 0-4: busy, alike
                         10 + torch.randn(3, 64, generator=generator, dtype=torch.float64)])      # 5-7: dead, far apart
    counts = torch.tensor([900.0, 800.0, 700.0, 600.0, 500.0, 0.0, 2.0, 0.0])
    paper = average_linkage_clusters(outputs, 4)
    assert [[0, 1, 2, 3, 4]] == [members for members in paper if 0 in members]  # one giant cluster of the busy ones
    seeded = frequency_seeded_clusters(outputs, counts, 4)
    seeds = [[e for e in members if e in (0, 1, 2, 3)] for members in seeded]
    assert sorted(map(len, seeds)) == [1, 1, 1, 1]  # the four busiest each lead a cluster
    assert all(any(e in members for e in (0, 1, 2, 3)) for members in seeded)  # no cluster without a busy expert
    distance = torch.cdist(outputs, outputs)
    for members in seeded:  # every other expert sits with its nearest seed
        seed = next(e for e in members if e in (0, 1, 2, 3))
        for expert in members:
            assert distance[expert, seed] == distance[expert, [0, 1, 2, 3]].min()
    assert [7] in frequency_seeded_clusters(outputs, counts, 4, singletons=[7])  # a super expert stays alone
    default = HcSmoeMerging({"num_experts_to_keep": 4})
    assert default.options.clustering == "balance_aware"
    # the default: frequency seeds on this starved layer, the paper's average linkage once the counts are balanced
    assert default.layer_clusters(outputs, counts, 4, []) == seeded
    balanced = torch.tensor([110.0, 100.0, 90.0, 100.0, 105.0, 95.0, 100.0, 100.0])
    assert default.layer_clusters(outputs, balanced, 4, []) == paper != seeded
    assert HcSmoeMerging({"num_experts_to_keep": 4, "preset": "hcsmoe_paper"}).options.clustering == "average_linkage"


def test_dominant_groups_join_the_most_similar_dominant():
    similarity = torch.tensor([[1.0, 0.1, 0.9, 0.2], [0.1, 1.0, 0.3, 0.8], [0.9, 0.3, 1.0, 0.1], [0.2, 0.8, 0.1, 1.0]])
    assert dominant_expert_groups(similarity, [0, 1]) == [[0, 2], [1, 3]]
    assert dominant_expert_groups(similarity, [0, 1, 3], singletons=[3]) == [[0, 2], [1], [3]]


def _merged_reference(original_view, clusters, anchors, weights, inputs, router_rule, aligned):
    """Block output [N, d] of the merged layer computed by hand from the original weights: members aligned to the
    anchor with the Hungarian permutation, averaged with the normalised weights; R1 routes with the original
    router and sends each pick to its cluster; R2 routes with the weight-averaged router rows."""
    merged = []
    for members, anchor, member_weights in zip(clusters, anchors, weights):
        total = sum(member_weights)
        anchor_weights = original_view.expert_weights(anchor)
        gate = up = down = 0
        for member, weight in zip(members, member_weights):
            w = original_view.expert_weights(member)
            perm = (alignment_permutation(anchor_weights, w) if aligned and member != anchor
                    else torch.arange(w.gate.shape[0]))
            gate = gate + weight / total * w.gate[perm]
            up = up + weight / total * w.up[perm]
            down = down + weight / total * w.down[:, perm]
        merged.append((gate, up, down))
    cluster_of = {member: c for c, members in enumerate(clusters) for member in members}
    logits = torch.nn.functional.linear(inputs, original_view.router_weight)
    if router_rule == "remap":
        routed = route_from_logits(logits, original_view.routing)
        index = routed.top_k_index.apply_(lambda e: cluster_of[e])
    else:
        rows = torch.stack([sum(w / sum(ws) * original_view.router_weight[m] for m, w in zip(members, ws))
                            for members, ws in zip(clusters, weights)])
        routed = route_from_logits(torch.nn.functional.linear(inputs, rows), original_view.routing)
        index = routed.top_k_index
    output = torch.zeros_like(inputs)
    for token in range(inputs.shape[0]):
        for slot in range(index.shape[1]):
            gate, up, down = merged[int(index[token, slot])]
            x = inputs[token]
            output[token] += routed.top_k_weights[token, slot] * (down @ (torch.nn.functional.silu(gate @ x) * (up @ x)))
    return output


@pytest.mark.parametrize("stage_class, options", [
    (UncurlMerging, {"num_experts_to_keep": 4}),
    (HcSmoeMerging, {"num_experts_to_keep": 4, "router_rule": "collapse"}),
    (MSmoeMerging, {"num_experts_to_keep": 5}),
])
def test_merged_block_matches_the_hand_computed_reference(mixtral, tmp_path, stage_class, options):
    tokens = torch.randint(1, 8192, (2, 24), generator=torch.Generator().manual_seed(6))
    original = copy.deepcopy(mixtral)
    model = copy.deepcopy(mixtral)
    context = RunContext(model=model, tokenizer=None, source="", output_dir=tmp_path, calibration=tokens,
                         super_experts=[(1, 2)])
    result = stage_class(options).run(context)
    decisions = result.decisions
    inputs = torch.randn(12, 256, generator=torch.Generator().manual_seed(7))
    for layer in (1, 3):
        clusters = decisions["clusters"][str(layer)]
        assert sorted(e for members in clusters for e in members) == list(range(8))
        assert len(clusters) == options["num_experts_to_keep"]
        original_view = next(v for v in find_moe_blocks(original) if v.layer_index == layer)
        merged_view = next(v for v in find_moe_blocks(model) if v.layer_index == layer)
        with torch.no_grad():
            expected = _merged_reference(original_view, clusters, decisions["anchors"][str(layer)],
                                         decisions["member_weights"][str(layer)], inputs, decisions["router_rule"],
                                         decisions["aligned"])
            actual = merged_view.block(inputs[None])
            actual = (actual[0] if isinstance(actual, tuple) else actual)[0]
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert [2] in decisions["clusters"]["1"]  # the super expert stayed alone
    merged_id = [c for c, members in enumerate(decisions["clusters"]["1"]) if members == [2]][0]
    assert context.super_experts == [(1, merged_id)]
    assert (tmp_path / result.plots[0]).is_file()
