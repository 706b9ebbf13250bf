"""Where an export is written: the output-folder rules and the staged write that publishes it whole.

The output is built in ``OUT/.export-partial`` and moved into ``OUT`` only when complete (:func:`staged_output`): a
failed export leaves ``OUT`` as it was (removed again if this export created it), and nothing is ever written into
the input folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from moecompress.errors import UsageError

PARTIAL_NAME = ".export-partial"


def check_output_folder(source: Path, out: Path) -> None:
    """``out`` must not be the input, inside it or contain it, and must be empty or new."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents:
        raise UsageError(f"--out {out} is inside the input folder {source}; export never writes into its input, pick "
                         "another folder")
    if out in source.parents:
        raise UsageError(f"--out {out} contains the input folder {source}; pick a folder beside it")
    if out.exists() and (not out.is_dir() or any(path.name != PARTIAL_NAME for path in out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; pick a new folder or remove it")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield ``OUT/.export-partial`` to write into; on success its files move into ``OUT``. On failure the partial
    folder is removed, and ``OUT`` too if this export created it: nothing is left behind."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_NAME
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        for path in sorted(partial.iterdir()):
            os.replace(path, out / path.name)
        partial.rmdir()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder`` (what a consumer downloads for the weights)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
