"""GGUF export: llama.cpp's quantizers reproduced byte for byte, the exact paths from our codes, the type choice,
metadata and tensors per architecture, the refusals, and (where a Python with llama_cpp exists) the real engine:
logits against our model, greedy text, tokenization.

The llama.cpp tests run ``scripts/llama_cpp_runner.py`` in ``$MOECOMPRESS_LLAMA_PYTHON`` (default
``/work/venvs/llama/bin/python``), a Python that never imports moecompress; they are skipped, with the reason, where
none is installed (``pip install 'moecompress[llama]'`` builds llama-cpp-python from source, about 20 minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder
from export_helpers import native_folder

from moecompress.cli import main
from moecompress.errors import CheckpointError, UnsupportedModelError, UsageError
from moecompress.export import export_folder
from moecompress.export.gguf import export_gguf, plan_export, read_export_source, report_path
from moecompress.export.gguf_arch import rope_pair_permutation
from moecompress.export.gguf_kquants import QUANTIZERS
from moecompress.export.gguf_types import (GGMLType, SourceFormat, TypeTable, choose_type, decode, encode_exact,
                                           encode_values, ggml_type)
from moecompress.kernels.layout import PackedLinearWeight
from moecompress.quantization.packing import quantize_rtn

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "data" / "ggml_reference_blocks.npz"
RUNNER = REPO_ROOT / "scripts" / "llama_cpp_runner.py"
LLAMA_PYTHON = os.environ.get("MOECOMPRESS_LLAMA_PYTHON", "/work/venvs/llama/bin/python")


def _llama_available() -> bool:
    if not Path(LLAMA_PYTHON).exists():
        return False
    return subprocess.run([LLAMA_PYTHON, "-c", "import llama_cpp"], capture_output=True).returncode == 0


needs_llama = pytest.mark.skipif(not _llama_available(), reason=f"no Python with llama_cpp at {LLAMA_PYTHON} (set "
                                 "MOECOMPRESS_LLAMA_PYTHON; pip install 'moecompress[llama]' builds llama-cpp-python)")


def run_llama(model: Path, ops: list[dict], tmp: Path) -> tuple[list[dict], Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    request = tmp / "request.json"
    request.write_text(json.dumps({"model": str(model), "n_ctx": 512, "threads": 1, "ops": ops}))
    done = subprocess.run([LLAMA_PYTHON, str(RUNNER), str(request), str(tmp / "llama-out")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp / "llama-out" / "results.json").read_text())
    assert results["moecompress_imported"] is False
    return results["results"], tmp / "llama-out"


def tensors_of(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


def values_of(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor of a written file, dequantized, in numpy order."""
    data = np.asarray(tensor.data)
    if tensor.tensor_type in (GGMLType.F32, GGMLType.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, tensor.tensor_type)


def field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


# ----- the quantizers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantizers_write_llama_cpps_bytes(name):
    """The fixture holds what llama.cpp's ggml_quantize_chunk (llama-cpp-python 0.3.36) wrote for rows with edge
    cases (all-zero and tiny sub-blocks, an outlier, one sign, heavy tails, values already on 2- and 3-bit grids,
    ties): our bytes are the same, every block."""
    reference = np.load(FIXTURE)
    assert np.array_equal(encode_values(reference["values"], ggml_type(name)), reference[name])


@pytest.mark.parametrize("name, bound", [("Q2_K", 0.35), ("Q3_K", 0.18), ("Q4_K", 0.09), ("Q5_K", 0.05),
                                         ("Q6_K", 0.025)])
def test_k_quants_round_trip_through_the_gguf_readers(name, bound):
    """Decoded by the gguf package's own dequantizers, Gaussian weights come back within the type's usual error
    (a layout mistake gives errors of order 1)."""
    values = (np.random.default_rng(3).standard_normal((64, 512)) * 0.02).astype(np.float32)
    encoded = QUANTIZERS[name](values).reshape(64, -1)
    assert encoded.shape[1] == 2 * gguf.GGML_QUANT_SIZES[ggml_type(name)][1]
    error = np.linalg.norm(decode(encoded, ggml_type(name)) - values) / np.linalg.norm(values)
    assert bound / 3 < error < bound


