"""The lazy checkpoint reader (profiling pass, streamed runs) maps keys the way transformers does on load: families
whose saved keys transformers renames (PhiMoE's router, GraniteMoE's ``block_sparse_moe``, Aria's experts, ...)
load layer by layer to exactly the tensors ``from_pretrained`` gives."""

from __future__ import annotations

import pytest
import torch

from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton
from moecompress.errors import CheckpointError
from moecompress.models import decoder_layers
from moecompress.models.tiny import tiny_model


@pytest.mark.parametrize("model_type", ["phimoe", "granitemoe", "aria_text", "laguna", "flint", "mixtral"])
def test_lazy_layers_equal_the_saved_model_for_families_transformers_renames(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    skeleton, _ = build_skeleton(tmp_path, dtype=torch.float32)
    checkpoint = LazyCheckpoint(tmp_path, skeleton)
    layers = decoder_layers(skeleton)
    path = next(name for name, module in skeleton.named_modules() if module is layers)
    for index, layer in enumerate(layers):
        checkpoint.load_module(layer, f"{path}.{index}.", dtype=torch.float32, device="cpu")
        reference = decoder_layers(model)[index].state_dict()
        loaded = layer.state_dict()
        assert set(loaded) == set(reference)
        assert all(torch.equal(loaded[key], reference[key]) for key in reference)


def test_a_layout_the_reader_cannot_fuse_is_a_clear_error(tmp_path):
    """Kimi-Linear's q/k/v convolutions are concatenated on load by a converter the lazy reader does not run."""
    model = tiny_model("kimi_linear")
    model.save_pretrained(tmp_path)
    skeleton, _ = build_skeleton(tmp_path, dtype=torch.float32)
    layers = decoder_layers(skeleton)
    path = next(name for name, module in skeleton.named_modules() if module is layers)
    with pytest.raises(CheckpointError, match="conv1d.weight has shape .* on disk but the config gives"):
        LazyCheckpoint(tmp_path, skeleton).load_module(layers[0], f"{path}.0.", dtype=torch.float32, device="cpu")
