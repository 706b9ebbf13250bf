"""safetensors headers: the one place that reads them.

A safetensors file is an 8-byte little-endian header length, a JSON header (``{key: {"dtype", "shape",
"data_offsets"}}`` plus an optional ``__metadata__``) and the tensor data. The safetensors library reads the header
too, but it reports a truncated file or a tensor that overruns the data as one opaque error; reading the header here
lets every command say which file is damaged and how (:func:`read_safetensors_header`), and gives the offsets and
raw header bytes that sizes and fingerprints need, without reading any tensor data.

Checked as the library's own rules require, so that a file accepted here is never refused later with a traceback:
known dtypes; offsets that are whole numbers, not negative, and lay the tensors end to end from the start of the
data to its end (no overlap, no gap, no trailing bytes); each tensor's byte size equal to its shape times its dtype's
size (a header whose dtype lies about the data is refused).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from moecompress.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
# Bytes per element of each safetensors dtype name.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
# Sub-byte dtypes the library knows (their sizes are packed, not checked here).
SUBBYTE_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")
MAX_HEADER_BYTES = 100_000_000


def read_header_bytes(handle) -> bytes:
    """The raw JSON header of the open safetensors file ``handle`` (positioned at its start), unchecked."""
    (header_length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(header_length)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """``{key: {"dtype", "shape", "data_offsets"}}`` of one safetensors file; :class:`CheckpointError` when the file
    is too short, its header length or JSON is broken, an entry is malformed, or its tensors overrun the file."""
    file_size = path.stat().st_size
    problem, entries = None, {}
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            problem = "the file is shorter than a safetensors header"
        else:
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > file_size - 8 or header_length > MAX_HEADER_BYTES:
                problem = "its header length field is larger than the file"
            else:
                try:
                    header = json.loads(handle.read(header_length))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problem = "its header is not valid JSON"
                else:
                    entries = header if isinstance(header, dict) else {}
                    entries = {name: entry for name, entry in entries.items() if name != "__metadata__"}
                    malformed = [_short(name) for name, entry in entries.items() if not _is_tensor_entry(entry)]
                    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
                    if not isinstance(header, dict) or malformed:
                        problem = (f"its header has malformed entries ({first_names(malformed) or 'not a mapping'}): each "
                                   "needs a dtype, a shape and two data_offsets, whole numbers >= 0")
                    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                        problem = "its header's __metadata__ is not a mapping of strings"
                    else:
                        problem = _layout_problem(entries, file_size - 8 - header_length)
    if problem is not None:
        raise CheckpointError(f"{path} is corrupt: {problem}. Re-download or re-save this checkpoint file.")
    return entries


def _is_tensor_entry(entry) -> bool:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
            and all(_is_count(size) for size in entry["shape"])
            and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(offset) for offset in offsets))


def _short(name: str, limit: int = 120) -> str:
    """A tensor name for a message (a crafted header may hold megabyte-long names)."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _layout_problem(entries: dict[str, dict], data_size: int) -> str | None:
    """What is wrong with where the header puts the tensors (None when nothing): unknown dtypes, a byte size other
    than shape x dtype, overlaps, gaps, data past the end, or bytes after the last tensor."""
    unknown = [name for name, entry in entries.items()
               if entry["dtype"] not in SAFETENSORS_DTYPE_BYTES and entry["dtype"] not in SUBBYTE_DTYPES]
    if unknown:
        return f"tensor {_short(unknown[0])} has an unknown dtype {entries[unknown[0]]['dtype']!r:.20}"
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        if end < begin:
            return f"tensor {_short(name)} ends before it starts (data_offsets {[begin, end]})"
        bytes_per_value = SAFETENSORS_DTYPE_BYTES.get(entry["dtype"])
        if bytes_per_value is not None and end - begin != math.prod(entry["shape"]) * bytes_per_value:
            return (f"its header says tensor {_short(name)} is {entry['dtype']} {entry['shape']} "
                    f"({math.prod(entry['shape']) * bytes_per_value} bytes) but gives it {end - begin} bytes")
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if end > data_size:
            return f"it is truncated ({data_size} data bytes, tensors need {end})"
        if begin != position:
            return (f"tensor {_short(name)} {'overlaps the one before it' if begin < position else 'leaves a gap before it'} "
                    f"(data_offsets {[begin, end]}, previous tensor ends at {position})")
        position = end
    if position != data_size:
        return f"it has {data_size - position} bytes after its last tensor"
    return None


def header_tensor_bytes(path: Path) -> int:
    """Sum of the tensors' data sizes of one safetensors file, from its header (no tensor read)."""
    return sum(entry["data_offsets"][1] - entry["data_offsets"][0]
               for entry in read_safetensors_header(Path(path)).values())


def read_weight_map(folder: Path) -> dict[str, str]:
    """``{key on disk: safetensors file name}``: the index's map when the folder has one, else every file's keys."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    return {key: path.name for path in sorted(folder.glob("*.safetensors")) for key in read_safetensors_header(path)}


def checkpoint_bytes(folder: str | Path) -> dict:
    """Bytes the tensors of the safetensors files in ``folder`` take on disk, from their headers (no data read).

    Returns ``{"total": bytes, "by_dtype": {"BF16": bytes, "F32": bytes, ...}, "parameters": values}`` (the
    headers' own dtypes, which may differ from the dtypes a loaded model holds; see
    :func:`moecompress.models.summary.model_summary`).
    """
    by_dtype: dict[str, int] = {}
    values = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        for entry in read_safetensors_header(path).values():
            count = math.prod(entry["shape"])
            dtype = entry["dtype"]
            by_dtype[dtype] = by_dtype.get(dtype, 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
            values += count
    return {"total": sum(by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items())), "parameters": values}


def first_names(names, count: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:count]) + (f", ... {len(names) - count} more" if len(names) > count else "")
