"""Tracebacks instead of one line (issue 26, class 5): each failure a user can cause is one line on stderr, naming the
file and the fix, with a known exit code (2: bad input; 1: the machine refused; 130: interrupted).

Covered: safetensors headers with negative, overlapping or gapped offsets, trailing bytes, a dtype that lies about
the data size or is unknown (inspect, eval, compress, export); a full disk (compress: the run resumes; export); crafted
or truncated pattern stores (retrieve, store show); bad ``--device``/``--threads``/``--tcess-top-k``/``--keep`` values
of ``store build`` and ``retrieve``; a garbage ``export_report.json`` where a recipe exports; a truncated staged layer
on resume; two exports into one folder; Ctrl-C while the libraries import; torch's allocation failures and a
``SafetensorError`` that slips past the checks (the top-level handler).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TESTBED
from conftest import testbed_model_path as model_folder
from safetensors import SafetensorError
from test_reliability_overwrite import make_store

from moecompress.checkpoint import shards
from moecompress.cli import main
from moecompress.export.output import LOCK_NAME, partial_folder
from moecompress.folders import RunLock
from moecompress.pipeline import _PipelineRun

pytestmark = pytest.mark.usefixtures("one_thread")

DS, MX, Q3 = model_folder("moe-ref-ds"), model_folder("moe-ref-mx"), model_folder("moe-ref-q3")
CALIB = TESTBED / "calib" / "pycode.jsonl"
NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def one_line(captured) -> str:
    """The one error line of stderr: the run's progress lines (``[m:ss] ...``, issue 25) may come before it."""
    lines = [line for line in captured.err.strip().splitlines()
             if "━" not in line and not re.match(r"\[\d+:\d\d(:\d\d)?\] ", line)]
    assert len(lines) == 1 and captured.err.strip().endswith(lines[0]), captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err, captured.err
    return lines[0]


