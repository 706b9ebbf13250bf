"""`moecompress inspect`: right on the three test-bed models (checked against their config.json and the tensor
shapes in their safetensors headers), readable tables, clear errors on bad input."""

from __future__ import annotations

import json
import re
import struct

import conftest
import pytest

from moecompress.cli import main

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


def _inspect_json(capsys, source) -> dict:
    assert main(["inspect", str(source), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _safetensors_tensors(folder) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from every safetensors header of ``folder`` (read independently of the code)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        tensors.update({k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return tensors


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@pytest.mark.parametrize("name", conftest.TESTBED_MODELS)
def test_inspect_json_matches_config_and_checkpoint(name, testbed, capsys):
    folder = conftest.testbed_model_path(name)
    config = json.loads((folder / "config.json").read_text())
    summary = _inspect_json(capsys, folder)
    num_experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    first_dense = config.get("first_k_dense_replace", 0)
    assert [row["layer"] for row in summary["moe_layers"]] == list(range(first_dense, config["num_hidden_layers"]))
    assert summary["dense_layers"] == list(range(first_dense))
    for row in summary["moe_layers"]:
        assert row["num_experts"] == num_experts
        assert row["top_k"] == config["num_experts_per_tok"]
        assert row["expert_intermediate_size"] == config.get("moe_intermediate_size", config.get("intermediate_size"))
    # parameter counts and on-disk bytes against the checkpoint's own tensor list
    tensors = _safetensors_tensors(folder)
    assert summary["parameters"]["total"] == sum(_numel(shape) for shape, _ in tensors.values())
    on_disk = summary["bytes_on_disk"]
    assert on_disk["total"] == sum(_numel(shape) * DTYPE_BYTES[dtype] for shape, dtype in tensors.values())
    assert on_disk["parameters"] == summary["parameters"]["total"]
    for dtype in {dtype for _, dtype in tensors.values()}:
        assert on_disk["by_dtype"][dtype] == sum(_numel(s) * DTYPE_BYTES[d] for s, d in tensors.values() if d == dtype)
    routed = sum(_numel(shape) for key, (shape, _) in tensors.items() if ".experts." in key)
    shared = sum(_numel(shape) for key, (shape, _) in tensors.items() if ".shared_expert" in key)
    assert summary["parameters"]["routed_experts"] == routed
    assert summary["parameters"]["shared_experts"] == shared


@pytest.mark.parametrize("name", conftest.TESTBED_MODELS)
def test_inspect_bytes_are_the_loaded_model_in_memory(name, testbed, capsys):
    """``bytes`` = the model transformers loads at the checkpoint dtype, each tensor at the dtype it keeps it in
    (transformers 5.24 keeps DeepSeek-V3's router weight and selection bias in float32 in a bf16 model)."""
    import torch

    from moecompress.checkpoint import load_model

    folder = conftest.testbed_model_path(name)
    summary = _inspect_json(capsys, folder)
    model, _ = load_model(folder, dtype=getattr(torch, summary["dtype"]))
    tensors = list(model.parameters()) + [
        buffer for module in model.modules() for key, buffer in module._buffers.items()
        if buffer is not None and key not in module._non_persistent_buffers_set
    ]
    unique = {id(t): t for t in tensors}.values()  # tied embeddings once
    assert summary["bytes"]["total"] == sum(t.numel() * t.element_size() for t in unique)
    assert summary["parameters"]["total"] == sum(t.numel() for t in unique)
    kept_in_fp32 = sum(t.numel() * 2 for t in unique if t.dtype == torch.float32)  # extra bytes over bf16
    assert summary["bytes"]["total"] - summary["bytes_on_disk"]["total"] == kept_in_fp32 - 2 * sum(
        _numel(shape) for shape, dtype in _safetensors_tensors(folder).values() if dtype == "F32"
    )


def test_inspect_deepseek_reads_sigmoid_groups_and_shared_expert(testbed, capsys):
    summary = _inspect_json(capsys, conftest.testbed_model_path("moe-ref-ds"))
    assert summary["family"] == "DeepSeek-V3" and summary["dense_layers"] == [0]
    for row in summary["moe_layers"]:
        assert (row["num_experts"], row["top_k"], row["scoring"], row["num_shared_experts"]) == (32, 4, "sigmoid", 1)
        assert (row["n_group"], row["topk_group"], row["routed_scaling_factor"], row["renormalize"]) == (4, 2, 2.5, True)


@pytest.mark.parametrize("name, scoring, top_k", [("moe-ref-q3", "softmax", 4), ("moe-ref-mx", "softmax", 2)])
def test_inspect_softmax_models(name, scoring, top_k, testbed, capsys):
    summary = _inspect_json(capsys, conftest.testbed_model_path(name))
    assert summary["dense_layers"] == []
    assert {(row["scoring"], row["top_k"], row["renormalize"], row["num_shared_experts"]) for row in summary["moe_layers"]} == {
        (scoring, top_k, True, 0)
    }


def test_inspect_table_is_readable(testbed, capsys):
    assert main(["inspect", str(conftest.testbed_model_path("moe-ref-ds"))]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-V3" in out and "sigmoid" in out and "dense layers: [0]" in re.sub(r"\s+", " ", out)
    assert "routed experts" in out and "7,864,320" in out  # 5 layers x 32 experts x 3 x 256 x 64


def test_inspect_refuses_bad_inputs(tmp_path, capsys):
    import transformers

    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    dense = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense")]) == 2
    error = capsys.readouterr().err
    assert "'llama' is not a supported MoE family" in error and "Mixtral" in error
    from moecompress.models.tiny import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert main(["inspect", str(tmp_path / "corrupt")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_inspect_calib_counts_equal_a_direct_router_count(capsys, testbed):
    """`inspect --calib` expert usage equals top-k picks counted from a plain HF forward with router hooks."""
    import torch
    from transformers import AutoTokenizer

    from moecompress.calibration import load_calibration
    from moecompress.checkpoint import load_model
    from moecompress.models import find_moe_blocks

    source = conftest.testbed_model_path("moe-ref-ds")
    calib_file = testbed / "calib" / "pycode.jsonl"
    assert main(["inspect", str(source), "--json", "--calib", str(calib_file), "--num-samples", "4", "--seq-len", "64"]) == 0
    usage = {row["layer"]: row for row in json.loads(capsys.readouterr().out)["expert_usage"]}

    model, _ = load_model(source, dtype=torch.bfloat16)  # the lazy pass computes in the checkpoint's dtype
    calibration = load_calibration(AutoTokenizer.from_pretrained(source), files=[calib_file], num_samples=4, seq_len=64)
    expected = {}
    hooks = []
    for view in find_moe_blocks(model):
        expected[view.layer_index] = torch.zeros(view.num_experts, dtype=torch.long)

        def count(module, inputs, output, layer=view.layer_index):
            top_k_index = output[2]
            expected[layer] += torch.bincount(top_k_index.reshape(-1), minlength=expected[layer].numel())

        hooks.append(view.router.register_forward_hook(count))
    with torch.no_grad():
        model(calibration.input_ids)
    for hook in hooks:
        hook.remove()

    assert sorted(usage) == sorted(expected) == [1, 2, 3, 4, 5]  # layer 0 is dense
    for layer, counts in expected.items():
        assert usage[layer]["expert_token_counts"] == counts.tolist()
        assert sum(usage[layer]["expert_token_counts"]) == 4 * 64 * 4  # every token routed to top-4
        assert usage[layer]["unused_experts"] == int((counts == 0).sum())
