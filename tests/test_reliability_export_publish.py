"""Atomic exports (issue 26, class 6): an export is built beside ``--out`` and published whole, in one rename.

An export killed at its worst moment (everything written, not yet published) leaves ``--out`` as it was, never a
config and a report without weights; the re-run finishes it (the killed export's work folder is started over). A
recipe's export replaces its own earlier export of the same native folder in one rename, and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from moecompress.cli import main
from moecompress.errors import UsageError
from moecompress.export import export_folder
from moecompress.export.options import ExportOptions, run_exports
from moecompress.export.output import LOCK_NAME, partial_folder

pytestmark = pytest.mark.usefixtures("one_thread")

_KILLED_EXPORT = r"""
import os, sys
from moecompress.export import hf
def killed(*args, **kwargs):
    os._exit(9)  # like SIGKILL: no cleanup runs
hf.write_report = killed  # everything but the report is written: the worst moment to die
from moecompress.export import export_folder
export_folder(sys.argv[1], sys.argv[2], "hf", dequantize=True)
"""


@pytest.fixture()
def native(native_mx):
    return native_mx  # shared by the session (conftest); tests copy it before damaging it


def listing(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_killed_export_leaves_no_half_export_and_the_rerun_finishes_it(native, tmp_path, capsys):
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(native), str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 9, done.stderr
    assert not out.exists()  # never a config and a report without weights
    assert (partial_folder(out) / "model.safetensors").is_file()  # the killed export's work, beside --out
    assert main(["export", str(native), "--format", "hf", "--dequantize", "--out", str(out)]) == 0, capsys.readouterr()
    report = json.loads((out / "export_report.json").read_text())
    assert sorted(report["files"]) == listing(out) and "model.safetensors" in report["files"]
    assert not partial_folder(out).exists() and not (out / LOCK_NAME).exists()


def test_publishing_is_one_rename_onto_out(native, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    renames = []
    real_replace = os.replace

    def recording_replace(source, destination):
        if os.path.abspath(destination) == str(out):
            renames.append((str(source), os.path.exists(os.path.join(destination, "config.json"))))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    export_folder(native, out, "hf", dequantize=True)
    assert renames == [(str(partial_folder(out)), False)]  # one rename, of the whole folder, onto a folder without it


def test_a_failed_export_leaves_an_empty_out_as_it_was(native, tmp_path, monkeypatch):
    from moecompress.checkpoint import shards

    out = tmp_path / "exported"
    out.mkdir()

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(shards.ShardWriter, "finish", fail)
    with pytest.raises(OSError, match="disk full"):
        export_folder(native, out, "compressed-tensors")
    assert out.is_dir() and listing(out) == [] and not partial_folder(out).exists()


def test_the_lock_file_of_an_export_killed_right_after_its_rename_is_tolerated(native, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 999999 on nowhere\n")
    export_folder(native, out, "hf", dequantize=True)
    assert not (out / LOCK_NAME).exists() and (out / "model.safetensors").is_file()


def test_a_recipe_export_replaces_its_own_earlier_export_and_nothing_else(native, tmp_path):
    options = [ExportOptions(format="hf", dequantize=True, out=str(tmp_path / "deploy"))]
    (first,) = run_exports(native, options)
    (second,) = run_exports(native, options)  # our own export of the same folder: replaced in one rename
    assert second["files"] == first["files"] == listing(tmp_path / "deploy")
    (tmp_path / "deploy" / "serving-notes.md").write_text("mine")
    with pytest.raises(UsageError, match=r"files it did not write \(serving-notes.md\)"):
        run_exports(native, options)
    assert (tmp_path / "deploy" / "serving-notes.md").read_text() == "mine"
    (tmp_path / "deploy" / "serving-notes.md").unlink()
    report = json.loads((tmp_path / "deploy" / "export_report.json").read_text())
    report["source"] = "/somewhere/else"  # an export of another native folder
    (tmp_path / "deploy" / "export_report.json").write_text(json.dumps(report))
    with pytest.raises(UsageError, match="is not a moecompress export of"):
        run_exports(native, options)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deploy"]  # no work folder left
