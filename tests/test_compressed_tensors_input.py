"""compressed-tensors folders as input to inspect, eval and the evaluate stage: ours and llm-compressor's layout,
decompressed through the library, score exactly like the same weights loaded natively."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from export_helpers import INPUT_IDS, llmcompressor_layout, native_folder
from safetensors.torch import load_file, save_file

from moecompress.checkpoint import load_model
from moecompress.cli import main
from moecompress.commands.inspect import inspect_checkpoint
from moecompress.errors import CheckpointError
from moecompress.export import export_folder

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = "tb_arith,tb_ppl_austen"  # a multiple-choice task (accuracy) and a perplexity task (bits per byte)
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A Mixtral quantized like llm-compressor's W4A16 (experts and attention, 4-bit, group 32), its native
    folder, our compressed-tensors export and the llm-compressor layout of the same weights; and a per-layer mixed
    native folder with its vLLM-only export."""
    tmp = tmp_path_factory.mktemp("ct-input")
    (tmp / "uniform").mkdir()
    native = native_folder(tmp / "uniform", "moe-ref-mx", bits=4, group_size=32, scale_search="minmax",
                           targets=("routed_experts", "attention"))
    export_folder(native, tmp / "ct", "compressed-tensors")
    gates = [f"model.layers.{layer}.block_sparse_moe.gate" for layer in range(6)]
    llmc = llmcompressor_layout(tmp / "ct", tmp / "llmc", gates + ["lm_head"])
    (tmp / "mixed").mkdir()
    mixed = native_folder(tmp / "mixed", "moe-ref-mx", group_size=32, scale_search="minmax",
                          bit_map=lambda layer, expert: (2, 3, 4)[layer % 3])
    export_folder(mixed, tmp / "ct-mixed", "compressed-tensors", consumer="vllm")
    return {"native": native, "ct": tmp / "ct", "llmc": llmc, "mixed_native": mixed, "ct_mixed": tmp / "ct-mixed"}


def _logits(folder) -> torch.Tensor:
    model, _ = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(INPUT_IDS).logits


@pytest.mark.parametrize("name, native", [("ct", "native"), ("llmc", "native"), ("ct_mixed", "mixed_native")])
def test_decompressed_weights_give_our_native_logits(folders, name, native):
    # every module with its own group's scheme, scales in fp32: our dequantised weights bit for bit (the vLLM-only
    # per-layer export too, which plain transformers refuses)
    assert torch.equal(_logits(folders[name]), _logits(folders[native]))


def test_inspect_describes_the_decompressed_model_and_its_compression(folders):
    summary = inspect_checkpoint(str(folders["llmc"]))
    native = inspect_checkpoint(str(folders["native"]))
    assert summary["parameters"]["routed_experts"] == 6 * 8 * 3 * 288 * 256 == native["parameters"]["routed_experts"]
    [group] = summary["compressed_tensors"]["groups"]
    assert (group["bits"], group["group_size"], group["symmetric"]) == (4, 32, True)
    mixed = inspect_checkpoint(str(folders["ct_mixed"]))["compressed_tensors"]
    assert sorted(group["bits"] for group in mixed["groups"]) == [2, 3, 4]


def _eval(folder, capsys, tasks=TASKS, limit=12) -> dict:
    assert main(["eval", str(folder), "--tasks", tasks, "--limit", str(limit), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_scores_equal_the_native_weights(folders, capsys):
    native = _eval(folders["native"], capsys)
    assert _eval(folders["ct"], capsys) == native
    assert _eval(folders["llmc"], capsys) == native


def test_evaluate_stage_scores_a_compressed_tensors_original(folders, tmp_path, capsys):
    from moecompress.pipeline import Pipeline

    recipe = {"calibration": {"num_samples": 4, "seq_len": 32},
              "stages": [{"method": "evaluate", "tasks": ["tb_arith"], "limit": 8}]}
    report = Pipeline.from_recipe(recipe).run(str(folders["llmc"]), tmp_path / "run")
    [stage] = report["stages"]
    assert stage["metrics"]["before"] == stage["metrics"]["after"]  # nothing changed the decompressed model
    native = _eval(folders["native"], capsys, "tb_arith", 8)["tb_arith"]
    assert "acc" in native and "acc" in stage["metrics"]["before"]["tb_arith"]
    assert {metric: value for metric, value in stage["metrics"]["before"]["tb_arith"].items() if metric in native} \
        == {metric: value for metric, value in native.items() if metric in stage["metrics"]["before"]["tb_arith"]}


def test_a_damaged_compressed_tensors_folder_is_one_line(folders, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["llmc"], damaged)
    shard = damaged / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.3.block_sparse_moe.experts.5.up_proj.weight_packed"]
    del tensors["model.layers.3.block_sparse_moe.experts.5.up_proj.weight_scale"]
    del tensors["model.layers.3.block_sparse_moe.experts.5.up_proj.weight_shape"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"(?s)missing.*experts") as raised:
        load_model(damaged)
    assert "\n" not in str(raised.value)
