"""compressed-tensors export: the library decompresses every expert to exactly our dequantised weights, plain
transformers (in a subprocess without moecompress) loads the folder to the same weights, widening is lossless."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import native_folder, native_logits, plain_transformers_logits, read_config
from safetensors import safe_open

from moecompress.export import export_folder
from moecompress.export.compressed_tensors import decompression_difference
from moecompress.export.deployability import NotDeployableError

pytestmark = pytest.mark.usefixtures("one_thread")


def _keys(folder):
    keys = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.update({key: handle.get_slice(key).get_shape() for key in handle.keys()})
    return keys


def _round_trip(tmp_path, name, **quantization):
    native = native_folder(tmp_path, name, **quantization)
    exported = tmp_path / "ct"
    report = export_folder(native, exported, "compressed-tensors")
    assert decompression_difference(native, exported)["max_abs_diff"] == 0.0  # the library reproduces our weights
    dequantized = tmp_path / "dequantized"
    export_folder(native, dequantized, "hf", dequantize=True)
    plain_ct, plain_ours = plain_transformers_logits([exported, dequantized], tmp_path)
    # our dequantised weights and the compressed-tensors folder, through the same plain-transformers code: identical
    assert torch.equal(plain_ct, plain_ours)
    # our packed model computes with fp32 dequantisation; transformers' compressed-tensors path rounds the
    # dequantised experts to the scales' dtype (bf16) first: close, not equal
    difference = (native_logits(native) - plain_ct).abs().max().item()
    return native, exported, report, difference


def test_mixtral_round_trip(tmp_path):
    native, exported, report, difference = _round_trip(tmp_path, "moe-ref-mx")
    assert difference < 0.1
    keys = _keys(exported)
    # Mixtral's own per-expert names (w1 gate, w3 up, w2 down), as transformers' conversion mapping expects them
    assert keys["model.layers.2.block_sparse_moe.experts.7.w1.weight_packed"] == [288, 32]  # 256 * 4 / 32 words
    assert keys["model.layers.2.block_sparse_moe.experts.7.w2.weight_scale"] == [256, 9]
    assert keys["model.layers.2.block_sparse_moe.experts.7.w3.weight_shape"] == [2]
    assert not any("_w4" in key or "expert_bits" in key for key in keys)
    quantization = read_config(exported)["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    assert quantization["quantization_status"] == "compressed"
    # every unquantized linear by name, as llm-compressor writes it (routers and attention included)
    assert {"lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.5.self_attn.o_proj"} <= set(quantization["ignore"])
    [group] = quantization["config_groups"].values()
    assert group["weights"]["num_bits"] == 4
    assert group["weights"]["group_size"] == 32 and group["weights"]["symmetric"] is True
    assert "experts" in group["targets"][0]
    saved = json.loads((exported / "export_report.json").read_text())
    assert saved["bytes_on_disk"] == report["bytes_on_disk"] > 0
    assert 4.0 < saved["expert_bits_per_parameter"] < 5.0  # 4-bit codes + one bf16 scale per 32 weights
    assert "--quantization compressed-tensors" in saved["load"]["vllm"]


@pytest.mark.slow
@pytest.mark.parametrize("name, group_size", [("moe-ref-q3", 16), ("moe-ref-ds", 32)])
def test_qwen3_and_deepseek_round_trip(tmp_path, name, group_size):
    # routed experts only: compressed-tensors decompresses quantized plain linears (shared experts) from the scales
    # transformers loaded in fp32, not in bf16 like our --dequantize export (see the pruned DeepSeek test)
    _, exported, _, difference = _round_trip(tmp_path, name, group_size=group_size)
    assert difference < 2.0  # bf16 rounding of dequantised weights can flip a near-tie in 32-expert routing


def test_asymmetric_zero_points_decompress_exactly(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", bits=4, symmetric=False, targets=("routed_experts", "attention"))
    with pytest.raises(NotDeployableError, match="symmetric: true.*--for vllm"):  # transformers drops zero points
        export_folder(native, tmp_path / "ct", "compressed-tensors")
    export_folder(native, tmp_path / "ct", "compressed-tensors", consumer="vllm")
    assert decompression_difference(native, tmp_path / "ct") == {"modules": 6 * 8 * 3 + 6 * 4, "max_abs_diff": 0.0}
    keys = _keys(tmp_path / "ct")
    assert keys["model.layers.0.self_attn.q_proj.weight_packed"] == [256, 32]
    # zero points packed along the output dimension: ceil(288 * 4 / 32) = 36 words per group column
    assert keys["model.layers.0.block_sparse_moe.experts.0.w1.weight_zero_point"] == [36, 8]
    report = json.loads((tmp_path / "ct" / "export_report.json").read_text())
    assert any("requires zero-point values" in note for note in report["notes"])  # transformers refuses it
    assert sorted(report["load"]) == ["moecompress_native", "vllm"]


def test_mixed_widths_per_layer_get_one_group_per_scheme(tmp_path):
    widths = (4, 3, 2, 8, 4, 3)
    native = native_folder(tmp_path, "moe-ref-mx", bit_map=lambda layer, expert: widths[layer])
    with pytest.raises(NotDeployableError, match=r"--widen-to-model-max \(every layer at 8 bits.*--for vllm"):
        export_folder(native, tmp_path / "refused", "compressed-tensors")
    assert not (tmp_path / "refused").exists()
    report = export_folder(native, tmp_path / "ct", "compressed-tensors", consumer="vllm")
    assert decompression_difference(native, tmp_path / "ct")["max_abs_diff"] == 0.0
    groups = read_config(tmp_path / "ct")["quantization_config"]["config_groups"]
    by_bits = {group["weights"]["num_bits"]: group["targets"] for group in groups.values()}
    assert set(by_bits) == {2, 3, 4, 8}
    assert r"layers\.(?:0|4)\." in by_bits[4][0] and r"layers\.(?:1|5)\." in by_bits[3][0]
    # the widest group is transformers' experts scheme, so the narrower layers fail to decode there (not silently)
    assert groups["group_0"]["weights"]["num_bits"] == 8 and list(groups) == sorted(groups)
    assert sorted(report["load"]) == ["moecompress_native", "vllm"]  # vLLM only: the "load with" lines say so
    assert any("raises on the narrower layers" in note for note in report["notes"])
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "vllm serve" in card and "Not plain transformers" in card


def test_config_lists_every_unquantized_linear_by_name(tmp_path):
    import compressed_tensors

    native = native_folder(tmp_path, "moe-ref-ds", targets=("routed_experts", "shared_experts"))
    export_folder(native, tmp_path / "ct", "compressed-tensors")
    quantization = read_config(tmp_path / "ct")["quantization_config"]
    assert quantization["version"] == compressed_tensors.__version__  # as llm-compressor's ModelCompressor writes it
    ignore = quantization["ignore"]
    # attention (MLA), routers, layer 0's dense MLP, lm_head: by name; no quantized module, no norm or embedding
    for name in ("model.layers.0.self_attn.q_a_proj", "model.layers.3.self_attn.kv_b_proj", "model.layers.2.mlp.gate",
                 "model.layers.0.mlp.down_proj", "lm_head"):
        assert name in ignore
    assert not any("shared_experts" in name or "norm" in name or "embed" in name or name.startswith("re:")
                   for name in ignore)


def test_widen_to_layer_max_is_lossless(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", bit_map=lambda layer, expert: (2, 4)[expert % 2])
    with pytest.raises(NotDeployableError, match="granularity: layer.*--widen-to-layer-max"):
        export_folder(native, tmp_path / "refused", "compressed-tensors")
    assert not (tmp_path / "refused").exists()
    report = export_folder(native, tmp_path / "ct", "compressed-tensors", widen_to_layer_max=True)
    assert report["widened_experts"] == 6 * 4
    # the 2-bit experts, stored as 4-bit codes q*4 with scale s/4, decompress to the very same weights
    assert decompression_difference(native, tmp_path / "ct")["max_abs_diff"] == 0.0
    [group] = read_config(tmp_path / "ct")["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 4
    assert report["bytes_on_disk"] > report["source_bytes_on_disk"]  # widening costs space


@pytest.mark.slow
def test_pruned_deepseek_with_quantized_shared_experts_loads_in_plain_transformers(tmp_path):
    native = native_folder(tmp_path, "moe-ref-ds", targets=("routed_experts", "shared_experts"),
                           keep=lambda views: {view.layer_index: list(range(0, 32, 2)) for view in views})
    export_folder(native, tmp_path / "ct", "compressed-tensors")
    assert decompression_difference(native, tmp_path / "ct") == {"modules": 5 * 16 * 3 + 5 * 3, "max_abs_diff": 0.0}
    assert read_config(tmp_path / "ct")["n_routed_experts"] == 16
    [plain] = plain_transformers_logits([tmp_path / "ct"], tmp_path)
    # shared experts are plain linears: compressed-tensors decompresses them from the fp32-loaded scales, routed
    # experts in bf16; both close to our packed model
    assert (plain - native_logits(native)).abs().max() < 0.1
