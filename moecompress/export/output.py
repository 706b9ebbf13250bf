"""Where an export is written: the output-folder rules, and the staged write that publishes it whole.

The export is built in a work folder beside ``OUT`` (``.<OUT name>.export-partial``), locked while an export works
there, and published by **one rename** onto ``OUT`` when complete (:func:`staged_output`): a reader, or an export
killed at any point, sees either no ``OUT`` (or the empty folder it was) or the whole export, never a config without
weights. A re-run after a kill starts the work folder over. Two exports into one ``OUT`` cannot interleave: the
second is refused while the first holds the lock. The work folder's name is predictable (a re-run must find it), so
it is created with ``mkdir`` and an existing one is used only when it is a real folder of this user holding a
killed export's leftovers (:func:`moecompress.folders.claim_folder`); nothing there is ever followed through a link.

Nothing is ever written into the input folder, and a non-empty ``OUT`` is refused, except that a recipe's
``export:`` may replace the export it wrote earlier from the same native folder (``replace_own``), when ``OUT``
holds nothing but the files that export recorded (``export_report.json``'s ``files``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from moecompress.errors import UsageError
from moecompress.folders import (
    RunLock,
    check_output_placement,
    check_replaceable_output,
    claim_folder,
    move_into_place,
    read_json,
)

REPORT_FILE = "export_report.json"
LOCK_NAME = ".moecompress-export.lock"  # in the work folder while an export builds there (it moves with the rename)


def partial_folder(out: Path) -> Path:
    """The work folder an export into ``out`` builds in: beside it, on the same disk (so publishing is a rename)."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.export-partial"


def export_files(out: Path, source: Path) -> set[str] | None:
    """The files an earlier export of the native folder ``source`` wrote into ``out`` (its report lists them), or
    None when ``out`` holds no such export (no report, a damaged one, another source, an older report)."""
    report = read_json(Path(out) / REPORT_FILE)
    files = (report or {}).get("files")
    if report is None or report.get("source") != str(Path(source).resolve()) or not isinstance(files, list) \
            or not all(isinstance(name, str) for name in files):
        return None
    return set(files) | {REPORT_FILE, LOCK_NAME}


def check_output_folder(source: Path, out: Path, *, replace_own: bool = False) -> None:
    """``out`` must not be the input, inside it or contain it, and must be empty or new (or, with ``replace_own``,
    hold only an earlier export of ``source``)."""
    source, out = Path(source).resolve(), Path(out).resolve()
    check_output_placement(out, [("input folder", source)], UsageError)
    if not out.is_dir() or all(path.name == LOCK_NAME for path in out.iterdir()):  # a killed publish's lock file
        return
    if not replace_own:
        raise UsageError(f"--out {out} already exists and is not empty; pick a new folder or remove it")
    check_replaceable_output(out, overwrite=True, owned_files=lambda folder: export_files(folder, source),
                             what=f"moecompress export of {source}", error=UsageError,
                             rule="a recipe's export replaces only an earlier export of the same folder (its "
                                  "export_report.json lists the files it wrote)")


@contextlib.contextmanager
def staged_output(out: Path, *, replace_own: bool = False) -> Iterator[Path]:
    """Yield the locked work folder to write into; on success it becomes ``OUT`` in one rename (``replace_own``: an
    earlier export there is replaced, removed only after the rename). On failure the work folder is removed and
    ``OUT`` is as it was."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_folder(out)
    created = claim_folder(partial, "the work folder of an export into " + str(out))
    killed_export = (partial / LOCK_NAME).is_file()  # what a killed export leaves; anything else is not ours
    lock = RunLock(partial, LOCK_NAME, holder="moecompress export",
                   fix=f"two exports cannot write {out} at once; wait for the other to finish (or stop it), then re-run")
    lock.acquire()  # another export writing there: refused, and nothing of its work is touched
    try:
        leftovers = [path for path in partial.iterdir() if path.name != LOCK_NAME]
        if leftovers and not killed_export:
            created = False  # never remove what this export did not make
            raise UsageError(f"{partial} holds files that are not a moecompress export's ({leftovers[0].name}, ...); "
                             "move that folder away, then re-run")
        for path in leftovers:  # a killed export's half-written files: start over
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        yield partial
        _publish(partial, out, replace_own=replace_own)
    except BaseException:
        lock.release()
        if created or killed_export:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    lock.release()
    (out / LOCK_NAME).unlink(missing_ok=True)


def _publish(partial: Path, out: Path, *, replace_own: bool) -> None:
    """``partial`` becomes ``out``: one rename onto a missing or empty ``out``; with ``replace_own`` an earlier
    export there is moved aside first and removed after (:func:`moecompress.folders.move_into_place`)."""
    if out.is_dir():
        (out / LOCK_NAME).unlink(missing_ok=True)  # left by an export killed right after its rename
        if any(out.iterdir()):
            if not replace_own:
                raise UsageError(f"--out {out} was written by someone else while this export ran; nothing was "
                                 "replaced. Pick another folder, or remove it and re-run")
            move_into_place(partial, out)
            return
    try:
        os.replace(partial, out)
    except OSError as error:
        raise UsageError(f"--out {out} could not be replaced by the finished export ({error.strerror}); it changed "
                         "while the export ran. Pick another folder, or remove it and re-run") from None


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder`` (what a consumer downloads for the weights)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
