"""NAEE: block outputs with a kept set against the HF block after ``keep_experts``, exact vs greedy search, the
dynamic-skipping threshold, and the stage on Mixtral (exact) and DeepSeek-V3 (greedy, groups)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.analysis.block_outputs import BlockReconstruction
from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks
from moecompress.models.edits import keep_experts
from moecompress.pipeline import RunContext
from moecompress.pruning.naee import NaeePruning, exact_search, greedy_elimination

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixtral(testbed):
    return load_model(str(model_folder("moe-ref-mx")), dtype=torch.float32)[0]


@pytest.fixture(scope="module")
def deepseek(testbed):
    return load_model(str(model_folder("moe-ref-ds")), dtype=torch.float32)[0]


def _hf_block_output(view, inputs):
    output = view.block(inputs[None])
    return (output[0] if isinstance(output, tuple) else output)[0].float()


@pytest.mark.parametrize("model_name, kept", [("mixtral", [0, 2, 3, 5, 7]), ("deepseek", list(range(0, 32, 2)))])
def test_block_output_with_a_kept_set_matches_the_hf_block_after_keep_experts(request, model_name, kept):
    model = copy.deepcopy(request.getfixturevalue(model_name))
    view = find_moe_blocks(model)[1]
    inputs = torch.randn(40, view.hidden_size, generator=torch.Generator().manual_seed(0))
    reconstruction = BlockReconstruction(view, inputs)
    with torch.no_grad():
        torch.testing.assert_close(reconstruction.full_output, _hf_block_output(view, inputs), rtol=1e-4, atol=1e-5)
        predicted = reconstruction.output(kept)
        keep_experts(model, {view.layer_index: kept})
        pruned_view = find_moe_blocks(model)[1]
        torch.testing.assert_close(predicted, _hf_block_output(pruned_view, inputs), rtol=1e-4, atol=1e-5)
    assert reconstruction.loss(kept) == pytest.approx(float(torch.linalg.norm(reconstruction.full_output - predicted)))


def test_exact_search_finds_the_smallest_loss_and_greedy_is_no_better(mixtral):
    view = find_moe_blocks(mixtral)[2]
    inputs = torch.randn(64, view.hidden_size, generator=torch.Generator().manual_seed(1))
    reconstruction = BlockReconstruction(view, inputs)
    best = exact_search(reconstruction, 4, [])
    all_losses = {subset: reconstruction.loss(list(subset)) for subset in itertools.combinations(range(8), 4)}
    assert reconstruction.loss(best) == pytest.approx(min(all_losses.values()))
    with_protected = exact_search(reconstruction, 4, [6])
    assert 6 in with_protected
    assert reconstruction.loss(with_protected) == pytest.approx(min(loss for s, loss in all_losses.items() if 6 in s))
    greedy = greedy_elimination(reconstruction, 4, [])
    assert len(greedy) == 4 and reconstruction.loss(greedy) >= reconstruction.loss(best) - 1e-6
    # keeping every expert reproduces the block exactly
    assert reconstruction.loss(list(range(8))) == pytest.approx(0.0, abs=1e-5)


def test_skip_threshold_is_the_median_top2_ratio_of_the_pruned_routing(mixtral):
    view = find_moe_blocks(mixtral)[0]
    inputs = torch.randn(31, view.hidden_size, generator=torch.Generator().manual_seed(2))
    reconstruction = BlockReconstruction(view, inputs)
    kept = [1, 2, 4, 6]
    logits = torch.nn.functional.linear(inputs, view.router_weight.detach())[:, kept]
    top2 = torch.softmax(logits, -1).topk(2, dim=-1).values
    assert reconstruction.skip_threshold(kept) == pytest.approx(float((top2[:, 1] / top2[:, 0]).median()), rel=1e-5)


def test_naee_stage_on_mixtral_is_exact_and_on_deepseek_greedy_and_group_balanced(mixtral, deepseek, tmp_path):
    tokens = torch.randint(1, 8192, (2, 24), generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(mixtral)
    context = RunContext(model=model, tokenizer=None, source="", output_dir=tmp_path, calibration=tokens,
                         super_experts=[(0, 3)])
    result = NaeePruning({"num_experts_to_keep": 6}).run(context)
    assert set(result.decisions["search"].values()) == {"exact"}
    assert 3 in result.decisions["kept_experts"]["0"]
    assert all(0 < beta <= 1 for beta in result.decisions["skip_threshold"].values())
    assert all(view.num_experts == 6 for view in find_moe_blocks(model))

    model = copy.deepcopy(deepseek)
    context = RunContext(model=model, tokenizer=None, source="", output_dir=tmp_path, calibration=tokens)
    result = NaeePruning({"num_experts_to_keep": 24, "group_balanced": True, "max_tokens": 24}).run(context)
    assert set(result.decisions["search"].values()) == {"greedy"}
    for kept in result.decisions["kept_experts"].values():
        assert torch.bincount(torch.tensor(kept) // 8, minlength=4).tolist() == [6, 6, 6, 6]
    assert all(view.router.num_group == 4 for view in find_moe_blocks(model))
