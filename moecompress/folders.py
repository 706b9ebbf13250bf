"""Writing files and folders so that a reader never sees half of one, and so that nothing a command did not write
is ever followed, written into or deleted. Used by the run folder, the pipeline, the pattern store, the exports and
the commands.

* Atomic writes: JSON and text through a temp file made with ``O_EXCL`` (``mkstemp``) and one rename.
* Work folders: :func:`new_work_folder` (a random name, created exclusively) for a one-shot build;
  :func:`claim_folder` for a folder whose name must be known in advance (a resumable run): created with ``mkdir``, or
  accepted only when it is a real folder (not a link, not a file) of this user.
* Publishing: :func:`move_into_place` replaces the output by the finished folder in one rename (the old content
  is moved aside under a random name first, removed only after; a link is never deleted through).
* Output rules shared by every command that writes a folder (:func:`check_output_placement`,
  :func:`check_replaceable_output`): never the input, inside it or around it; a non-empty folder is replaced only
  with ``--overwrite``, only when the command itself wrote it, and only when it holds nothing else.
* :class:`RunLock`: an exclusive ``flock`` in a work folder so that two processes never build into the same one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import MoECompressError


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same folder, then ``os.replace`` (a reader never sees a half-written file)."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, default=json_default)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temp file beside it (created exclusively: a planted link is never followed)
    and one rename."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def json_default(value):
    """JSON for what run records hold besides plain types: tensors, sets, tuples, paths."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def move_into_place(partial: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by the finished ``partial`` folder in one rename. Old content is first renamed aside
    (a fresh random name, so nothing planted there is followed) and removed only after the move; a link at
    ``output_dir`` is refused, never deleted through."""
    partial, output_dir = Path(partial), Path(output_dir)
    if output_dir.is_symlink():
        raise MoECompressError(f"{output_dir} is a link; moecompress does not replace a folder through a link. Give "
                               "the real folder's path, or remove the link.")
    if os.path.lexists(output_dir):
        aside = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, aside)  # a folder renamed onto the empty one just made
        os.replace(partial, output_dir)
        shutil.rmtree(aside, ignore_errors=True)  # rmtree never follows the links it finds
    else:
        os.replace(partial, output_dir)


def new_work_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` under a random name starting with ``prefix``, created exclusively (an
    existing path of that name, link or not, is never used), with the permissions a plain ``mkdir`` would give."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes 0700; the published output should look like any other folder
    return folder


def claim_folder(folder: Path, what: str) -> bool:
    """Create ``folder`` (True), or accept an existing one (False) only when it is a real folder of this user: a
    link, a file or another user's folder at a name moecompress chose is refused, never followed or emptied."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)  # the folders of the user's --out (`runs/` on a fresh clone)
    try:
        folder.mkdir()
        return True
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode):
        problem = "is a link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    else:
        return False
    raise MoECompressError(f"{folder} ({what}) {problem}; moecompress never writes through it. Remove it, or choose "
                           "another --out.")


def folder_listing(folder: Path, count: int = 3) -> str:
    """The first ``count`` names in ``folder`` and how many more (for messages)."""
    names = sorted(path.name for path in Path(folder).iterdir())
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def check_output_placement(out: Path, inputs: Iterable[tuple[str, Path]], error: type[MoECompressError]) -> None:
    """``out`` (resolved) is none of the ``(label, path)`` inputs, inside none and around none, and not a file: a
    command never writes into, or replaces, what it reads."""
    out = Path(out)
    for label, path in inputs:
        path = Path(path).expanduser().resolve()
        if out == path or path in out.parents:
            raise error(f"--out {out} is inside the {label} {path}; moecompress never writes into its input. Choose "
                        "an output folder outside it.")
        if out in path.parents:
            raise error(f"--out {out} contains the {label} {path}; replacing it would delete the input. Choose a "
                        "separate folder.")
    blocking = next((path for path in (out, *out.parents) if os.path.lexists(path)), None)
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == out else f"is inside {blocking}, which is a file"
        raise error(f"--out {out} {where}; give the path of a folder")


def check_replaceable_output(out: Path, *, overwrite: bool, owned_files: Callable[[Path], set[str] | None],
                             what: str, error: type[MoECompressError], rule: str | None = None) -> bool:
    """May this command write ``out``? True when ``out`` will be replaced (``overwrite`` and it is this command's
    own earlier output), False when it is new or empty. ``owned_files(out)`` gives the files a previous output of
    this command recorded writing there, or None when ``out`` is not such an output. A folder of other content is
    never replaced, nor one that also holds files the command did not write (replacing would delete them). ``rule``:
    how the message states what may be replaced (default: ``--overwrite``'s rule)."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise error(f"--out {out} exists and is not empty; pass --overwrite to replace the {what} there, or choose "
                    "another folder")
    owned = owned_files(out)
    if owned is None:
        rule = rule or f"--overwrite replaces only a {what} moecompress wrote"
        raise error(f"--out {out} is not a {what} (it holds {folder_listing(out)}); {rule}. Choose another --out, or "
                    "empty that folder yourself.")
    foreign = sorted(str(path.relative_to(out)) for path in out.rglob("*")
                     if not path.is_dir() and str(path.relative_to(out)) not in owned)
    if foreign:
        raise error(f"--out {out} holds a {what} and files it did not write ({', '.join(foreign[:3])}"
                    f"{' ...' if len(foreign) > 3 else ''}); replacing it would delete them. Move them elsewhere "
                    "first, or choose another --out.")
    return True


class RunLock:
    """``name`` in a work folder: an exclusive ``flock`` plus the holder's pid, so that two processes cannot build
    into one folder. The kernel drops the lock when its holder dies, so the lock file of a killed process is simply
    taken over. The file is opened without following a link."""

    def __init__(self, folder: Path, name: str = ".moecompress.lock", *, holder: str = "moecompress run",
                 fix: str = "wait for it to finish or stop it (a stopped run resumes), then re-run") -> None:
        self.path = Path(folder) / name
        self.holder, self.fix = holder, fix
        self._handle = None

    def acquire(self) -> None:
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "unknown"
            handle.close()
            raise MoECompressError(
                f"another {self.holder} ({holder}) is writing {self.path.parent}; {self.fix}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None