def write_recipe(tmp_path, stages="[]", name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(f"calibration: {{files: [{CALIB}], num_samples: 2, seq_len: 16}}\nstages: {stages}\n")
    return path


# ----- safetensors headers: one line in every command -------------------------------------------------------------------
def edit_header(path, edit):
    """Rewrite the JSON header of ``path`` with ``edit(header)`` (entries in data order), keeping the data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    entries = sorted((key for key in header if key != "__metadata__"), key=lambda key: header[key]["data_offsets"][0])
    edit(header, entries)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def _negative(header, entries):
    header[entries[1]]["data_offsets"][0] = -8


def _overlap(header, entries):
    header[entries[1]]["data_offsets"] = [0, header[entries[1]]["data_offsets"][1] - header[entries[1]]["data_offsets"][0]]


def _gap(header, entries):
    del header[entries[0]]  # its bytes stay: a gap before the next tensor


def _dtype_size_lie(header, entries):
    entry = header[entries[1]]
    entry["dtype"] = "F16" if entry["dtype"] in ("F32", "I32") else "F32"  # another element size than the data's


def _unknown_dtype(header, entries):
    header[entries[1]]["dtype"] = "Q4_K"


HEADER_DAMAGE = {
    "negative-offset": (_negative, "malformed entries"),
    "overlapping-offsets": (_overlap, "overlaps the one before it"),
    "gap": (_gap, "leaves a gap before it"),
    "trailing-bytes": (None, "bytes after its last tensor"),
    "dtype-lies-about-size": (_dtype_size_lie, "its header says tensor"),
    "unknown-dtype": (_unknown_dtype, "unknown dtype 'Q4_K'"),
}


def damage_shard(path, damage):
    edit, _ = HEADER_DAMAGE[damage]
    if edit is None:
        path.write_bytes(path.read_bytes() + b"\0" * 16)
    else:
        edit_header(path, edit)


@pytest.fixture()
def native(native_mx):
    return native_mx  # shared by the session (conftest); tests copy it before damaging it


@pytest.mark.parametrize("command", ["inspect", "eval", "compress", "export"])
@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_a_damaged_header_is_one_line_in_every_command(tmp_path, capsys, native, command, damage):
    folder = tmp_path / "model"
    shutil.copytree(native if command == "export" else DS, folder)
    shard = folder / ("model.safetensors" if command == "export" else "model-00001-of-00002.safetensors")
    damage_shard(shard, damage)
    argv = {
        "inspect": ["inspect", str(folder)],
        "eval": ["eval", str(folder), "--tasks", "tb_arith", "--limit", "2"],
        "compress": ["compress", str(folder), "--recipe", str(write_recipe(tmp_path)), "--out", str(tmp_path / "out")],
        "export": ["export", str(folder), "--format", "hf", "--dequantize", "--out", str(tmp_path / "out")],
    }[command]
    assert main(argv) == 2
    message = one_line(capsys.readouterr())
    assert f"{shard} is corrupt: " in message and HEADER_DAMAGE[damage][1] in message
    assert "Re-download or re-save" in message and not (tmp_path / "out").exists()


# ----- a full disk -------------------------------------------------------------------------------------------------------
def test_a_full_disk_in_compress_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, "[{method: prune_frequency, num_experts_to_keep: 6}]")
    argv = ["compress", str(MX), "--recipe", str(recipe), "--out", str(tmp_path / "out")]
    from moecompress import pipeline

    def disk_full(*args, **kwargs):
        raise SafetensorError(NO_SPACE)  # what safetensors raises when a shard cannot be written

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "save_model", disk_full)
        patch.setattr(pipeline, "StreamedStages", None)  # force the in-memory path, which saves with save_model
        assert main([*argv, "--execution", "in_memory"]) == 1
    message = one_line(capsys.readouterr())
    assert "no space left on the device while writing" in message and ".partial-" in message
    assert "re-run the same command: the run resumes from the work saved there" in message
    assert main([*argv, "--execution", "in_memory"]) == 0  # and it does
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.parametrize("failure", [SafetensorError(NO_SPACE), OSError(28, "No space left on device")],
                         ids=["safetensors", "oserror"])
def test_a_full_disk_in_export_is_one_line_naming_the_output(native, tmp_path, capsys, monkeypatch, failure):
    def disk_full(self):
        raise failure

    monkeypatch.setattr(shards.ShardWriter, "flush", disk_full)
    out = tmp_path / "exported"
    assert main(["export", str(native), "--format", "compressed-tensors", "--out", str(out)]) == 1
    message = one_line(capsys.readouterr())
    assert f"no space left on the device while writing {out}" in message and "free some space" in message
    assert not out.exists() and not partial_folder(out).exists()


# ----- crafted and truncated pattern stores ----------------------------------------------------------------------------
def _grow(path, size):
    with path.open("r+b") as handle:
        handle.truncate(size)  # sparse: nothing is written


def _set(key, value):
    def edit(record):
        record[key] = value
    return edit


STORE_DAMAGE = {
    "garbage-json": ("store.json", lambda path: path.write_text("{not json"), "is not a JSON object"),
    "json-list": ("store.json", lambda path: path.write_text("[1, 2]"), "is not a JSON object"),
    "huge-record": ("store.json", lambda path: _grow(path, 64 << 20), "far more than a pattern store"),
    "layers-not-numbers": ("store.json", _set("moe_layers", "all"), "moe_layers"),
    "key-layer-not-moe": ("store.json", _set("key_layers", [17]), "are not all MoE layers"),
    "super-expert-out-of-range": ("store.json", _set("super_experts", [[0, 99]]), "is not an expert of an MoE layer"),
    "tcess-unknown-key": ("store.json", _set("tcess", {"phi": "peu", "run": "rm -rf"}), "tcess.run"),
    "tcess-top-k-too-big": ("store.json", _set("tcess", {"top_k": 999}), "exceeds num_experts"),
    "no-tasks": ("store.json", _set("tasks", {}), "tasks"),
    "wrong-expert-count": ("store.json", _set("num_experts", 16), "is [6, 32] float32, not a float [6, 16] matrix"),
    "truncated-tensors": ("patterns.safetensors", lambda path: path.write_bytes(path.read_bytes()[:-100]),
                          "it is truncated"),
    "tensors-not-safetensors": ("patterns.safetensors", lambda path: path.write_bytes(b"\x10" * 64),
                                "is corrupt"),
}


@pytest.mark.parametrize("command", ["retrieve", "store show"])
@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_a_crafted_or_truncated_store_is_one_line(testbed, tmp_path, capsys, command, damage):
    folder = make_store(testbed).save(tmp_path / "store")
    name, edit, message = STORE_DAMAGE[damage]
    if name == "store.json" and damage not in ("garbage-json", "json-list", "huge-record"):
        record = json.loads((folder / name).read_text())
        edit(record)
        (folder / name).write_text(json.dumps(record))
    else:
        edit(folder / name)
    argv = ["retrieve", str(Q3), "--store", str(folder), "--prompt", "x"] if command == "retrieve" else \
        ["store", "show", str(folder)]
    assert main(argv) == 2
    line = one_line(capsys.readouterr())
    assert message in line and ("store build" in line or "rebuild" in line), line


# ----- bad values on store build / retrieve -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "argument --threads: expected a whole number >= 1, got '-1'"),
    (["--threads", "0"], "argument --threads: expected a whole number >= 1, got '0'"),
    (["--device", "cuda"], "argument --device: --device cuda:"),
    (["--device", "toaster"], "argument --device: 'toaster' is not a torch device"),
    (["--tcess-top-k", "0"], "argument --tcess-top-k: expected a whole number >= 1"),
    (["--tcess-top-k", "999"], "TCESS top_k 999 exceeds the model's 32 experts per layer"),
    (["--num-samples", "0"], "argument --num-samples: expected a whole number >= 1"),
], ids=["threads-negative", "threads-zero", "device-cuda", "device-garbage", "top-k-zero", "top-k-too-big",
        "samples-zero"])
def test_store_build_argument_errors(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["store", "build", str(Q3), "--tasks", f"code={CALIB}", "--num-samples", "2", "--seq-len", "16",
            "--out", str(tmp_path / "store"), *extra]
    assert main(argv) == 2
    assert message in one_line(capsys.readouterr())
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "argument --threads: expected a whole number >= 1"),
    (["--threads", "0"], "argument --threads: expected a whole number >= 1"),
    (["--device", "cuda"], "argument --device: --device cuda:"),
    (["--keep", "0"], "argument --keep: expected a whole number >= 1"),
    (["--top-k", "-2"], "argument --top-k: expected a whole number >= 1"),
], ids=["threads-negative", "threads-zero", "device-cuda", "keep-zero", "top-k-negative"])
def test_retrieve_argument_errors(testbed, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = make_store(testbed).save(tmp_path / "store")
    assert main(["retrieve", str(Q3), "--store", str(folder), "--prompt", "x", *extra]) == 2
    assert message in one_line(capsys.readouterr())


# ----- exports: a garbage report where a recipe exports; two exports at once ------------------------------------------------
@pytest.mark.parametrize("garbage", ["{truncated", "[]", '{"source": 42}'], ids=["not-json", "a-list", "wrong-types"])
def test_a_garbage_export_report_is_one_line_and_left_alone(tmp_path, capsys, garbage):
    recipe = write_recipe(tmp_path, "[{method: prune_frequency, num_experts_to_keep: 6}]")
    export_out = tmp_path / "deploy"
    export_out.mkdir()
    (export_out / "export_report.json").write_text(garbage)
    assert main(["compress", str(MX), "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--export", "hf",
                 "--export-out", str(export_out)]) == 2
    message = one_line(capsys.readouterr())
    assert f"--out {export_out} is not a moecompress export" in message and "export_report.json" in message
    assert (export_out / "export_report.json").read_text() == garbage
    assert (tmp_path / "out" / "report.json").is_file()  # the compress run itself finished


def test_two_exports_into_one_folder_the_second_is_refused(native, tmp_path, capsys):
    out = tmp_path / "exported"
    partial_folder(out).mkdir()
    holder = RunLock(partial_folder(out), LOCK_NAME, holder="moecompress export")
    holder.acquire()  # the first export, still writing
    try:
        (partial_folder(out) / "model.safetensors").write_text("the first export's work")
        assert main(["export", str(native), "--format", "hf", "--dequantize", "--out", str(out)]) == 2
        message = one_line(capsys.readouterr())
        assert "another moecompress export (pid" in message and f"two exports cannot write {out} at once" in message
        assert (partial_folder(out) / "model.safetensors").read_text() == "the first export's work"
    finally:
        holder.release()


# ----- a damaged staged layer on resume ------------------------------------------------------------------------------------
def test_a_truncated_staged_layer_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, "[{method: prune_frequency, num_experts_to_keep: 6}, "
                                    "{method: rtn, bits: 4, group_size: 32}]")
    argv = ["compress", str(MX), "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--execution", "streamed"]
    saved = []
    original = shards.LayerFiles.save

    def stop_after_three(self, *args, **kwargs):
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(args[0])
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(shards.LayerFiles, "save", stop_after_three)
        assert main(argv) == 130
    assert "the run can be resumed" in one_line(capsys.readouterr())
    (staged,) = (path for path in tmp_path.glob("out.partial-*/.stream-layers/layer-00001.safetensors"))
    staged.write_bytes(staged.read_bytes()[: staged.stat().st_size // 2])
    assert main(argv) == 2
    message = one_line(capsys.readouterr())
    assert f"{staged}, a decoder layer staged by the stopped run, is damaged" in message
    assert f"Delete the folder {staged.parent}" in message
    shutil.rmtree(staged.parent)  # the fix the message gives
    assert main(argv) == 0 and (tmp_path / "out" / "report.json").is_file()


# ----- the top-level handler -------------------------------------------------------------------------------------------------
def test_ctrl_c_while_the_libraries_import_is_one_line():
    """An interrupt landing during `import moecompress` (torch and transformers take seconds) prints one line."""
    script = (
        "import runpy, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['moecompress', '--version']\n"
        "runpy.run_module('moecompress.cli', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["moecompress: interrupted while starting; nothing was done"], done.stderr


def test_a_real_sigint_in_the_first_second_is_one_line():
    """The same with a real signal: half a second in, the libraries are still importing (or, on a fast machine, the
    command has started): one line either way, never a traceback."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "moecompress.cli", "inspect", str(MX)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert process.returncode in (-signal.SIGINT, 130), err
    assert len(lines) == 1 and lines[0].startswith("moecompress") and "interrupted" in lines[0], err


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    import importlib

    real_import_module = importlib.import_module

    def interrupted(name, *args, **kwargs):
        if name.startswith("moecompress.commands."):  # Ctrl-C while the commands' modules import
            raise KeyboardInterrupt
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["inspect", str(MX)]) == 130
    assert one_line(capsys.readouterr()) == "moecompress: interrupted while starting; nothing was done"


@pytest.mark.parametrize("failure, code, message", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 687194767360 bytes. Error code 12 (Cannot allocate memory)"), 1,
     "error: out of memory ([enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory"),
    (SafetensorError("Error while deserializing header: invalid offset for tensor `x`"), 2,
     "a safetensors file could not be read (Error while deserializing header: invalid offset"),
    (SafetensorError(NO_SPACE), 1, "no space left on the device while writing"),
], ids=["allocation", "safetensors", "safetensors-disk-full"])
def test_library_errors_reach_the_user_as_one_line(tmp_path, capsys, monkeypatch, failure, code, message):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(_PipelineRun, "_profile", fail)
    assert main(["compress", str(MX), "--recipe", str(write_recipe(tmp_path)), "--out", str(tmp_path / "out")]) == code
    assert message in one_line(capsys.readouterr())
