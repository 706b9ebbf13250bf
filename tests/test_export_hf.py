"""Plain Hugging Face export: uniformly pruned models load with no package (subprocess without moecompress) and give
our logits; quantized input needs --dequantize; non-uniform expert counts are refused."""

from __future__ import annotations

import pytest
import torch
from export_helpers import INPUT_IDS, native_folder, plain_transformers_logits, read_config

from moecompress.checkpoint import load_model
from moecompress.errors import UsageError
from moecompress.export import export_folder
from moecompress.export.deployability import NotDeployableError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniformly_pruned_model_exports_and_loads_without_moecompress(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", quantize=False,
                           keep=lambda views: {view.layer_index: [0, 2, 3, 5, 6, 7] for view in views})
    report = export_folder(native, tmp_path / "hf", "hf")
    config = read_config(tmp_path / "hf")
    assert "quantization_config" not in config and config["num_local_experts"] == 6
    [plain] = plain_transformers_logits([tmp_path / "hf"], tmp_path)
    model, _ = load_model(native, dtype=torch.float32)
    with torch.no_grad():
        ours = model(INPUT_IDS).logits
    assert torch.allclose(plain, ours, atol=1e-4, rtol=0)  # same weights; experts backends may sum in another order
    assert report["bytes_on_disk"] == report["source_bytes_on_disk"]  # a copy: the same tensors
    assert report["bits_per_parameter"] == pytest.approx(16.0)


def test_quantized_input_needs_dequantize(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx")
    with pytest.raises(UsageError, match="--format compressed-tensors, or add --dequantize"):
        export_folder(native, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    report = export_folder(native, tmp_path / "hf", "hf", dequantize=True)
    assert report["bytes_on_disk"] > 2 * report["source_bytes_on_disk"]  # full-size weights again
    assert "quantization_config" not in read_config(tmp_path / "hf")


def test_different_expert_counts_are_refused(tmp_path):
    native = native_folder(tmp_path, "moe-ref-mx", quantize=False, keep=lambda views: {views[1].layer_index: [0, 1, 2]})
    with pytest.raises(NotDeployableError, match="layer_budget: uniform"):
        export_folder(native, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
