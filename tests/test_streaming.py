"""Streamed compress runs (``moecompress.streaming``): the same result as the in-memory run, bit for bit, written
shard by shard; resuming at the first layer not yet staged; recipes that cannot stream are named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import testbed_model_path as model_folder
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers the native format with transformers)
from moecompress.checkpoint.shards import INDEX_FILE
from moecompress.errors import RecipeError, RunInterrupted
from moecompress.pipeline import Pipeline
from moecompress.quantization import sequential
from moecompress.streaming import stream_plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def calibration_config(testbed):
    return {"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32}


def _recipe(calibration, *stages):
    return {"calibration": calibration, "stages": list(stages)}


def _tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _assert_same_checkpoint(first, second):
    a, b = _tensors(first), _tensors(second)
    assert set(a) == set(b)
    assert all(a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]) for key in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def _logits(folder, input_ids):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("name", ["moe-ref-q3", pytest.param("moe-ref-ds", marks=pytest.mark.slow)])
def test_streamed_prune_and_gptq_equal_the_in_memory_run_bit_for_bit(name, tmp_path, calibration_config):
    pruning = {"method": "prune_frequency", "num_experts_to_keep": 24}
    if name == "moe-ref-ds":
        pruning["group_balanced"] = True
    recipe = _recipe(calibration_config, pruning, {"method": "gptq", "bits": 3, "group_size": 32, "agq": True})
    reports = {mode: Pipeline.from_recipe(recipe).run(model_folder(name), tmp_path / mode, execution=mode)
               for mode in ("in_memory", "streamed")}
    streamed = tmp_path / "streamed"
    _assert_same_checkpoint(tmp_path / "in_memory", streamed)
    # one shard per decoder layer plus one for the rest, listed by the index
    index = json.loads((streamed / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 7 and len(list(streamed.glob("model-*.safetensors"))) == 7
    assert not (streamed / ".stream-layers").exists()
    assert "stream layers" in reports["streamed"]["timings"]
    for key in ("parameters_after", "bytes_after", "bits_per_parameter"):
        assert reports["streamed"]["model"][key] == reports["in_memory"]["model"][key]
    gptq = {mode: next(s for s in reports[mode]["stages"] if s["method"] == "gptq") for mode in reports}
    assert gptq["streamed"]["decisions"] == gptq["in_memory"]["decisions"]
    input_ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(streamed, input_ids), _logits(tmp_path / "in_memory", input_ids))


def test_streamed_pruning_writes_a_plain_checkpoint_and_evaluate_reads_it(tmp_path, calibration_config):
    recipe = _recipe(calibration_config, {"method": "prune_reap", "num_experts_to_keep": 16},
                     {"method": "evaluate", "tasks": ["tb_arith"], "limit": 4})
    report = Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "streamed", execution="streamed")
    Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "in_memory", execution="in_memory")
    _assert_same_checkpoint(tmp_path / "in_memory", tmp_path / "streamed")
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_local_experts"] == 16  # plain HF: no package needed
    evaluate = report["stages"][-1]
    assert evaluate["method"] == "evaluate" and "tb_arith" in evaluate["metrics"]["after"]
    assert report["model"]["parameters_after"] < report["model"]["parameters_before"]


def test_a_stopped_streamed_run_resumes_at_the_first_layer_not_staged(tmp_path, calibration_config, monkeypatch):
    recipe = _recipe(calibration_config, {"method": "prune_frequency", "num_experts_to_keep": 24},
                     {"method": "rtn", "bits": 4, "group_size": 32})
    quantized_layers = []
    original = sequential._quantize_layer_rtn

    def counting(model, layer_index, settings, result):
        if len(quantized_layers) == 3 and not getattr(counting, "resumed", False):
            raise KeyboardInterrupt  # Ctrl-C while layer 3 is being quantised
        quantized_layers.append(layer_index)
        return original(model, layer_index, settings, result)

    monkeypatch.setattr(sequential, "_quantize_layer_rtn", counting)
    out = tmp_path / "out"
    with pytest.raises(RunInterrupted, match="resumed"):
        Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), out, execution="streamed")
    assert quantized_layers == [0, 1, 2]
    counting.resumed = True
    Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), out, execution="streamed")
    assert quantized_layers == [0, 1, 2, 3, 4, 5]  # layers 0-2 came from the staged files
    Pipeline.from_recipe(recipe).run(model_folder("moe-ref-q3"), tmp_path / "fresh", execution="streamed")
    _assert_same_checkpoint(tmp_path / "fresh", out)


def test_recipes_that_cannot_stream_are_named_before_any_work(tmp_path, calibration_config):
    # collapse: a merge that gptq may follow (after a remap merge the recipe is refused earlier, see test_recipe)
    merge = _recipe(calibration_config, {"method": "merge_uncurl", "num_experts_to_keep": 16, "router_rule": "collapse"},
                    {"method": "gptq", "bits": 4})
    with pytest.raises(RecipeError, match="merge_uncurl.*needs the whole model"):
        Pipeline.from_recipe(merge).run(model_folder("moe-ref-q3"), tmp_path / "out", execution="streamed")
    assert list(tmp_path.iterdir()) == []
    naee = _recipe(calibration_config, {"method": "prune_naee", "num_experts_to_keep": 16})
    with pytest.raises(RecipeError, match="prune_naee"):
        Pipeline.from_recipe(naee).run(model_folder("moe-ref-q3"), tmp_path / "out", execution="streamed")
    stages = Pipeline.from_recipe(_recipe(calibration_config, {"method": "gptq", "bits": 4},
                                          {"method": "prune_frequency", "num_experts_to_keep": 16})).stages
    plan, reason = stream_plan(stages)
    assert plan is None and "prune_frequency" in reason
