"""Bad input to export: one-line errors, nothing written outside --out (nor left in it), the input untouched."""

from __future__ import annotations

import shutil

import pytest
from conftest import testbed_model_path as model_folder
from export_helpers import native_folder

from moecompress.cli import main
from moecompress.errors import CheckpointError, UsageError
from moecompress.export import export_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return native_folder(tmp_path_factory.mktemp("export-errors"), "moe-ref-mx")


def _listing(folder):
    return sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir())


def test_an_original_model_is_not_a_moecompress_output(tmp_path):
    with pytest.raises(CheckpointError, match="not a moecompress output"):
        export_folder(model_folder("moe-ref-mx"), tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_a_truncated_shard_is_a_clear_error(native, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(native, damaged)
    shard = damaged / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        export_folder(damaged, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_the_output_folder_rules(native, tmp_path):
    before = _listing(native)
    with pytest.raises(UsageError, match="inside the input folder"):
        export_folder(native, native / "ct", "compressed-tensors")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_folder(native, busy, "compressed-tensors")
    assert [path.name for path in busy.iterdir()] == ["keep.txt"]
    assert _listing(native) == before


def test_a_failure_midway_leaves_nothing(native, tmp_path, monkeypatch):
    from moecompress.checkpoint import shards

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(shards.ShardWriter, "finish", fail)
    with pytest.raises(OSError, match="disk full"):
        export_folder(native, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_format_and_errors_are_one_line(native, tmp_path, capsys):
    assert main(["export", str(native), "--format", "onnx", "--out", str(tmp_path / "o1")]) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown export format 'onnx'"):
        export_folder(native, tmp_path / "o2", "onnx")
    assert main(["export", str(model_folder("moe-ref-mx")), "--format", "hf", "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a moecompress output" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_cli_export_prints_the_report(native, tmp_path, capsys):
    assert main(["export", str(native), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    printed = capsys.readouterr().out
    assert "bits/parameter" in printed and "vllm serve" in printed and "--quantization compressed-tensors" in printed
    assert (tmp_path / "ct" / "export_report.json").is_file()
