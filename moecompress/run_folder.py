"""The output folder of a compress run: where it may be, how it is built, locked and published, and how a run
recognises its own earlier work.

* **Placement.** ``--out`` is never the input folder, inside it or around it, never a file, and never a folder of
  other content (:meth:`RunFolder.check_placement`).
* **Partial folder.** The run is built in ``<out>.partial-<recipe hash>``, locked by :class:`RunLock` while a run
  works there, and moved into place only when complete (:meth:`RunFolder.publish`). Its name is predictable (a
  stopped run must find it again), so it is created with ``mkdir`` and an existing one is used only when it is a
  real folder of this user holding a stopped run (or nothing): a planted link or file is refused, never followed.
* **Identity.** ``state.json`` records what makes a run *this* run (:data:`IDENTITY_KEYS`): a stopped run resumes,
  and a finished run returns its report, only when all three match; another run is an error unless ``overwrite``
  (which never replaces a folder that is not a moecompress run, nor files the run did not write). The source model's
  identity is the sha256 of every byte of its safetensors files (:mod:`moecompress.checkpoint.fingerprint`); the
  per-file hashes are kept in ``state.json`` (``source_files``) and reused while a file's size, times and inode are
  unchanged (:meth:`RunFolder.cached_source_files`).
* **Damage.** A finished run whose files are missing, changed size or have broken safetensors headers is made again
  (:func:`damaged_files`).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from moecompress.checkpoint.validation import validate_checkpoint
from moecompress.errors import CheckpointError, MoECompressError
from moecompress.folders import RunLock as FolderLock
from moecompress.folders import check_output_placement, claim_folder, folder_listing, move_into_place, read_json
from moecompress.logs import RUN_LOG  # the run's log: ours, though it is not among the files a run records

REPORT_FILE = "report.json"
STATE_FILE = "state.json"
LOCK_FILE = ".moecompress.lock"  # in the partial folder while a run works there: the holder's pid, flock-ed
RUN_FORMAT = "moecompress-run/1"  # marks state.json as a moecompress run (only such folders are ever replaced)
# What makes two runs the same run: a stopped or finished run is reused only when all three match.
IDENTITY_KEYS = {"recipe_sha256": "another recipe", "source_fingerprint": "another source model",
                 "calibration_sha256": "other calibration data"}


class RunFolder:
    """The ``--out`` folder of one run (``recipe_sha256`` names its partial folder) and the rules around it."""

    def __init__(self, output_dir: Path, *, recipe_sha256: str, source: str, overwrite: bool) -> None:
        self.output_dir = Path(output_dir)
        self.recipe_sha256 = recipe_sha256
        self.source = source
        self.overwrite = overwrite
        self.lock: RunLock | None = None

    @property
    def partial_dir(self) -> Path:
        return self.output_dir.parent / f"{self.output_dir.name}.partial-{self.recipe_sha256[:12]}"

    def check_placement(self, checkpoint_folder: Path) -> None:
        """``--out`` is not the input, inside it or around it, not a file, and not a folder of other content."""
        check_output_placement(self.output_dir, [("input model folder", checkpoint_folder)], MoECompressError)
        out = self.output_dir
        if _folder_has_content(out) and run_state(out) is None:
            raise MoECompressError(
                f"--out {out} exists and is not a moecompress run folder (it holds {folder_listing(out)}); moecompress "
                "never replaces it, even with --overwrite. Choose another --out, or empty that folder yourself."
            )

    def cached_source_files(self) -> dict[str, dict]:
        """The source files' hashes recorded by a run in ``--out`` or by this run's stopped partial folder (read
        only from a real folder of this user), for :func:`moecompress.checkpoint.fingerprint.source_identity`."""
        cached: dict[str, dict] = {}
        for folder in (self.output_dir, self.partial_dir):
            try:
                info = os.lstat(folder)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                files = (run_state(folder) or {}).get("source_files")
                cached.update(files if isinstance(files, dict) else {})
        return cached

    def finished_state(self, identity: dict[str, str]) -> dict | None:
        """The state of the run in ``--out`` when it may be this run (its recipe and source model match, the
        calibration is compared once loaded); None when ``--out`` is free or ``overwrite`` replaces it."""
        state = run_state(self.output_dir)
        if state is None:
            return None
        differences = identity_differences(state, identity)
        if differences and not self.overwrite:
            raise other_run_error(self.output_dir, "holds a finished moecompress run", differences,
                                  "pass --overwrite to replace it, or choose another --out")
        return None if differences or self.overwrite else state

    def reusable_report(self, state: dict, identity: dict[str, str]) -> dict | None:
        """The report of the finished run in ``--out`` when it is this run and its files are intact, else None
        (a damaged finished run is redone; one with other calibration data is an error)."""
        differences = identity_differences(state, identity)
        if differences:
            raise other_run_error(self.output_dir, "holds a finished moecompress run", differences,
                                  "pass --overwrite to replace it, or choose another --out")
        if not state.get("finished") or damaged_files(self.output_dir, state):
            return None  # not done: the run is made again and replaces it
        return read_json(self.output_dir / REPORT_FILE)

    def check_replaceable(self, state: dict | None) -> None:
        """This run will replace the run in ``--out`` when it finishes: refuse if that folder also holds files the
        run did not write (the user's), which replacing would delete."""
        recorded = (state or {}).get("files")
        if not isinstance(recorded, dict):
            return  # no run there, or one by an older version that did not record its files
        foreign = sorted(set(file_sizes(self.output_dir, exclude={STATE_FILE, LOCK_FILE, RUN_LOG})) - set(recorded))
        if foreign:
            raise MoECompressError(
                f"--out {self.output_dir} holds a moecompress run and files it did not write ({', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}); replacing the run would delete them. Move them elsewhere "
                "first, or choose another --out."
            )

    def open_partial(self, identity: dict[str, str]) -> tuple[dict, bool]:
        """Lock the partial folder and read its state: ``(state, created)``, created when this run made (or emptied)
        the folder. A stopped run of another identity is an error, or with ``overwrite`` its work is discarded. An
        existing partial folder that is a link, a file, another user's, or a folder of files without a run's state
        is refused (:func:`moecompress.folders.claim_folder`): nothing there is followed, written or deleted."""
        partial = self.partial_dir
        created = claim_folder(partial, "the partial folder of this run")
        self.lock = RunLock(partial)
        self.lock.acquire()  # another run working there: refused, and nothing of its work is touched
        try:
            state = run_state(partial)
            leftovers = [path.name for path in partial.iterdir() if path.name != LOCK_FILE]
            if state is None and leftovers:
                raise MoECompressError(
                    f"{partial} holds files but no stopped moecompress run ({', '.join(sorted(leftovers)[:3])}); "
                    "moecompress builds this run there and will not mix it with other files. Move that folder away, "
                    "then re-run."
                )
            created = created or not leftovers  # a run killed before saving anything left only its lock file
            state = state or {}
            differences = identity_differences(state, identity) if state else []
            if differences and not self.overwrite:
                raise other_run_error(partial, "holds a stopped moecompress run", differences,
                                      "pass --overwrite to discard it and start over, or choose another --out")
        except BaseException:
            self.lock.release()
            if created:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if differences:  # --overwrite: the stopped run of another identity is discarded
            empty_folder(partial, keep={LOCK_FILE})
            state, created = {}, True
        if not state:
            state = {"format": RUN_FORMAT, **identity, "source": self.source, "stages": {}, "finished": False}
        return state, created

    def publish(self, output_seen: dict | None) -> None:
        """Move the finished partial folder into ``--out``, unless another run wrote ``--out`` meanwhile (its state
        is no longer ``output_seen``): then this run's result stays in the partial folder, named in the error."""
        partial = self.partial_dir
        if run_state(self.output_dir) != output_seen:
            raise other_run_error(self.output_dir, "was written by another run while this one worked", [],
                                  f"this run's result is kept in {partial}; compare the two, then re-run with "
                                  "--overwrite to publish it")
        move_into_place(partial, self.output_dir)
        (self.output_dir / LOCK_FILE).unlink(missing_ok=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


class RunLock(FolderLock):
    """``LOCK_FILE`` in a run's partial folder (:class:`moecompress.folders.RunLock`): two runs aimed at the same
    ``--out`` cannot write into one folder; the lock of a killed run (a dead pid) is simply taken over."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, LOCK_FILE)


def run_state(folder: Path) -> dict | None:
    """``state.json`` of ``folder`` when it is a moecompress run folder (this version's or an older one's), else None."""
    state = read_json(Path(folder) / STATE_FILE)
    if state is not None and (state.get("format") == RUN_FORMAT or {"recipe_sha256", "stages"} <= set(state)):
        return state
    return None


def identity_differences(state: dict, identity: dict[str, str]) -> list[str]:
    """What makes the run recorded in ``state`` another run than ``identity`` (keys compared where both have them;
    a state without a model fingerprint was made by an older version and can not be confirmed)."""
    if "source_fingerprint" not in state:
        return ["a run by an older moecompress version, which did not record the source model"]
    if "source_files" not in state and "source_fingerprint" in identity:
        return ["a run by an older moecompress version, which identified the source model by samples, not by its "
                "full content"]
    return [label for key, label in IDENTITY_KEYS.items() if key in identity and state.get(key) != identity[key]]


def other_run_error(folder: Path, what: str, differences: list[str], fix: str):
    detail = f" ({', '.join(differences)})" if differences else ""
    return MoECompressError(f"{folder} {what}{detail}; {fix}")


def _folder_has_content(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def empty_folder(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def file_sizes(folder: Path, exclude: set[str]) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``folder`` (what a finished run is checked against)."""
    return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in exclude and not path.name.startswith(".")}


def damaged_files(folder: Path, state: dict) -> list[str]:
    """Files of a finished run that are missing or changed size, or safetensors files with a broken header or index
    (files only: a model whose layers differ after an edit is valid output that plain transformers cannot build)."""
    recorded = state.get("files")
    if not isinstance(recorded, dict) or REPORT_FILE not in recorded:
        return [REPORT_FILE]
    damaged = [name for name, size in recorded.items()
               if not (folder / name).is_file() or (folder / name).stat().st_size != size]
    if not damaged and "config.json" in recorded:
        try:
            validate_checkpoint(folder, weights_vs_config=False)
        except CheckpointError as error:
            damaged.append(str(error))
    return damaged