@needs_llama
@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_match_the_installed_llama_cpp(name, tmp_path):
    """Fresh random rows (bf16-rounded weights and a 4-bit grid) quantized by the installed llama.cpp."""
    rng = np.random.default_rng(7)
    values = np.concatenate([torch.tensor(rng.standard_normal((96, 512)) * 0.03).bfloat16().float().numpy(),
                             (rng.integers(0, 16, (32, 512)) - 8) * 0.004]).astype(np.float32)
    np.save(tmp_path / "values.npy", values)
    script = ("import ctypes, glob, os, sys, numpy as np, llama_cpp\n"
              "lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib', 'libggml-base.so*'))[0])\n"
              "f = lib.ggml_quantize_chunk; f.restype = ctypes.c_size_t\n"
              "f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]\n"
              "x = np.ascontiguousarray(np.load(sys.argv[1])); out = np.zeros(x.size * 2, np.uint8)\n"
              "n = f(int(sys.argv[2]), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)\n"
              "np.save(sys.argv[3], out[:n].reshape(x.shape[0], -1))\n")
    done = subprocess.run([LLAMA_PYTHON, "-c", script, str(tmp_path / "values.npy"), str(int(ggml_type(name))),
                           str(tmp_path / "theirs.npy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(encode_values(values, ggml_type(name)), np.load(tmp_path / "theirs.npy"))


# ----- the exact paths ----------------------------------------------------------------------------------------------

def _packed(bits: int, symmetric: bool, group_size: int, dtype=torch.bfloat16, seed: int = 0) -> PackedLinearWeight:
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(seed)).to(dtype) * 0.05
    return quantize_rtn(weight, bits, group_size, symmetric, scale_search="minmax")


@pytest.mark.parametrize("bits, symmetric, group_size, ggml", [
    (8, True, 32, GGMLType.Q8_0), (4, True, 32, GGMLType.Q4_0), (4, True, 128, GGMLType.Q4_0),
    (2, True, 64, GGMLType.Q4_0), (3, True, 32, GGMLType.Q8_0), (1, True, 32, GGMLType.Q4_0),
])
def test_symmetric_codes_are_written_as_they_are(bits, symmetric, group_size, ggml):
    """bf16 scales convert to fp16 exactly, so the block types decode to our dequantized weights exactly; 4-bit
    codes land in Q4_0's nibbles bit for bit (u = q + 8)."""
    packed = _packed(bits, symmetric, group_size)
    data = encode_exact(packed, ggml)
    assert np.array_equal(decode(data, ggml), packed.dequantize(torch.float32).numpy())
    if ggml == GGMLType.Q4_0:
        nibbles = data.reshape(48, 8, 18)[:, :, 2:]
        unpacked = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).reshape(48, 256).astype(int) - 8
        assert np.array_equal(unpacked, packed.codes().numpy())


def test_asymmetric_four_bits_round_only_the_offset():
    """Q4_1 stores d = s exactly (bf16 -> fp16) and m = -s (8 + z) rounded to fp16: each weight moves by at most
    half an fp16 ulp of its block's m."""
    packed = _packed(4, False, 32)
    expected = packed.dequantize(torch.float32).numpy()
    decoded = decode(encode_exact(packed, GGMLType.Q4_1), GGMLType.Q4_1)
    scales = packed.scales.float().numpy().repeat(32, axis=1)
    zeros = packed.zeros.float().numpy().repeat(32, axis=1)
    offset = np.abs(scales * (8 + zeros))
    bound = np.maximum(offset * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(decoded - expected) <= bound)
    assert np.abs(decoded - expected).max() > 0  # the offsets do round: this is not bit for bit


def test_fp32_scales_round_to_fp16_within_half_an_ulp():
    packed = _packed(4, True, 32, dtype=torch.float32)
    decoded = decode(encode_exact(packed, GGMLType.Q4_0), GGMLType.Q4_0)
    expected = packed.dequantize(torch.float32).numpy()
    scales = np.abs(packed.scales.numpy()).repeat(32, axis=1)
    assert np.all(np.abs(decoded - expected) <= 8 * scales * 2.0**-11 + 1e-12)
    assert np.abs(decoded - expected).max() > 0


# ----- choosing types -----------------------------------------------------------------------------------------------

def test_auto_types_follow_the_widths():
    sym = lambda *bits: SourceFormat(bits, True, 32)  # noqa: E731
    assert choose_type("auto", sym(8), 256) .ggml_type == GGMLType.Q8_0
    assert choose_type("auto", sym(4), 256).path == "exact"
    assert choose_type("auto", SourceFormat((4,), False, 128), 256).ggml_type == GGMLType.Q4_1
    three = choose_type("auto", sym(3), 256)
    assert (three.ggml_type, three.path) == (GGMLType.Q3_K, "requantized")
    assert choose_type("auto", sym(1), 256).ggml_type == GGMLType.Q2_K
    # a layer of 2- and 4-bit experts: widened to 4 bits, which Q4_0 holds exactly for both
    mixed = choose_type("auto", sym(2, 4, 2, 2), 256)
    assert (mixed.ggml_type, mixed.path) == (GGMLType.Q4_0, "exact") and "widened" in mixed.notes[0]
    mean = choose_type("auto", sym(2, 4, 2, 2), 256, layer_mean=True)
    assert mean.ggml_type == GGMLType.Q3_K and "mean 2.50" in mean.notes[0]  # ties round up
    assert choose_type("auto", SourceFormat(None, float_type=GGMLType.BF16), 256).ggml_type == GGMLType.BF16


def test_rows_that_do_not_fit_a_block():
    """Mixtral's ffn_down rows (288) take no K-quant: 2-bit codes go to Q4_0 exactly; float weights asked for Q3_K
    take llama-quantize's fallback; rows of 80 (Qwen3's ffn_down here) fit only float types."""
    container = choose_type("auto", SourceFormat((2,), True, 32), 288)
    assert (container.ggml_type, container.path) == (GGMLType.Q4_0, "exact")
    fallback = choose_type("Q3_K", SourceFormat(None), 288)
    assert (fallback.ggml_type, fallback.path) == (GGMLType.Q4_0, "requantized")
    assert choose_type("Q4_K", SourceFormat(None), 288).ggml_type == GGMLType.Q5_0
    assert choose_type("auto", SourceFormat((4,), True, 32), 80).ggml_type == GGMLType.F16


def test_the_types_table():
    table = TypeTable.parse("routed_experts=Q2_K, routed_experts.down=Q3_K, routed_experts@4-5=Q4_K, attention=Q6_K")
    assert table.lookup("routed_experts", "gate", 1) == "Q2_K"
    assert table.lookup("routed_experts", "down", 1) == "Q3_K"
    assert table.lookup("routed_experts", "down", 5) == "Q4_K"  # the last matching rule wins
    assert table.lookup("attention", "q", 0) == "Q6_K" and table.lookup("embedding") == "auto"
    for bad, message in [("experts=Q4_K", "unknown role"), ("attention.gate=Q4_K", "no projection"),
                         ("attention=Q4", "not a GGML type"), ("attention=IQ2_XS", "cannot be written"),
                         ("router=Q8_0", "router stays float"), ("attention:Q4_K", "ROLE")]:
        with pytest.raises(UsageError, match=message):
            TypeTable.parse(bad)


# ----- files per architecture ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def original_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-original")
    return {name: export_gguf(model_folder(name), folder / f"{name}.gguf") for name in
            ("moe-ref-q3", "moe-ref-mx", "moe-ref-ds")}


def test_metadata_llama_cpp_reads(original_files):
    q3 = gguf.GGUFReader(original_files["moe-ref-q3"]["out"])
    assert field(q3, "general.architecture") == "qwen3moe"
    assert field(q3, "qwen3moe.expert_count") == 32 and field(q3, "qwen3moe.expert_used_count") == 4
    assert field(q3, "qwen3moe.expert_feed_forward_length") == 80
    assert q3.get_field("qwen3moe.expert_count").types == [gguf.GGUFValueType.UINT32]
    assert field(q3, "tokenizer.ggml.pre") == "smollm" and field(q3, "tokenizer.ggml.model") == "gpt2"
    tokens = field(q3, "tokenizer.ggml.tokens")
    types = field(q3, "tokenizer.ggml.token_type")
    assert len(tokens) == 8192 and tokens[0] == "<|endoftext|>" and types[0] == gguf.TokenType.CONTROL
    assert set(types[1:]) == {gguf.TokenType.NORMAL}
    assert len(field(q3, "tokenizer.ggml.merges")) == 7935
    assert field(q3, "tokenizer.ggml.eos_token_id") == 0 and field(q3, "tokenizer.ggml.add_bos_token") is False
    ds = gguf.GGUFReader(original_files["moe-ref-ds"]["out"])
    assert field(ds, "general.architecture") == "deepseek2"
    assert field(ds, "deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert (field(ds, "deepseek2.expert_group_count"), field(ds, "deepseek2.expert_group_used_count")) == (4, 2)
    assert field(ds, "deepseek2.expert_weights_scale") == pytest.approx(2.5)
    assert field(ds, "deepseek2.attention.head_count_kv") == 1 and field(ds, "deepseek2.leading_dense_block_count") == 1
    assert (field(ds, "deepseek2.attention.key_length"), field(ds, "deepseek2.attention.value_length")) == (96, 64)
    assert ds.get_field("deepseek2.nextn_predict_layers") is None
    mx = gguf.GGUFReader(original_files["moe-ref-mx"]["out"])
    assert field(mx, "general.architecture") == "llama" and field(mx, "llama.feed_forward_length") == 288
    assert field(mx, "llama.rope.dimension_count") == 64


def test_tensors_and_their_order_in_the_file(original_files):
    q3 = tensors_of(original_files["moe-ref-q3"]["out"])
    gate = q3["blk.2.ffn_gate_exps.weight"]
    assert list(gate.shape) == [256, 80, 32] and gate.tensor_type == GGMLType.BF16  # ne: (in, out, expert)
    assert q3["blk.2.ffn_gate_inp.weight"].tensor_type == GGMLType.F32 and "output.weight" not in q3
    ds = tensors_of(original_files["moe-ref-ds"]["out"])
    assert "blk.1.attn_kv_b.weight" not in ds and "output.weight" in ds and "blk.0.ffn_gate_exps.weight" not in ds
    assert list(ds["blk.1.attn_k_b.weight"].shape) == [32, 64, 4] and list(ds["blk.1.attn_v_b.weight"].shape) == [64, 64, 4]
    assert ds["blk.1.exp_probs_b.bias"].tensor_type == GGMLType.F32
    # the values: the original's bf16 weights, the kv_b split as llama.cpp's MLA expects it
    from safetensors.torch import load_file

    weights = {}
    for shard in model_folder("moe-ref-ds").glob("*.safetensors"):
        weights.update(load_file(shard))
    kv_b = weights["model.layers.1.self_attn.kv_b_proj.weight"].float().reshape(4, 96, 64)
    assert np.array_equal(values_of(ds["blk.1.attn_k_b.weight"]), kv_b[:, :32].transpose(1, 2).numpy())
    assert np.array_equal(values_of(ds["blk.1.attn_v_b.weight"]), kv_b[:, 32:].numpy())
    experts = torch.stack([weights[f"model.layers.3.mlp.experts.{e}.down_proj.weight"].float() for e in range(32)])
    assert np.array_equal(values_of(ds["blk.3.ffn_down_exps.weight"]), experts.numpy())
    mx = tensors_of(original_files["moe-ref-mx"]["out"])
    mx_weights = {}
    for shard in model_folder("moe-ref-mx").glob("*.safetensors"):
        mx_weights.update(load_file(shard))
    k_proj = mx_weights["model.layers.0.self_attn.k_proj.weight"].float()
    assert np.array_equal(values_of(mx["blk.0.attn_k.weight"]), k_proj[rope_pair_permutation(128, 2)].numpy())


def test_rope_pair_permutation_interleaves_the_halves():
    assert rope_pair_permutation(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ----- native folders -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_mixed(tmp_path_factory):
    """mx with experts at 2 and 4 bits (symmetric, groups of 32) and 4-bit attention."""
    return native_folder(tmp_path_factory.mktemp("gguf-native"), "moe-ref-mx", bits=4, group_size=32,
                         bit_map=lambda layer, expert: 4 if expert % 2 else 2, targets=("routed_experts", "attention"))


def test_native_codes_reach_the_file(native_mixed, tmp_path):
    """Widened to 4 bits, each layer's 2- and 4-bit experts and the attention are Q4_0 bit for bit: the file's
    weights are our dequantized weights exactly (bf16 scales); the report says so per tensor."""
    from moecompress.checkpoint.native_reader import NativeCheckpoint

    report = export_gguf(native_mixed, tmp_path / "mx.gguf")
    rows = {row["name"]: row for row in report["tensors"]}
    gate = rows["blk.2.ffn_gate_exps.weight"]
    assert (gate["type"], gate["path"], gate["rel_rmse"], gate["source_bits"][:2]) == ("Q4_0", "exact", 0.0, [2, 4])
    assert rows["blk.2.attn_q.weight"]["path"] == "exact"
    assert report["widened_experts"] == 6 * 4 and any("widened" in note for note in report["notes"])
    native = NativeCheckpoint(native_mixed)
    layer = native.expert_layers[2]
    file_tensors = tensors_of(tmp_path / "mx.gguf")
    down = values_of(file_tensors["blk.2.ffn_down_exps.weight"])
    for expert in (0, 1):
        ours = native.expert_weight(layer, expert, "down_proj").dequantize(torch.float32).numpy()
        assert np.array_equal(down[expert], ours)
    assert read_export_source(tmp_path / "mx.gguf") == str(native_mixed.resolve())
    assert json.loads(report_path(tmp_path / "mx.gguf").read_text())["bytes_on_disk"] == report["bytes_on_disk"]


def test_requantized_tensors_report_their_error(native_mixed, tmp_path):
    """Asked for Q2_K / Q6_K, the experts are re-quantized from our weights: the report's error is the file's, and
    plan_export gives the tensors' sizes without writing."""
    types = "routed_experts=Q2_K,attention=Q6_K"
    report = export_gguf(native_mixed, tmp_path / "mx.gguf", types=types)
    rows = {row["name"]: row for row in report["tensors"]}
    gate = rows["blk.1.ffn_gate_exps.weight"]
    assert (gate["type"], gate["path"]) == ("Q2_K", "requantized") and 0.05 < gate["rel_rmse"] < 0.6
    assert rows["blk.1.ffn_down_exps.weight"]["type"] == "Q4_0"  # 288-wide rows: the exact container instead
    assert rows["blk.1.attn_v.weight"]["type"] == "Q6_K" and 0 < rows["blk.1.attn_v.weight"]["rel_rmse"] < 0.05
    from moecompress.checkpoint.native_reader import NativeCheckpoint

    native = NativeCheckpoint(native_mixed)
    ours = torch.stack([native.expert_weight(native.expert_layers[1], expert, "gate_up_proj").dequantize(torch.float32)[:288]
                        for expert in range(8)]).numpy()
    theirs = values_of(tensors_of(tmp_path / "mx.gguf")["blk.1.ffn_gate_exps.weight"])
    assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) == pytest.approx(gate["rel_rmse"], rel=1e-4)
    payload = sum(tensor.nbytes for tensor in plan_export(native_mixed, types=types))
    assert payload < report["bytes_on_disk"] < payload + 600_000  # metadata (the vocabulary) and alignment


# ----- refusals -----------------------------------------------------------------------------------------------------

def _copy_model(name: str, tmp: Path) -> Path:
    copy = tmp / name
    shutil.copytree(model_folder(name), copy)
    return copy


def test_refusals_come_before_any_file(tmp_path):
    out = tmp_path / "out" / "model.gguf"
    no_tokenizer = _copy_model("moe-ref-q3", tmp_path)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        export_gguf(no_tokenizer, out)
    other_pre = _copy_model("moe-ref-mx", tmp_path)
    tokenizer = json.loads((other_pre / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (other_pre / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UnsupportedModelError, match="Metaspace"):
        export_gguf(other_pre, out)
    unnormalised = _copy_model("moe-ref-ds", tmp_path)
    config = json.loads((unnormalised / "config.json").read_text())
    (unnormalised / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    with pytest.raises(UnsupportedModelError, match="scoring_func"):
        export_gguf(unnormalised, out)
    with pytest.raises(UsageError, match="cannot be written"):
        export_gguf(model_folder("moe-ref-q3"), out, types="routed_experts=IQ4_XS")
    assert not out.parent.exists()


def test_architectures_llama_cpp_does_not_run(tmp_path):
    from moecompress.models.tiny import tiny_model

    folder = tmp_path / "olmoe"
    model = tiny_model("olmoe")
    model.save_pretrained(folder)
    shutil.copy(model_folder("moe-ref-q3") / "tokenizer.json", folder)
    with pytest.raises(UnsupportedModelError, match="'olmoe' has no GGUF export"):
        export_gguf(folder, tmp_path / "olmoe.gguf")
    assert not (tmp_path / "olmoe.gguf").exists()


def test_different_expert_counts_are_refused(tmp_path):
    pruned = native_folder(tmp_path, "moe-ref-mx", quantize=False, keep={0: [0, 1, 2, 3], 1: [0, 1, 2], 2: list(range(8)),
                                                                       3: list(range(8)), 4: list(range(8)),
                                                                       5: list(range(8))})
    with pytest.raises(UsageError, match="different expert counts"):
        export_gguf(pruned, tmp_path / "pruned.gguf")


def test_output_file_rules(native_mixed, tmp_path):
    with pytest.raises(UsageError, match="inside the input folder"):
        export_gguf(native_mixed, native_mixed / "x.gguf")
    with pytest.raises(UsageError, match="is a folder"):
        export_gguf(native_mixed, tmp_path)
    other = tmp_path / "other.gguf"
    other.write_text("not ours")
    with pytest.raises(UsageError, match="already exists"):
        export_gguf(native_mixed, other)
    assert other.read_text() == "not ours"
    first = export_gguf(native_mixed, tmp_path / "mine.gguf")
    again = export_gguf(native_mixed, tmp_path / "mine.gguf", types="attention=Q8_0")  # our own export: replaced
    assert again["bytes_on_disk"] != first["bytes_on_disk"]


def test_a_failure_midway_leaves_no_file(native_mixed, tmp_path, monkeypatch):
    from moecompress.export import gguf as gguf_export

    calls = []

    def fail_on_the_third(tensor):
        calls.append(tensor.name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(tensor)

    real = gguf_export.encode_tensor
    monkeypatch.setattr(gguf_export, "encode_tensor", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(native_mixed, tmp_path / "broken.gguf")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# ----- the command line ---------------------------------------------------------------------------------------------

def test_export_command_writes_gguf(native_mixed, tmp_path, capsys):
    out = tmp_path / "mx.gguf"
    assert main(["export", str(native_mixed), "--format", "gguf", "--out", str(out), "--types",
                 "routed_experts=Q4_0,routed_experts.down=Q8_0", "--layer-mean"]) == 0
    printed = capsys.readouterr().out
    assert "llama-cli -m" in printed and "layer mean" in printed
    file_tensors = tensors_of(out)
    assert file_tensors["blk.0.ffn_down_exps.weight"].tensor_type == GGMLType.Q8_0
    report = json.loads(report_path(out).read_text())
    gate = next(row for row in report["tensors"] if row["name"] == "blk.0.ffn_gate_exps.weight")
    assert (gate["type"], gate["path"]) == ("Q4_0", "exact")  # the mean is 3 bits, but Q4_0 holds the 4-bit experts
    assert main(["export", str(native_mixed), "--format", "gguf", "--out", str(tmp_path / "y.gguf"), "--types",
                 "experts=Q2_K"]) == 2
    assert "unknown role" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_exports_gguf_beside_its_output(tmp_path, testbed):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
calibration: {{files: [{testbed / 'calib'}], num_samples: 4, seq_len: 32, seed: 1}}
stages:
  - {{method: rtn, bits: 4, group_size: 32}}
""")
    out = tmp_path / "out"
    assert main(["compress", str(model_folder("moe-ref-mx")), "--recipe", str(recipe), "--out", str(out), "--export",
                 "gguf"]) == 0
    assert read_export_source(tmp_path / "out.gguf") == str(out.resolve())
    assert tensors_of(tmp_path / "out.gguf")["blk.0.ffn_up_exps.weight"].tensor_type == GGMLType.Q4_0
    assert main(["compress", str(model_folder("moe-ref-mx")), "--recipe", str(recipe), "--out", str(tmp_path / "b"),
                 "--export", "gguf", "--types", "nonsense=Q4_K"]) == 2
    assert not (tmp_path / "b").exists()  # refused before the run


def test_export_entries_in_recipes():
    from moecompress.export.options import parse_export

    [options] = parse_export({"format": "gguf", "types": "attention=Q6_K", "layer_mean": True})
    assert options.out_dir(Path("/runs/pmq")) == Path("/runs/pmq.gguf")
    with pytest.raises(UsageError, match="unknown role"):
        parse_export({"format": "gguf", "types": "attn=Q6_K"})
    assert export_folder  # the one entry point dispatches gguf (used by the command above)


# ----- llama.cpp itself ---------------------------------------------------------------------------------------------

PROMPT = "It is a truth universally acknowledged, that a single man\ndef add(a, b):\n    return a + b\n12 + 30 ="


def _reference_logits(folder: Path, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """fp32 logits of our model (native loader) on ``ids`` and its greedy continuation of 12 tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    return logits, greedy


# bounds on |llama.cpp logit - our fp32 logit| over the prompt: (max, mean). F32 files differ only by float
# summation order; bf16 weights make llama.cpp round activations to bf16; block types make it quantize activations
# (Q8_0 / Q8_K). Near-tied routing (q3's 32 experts, DeepSeek's grouped sigmoid) turns such noise into an
# occasional different expert at a position, a jump of 1-3 in that position's logits, hence the loose max.
LOGIT_BOUNDS = {"F32": (0.03, 0.005), "BF16": (1.0, 0.05), "Q4_0": (4.0, 0.06)}


@needs_llama
@pytest.mark.parametrize("name", ["moe-ref-q3", "moe-ref-mx", "moe-ref-ds"])
def test_llama_cpp_runs_the_original(name, tmp_path):
    """F32 and BF16 exports of the original: llama.cpp's logits match transformers' (fp32) within the bounds,
    greedy text is the same, and llama.cpp tokenizes the calibration text as the Hugging Face tokenizer does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(name))
    ids = [0, *tokenizer(PROMPT)["input_ids"]]
    reference, greedy = _reference_logits(model_folder(name), ids)
    texts = [json.loads(line)["text"][:3000] for domain in ("pycode", "austen", "arithmetic", "manpages")
             for line in (REPO_ROOT.parent / "shared" / "testbed" / "calib" / f"{domain}.jsonl").read_text().splitlines()[:2]]
    for type_name in ("F32", "BF16"):
        types = None if type_name == "BF16" else ",".join(
            f"{role}=F32" for role in ("embedding", "output", "attention", "shared_expert", "dense_ffn", "routed_experts"))
        path = tmp_path / f"{type_name}.gguf"
        export_gguf(model_folder(name), path, types=types)
        ops = [{"op": "logits", "tokens": ids}, {"op": "generate", "tokens": ids, "max_tokens": 12},
               {"op": "tokenize", "texts": texts}, {"op": "detokenize", "ids": [tokenizer(t)["input_ids"] for t in texts]}]
        results, folder = run_llama(path, ops, tmp_path / type_name)
        difference = np.abs(np.load(folder / results[0]["file"]) - reference)
        max_bound, mean_bound = LOGIT_BOUNDS[type_name]
        assert difference.max() < max_bound and difference.mean() < mean_bound, (difference.max(), difference.mean())
        assert results[1]["ids"] == greedy
        assert results[2]["ids"] == [tokenizer(text)["input_ids"] for text in texts]
        assert results[3]["texts"] == texts


@needs_llama
@pytest.mark.parametrize("name", ["moe-ref-q3", "moe-ref-mx", "moe-ref-ds"])
def test_llama_cpp_runs_our_exact_q4_0(name, tmp_path):
    """A native model (experts and attention RTN 4-bit symmetric, groups of 32) exported with its own codes:
    llama.cpp's logits stay within the Q4_0 bound of our packed model's, and it generates from the file."""
    from transformers import AutoTokenizer

    native = native_folder(tmp_path, name, bits=4, group_size=32, targets=("routed_experts", "attention"))
    tokenizer = AutoTokenizer.from_pretrained(native)
    ids = [0, *tokenizer(PROMPT)["input_ids"]]
    import moecompress  # noqa: F401  (registers the native format for from_pretrained)

    reference, greedy = _reference_logits(native, ids)
    # the embedding (float in the native folder) in F32, so that the logits measure the Q4_0 tensors' path
    report = export_gguf(native, tmp_path / "q4.gguf", types="embedding=F32,output=F32")
    paths = {row["path"] for row in report["tensors"] if row["role"] in ("routed_experts", "attention")
             and not row["name"].endswith("attn_k_b.weight")}  # DeepSeek's k_b is transposed: Q8_0, re-quantized
    assert paths <= {"exact", "float"}
    results, folder = run_llama(tmp_path / "q4.gguf", [{"op": "logits", "tokens": ids},
                                                       {"op": "generate", "tokens": ids, "max_tokens": 12}],
                                tmp_path / "run")
    difference = np.abs(np.load(folder / results[0]["file"]) - reference)
    per_position = difference.max(axis=1)
    stats = (difference.max(), difference.mean(), np.percentile(per_position, 75))
    assert stats[0] < LOGIT_BOUNDS["Q4_0"][0] and stats[1] < LOGIT_BOUNDS["Q4_0"][1], stats
    assert stats[2] < 0.5, stats  # most positions: activation rounding only; a few: a routing choice flips
    assert len(results[1]["ids"]) == 12 and results[1]["ids"][:4] == greedy[:4]


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("bits, symmetric, expected, bounds", [
    (8, True, ("Q8_0", "exact"), (1.0, 0.05)),
    (4, False, ("Q4_1", "exact-offset"), (2.0, 0.06)),
    (3, True, ("Q3_K", "requantized"), (6.0, 0.6)),
])
def test_llama_cpp_logits_per_type(bits, symmetric, expected, bounds, tmp_path):
    """moe-ref-mx quantized natively (RTN, groups of 32, experts and attention) and exported with the auto types:
    exact types stay near the Q4_0 bound; a re-quantized one moves by what re-quantizing added (the report's
    error, measured in benchmarks/gguf_quality.py)."""
    from transformers import AutoTokenizer

    native = native_folder(tmp_path, "moe-ref-mx", bits=bits, symmetric=symmetric, group_size=32,
                           targets=("routed_experts", "attention"))
    tokenizer = AutoTokenizer.from_pretrained(native)
    ids = [0, *tokenizer(PROMPT)["input_ids"]]
    import moecompress  # noqa: F401  (registers the native format for from_pretrained)

    reference, _ = _reference_logits(native, ids)
    report = export_gguf(native, tmp_path / "x.gguf", types="embedding=F32,output=F32")
    gate = next(row for row in report["tensors"] if row["name"] == "blk.1.ffn_gate_exps.weight")
    assert (gate["type"], gate["path"]) == expected
    results, folder = run_llama(tmp_path / "x.gguf", [{"op": "logits", "tokens": ids}], tmp_path / "run")
    difference = np.abs(np.load(folder / results[0]["file"]) - reference)
    assert difference.max() < bounds[0] and difference.mean() < bounds[1], (difference.max(), difference.mean())
