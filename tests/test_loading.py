"""load_model: loads folders, never writes into them, and turns every bad input into a clear error."""

from __future__ import annotations

import json
import os

import conftest
import pytest
import torch
import transformers

from moecompress.checkpoint import load_model
from moecompress.errors import CheckpointError, UnsupportedModelError
from moecompress.models import find_moe_blocks
from moecompress.models.tiny import tiny_model


def _folder_state(folder):
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def test_testbed_loads_with_tokenizer_and_leaves_the_folder_untouched(testbed):
    folder = conftest.testbed_model_path("moe-ref-q3")
    before = _folder_state(folder)
    model, tokenizer = load_model(folder, dtype=torch.float32)
    assert _folder_state(folder) == before
    assert not model.training and model.dtype == torch.float32
    assert model.config._experts_implementation == "eager"
    assert len(find_moe_blocks(model)) == 6
    tokens = tokenizer("def f(x):", return_tensors="pt")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**tokens).logits, reference(**tokens).logits)


def test_folder_without_tokenizer_gives_none(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype=torch.float32)
    assert tokenizer is None and len(find_moe_blocks(model)) == 2


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_unreachable_hub_id():
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        load_model("no-such-org/no-such-moe-model")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_dense_model_names_supported_families(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'llama' is not a supported MoE family.*DeepSeek-V3"):
        load_model(tmp_path)


def test_moe_family_configured_without_experts_is_rejected(tmp_path):
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=8, mlp_only_layers=[0, 1],
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="no MoE blocks"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:-64], "truncated"),
        (lambda data: b"not a safetensors file at all", "header length"),
        (lambda data: data[:8] + b"{broken json" + data[20:], "not valid JSON"),
        (lambda data: b"", "shorter than a safetensors header"),
    ],
)
def test_corrupt_safetensors(tmp_path, damage, message):
    tiny_model("mixtral").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_missing_shard_named_by_the_index(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match="missing safetensors files"):
        load_model(tmp_path)


def test_folder_without_weights(tmp_path):
    tiny_model("mixtral").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)
