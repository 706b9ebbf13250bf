"""The common budget of every expert-level stage: uniform and global layer budgets, group-balanced selection, super
experts, option and model checks with one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import load_model
from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.pipeline import RunContext
from moecompress.pruning.base import ExpertBudgetOptions, select_kept_experts
from moecompress.pruning.frequency import FrequencyPruning, select_most_used
from moecompress.pruning.naee import NaeePruning
from moecompress.pruning.reap import ReapPruning
from moecompress.pruning.uncurl import UncurlMerging


def test_uniform_budget_keeps_the_best_with_super_experts_first_and_ties_to_the_lower_id():
    scores = {0: torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0]), 2: torch.tensor([0.0, 0.0, 9.0, 1.0, 2.0])}
    kept = select_kept_experts(scores, 2, protected={2: [0]})
    assert kept == {0: [0, 2], 2: [0, 2]}
    assert select_most_used(torch.tensor([3, 3, 1]), 1, []) == [0]
    with pytest.raises(RecipeError, match="super experts \\[0, 1\\] must stay"):
        select_kept_experts(scores, 1, protected={0: [0, 1]})


def test_global_budget_ranks_layers_together_on_per_layer_shares():
    # layer 0's mass is spread, layer 1's concentrated: shares make them comparable whatever the scale
    scores = {0: torch.tensor([25.0, 25.0, 25.0, 25.0]), 1: torch.tensor([700.0, 200.0, 50.0, 50.0])}
    kept = select_kept_experts(scores, 2, layer_budget="global", min_per_layer={0: 1, 1: 1})
    assert sum(len(ids) for ids in kept.values()) == 4
    # shares: layer 0 all 0.25; layer 1: 0.7, 0.2, 0.05, 0.05 -> best four: 0.7, then 0.25 x3 (min 1 in layer 0)
    assert kept == {0: [0, 1, 2], 1: [0]}
    kept_min2 = select_kept_experts(scores, 2, layer_budget="global", min_per_layer={0: 1, 1: 2})
    assert kept_min2 == {0: [0, 1], 1: [0, 1]}


def test_group_balanced_keeps_the_same_count_in_every_group():
    # 8 experts in 2 groups of 4; the best 4 overall all sit in group 0
    scores = {0: torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 0.5, 2.0, 0.1])}
    assert select_kept_experts(scores, 4) == {0: [0, 1, 2, 3]}
    assert select_kept_experts(scores, 4, groups={0: 2}) == {0: [0, 1, 4, 6]}
    # a protected expert ranks first in its group
    assert select_kept_experts(scores, 4, groups={0: 2}, protected={0: [7]}) == {0: [0, 1, 6, 7]}
    # global + groups: a layer takes whole tiers (one expert per group)
    two_layers = {0: scores[0], 1: torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
    kept = select_kept_experts(two_layers, 4, groups={0: 2, 1: 2}, layer_budget="global", min_per_layer={0: 2, 1: 2})
    assert all(len(ids) % 2 == 0 for ids in kept.values()) and sum(len(ids) for ids in kept.values()) == 8


def test_options_are_validated():
    with pytest.raises(ValueError, match="exactly one of"):
        ExpertBudgetOptions()
    with pytest.raises(ValueError, match="layer_budget"):
        ExpertBudgetOptions(num_experts_to_keep=4, layer_budget="per_layer")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        FrequencyPruning({"num_experts_to_keep": 4, "colour": "red"})


@pytest.fixture(scope="module")
def models(testbed):
    return {name: load_model(str(model_folder(name)), dtype=torch.float32)[0] for name in ("moe-ref-q3", "moe-ref-ds")}


def _context(model, tmp_path):
    return RunContext(model=model, tokenizer=None, source="", output_dir=tmp_path)


@pytest.mark.parametrize("model_name, stage, message", [
    ("moe-ref-q3", FrequencyPruning({"num_experts_to_keep": 40}), "has only 32 experts"),
    ("moe-ref-q3", ReapPruning({"num_experts_to_keep": 8, "top_k": 9}), "top_k=9 exceeds the 8 experts"),
    ("moe-ref-q3", ReapPruning({"num_experts_to_keep": 8, "group_balanced": True}), "needs a group-limited router"),
    ("moe-ref-ds", ReapPruning({"num_experts_to_keep": 10, "group_balanced": True}), "multiple of 4"),
    ("moe-ref-q3", ReapPruning({"num_experts_to_keep": 8, "layer_budget": "global", "progressive": True}),
     "progressive mode .* layer_budget: uniform"),
    ("moe-ref-q3", NaeePruning({"num_experts_to_keep": 8, "layer_budget": "global"}), "use layer_budget: uniform"),
    ("moe-ref-q3", UncurlMerging({"num_experts_to_keep": 8, "top_k": 2}), "merges keep the router's top-k"),
    ("moe-ref-q3", UncurlMerging({"num_experts_to_keep": 8, "layer_budget": "global"}), "merge_msmoe supports"),
    ("moe-ref-ds", UncurlMerging({"num_experts_to_keep": 8, "group_balanced": True}), "group_balanced is for pruning"),
])
def test_impossible_budgets_fail_before_any_work(models, tmp_path, model_name, stage, message):
    with pytest.raises(RecipeError, match=message):
        stage.check(_context(models[model_name], tmp_path))


def test_group_balanced_pruning_keeps_deepseek_group_routing(models, tmp_path):
    import copy

    model = copy.deepcopy(models["moe-ref-ds"])
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 8192, (2, 16), generator=generator)
    for balanced, groups_after in ((True, 4), (False, None)):
        pruned = copy.deepcopy(model)
        context = RunContext(model=pruned, tokenizer=None, source="", output_dir=tmp_path, calibration=tokens)
        result = FrequencyPruning({"num_experts_to_keep": 16, "group_balanced": balanced}).run(context)
        for view in find_moe_blocks(pruned):
            kept = result.decisions["kept_experts"][str(view.layer_index)]
            per_group = torch.bincount(torch.tensor(kept) // 8, minlength=4)
            if balanced:
                assert per_group.tolist() == [4, 4, 4, 4]
                assert view.router.num_group == groups_after and pruned.config.n_group == 4
        if balanced:
            with torch.no_grad():
                assert torch.isfinite(pruned(tokens).logits).all()


@pytest.mark.parametrize("name", ["premoe_code.yaml", "prune_reap.yaml", "merge_uncurl.yaml"])
def test_preset_recipes_parse(name):
    from conftest import REPO_ROOT

    from moecompress.recipe import load_recipe

    recipe = load_recipe(REPO_ROOT / "recipes" / name)
    assert recipe.stages[0].method in {"prune_premoe", "prune_reap", "merge_uncurl"}
    assert recipe.stages[-1].method == "evaluate"
