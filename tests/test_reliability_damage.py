"""Silent wrong results from damaged inputs (issue 26, class 3): what is read is validated, and a run's identity is
the full content of its source.

* A native folder whose scales or norms hold NaN, or whose packed tensor's header claims another dtype (with the same
  byte size, so the library does not notice), is refused by ``eval``, ``inspect`` and ``export``, naming the tensor:
  no score is reported, nothing is exported.
* A source checkpoint with a NaN or an infinity is refused by ``compress`` before any work, naming file and tensor.
* A pattern store with NaN patterns is refused (no task is chosen on NaN distances).
* The run identity hashes every byte of the source: a model that differs from a finished run's source anywhere
  (also between the blocks the old fingerprint sampled, with the old size and mtime) never reuses that run; the
  per-file hashes are reused only while a file's size, times and inode are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from conftest import testbed_model_path as model_folder
from safetensors.torch import load_file, save_file
from test_reliability_overwrite import make_store

from moecompress.checkpoint import checkpoint_fingerprint, validate_checkpoint
from moecompress.checkpoint.fingerprint import source_identity
from moecompress.cli import main
from moecompress.errors import CheckpointError, MoECompressError, RetrievalError
from moecompress.export import export_folder
from moecompress.pipeline import Pipeline
from moecompress.pruning.retrieval import PatternStore

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER0 = "model.layers.0.block_sparse_moe.experts"


@pytest.fixture()
def native(native_mx):
    return native_mx  # shared by the session (conftest); tests copy it before damaging it


def edit_tensor(folder, key, edit):
    """Rewrite one tensor of a single-file checkpoint: ``edit(tensor) -> tensor``."""
    path = folder / "model.safetensors" if (folder / "model.safetensors").is_file() else None
    if path is None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        path = folder / index["weight_map"][key]
    tensors = load_file(path)
    tensors[key] = edit(tensors[key].clone())
    save_file(tensors, path, metadata={"format": "pt"})


def set_value(value, index=3):
    def edit(tensor):
        tensor.view(-1)[index] = value
        return tensor
    return edit


def one_line(captured) -> str:
    lines = [line for line in captured.err.strip().splitlines() if "━" not in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# ----- damaged native folders ---------------------------------------------------------------------------------------
NATIVE_DAMAGE = {
    "nan-scale": (f"{LAYER0}.gate_up_proj_scale_w4", set_value(float("nan")), "NaN or infinite"),
    "inf-scale": (f"{LAYER0}.down_proj_scale_w4", set_value(float("inf")), "NaN or infinite"),
    "nan-norm": ("model.layers.1.input_layernorm.weight", set_value(float("nan")), "NaN or infinite"),
    "nan-final-norm": ("model.norm.weight", set_value(float("nan"), 0), "NaN or infinite"),
    # int32 codes relabelled float32: same bytes, so the header's sizes agree and only the format's rules can tell
    "packed-dtype-lie": (f"{LAYER0}.gate_up_proj_packed_w4", lambda tensor: tensor.view(torch.float32),
                         "stored in a dtype that does not hold their values"),
    "bits-dtype-lie": (f"{LAYER0}.expert_bits", lambda tensor: tensor.view(torch.float32),
                       "expert_bits stored as F32, the model holds int32"),
}


@pytest.mark.parametrize("damage", list(NATIVE_DAMAGE))
def test_a_damaged_native_folder_is_neither_scored_nor_exported(native, tmp_path, capsys, damage):
    key, edit, message = NATIVE_DAMAGE[damage]
    folder = tmp_path / "native"
    shutil.copytree(native, folder)
    edit_tensor(folder, key, edit)
    with pytest.raises(CheckpointError, match=message):
        export_folder(folder, tmp_path / "exported", "hf", dequantize=True)
    assert not (tmp_path / "exported").exists() and not list(tmp_path.glob(".exported*"))
    assert main(["eval", str(folder), "--tasks", "tb_arith", "--limit", "2", "--json"]) == 2
    captured = capsys.readouterr()
    assert message in one_line(captured) and captured.out == ""  # no score reported
    assert key.split(".experts.")[-1].removeprefix("model.") in captured.err  # the tensor is named


def test_inspect_refuses_a_header_dtype_that_lies(native, tmp_path, capsys):
    folder = tmp_path / "native"
    shutil.copytree(native, folder)
    edit_tensor(folder, f"{LAYER0}.down_proj_packed_w4", lambda tensor: tensor.view(torch.float32))
    with pytest.raises(CheckpointError, match="down_proj_packed_w4 stored as F32, the model holds int32"):
        validate_checkpoint(folder)
    assert main(["inspect", str(folder)]) == 2
    assert "stored in a dtype that does not hold their values" in one_line(capsys.readouterr())


# ----- a damaged source is refused before work ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_compress_refuses_non_finite_source_weights_naming_the_tensor(tmp_path, testbed, capsys, value):
    source = tmp_path / "model"
    shutil.copytree(model_folder("moe-ref-mx"), source)
    key = "model.layers.2.block_sparse_moe.experts.5.w1.weight"
    edit_tensor(source, key, set_value(value, 1000))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"calibration: {{files: [{testbed / 'calib' / 'pycode.jsonl'}], num_samples: 2, seq_len: 16}}\n"
                      "stages: []\n")
    assert main(["compress", str(source), "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 2
    message = one_line(capsys.readouterr())
    assert f"tensor {key} holds NaN or infinite values" in message and ".safetensors" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


def test_a_store_with_nan_patterns_is_refused(tmp_path, testbed, capsys):
    store = make_store(testbed)
    store.patterns["prose"][2, 7] = float("nan")
    folder = store.save(tmp_path / "store")
    with pytest.raises(RetrievalError, match="pattern of task 'prose' holds NaN or infinite values"):
        PatternStore.load(folder)
    assert main(["retrieve", str(model_folder("moe-ref-q3")), "--store", str(folder), "--prompt", "x"]) == 2
    assert "holds NaN or infinite values, so no distance to it means anything" in one_line(capsys.readouterr())


# ----- the run identity is the full content ---------------------------------------------------------------------------
def _change_one_value_between_samples(folder):
    """Flip one bf16 value at 1/6 of the largest shard's data (the old fingerprint read 4 x 64 KiB at 0, 1/3, 2/3
    and the end), keeping the size and the modification time."""
    path = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    info = path.stat()
    data = bytearray(path.read_bytes())
    (header_length,) = struct.unpack("<Q", data[:8])
    offset = 8 + header_length + (len(data) - 8 - header_length) // 6
    offset -= offset % 2
    data[offset + 1] ^= 0x01  # a low exponent bit: still a finite value
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns


def test_a_model_changed_between_the_old_samples_never_reuses_a_finished_run(tmp_path, testbed):
    source = tmp_path / "model"
    shutil.copytree(model_folder("moe-ref-mx"), source)
    calibration = {"files": [str(testbed / "calib" / "pycode.jsonl")], "num_samples": 2, "seq_len": 16}
    out = tmp_path / "out"
    Pipeline([], calibration=calibration).run(source, out)
    recorded = json.loads((out / "state.json").read_text())
    assert {entry["sha256"] for entry in recorded["source_files"].values()}  # the per-file hashes, beside the run
    before = checkpoint_fingerprint(source)
    _change_one_value_between_samples(source)
    assert checkpoint_fingerprint(source) != before
    with pytest.raises(MoECompressError, match=r"holds a finished moecompress run \(another source model\)"):
        Pipeline([], calibration=calibration).run(source, out)


def test_cached_file_hashes_are_reused_only_while_the_file_is_unchanged(tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_folder("moe-ref-q3"), source)
    first = source_identity(source)
    assert len(first.hashed) == 3
    again = source_identity(source, first.files)
    assert again.hashed == [] and again.fingerprint == first.fingerprint  # nothing read: one stat per file
    _change_one_value_between_samples(source)  # same size and mtime: the change time still moves
    changed = source_identity(source, first.files)
    assert len(changed.hashed) == 1 and changed.fingerprint != first.fingerprint
    forged = {name: {**entry, "sha256": "0" * 64} for name, entry in changed.files.items()}
    other_folder = tmp_path / "copy"
    shutil.copytree(source, other_folder)  # other inodes: a record of the first folder does not apply
    assert source_identity(other_folder, forged).fingerprint == changed.fingerprint


@pytest.mark.parametrize("key, message", [
    ("model.embed_tokens.weight", "TCESS markers at key layer(s) [0] are NaN or infinite"),
    ("model.layers.4.self_attn.o_proj.weight", "the reduced model holds NaN or infinite values"),
], ids=["query-reads-nan", "built-model-holds-nan"])
def test_retrieve_never_chooses_on_nan_nor_saves_nan(tmp_path, testbed, capsys, key, message):
    source = tmp_path / "model"
    shutil.copytree(model_folder("moe-ref-q3"), source)
    edit_tensor(source, key, lambda tensor: torch.full_like(tensor, float("nan")))
    folder = make_store(testbed).save(tmp_path / "store")  # its routing fingerprint still matches: routers unchanged
    argv = ["retrieve", str(source), "--store", str(folder), "--prompt", "def main(argv):", "--keep", "8",
            "--out", str(tmp_path / "reduced")]
    assert main(argv) == 2
    assert message in one_line(capsys.readouterr())
    assert not (tmp_path / "reduced").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model", "store"]
