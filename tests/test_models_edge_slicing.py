"""Channel slicing to a width transformers' default experts backend cannot run (``grouped_mm`` needs the width times
the bytes per value to be a multiple of 16: 8 in bf16, 4 in fp32) still gives a checkpoint that plain
``from_pretrained`` loads and runs: the saved config names the ``eager`` experts backend, for those widths only."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_family_params

from moecompress.models import ADAPTERS, find_moe_blocks, slice_micro_experts
from moecompress.models.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _sliced(model_type: str, width: int, dtype: torch.dtype):
    model = tiny_model(model_type, dtype=dtype)
    slice_micro_experts(model, {view.layer_index: list(range(1, 1 + width)) for view in find_moe_blocks(model)})
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_mm_really_fails_on_a_misaligned_width(dtype, tmp_path):
    """The reason for the setting: the same checkpoint, loaded with grouped_mm forced, fails (5 is neither 8k nor 4k)."""
    model = _sliced("qwen3_moe", 5, dtype)
    model.save_pretrained(tmp_path)
    forced = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, experts_implementation="grouped_mm")
    with pytest.raises(RuntimeError, match="16 bytes"):
        _logits(forced)


# Families whose expert width field also sizes other modules (DeepSeek's shared experts, ...) cannot describe a
# sliced width in a plain config at all; test_edits_micro checks that their plain reload refuses the checkpoint.
SLICE_RELOADABLE = tiny_family_params(exclude=[t for t, adapter in ADAPTERS.items() if adapter.intermediate_field_shared])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model_type", SLICE_RELOADABLE)
def test_misaligned_width_reloads_with_plain_from_pretrained(model_type, dtype, tmp_path):
    model = _sliced(model_type, 5, dtype)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved = saved.get("text_config", saved)
    assert saved["experts_implementation"] == "eager" and saved["moecompress"]["eager_experts_for_widths"] == [5]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)  # no backend argument
    assert reloaded.config._experts_implementation == "eager"
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_aligned_width_keeps_the_default_backend(tmp_path):
    model = _sliced("qwen3_moe", 8, torch.bfloat16)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "experts_implementation" not in saved and "moecompress" not in saved
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.config._experts_implementation == "grouped_mm"
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=2e-2, atol=2e-2)  # bf16, another backend


def test_slicing_again_to_an_aligned_width_drops_the_setting():
    model = _sliced("qwen3_moe", 12, torch.float32)  # 12 channels of 16: misaligned
    assert model.config.experts_implementation == "eager"
    slice_micro_experts(model, {view.layer_index: list(range(8)) for view in find_moe_blocks(model)})
    assert not hasattr(model.config, "experts_implementation") and not hasattr(model.config, "moecompress")
