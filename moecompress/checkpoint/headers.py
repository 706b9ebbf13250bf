"""safetensors headers: the one place that reads them.

A safetensors file is an 8-byte little-endian header length, a JSON header (``{key: {"dtype", "shape",
"data_offsets"}}`` plus an optional ``__metadata__``) and the tensor data. The safetensors library reads the header
too, but it reports a truncated file or a tensor that overruns the data as one opaque error; reading the header here
lets every command say which file is damaged and how (:func:`read_safetensors_header`), and gives the offsets and
raw header bytes that sizes and fingerprints need, without reading any tensor data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from moecompress.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
# Bytes per element of each safetensors dtype name.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
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
                    malformed = [name for name, entry in entries.items() if not _is_tensor_entry(entry)]
                    data_size = file_size - 8 - header_length
                    ends = [entry["data_offsets"][1] for name, entry in entries.items() if name not in malformed]
                    if not isinstance(header, dict) or malformed:
                        problem = f"its header has malformed entries ({first_names(malformed) or 'not a mapping'})"
                    elif ends and max(ends) > data_size:
                        problem = f"it is truncated ({data_size} data bytes, tensors need {max(ends)})"
    if problem is not None:
        raise CheckpointError(f"{path} is corrupt: {problem}. Re-download or re-save this checkpoint file.")
    return entries


def _is_tensor_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and all(isinstance(size, int) for size in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2)


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
            count = 1
            for size in entry["shape"]:
                count *= int(size)
            dtype = entry["dtype"]
            by_dtype[dtype] = by_dtype.get(dtype, 0) + count * SAFETENSORS_DTYPE_BYTES[dtype]
            values += count
    return {"total": sum(by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items())), "parameters": values}


def first_names(names, count: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:count]) + (f", ... {len(names) - count} more" if len(names) > count else "")
