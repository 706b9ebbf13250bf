"""CAMERA energies and CAMERA-P: the energy formula against a direct computation from the HF modules, the global
per-layer selection with its guards, physical (variable-width) experts equal to masked ones and smaller, saving and
reloading both physical formats, and the layer-by-layer sweep against a by-hand recomputation."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.analysis.camera import LayerEnergies, layer_energies, random_scores, summarize
from moecompress.calibration import collect_statistics
from moecompress.checkpoint import save_model
from moecompress.errors import RecipeError
from moecompress.kernels.variable_width import VariableWidthExperts
from moecompress.models import find_moe_blocks
from moecompress.models.edits import EditError
from moecompress.models.tiny import tiny_model
from moecompress.pipeline import RunContext, StageResult
from moecompress.pruning.camera_p import CameraPruning, apply_masked, make_padded, make_physical, plan_layer

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ("qwen2_moe", "mixtral", "deepseek_v3")  # shared expert with a gate / none / ungated shared expert
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def _random_plans(model, ratio=0.4, protected=(1,)):
    return {view.layer_index: plan_layer(random_scores(view), ratio, protected_experts=list(protected))
            for view in find_moe_blocks(model)}


# ----- energies ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_energies_match_a_direct_computation_on_routed_tokens_with_the_combine_weights(model_type):
    model = tiny_model(model_type)
    view = find_moe_blocks(model)[0]
    captured = []
    handle = view.block.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(CALIBRATION)
    handle.remove()
    x = torch.cat(captured).double()
    alpha = 0.7
    statistics = collect_statistics(model, CALIBRATION, ["camera_energy_l2", "camera_energy_max"], batch_size=4)
    energies = layer_energies(view, statistics[view.layer_index], alpha)

    routing = view.route(x.float())
    for expert in range(view.num_experts):
        weights = view.expert_weights(expert)
        token, slot = torch.where(routing.top_k_index == expert)
        gate, up, down = weights.gate.double(), weights.up.double(), weights.down.double()
        h = view.activation(x[token] @ gate.T) * (x[token] @ up.T)
        phi2 = (routing.top_k_weights[token, slot].double()[:, None] * h) ** 2
        peak = phi2.amax(0) if token.numel() else torch.zeros(h.shape[1], dtype=torch.float64)
        expected = down.square().sum(0) * ((1 - alpha) * phi2.sum(0) + alpha * peak)
        torch.testing.assert_close(energies.routed[expert].double(), expected, rtol=1e-4, atol=1e-10)
    for index, shared in enumerate(view.shared_experts):
        module = shared.module
        h = view.activation(x @ module.gate_proj.weight.double().T) * (x @ module.up_proj.weight.double().T)
        gate = torch.sigmoid(x @ shared.gate.weight.double().T) if shared.gate is not None else torch.ones(x.shape[0], 1, dtype=torch.float64)
        phi2 = (gate * h) ** 2
        expected = module.down_proj.weight.double().square().sum(0) * ((1 - alpha) * phi2.sum(0) + alpha * phi2.amax(0))
        torch.testing.assert_close(energies.shared[index].double(), expected, rtol=1e-4, atol=1e-10)
    row = summarize(energies)
    assert 0 <= row["lowest_share"]["20%"] <= row["lowest_share"]["40%"] <= row["lowest_share"]["60%"] <= 0.6


# ----- selection --------------------------------------------------------------------------------------------------
def test_plan_takes_the_lowest_scores_over_routed_and_shared_channels_within_the_guards():
    routed = torch.tensor([[1.0, 2.0, 3.0, 4.0],      # expert 0: its lowest would all go without the floor
                           [0.1, 0.2, 0.3, 0.4],      # expert 1: protected (super expert)
                           [10.0, 11.0, 12.0, 13.0]])
    shared = [torch.tensor([0.5, 5.0, 6.0, 7.0, 8.0, 9.0])]
    scores = LayerEnergies(3, routed, shared)
    plan = plan_layer(scores, ratio=5 / 18, max_expert_share=0.5, protected_experts=[1])
    # floor(5/18 * 18) = 5 channels; expert 0 may lose 2 of 4, expert 1 none, shared 3 of 6
    assert plan.routed == {0: [0, 1]}
    assert plan.shared == {0: [0, 1, 2]}
    assert plan.num_pruned == 5
    unguarded = plan_layer(scores, ratio=5 / 18, max_expert_share=1.0)
    assert unguarded.routed == {1: [0, 1, 2, 3]} and unguarded.shared == {0: [0]}


# ----- physical = masked, smaller, reloadable -----------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_physical_experts_give_the_masked_logits_and_shrink_by_the_pruned_share(model_type, tmp_path):
    model = tiny_model(model_type)
    dense_parameters = sum(p.numel() for p in model.parameters())
    plans = _random_plans(model)
    for plan in plans.values():
        apply_masked(model, plan)
    masked = _logits(model)
    for name in ("masked", "physical"):
        (tmp_path / name).mkdir()
    save_model(model, None, tmp_path / "masked")
    make_physical(model, plans)
    assert all(isinstance(view.experts, VariableWidthExperts) for view in find_moe_blocks(model))
    torch.testing.assert_close(_logits(model), masked, rtol=1e-5, atol=1e-5)
    pruned_weights = sum(plan.num_pruned for plan in plans.values()) * 3 * find_moe_blocks(model)[0].hidden_size
    assert sum(p.numel() for p in model.parameters()) == dense_parameters - pruned_weights
    save_model(model, None, tmp_path / "physical")
    saved = {name: os.path.getsize(tmp_path / name / "model.safetensors") for name in ("masked", "physical")}
    assert saved["masked"] - saved["physical"] >= 4 * pruned_weights - 4096  # fp32, minus header differences
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "physical").eval()
    assert [view.experts.widths for view in find_moe_blocks(reloaded)] == [view.experts.widths for view in find_moe_blocks(model)]
    torch.testing.assert_close(_logits(reloaded), masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pad_to_saves_a_plain_hf_checkpoint_with_the_masked_logits(model_type, tmp_path):
    model = tiny_model(model_type)
    plans = _random_plans(model, ratio=0.5, protected=())
    for plan in plans.values():
        apply_masked(model, plan)
    masked = _logits(model)
    width = make_padded(model, plans, pad_to=4)
    assert width % 4 == 0 and width < 16
    assert all(view.intermediate_size == width for view in find_moe_blocks(model))
    torch.testing.assert_close(_logits(model), masked, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded), masked, rtol=1e-5, atol=1e-5)


def test_bad_options_and_layouts_fail_with_a_fix():
    with pytest.raises(ValueError, match="pad_to applies to mode: physical"):
        CameraPruning({"ratio": 0.2, "pad_to": 64})
    with pytest.raises(ValueError):
        CameraPruning({"ratio": 1.2})
    model = tiny_model("gpt_oss")
    with pytest.raises(EditError, match="use mode: masked"):
        make_physical(model, _random_plans(model))
    context = RunContext(model=tiny_model("mixtral"), tokenizer=None, source="tiny", output_dir=None)
    with pytest.raises(RecipeError, match="calibration"):
        CameraPruning({"ratio": 0.2}).run(context)


# ----- the stage: layer by layer on the already-pruned model --------------------------------------------------------
def test_stage_decides_each_layer_on_statistics_of_the_model_pruned_so_far(tmp_path):
    model = tiny_model("deepseek_v3")
    by_hand = copy.deepcopy(model)
    stage = CameraPruning({"ratio": 0.3, "alpha": 0.9})
    context = RunContext(model=model, tokenizer=None, source="tiny", output_dir=tmp_path, calibration=CALIBRATION,
                         super_experts=[(find_moe_blocks(model)[0].layer_index, 2)], batch_size=2)
    result = stage.run(context)
    decisions = result.decisions["pruned_channels"]
    first_layer = find_moe_blocks(by_hand)[0].layer_index
    for layer in [view.layer_index for view in find_moe_blocks(by_hand)]:  # one full pass per layer, pruned so far
        statistics = collect_statistics(by_hand, CALIBRATION, ["camera_energy_l2", "camera_energy_max"], batch_size=2)
        view = {v.layer_index: v for v in find_moe_blocks(by_hand)}[layer]
        protected = [2] if layer == first_layer else []
        plan = plan_layer(layer_energies(view, statistics[layer], 0.9), 0.3, protected_experts=protected)
        assert plan.to_json() == decisions[str(layer)]
        if protected:  # the super expert keeps every channel
            assert "2" not in decisions[str(layer)]["routed"]
        apply_masked(by_hand, plan)
    torch.testing.assert_close(_logits(model), _logits(by_hand))
    assert len(decisions) >= 2 and result.plots
    replayed = tiny_model("deepseek_v3")
    assert stage.replay(RunContext(model=replayed, tokenizer=None, source="tiny", output_dir=tmp_path),
                        StageResult(decisions=result.decisions))
    torch.testing.assert_close(_logits(replayed), _logits(model))


# ----- recipe and pipeline ------------------------------------------------------------------------------------------
def test_camera_code_recipe_parses_with_the_code_settings():
    from pathlib import Path

    from moecompress.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "camera_code.yaml")
    stage = recipe.stages[0]
    assert stage.method == "prune_camera" and stage.options.ratio == 0.2
    assert (stage.options.setting("alpha"), stage.options.setting("max_expert_share"),
            stage.options.setting("protect_super_experts")) == (0.9, 1.0, False)
    with pytest.raises(ValueError, match="fixes"):
        CameraPruning({"ratio": 0.2, "preset": "camera_code", "alpha": 0.5})


def test_physical_pipeline_run_saves_a_smaller_native_checkpoint_that_reloads(testbed, tmp_path):
    from conftest import testbed_model_path

    from moecompress.checkpoint import load_model
    from moecompress.pipeline import Pipeline

    source = testbed_model_path("moe-ref-q3")
    stage = CameraPruning({"ratio": 0.25, "mode": "physical"})
    report = Pipeline([stage], calibration={"num_samples": 4, "seq_len": 32, "files": [str(testbed / "calib")]}).run(
        source, tmp_path / "out", dtype="float32")
    record = report["stages"][0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert all(isinstance(view.experts, VariableWidthExperts) for view in find_moe_blocks(reloaded))
    masked, _ = load_model(str(source), dtype=torch.float32)
    context = RunContext(model=masked, tokenizer=None, source=str(source), output_dir=tmp_path)
    CameraPruning({"ratio": 0.25}).replay(context, StageResult(decisions=record["decisions"]))
    tokens = torch.randint(1, 8000, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(reloaded, tokens), _logits(masked, tokens), rtol=1e-4, atol=1e-4)
    assert report["model"]["parameters_after"] < report["model"]["parameters_before"]
    for layer in record["metrics"]["layers"].values():
        assert layer["pruned"] == int(0.25 * layer["micro_experts"])
        assert min(layer["expert_widths"]) >= 80 - int(0.9 * 80)
