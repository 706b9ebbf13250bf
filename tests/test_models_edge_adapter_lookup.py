"""A checkpoint whose ``model_type`` is new but whose classes are a supported family's (a config class derived
from DeepseekV3Config, or ``architectures: ["DeepseekV3ForCausalLM"]``) finds the family's adapter: views, edits,
save/reload and ``inspect`` work on it. Dense and unknown models are still refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from moecompress.cli import main
from moecompress.errors import UnsupportedModelError
from moecompress.models import adapter_for, find_moe_blocks, keep_experts
from moecompress.models.tiny import tiny_config, tiny_model_from_config

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


class RenamedDeepseekConfig(transformers.DeepseekV3Config):
    """A new model_type that builds DeepSeek-V3 (as e.g. Kimi-K2's configs do)."""

    model_type = "renamed_deepseek_for_tests"


class RenamedDeepseekForCausalLM(transformers.DeepseekV3ForCausalLM):
    config_class = RenamedDeepseekConfig


transformers.AutoConfig.register(RenamedDeepseekConfig.model_type, RenamedDeepseekConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(RenamedDeepseekConfig, RenamedDeepseekForCausalLM, exist_ok=True)


def _renamed_model():
    fields = tiny_config("deepseek_v3").to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    return tiny_model_from_config(RenamedDeepseekConfig(**fields))


def test_renamed_model_type_finds_the_deepseek_adapter_by_class(tmp_path):
    model = _renamed_model()
    assert model.config.model_type == "renamed_deepseek_for_tests"
    assert adapter_for(model.config, model).model_type == "deepseek_v3"
    views = find_moe_blocks(model)
    assert [view.layer_index for view in views] == [1, 2] and views[0].routing.n_group == 4
    hidden_states = torch.randn(2, 7, views[0].hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = views[0].block(hidden_states)
        ours = views[0].forward(hidden_states.reshape(-1, views[0].hidden_size)).reshape(reference.shape)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    keep_experts(model, {1: [0, 1, 4, 5], 2: [2, 3, 6, 7]}, top_k=1)
    assert model.config.n_routed_experts == 4 and model.config.num_experts_per_tok == 1
    with torch.no_grad():
        logits = model(TOKENS).logits
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager")
    assert type(reloaded) is RenamedDeepseekForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, logits, rtol=1e-5, atol=1e-5)


def test_inspect_describes_a_renamed_checkpoint(tmp_path, capsys):
    _renamed_model().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "DeepSeek-V3" and summary["model_type"] == "renamed_deepseek_for_tests"
    assert [row["num_experts"] for row in summary["moe_layers"]] == [8, 8]


def test_architectures_entry_names_the_family():
    """A config transformers does not know (remote code) that declares a supported architecture class."""
    config = transformers.PretrainedConfig(architectures=["DeepseekV3ForCausalLM"])
    config.model_type = "kimi_k2_like"
    assert adapter_for(config).model_type == "deepseek_v3"


@pytest.mark.parametrize("architectures", [["LlamaForCausalLM"], ["NoSuchModelForCausalLM"], None])
def test_dense_or_unknown_classes_are_still_refused(architectures):
    config = transformers.PretrainedConfig(architectures=architectures)
    config.model_type = "something_new"
    with pytest.raises(UnsupportedModelError, match="'something_new' is not a supported MoE family"):
        adapter_for(config)
