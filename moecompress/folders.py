"""Writing files and folders so that a reader never sees half of one: atomic JSON and text writes, and the move
that publishes a finished folder. Used by the run folder, the pipeline, the pattern store and the commands."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


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
    """``text`` into ``path`` through a temp file beside it and one rename."""
    path = Path(path)
    temp = path.parent / f".{path.name}.tmp"
    temp.write_text(text)
    os.replace(temp, path)


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
    """Replace ``output_dir`` by the finished ``partial`` folder (old content is removed only after the move)."""
    if output_dir.exists():
        aside = output_dir.parent / f"{output_dir.name}.old-{os.getpid()}"
        os.replace(output_dir, aside)
        os.replace(partial, output_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(partial, output_dir)
