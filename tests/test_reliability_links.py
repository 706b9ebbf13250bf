"""Symlinks and predictable names (issue 26, class 2): a path planted where moecompress will create a work folder or
a temp file (a link, a file, a folder of someone else's files) is never followed, written into or emptied.

The compress partial folder (``<out>.partial-<recipe hash>``) and the export work folder (``.<out>.export-partial``)
must have predictable names (a stopped run finds them again), so they are created with ``mkdir`` and an existing one
is used only when it is a real folder of this user holding a stopped run; one-shot work folders (stores, reduced
models, the old copy moved aside on replace) and temp files get random names created exclusively.
"""

from __future__ import annotations

import os

import pytest
from conftest import testbed_model_path as model_folder

from moecompress.cli import main
from moecompress.errors import MoECompressError
from moecompress.export import export_folder
from moecompress.export.output import partial_folder
from moecompress.folders import claim_folder, move_into_place, new_work_folder, write_json_atomic, write_text_atomic
from moecompress.pipeline import Pipeline
from moecompress.run_folder import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

MX = model_folder("moe-ref-mx")


@pytest.fixture()
def recipe(tmp_path, testbed):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"calibration: {{files: [{testbed / 'calib' / 'pycode.jsonl'}], num_samples: 2, seq_len: 16}}\n"
                    "stages: []\n")
    return path


@pytest.fixture()
def victim(tmp_path):
    """A folder of someone's files that a planted link points at."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def snapshot(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def partial_of(recipe, out):
    return RunFolder(out, recipe_sha256=Pipeline.from_recipe(recipe).recipe.sha256, source=str(MX),
                     overwrite=False).partial_dir


def one_line(captured) -> str:
    lines = [line for line in captured.err.strip().splitlines() if "━" not in line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# ----- compress: the predictable partial folder ----------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_compress_never_follows_a_link_planted_at_the_partial_folder(recipe, tmp_path, victim, capsys, overwrite):
    out = tmp_path / "out"
    partial = partial_of(recipe, out)
    partial.symlink_to(victim, target_is_directory=True)
    before = snapshot(victim)
    argv = ["compress", str(MX), "--recipe", str(recipe), "--out", str(out)] + (["--overwrite"] if overwrite else [])
    assert main(argv) == 2
    message = one_line(capsys.readouterr())
    assert str(partial) in message and "is a link" in message and "never writes through it" in message
    assert snapshot(victim) == before  # nothing written there, nothing emptied (with --overwrite neither)
    assert partial.is_symlink() and not out.exists()


def test_compress_refuses_a_file_or_a_folder_of_other_files_at_the_partial_folder(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    partial = partial_of(recipe, out)
    partial.write_text("not a folder")
    assert main(["compress", str(MX), "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "is not a folder" in one_line(capsys.readouterr())
    assert partial.read_text() == "not a folder"
    partial.unlink()
    partial.mkdir()
    (partial / "mine.txt").write_text("someone's file")
    assert main(["compress", str(MX), "--recipe", str(recipe), "--out", str(out), "--overwrite"]) == 2
    assert "holds files but no stopped moecompress run (mine.txt)" in one_line(capsys.readouterr())
    assert (partial / "mine.txt").read_text() == "someone's file" and not out.exists()


def test_a_partial_folder_left_with_only_its_lock_is_taken_over(recipe, tmp_path, capsys):
    """What a run killed before saving anything leaves (its lock file): the next run uses it and cleans up."""
    out = tmp_path / "out"
    partial = partial_of(recipe, out)
    partial.mkdir()
    (partial / ".moecompress.lock").write_text("pid 999999 on nowhere since long ago\n")
    assert main(["compress", str(MX), "--recipe", str(recipe), "--out", str(out)]) == 0
    assert (out / "report.json").is_file() and not partial.exists()


# ----- export: the predictable work folder ----------------------------------------------------------------------------
@pytest.fixture()
def native(native_mx):
    return native_mx  # shared by the session (conftest); tests copy it before damaging it


def test_export_never_follows_a_link_planted_at_its_work_folder(native, tmp_path, victim, capsys):
    out = tmp_path / "exported"
    partial_folder(out).symlink_to(victim, target_is_directory=True)
    before = snapshot(victim)
    assert main(["export", str(native), "--format", "hf", "--dequantize", "--out", str(out)]) == 2
    assert "is a link" in one_line(capsys.readouterr())
    assert snapshot(victim) == before and not out.exists()


def test_export_refuses_a_folder_of_other_files_at_its_work_folder(native, tmp_path):
    out = tmp_path / "exported"
    partial_folder(out).mkdir()
    (partial_folder(out) / "mine.txt").write_text("someone's file")
    with pytest.raises(MoECompressError, match="not a moecompress export's"):
        export_folder(native, out, "hf", dequantize=True)
    assert (partial_folder(out) / "mine.txt").read_text() == "someone's file" and not out.exists()


# ----- temp files and one-shot work folders: random, exclusive --------------------------------------------------------
def test_atomic_writes_never_follow_a_link_at_the_old_temp_name(tmp_path, victim):
    target = tmp_path / "run"
    target.mkdir()
    (target / ".config.json.tmp").symlink_to(victim / "precious.txt")  # the name the writer used to use
    (target / ".state.json.tmp").symlink_to(victim / "precious.txt")
    write_text_atomic(target / "config.json", "{}")
    write_json_atomic(target / "state.json", {"a": 1})
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (target / "config.json").read_text() == "{}" and not (target / "config.json").is_symlink()


def test_work_folders_are_new_and_claimed_folders_are_checked(tmp_path, victim):
    first, second = new_work_folder(tmp_path, ".out.partial-"), new_work_folder(tmp_path, ".out.partial-")
    umask = os.umask(0)
    os.umask(umask)
    assert first != second and not any(first.iterdir())
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir would make it (it becomes the output)
    assert claim_folder(tmp_path / "fresh", "a test folder") is True
    assert claim_folder(tmp_path / "fresh", "a test folder") is False  # our own real folder: accepted
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(MoECompressError, match="is a link"):
        claim_folder(tmp_path / "link", "a test folder")


def test_a_folder_of_another_user_is_not_claimed(tmp_path, monkeypatch):
    (tmp_path / "theirs").mkdir()  # made by "another user": this process pretends to run as someone else
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(MoECompressError, match=r"belongs to another user \(uid \d+\)"):
        claim_folder(tmp_path / "theirs", "a test folder")


def test_replacing_an_output_never_deletes_through_a_link(tmp_path, victim):
    finished = new_work_folder(tmp_path, ".result-")
    (finished / "model.safetensors").write_text("new")
    (tmp_path / "out").symlink_to(victim, target_is_directory=True)
    with pytest.raises(MoECompressError, match="is a link"):
        move_into_place(finished, tmp_path / "out")
    assert snapshot(victim) == {"precious.txt": b"keep me"}
    old = tmp_path / "old"
    old.mkdir()
    (old / "inner-link").symlink_to(victim)  # a link inside the replaced folder: removed, its target kept
    move_into_place(finished, old)
    assert (old / "model.safetensors").read_text() == "new" and snapshot(victim) == {"precious.txt": b"keep me"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old", "out", "victim"]  # nothing set aside left
