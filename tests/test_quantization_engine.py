"""The quantisation engine on the test-bed models: AGQ against a direct computation, save and reload through the
native format (plain ``from_pretrained`` after ``import moecompress``), cold experts, mixed widths, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import testbed_model_path as model_folder
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers the native format with transformers)
from moecompress.calibration import load_calibration
from moecompress.checkpoint import load_model
from moecompress.errors import CheckpointError, MoECompressError, RecipeError
from moecompress.kernels.backend import PackedExperts
from moecompress.models import find_moe_blocks, keep_experts
from moecompress.quantization.gptq import gptq_quantize
from moecompress.quantization.sequential import QuantizationSettings, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model_and_calibration(name, testbed, num_samples=4, seq_len=32):
    model, tokenizer = load_model(model_folder(name), dtype=torch.float32)
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=num_samples, seq_len=seq_len,
                                   seed=0)
    return model, tokenizer, calibration


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("name", ["moe-ref-q3", "moe-ref-mx", "moe-ref-ds"])
def test_gptq_model_saves_and_reloads_with_plain_from_pretrained(name, testbed, tmp_path):
    model, tokenizer, calibration = _model_and_calibration(name, testbed)
    settings = QuantizationSettings(method="gptq", bits=4, group_size=32, agq=True,
                                    targets=("routed_experts", "shared_experts") if name == "moe-ref-ds" else ("routed_experts",))
    quantize_model(model, settings, calibration)
    assert all(isinstance(view.experts, PackedExperts) for view in find_moe_blocks(model))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)  # packed tensors bit-identical
    input_ids = calibration.input_ids[:2, :24]
    assert torch.equal(_logits(model, input_ids), _logits(reloaded, input_ids))
    # moecompress's own loader and a statistics pass work on the packed model too
    again, _ = load_model(tmp_path, dtype=torch.float32)
    assert torch.equal(_logits(again, input_ids), _logits(model, input_ids))


def test_agq_expert_equals_gptq_on_directly_computed_affinity_hessian(testbed):
    """Layer 0's inputs are the embeddings (no earlier layer is quantised), so one expert's AGQ result must equal
    GPTQ run on ``sum_t c_t x_t x_t^T`` computed from a hooked HF forward of the original model."""
    model, _, calibration = _model_and_calibration("moe-ref-q3", testbed, num_samples=4, seq_len=48)
    view = find_moe_blocks(model)[0]
    captured = {}

    def hook(module, args, kwargs, output):
        hidden, index, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
        captured.setdefault("x", []).append(hidden.detach().clone())
        captured.setdefault("index", []).append(index.detach().clone())
        captured.setdefault("weights", []).append(weights.detach().float().clone())

    handle = view.experts.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for start in range(0, calibration.num_samples, 8):
            model(calibration.input_ids[start:start + 8], use_cache=False)
    handle.remove()
    x, index, weights = (torch.cat(captured[key]) for key in ("x", "index", "weights"))
    expert = int(torch.bincount(index.reshape(-1)).argmax())  # the busiest expert
    token, slot = torch.where(index == expert)
    combine = weights[token, slot]
    hessian = (x[token] * combine[:, None]).T @ x[token]
    expected = gptq_quantize(view.experts.gate_up_proj[expert].detach().clone(), hessian, 3, group_size=32, damp=0.01,
                             scale_search="mse")  # the stage's default scales

    settings = QuantizationSettings(method="gptq", bits=3, group_size=32, agq=True, cold_token_floor=1)
    quantize_model(model, settings, calibration)
    packed = find_moe_blocks(model)[0].experts.expert_linear(expert, "gate_up_proj")
    # The two Hessians agree to float rounding only (another summation order), and GPTQ carries a rare code that
    # rounds the other way into the columns after it: so almost all codes and scales agree, not all of them.
    same = (packed.codes() == expected.packed.codes()).float().mean()
    assert same > 0.99
    assert _share_close(packed.scales, expected.packed.scales) > 0.99
    # and the weighting matters: plain GPTQ on the same tokens gives other codes and scales
    plain = gptq_quantize(view.experts.gate_up_proj[expert].detach().clone(), x[token].T @ x[token], 3,
                          group_size=32, damp=0.01, scale_search="mse")
    assert (plain.packed.codes() == expected.packed.codes()).float().mean() < 0.95
    assert _share_close(plain.packed.scales, expected.packed.scales) < 0.5


def _share_close(values: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-3) -> float:
    """Share of ``values`` within ``rtol`` (relative) of ``reference``."""
    relative = (values.float() - reference.float()).abs() / reference.float().abs().clamp_min(1e-12)
    return float((relative <= rtol).float().mean())


def test_gptq_beats_rtn_on_the_calibration_objective(testbed):
    model, _, calibration = _model_and_calibration("moe-ref-mx", testbed, num_samples=8, seq_len=64)
    rtn_model, _, _ = _model_and_calibration("moe-ref-mx", testbed)
    quantize_model(rtn_model, QuantizationSettings(method="rtn", bits=2, group_size=32))
    result = quantize_model(model, QuantizationSettings(method="gptq", bits=2, group_size=32), calibration)
    input_ids = calibration.input_ids
    full, _, _ = _model_and_calibration("moe-ref-mx", testbed)
    reference = torch.log_softmax(_logits(full, input_ids), -1)

    def divergence(quantised):
        return float(torch.nn.functional.kl_div(torch.log_softmax(_logits(quantised, input_ids), -1), reference,
                                                log_target=True, reduction="batchmean"))

    assert divergence(model) < 0.8 * divergence(rtn_model)
    assert all(record.gate_up_error is not None for record in result.experts)


def test_cold_experts_get_finite_weights_and_are_reported(testbed, tmp_path):
    model, tokenizer, _ = _model_and_calibration("moe-ref-q3", testbed)
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=1, seq_len=6, seed=0)
    result = quantize_model(model, QuantizationSettings(method="gptq", bits=2, group_size=32, agq=True), calibration)
    cold = [record for record in result.experts if record.cold]
    assert len(cold) == len(result.experts)  # 6 tokens x top-4 picks: every expert is far below its floor
    assert any(record.tokens == 0 for record in cold) and any(record.tokens > 0 for record in cold)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    for file in tmp_path.glob("*.safetensors"):
        for key, tensor in load_file(file).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), key


def test_cold_damping_grows_below_the_floor_and_can_be_turned_off(testbed):
    from moecompress.quantization.sequential import _cold_damping

    hessian = torch.eye(4)
    assert _cold_damping(0.01, 64, 256, hessian) == pytest.approx(0.01 + 0.75)
    assert _cold_damping(0.01, 300, 256, hessian) == pytest.approx(0.01)
    assert _cold_damping(0.01, 64, 0, hessian) == pytest.approx(0.01)  # off: GPTQ's plain damping
    assert _cold_damping(0.01, 0, 256, hessian) is None  # no token: rounded
    # on a model: off changes exactly the cold experts that saw some tokens (those with none are rounded either way)
    quantised = {}
    for cold_damping in (True, False):
        model, tokenizer, _ = _model_and_calibration("moe-ref-q3", testbed)
        calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=2, seq_len=32, seed=0)
        settings = QuantizationSettings(method="gptq", bits=2, group_size=32, scale_search="minmax",
                                        cold_damping=cold_damping)
        result = quantize_model(model, settings, calibration)
        view = find_moe_blocks(model)[0]
        quantised[cold_damping] = [view.experts.expert_linear(e, "gate_up_proj").dequantize(torch.float32)
                                   for e in range(view.num_experts)]
        tokens = {r.expert: r.tokens for r in result.experts if r.layer == view.layer_index}
    changed = [e for e in tokens if not torch.equal(quantised[True][e], quantised[False][e])]
    assert changed and all(0 < tokens[e] < 256 for e in changed)
    assert all(torch.equal(quantised[True][e], quantised[False][e]) for e in tokens if tokens[e] == 0)


def test_mixed_widths_and_pruned_layers_round_trip(testbed, tmp_path):
    model, _, calibration = _model_and_calibration("moe-ref-q3", testbed)
    views = find_moe_blocks(model)
    keep_experts(model, {views[0].layer_index: list(range(20)), views[2].layer_index: list(range(12))})
    bit_map = {(view.layer_index, expert): (2, 3, 4, 8)[(view.layer_index + expert) % 4]
               for view in find_moe_blocks(model) for expert in range(view.num_experts)}
    quantize_model(model, QuantizationSettings(method="gptq", bits=4, group_size=32, bit_map=bit_map), calibration)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "moecompress"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for view in find_moe_blocks(reloaded):
        expected = [bit_map[(view.layer_index, expert)] for expert in range(view.num_experts)]
        assert view.experts.expert_bits.tolist() == expected
    assert [view.num_experts for view in find_moe_blocks(reloaded)] == [20, 32, 12, 32, 32, 32]
    input_ids = calibration.input_ids[:2, :16]
    assert torch.equal(_logits(model, input_ids), _logits(reloaded, input_ids))


def test_rtn_of_attention_and_experts_round_trips(testbed, tmp_path):
    model, _, calibration = _model_and_calibration("moe-ref-mx", testbed)
    quantize_model(model, QuantizationSettings(method="rtn", bits=8, group_size=-1,
                                               targets=("routed_experts", "attention")))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "PackedLinear"
    input_ids = calibration.input_ids[:2, :16]
    assert torch.equal(_logits(model, input_ids), _logits(reloaded, input_ids))


@pytest.mark.parametrize("options, message", [
    ({"bits": 5}, "cannot be packed"),
    ({"group_size": 40}, "multiple of 16"),
    ({"targets": ["routers"]}, "unknown target"),
])
def test_bad_quantisation_options_are_one_line_recipe_errors(options, message):
    from moecompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=message) as raised:
        parse_recipe({"stages": [{"method": "gptq", **options}]})
    assert "\n" not in str(raised.value) and str(raised.value).startswith("stages[0] (gptq)")


def test_a_target_that_matches_nothing_is_refused_before_work(testbed):
    model, _, _ = _model_and_calibration("moe-ref-mx", testbed)
    with pytest.raises(MoECompressError, match="shared_experts.*matches nothing"):
        quantize_model(model, QuantizationSettings(method="rtn", targets=("routed_experts", "shared_experts")))


def test_a_truncated_packed_checkpoint_is_a_clear_error(testbed, tmp_path):
    model, _, _ = _model_and_calibration("moe-ref-q3", testbed)
    quantize_model(model, QuantizationSettings(method="rtn", bits=4, group_size=32))
    model.save_pretrained(tmp_path / "packed")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "packed", broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(broken)


def test_a_stopped_gptq_run_resumes_at_the_first_unwritten_layer(testbed, tmp_path, monkeypatch):
    from moecompress.quantization import sequential

    model, _, calibration = _model_and_calibration("moe-ref-q3", testbed)
    settings = QuantizationSettings(method="gptq", bits=3, group_size=32, agq=True, progress_dir=tmp_path / "layers",
                                    fingerprint="run-1")
    uninterrupted, _, _ = _model_and_calibration("moe-ref-q3", testbed)
    quantize_model(uninterrupted, QuantizationSettings(method="gptq", bits=3, group_size=32, agq=True), calibration)

    original_run = sequential._GPTQLayer.run
    quantized_layers = []

    def run_until_layer_3(self):
        if self.layer_index == 3:
            raise KeyboardInterrupt  # the run is killed while layer 3 is being quantised
        quantized_layers.append(self.layer_index)
        original_run(self)

    monkeypatch.setattr(sequential._GPTQLayer, "run", run_until_layer_3)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, settings, calibration)
    assert quantized_layers == [0, 1, 2]

    quantized_layers.clear()
    monkeypatch.setattr(sequential._GPTQLayer, "run", lambda self: (quantized_layers.append(self.layer_index),
                                                                      original_run(self)))
    fresh, _, _ = _model_and_calibration("moe-ref-q3", testbed)
    result = quantize_model(fresh, settings, calibration)
    assert quantized_layers == [3, 4, 5]  # layers 0-2 came from disk
    assert len(result.experts) == 6 * 32
    saved, expected = fresh.state_dict(), uninterrupted.state_dict()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)  # same as a run never stopped


@pytest.mark.parametrize("bits, group_size", [(4, 32), (2, 64), (8, -1)])
def test_bits_per_parameter_count_scales_and_packing(testbed, bits, group_size):
    """The summary counts a packed expert's weights (not its int32 words) and its scales' bytes: routed experts take
    ``bits + 16 / group`` bits per weight in a bf16 model (a ragged last group adds a little)."""
    from moecompress.models import model_summary

    model, _ = load_model(model_folder("moe-ref-q3"), dtype=torch.bfloat16)
    before = model_summary(model)
    quantize_model(model, QuantizationSettings(method="rtn", bits=bits, group_size=group_size))
    after = model_summary(model)
    assert after["parameters"] == before["parameters"]  # the same weights, now packed
    routed_bits = 8 * after["bytes"]["routed_experts"] / after["parameters"]["routed_experts"]
    hidden, intermediate = 256, 80
    scales_per_row = {32: (hidden / 32, 3), 64: (hidden / 64, 2), -1: (1, 1)}[group_size]
    # gate_up rows see `hidden` inputs, down rows `intermediate` (80 = 2 full groups of 32 + a ragged one, ...)
    expected_scale_bits = 16 * (2 * intermediate * scales_per_row[0] + hidden * scales_per_row[1]) / (3 * intermediate * hidden)
    assert routed_bits == pytest.approx(bits + expected_scale_bits, abs=0.02)


def test_inspect_describes_a_native_checkpoint_without_loading_it(testbed, tmp_path):
    from moecompress.commands.inspect import inspect_checkpoint
    from moecompress.models import model_summary

    model, _ = load_model(model_folder("moe-ref-q3"), dtype=torch.bfloat16)
    quantize_model(model, QuantizationSettings(method="rtn", bits=3, group_size=64))
    model.save_pretrained(tmp_path)
    described = inspect_checkpoint(str(tmp_path))
    loaded = model_summary(model)
    assert described["parameters"] == loaded["parameters"]
    assert described["bytes"] == loaded["bytes"]
    assert described["bytes_on_disk"]["total"] == loaded["bytes"]["total"]


def test_a_pipeline_model_with_different_expert_counts_per_layer_reloads(testbed, tmp_path):
    """Not quantised, but not describable by a plain config either: the pipeline saves it in the native format."""
    from moecompress.checkpoint import save_model

    model, tokenizer = load_model(model_folder("moe-ref-q3"), dtype=torch.float32)
    keep_experts(model, {0: list(range(20)), 2: list(range(12))})
    save_model(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager")
    assert [view.num_experts for view in find_moe_blocks(reloaded)] == [20, 32, 12, 32, 32, 32]
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(model, input_ids), _logits(reloaded, input_ids))


def test_quantising_a_remap_merged_model_is_refused_with_the_fix():
    """Called directly (no recipe), quantize_model refuses a model whose router maps onto merged experts."""
    from moecompress.errors import UnsupportedModelError
    from moecompress.models.edits import merge_experts

    model, _ = load_model(model_folder("moe-ref-mx"), dtype=torch.float32)
    merge_experts(model, {view.layer_index: [[0, 1], [2, 3], [4, 5], [6, 7]] for view in find_moe_blocks(model)},
                  router_rule="remap")
    with pytest.raises(UnsupportedModelError, match="router_rule='collapse'"):
        quantize_model(model, QuantizationSettings(method="rtn", bits=4, group_size=32))
