"""One checkpoint validation for every command (issue 8, section 3).

Each class of damage (truncated shard, corrupt header, missing shard, index naming a tensor its shard lacks, missing
tensor, missing per-expert tensor, a tensor of no part of the model, a config naming another architecture) is
refused the same way by ``inspect``, ``eval`` and ``compress``: exit 2, one line, nothing written. Loading that would
leave weights newly initialised is an error even when the pre-check is bypassed.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import testbed_model_path as model_folder
from conftest import tiny_family_params
from safetensors.torch import load_file, save_file

from moecompress.checkpoint import load_model, loading, validate_checkpoint
from moecompress.cli import main
from moecompress.errors import CheckpointError
from moecompress.models.tiny import tiny_model

SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture()
def damaged_copy(tmp_path, testbed):
    """A copy of moe-ref-ds (two shards and an index) to damage; the test bed itself is never touched."""
    folder = tmp_path / "model"
    shutil.copytree(model_folder("moe-ref-ds"), folder)
    return folder


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _remove_tensor(folder, key, *, from_index=True):
    index = _index(folder)
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    if from_index:
        del index["weight_map"][key]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _add_tensor(folder, key):
    index = _index(folder)
    shard = folder / SHARD_2
    tensors = load_file(shard)
    tensors[key] = torch.zeros(4)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"][key] = SHARD_2
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(folder):
    path = folder / SHARD_2
    path.write_bytes(path.read_bytes()[:-1000])


def _corrupt_header(folder):
    path = folder / SHARD_1
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{broken json" + data[20:])


def _other_architecture(folder):
    shutil.copy(model_folder("moe-ref-mx") / "config.json", folder / "config.json")


DAMAGE = {
    "truncated-shard": (_truncate, "is corrupt: it is truncated"),
    "corrupt-header": (_corrupt_header, "is corrupt: its header is not valid JSON"),
    "missing-shard": (lambda folder: (folder / SHARD_2).unlink(), "index names missing safetensors files"),
    "index-names-absent-tensor": (lambda folder: _remove_tensor(folder, "model.norm.weight", from_index=False),
                                  "maps 1 tensor\\(s\\) to a shard that does not hold them"),
    "missing-tensor": (lambda folder: _remove_tensor(folder, "model.norm.weight"),
                       "1 tensor\\(s\\) the model needs are missing \\(model.norm.weight\\)"),
    "missing-expert-tensor": (lambda folder: _remove_tensor(folder, "model.layers.2.mlp.experts.7.up_proj.weight"),
                              "layers.2.mlp.experts.gate_up_proj: 31 of 32 experts"),
    "unknown-tensor": (lambda folder: _add_tensor(folder, "model.layers.0.mlp.mystery.weight"),
                       "belong to no part of the model \\(model.layers.0.mlp.mystery.weight\\)"),
    "config-of-another-architecture": (_other_architecture, "do not fit its config.json \\(mixtral, MixtralForCausalLM\\)"),
}


@pytest.mark.parametrize("command", ["inspect", "eval", "compress"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_command_refuses_every_class_of_damage_with_one_line(damaged_copy, tmp_path, capsys, command, damage):
    apply, message = DAMAGE[damage]
    apply(damaged_copy)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(damaged_copy)
    recipe = tmp_path / "profile.yaml"
    recipe.write_text("calibration: {files: bundled, num_samples: 2, seq_len: 16}\nstages: []\n")
    argv = {
        "inspect": ["inspect", str(damaged_copy), "--json"],
        "eval": ["eval", str(damaged_copy), "--tasks", "tb_arith", "--limit", "2"],
        "compress": ["compress", str(damaged_copy), "--recipe", str(recipe), "--out", str(tmp_path / "out")],
    }[command]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert re.search(message, captured.err), captured.err
    assert captured.out == "" and not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


def test_loading_that_would_initialise_weights_is_an_error_even_without_the_precheck(tmp_path, monkeypatch):
    """The second line of defence: transformers' own loading report (missing or mismatched keys) is checked."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(loading, "validate_checkpoint", lambda folder, config=None: [])
    with pytest.raises(CheckpointError, match="newly initialised: 1 weight\\(s\\) missing.*post_attention_layernorm"):
        load_model(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("model_type", tiny_family_params())
def test_every_family_saved_by_transformers_passes_validation(tmp_path, model_type):
    """No false alarms: keys are mapped the way transformers' loader maps them (renames, fused experts)."""
    tiny_model(model_type).save_pretrained(tmp_path)
    assert validate_checkpoint(tmp_path) == [tmp_path / "model.safetensors"]


def test_testbed_models_pass_and_a_sharded_save_passes(tmp_path, testbed):
    for name in ("moe-ref-q3", "moe-ref-mx", "moe-ref-ds"):
        assert len(validate_checkpoint(model_folder(name))) >= 1
    tiny_model("deepseek_v3").save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(validate_checkpoint(tmp_path)) > 1
