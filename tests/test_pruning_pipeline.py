"""Stages in a pipeline run: every rewrite kind (keep experts, R1 remap merge, R2 collapse merge) saves a model that
plain ``from_pretrained`` reloads with the same logits as the stage's decisions replayed in memory; progressive
mode against layer-by-layer passes done by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import testbed_model_path as model_folder
from transformers import AutoModelForCausalLM

from moecompress.calibration import collect_statistics
from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks
from moecompress.models.edits import keep_experts
from moecompress.pipeline import Pipeline, RunContext, StageResult
from moecompress.pruning.base import select_kept_experts
from moecompress.pruning.hcsmoe import HcSmoeMerging
from moecompress.pruning.naee import NaeePruning
from moecompress.pruning.premoe import PremoePruning
from moecompress.pruning.reap import ReapPruning
from moecompress.pruning.uncurl import UncurlMerging

pytestmark = pytest.mark.usefixtures("one_thread")
CALIBRATION = {"num_samples": 8, "seq_len": 32}


@pytest.mark.parametrize("model_name, stage", [
    ("moe-ref-q3", ReapPruning({"num_experts_to_keep": 16})),
    ("moe-ref-mx", UncurlMerging({"num_experts_to_keep": 4})),
    ("moe-ref-ds", HcSmoeMerging({"num_experts_to_keep": 16, "router_rule": "collapse"})),
])
def test_pruned_and_merged_models_reload_with_plain_from_pretrained_and_the_same_logits(testbed, tmp_path, model_name, stage):
    source = model_folder(model_name)
    report = Pipeline([stage], calibration={**CALIBRATION, "files": [str(testbed / "calib")]}).run(
        source, tmp_path / "out", dtype="float32")
    record = report["stages"][0]
    assert record["decisions"]["uniform_layers"] is True and record["plots"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager").eval()
    replayed, _ = load_model(str(source), dtype=torch.float32)
    context = RunContext(model=replayed, tokenizer=None, source=str(source), output_dir=tmp_path,
                         super_experts=[tuple(pair) for pair in report["super_experts"]])
    assert stage.replay(context, StageResult(decisions=record["decisions"], changed_structure=True))
    tokens = torch.randint(1, 8192, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = replayed(tokens).logits
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        compacted, _ = load_model(str(tmp_path / "out"), dtype=torch.float32)  # R1: merged experts stored once
        torch.testing.assert_close(compacted(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    assert all(view.num_experts == stage.options.num_experts_to_keep for view in find_moe_blocks(compacted))
    assert report["model"]["parameters_after"] < report["model"]["parameters_before"]


def test_progressive_mode_scores_each_layer_after_the_layers_before_it_were_pruned(testbed, tmp_path):
    model, _ = load_model(str(model_folder("moe-ref-q3")), dtype=torch.float32)
    tokens = torch.randint(1, 8192, (4, 24), generator=torch.Generator().manual_seed(1))
    # by hand: one full pass per layer on the model pruned so far (the paper's mean score)
    by_hand = copy.deepcopy(model)
    expected = {}
    for view in find_moe_blocks(model):
        layer = view.layer_index
        statistics = collect_statistics(by_hand, tokens, ["reap_sums", "expert_token_counts"], batch_size=2)
        counts, sums = statistics[layer]["expert_token_counts"].double(), statistics[layer]["reap_sums"].double()
        scores = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        expected[layer] = select_kept_experts({layer: scores}, 12)[layer]
        keep_experts(by_hand, {layer: expected[layer]})
    progressive = copy.deepcopy(model)
    context = RunContext(model=progressive, tokenizer=None, source="", output_dir=tmp_path, calibration=tokens,
                         batch_size=2)
    result = ReapPruning({"num_experts_to_keep": 12, "progressive": True, "preset": "reap_paper"}).run(context)
    assert {int(layer): kept for layer, kept in result.decisions["kept_experts"].items()} == expected
    assert context.calibration_passes == 1
    plain = ReapPruning({"num_experts_to_keep": 12, "preset": "reap_paper"}).run(
        RunContext(model=copy.deepcopy(model), tokenizer=None, source="", output_dir=tmp_path, calibration=tokens,
                   batch_size=2))
    assert plain.decisions["kept_experts"]["0"] == result.decisions["kept_experts"]["0"]  # the first layer agrees
    assert plain.decisions["kept_experts"] != result.decisions["kept_experts"]  # later layers see pruned inputs
    with torch.no_grad():
        torch.testing.assert_close(progressive(tokens).logits, by_hand(tokens).logits)


@pytest.mark.parametrize("stage", [PremoePruning({"num_experts_to_keep": 4}),
                                   NaeePruning({"num_experts_to_keep": 6, "max_tokens": 64})])
def test_a_first_stage_with_statistic_options_needs_no_pass_beyond_the_profile(testbed, tmp_path, stage):
    report = Pipeline([stage], calibration={**CALIBRATION, "files": [str(testbed / "calib")]}).run(
        model_folder("moe-ref-mx"), tmp_path / "out", dtype="float32")
    assert report["timings"]["calibration passes in stages"] == 0.0  # the profiling pass served the stage
    assert all(len(kept) == stage.options.num_experts_to_keep
               for kept in report["stages"][0]["decisions"]["kept_experts"].values())
